"""The signed TCP link to a hub that requestors and providers both use.

Every frame on it is an :class:`~golem_dask.protocol.wire.Envelope` signed with the
sender's key; :class:`HubLink` says hello, reads and verifies frames (refusing replays),
hands each to its owner and reconnects, with back-off, when the hub goes away.  Pushes
that came for it while it was away arrive in a hub-signed ``stored`` notice holding their
senders' own frames: each is verified and handed over like a live push, once per process,
and acknowledged so that the hub forgets it.  This
module also fixes the calls a requestor may make on a provider agent through the hub
(:data:`PROVIDER_METHODS`) and the errors a reply may carry back (:data:`REMOTE_ERRORS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError, GolemDaskError, MarketError, NetworkError, ProposalRejected, ProtocolError
from golem_dask.protocol import wire

logger = logging.getLogger(__name__)

#: The provider agent methods a requestor may call, and nothing else.
PROVIDER_METHODS = frozenset({
    "on_proposal", "approve", "terminate", "create_activity", "exec", "destroy_activity",
    "on_accepted", "on_rejected", "on_payment",
})

#: Exceptions a provider's reply may carry back, by name.
REMOTE_ERRORS: dict[str, type[GolemDaskError]] = {
    "ProposalRejected": ProposalRejected,
    "ActivityError": ActivityError,
    "MarketError": MarketError,
}


# (receiver, sender, nonce) of the stored pushes handed over in this process: the hub
# delivers a stored push again until it is acknowledged, and a stored push is older than
# the replay window, so the window cannot refuse the second copy.
_stored_seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()


def _first_sight(receiver: str, envelope: wire.Envelope) -> bool:
    """Remember a stored push; False if it was handed over before in this process."""
    key = (receiver, envelope.sender, envelope.nonce)
    if key in _stored_seen:
        return False
    _stored_seen[key] = None
    while len(_stored_seen) > max(10_000, 4 * int(config.get("hub.offline-max-messages"))):
        _stored_seen.popitem(last=False)
    return True


def parse_url(url: str) -> tuple[str, int]:
    """``tcp://host:port`` as (host, port).

    Examples
    --------
    >>> parse_url("tcp://127.0.0.1:7465")
    ('127.0.0.1', 7465)
    """
    if not url.startswith("tcp://") or ":" not in url[6:]:
        raise MarketError(f"hub address {url!r} must look like tcp://HOST:PORT")
    host, _, port = url[6:].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError as e:
        raise MarketError(f"hub address {url!r} has no valid port") from e


class HubLink:
    """A signed, self-reconnecting connection to a hub, for providers and requestors.

    ``on_message(envelope, payload)`` gets every verified frame; ``on_connect()`` runs
    after each (re)connection, to re-publish or re-subscribe.
    """

    def __init__(self, url: str, wallet: Any, role: str, on_message: Any, on_connect: Any = None) -> None:
        self.url = url
        self.host, self.port = parse_url(url)
        self.wallet = wallet
        self.role = role
        self._on_message = on_message
        self._on_connect = on_connect
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = asyncio.Lock()
        self.replay = wire.ReplayGuard(int(config.seconds("hub.replay-window") * 1000))
        self.max_frame = int(config.byte_size(config.get("hub.max-frame"), "golem.hub.max-frame"))
        self.hub_address: str | None = None

    async def start(self, timeout_s: float) -> None:
        self._task = asyncio.create_task(self._run(), name=f"hub-link-{self.role}")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError as e:
            raise NetworkError(f"no hub answers at {self.url} within {timeout_s:g}s; start one with "
                               "'golem-dask hub' or check the address") from e

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def send(self, kind: str, payload: Any) -> None:
        if self._writer is None or not self._connected.is_set():
            raise NetworkError(f"not connected to the hub at {self.url}")
        data = wire.frame(wire.seal(self.wallet, kind, payload))
        async with self._lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                raise NetworkError(f"lost the hub at {self.url}: {e}") from e

    async def _run(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=self.max_frame + 16)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, config.seconds("hub.reconnect-max-delay"))
                continue
            self._writer = writer
            try:
                writer.write(wire.frame(wire.seal(self.wallet, "hello", {"role": self.role})))
                await writer.drain()
                welcome = await wire.read_frame(reader, self.max_frame)
                payload = wire.verify(welcome)
                if welcome.kind != "welcome":
                    raise ProtocolError(f"hub said {welcome.kind}: {payload}")
                self.hub_address = welcome.sender
                self._connected.set()
                delay = 0.1
                if self._on_connect is not None:
                    await self._on_connect()
                while True:
                    envelope = await wire.read_frame(reader, self.max_frame)
                    payload = wire.verify(envelope)
                    self.replay.check(envelope)
                    if envelope.kind == "stored" and envelope.sender == self.hub_address:
                        await self._stored(payload)
                        continue
                    try:
                        await self._on_message(envelope, payload)
                    except Exception:
                        logger.exception("handling %s from %s failed", envelope.kind, envelope.sender)
            except (ConnectionError, OSError, asyncio.IncompleteReadError, ProtocolError) as e:
                logger.info("hub link %s lost: %s; reconnecting", self.url, e)
            finally:
                self._connected.clear()
                writer.close()
                self._writer = None
            await asyncio.sleep(delay)

    async def _stored(self, payload: Any) -> None:
        """Hand over the pushes the hub kept while we were away, then acknowledge them."""
        frames = payload.get("frames") if isinstance(payload, dict) else None
        ids = payload.get("ids") if isinstance(payload, dict) else None
        for data in frames if isinstance(frames, list) else []:
            try:
                envelope = wire.unframe(data, self.max_frame)
                inner = wire.verify(envelope)  # its sender's signature; not its age
            except ProtocolError as e:
                logger.warning("dropping a stored message the hub delivered: %s", e)
                continue
            if envelope.kind != "push" or not isinstance(inner, dict) or inner.get("to") != self.wallet.address:
                logger.warning("dropping a stored %s from %s: not a push to us", envelope.kind, envelope.sender)
                continue
            if not _first_sight(self.wallet.address, envelope):
                continue
            try:
                await self._on_message(envelope, inner)
            except Exception:
                logger.exception("handling a stored push from %s failed", envelope.sender)
        if isinstance(ids, list) and ids:
            with contextlib.suppress(NetworkError):
                await self.send("stored_ack", {"ids": ids})
