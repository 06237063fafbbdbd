"""``golem-dask hub``: the market server of a private fleet.

Providers connect and publish offers (which expire unless refreshed); requestors connect
and subscribe demands.  The hub matches offers to demands both ways and forwards every
other message (a requestor's calls on a provider agent, the provider's replies, activity
states, debit notes, invoices) between the two parties unchanged.  Every frame is an
:class:`~golem_dask.protocol.wire.Envelope` signed by its author's Ethereum key: the hub
checks signatures so that nobody can speak for another address, and the receiving party
checks them again, so the hub cannot forge what it forwards.  It holds no money and no
secrets (its own key is made at start and only signs its notices).

Bad input never takes the hub down: a malformed or oversized frame, a bad signature, a
replayed message or a flood from one peer gets that peer an error or a disconnect, and
every other peer keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from golem_dask import config
from golem_dask.errors import MarketError, ProtocolError
from golem_dask.market.matching import matches
from golem_dask.protocol import wire
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import Demand, Offer

logger = logging.getLogger(__name__)


class TokenBucket:
    """At most ``rate`` messages a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(slots=True)
class _Peer:
    address: str
    role: str
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, data: bytes) -> None:
        async with self.lock:
            self.writer.write(data)
            await self.writer.drain()


@dataclass(slots=True)
class _StoredOffer:
    offer: Offer
    frame: bytes  # the provider's own signed publish envelope, forwarded as is
    provider: str
    received: float


class HubServer:
    """The market server.

    Parameters
    ----------
    host, port:
        Where to listen (port 0 picks a free one; see :attr:`url`).

    Examples
    --------
    >>> import asyncio
    >>> async def main():
    ...     hub = HubServer("127.0.0.1", 0)
    ...     await hub.start()
    ...     print(hub.url.startswith("tcp://127.0.0.1:"))
    ...     await hub.close()
    >>> asyncio.run(main())
    True
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._wallet = Wallet.generate()  # signs the hub's own notices; holds nothing
        self.max_frame = int(config.byte_size(config.get("hub.max-frame"), "golem.hub.max-frame"))
        self.offer_ttl_s = config.seconds("hub.offer-ttl")
        self.rate = float(config.get("hub.messages-per-second"))
        self.replay = wire.ReplayGuard(int(config.seconds("hub.replay-window") * 1000))
        self._peers: dict[str, _Peer] = {}
        self._offers: dict[str, _StoredOffer] = {}
        self._subs: dict[tuple[str, str], Demand] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = {"frames": 0, "refused": 0, "disconnected": 0}

    @property
    def address(self) -> str:
        return self._wallet.address

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=self.max_frame + 16)
        self.port = self._server.sockets[0].getsockname()[1]
        task = asyncio.create_task(self._expire_offers(), name="hub-expiry")
        self._tasks.add(task)
        logger.info("hub listening on %s", self.url)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            for peer in list(self._peers.values()):
                peer.writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    def _notice(self, kind: str, payload: Any) -> bytes:
        return wire.frame(wire.seal(self._wallet, kind, payload))

    async def _expire_offers(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.offer_ttl_s / 4))
            cutoff = time.monotonic() - self.offer_ttl_s
            for offer_id in [k for k, v in self._offers.items() if v.received < cutoff]:
                await self._withdraw(offer_id)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer: _Peer | None = None
        bucket = TokenBucket(self.rate, self.rate * 2)
        try:
            while True:
                try:
                    envelope = await wire.read_frame(reader, self.max_frame)
                    payload = wire.verify(envelope)
                    self.replay.check(envelope)
                except ProtocolError as e:
                    # Someone who cannot frame or sign is not worth a second chance.
                    self.stats["refused"] += 1
                    with contextlib.suppress(Exception):
                        writer.write(self._notice("error", {"ref": None, "reason": str(e)}))
                        await writer.drain()
                    return
                self.stats["frames"] += 1
                if not bucket.take():
                    self.stats["refused"] += 1
                    writer.write(self._notice("error", {"ref": None, "reason": "too many messages; slow down"}))
                    return
                if peer is None:
                    if envelope.kind != "hello" or not isinstance(payload, dict) or payload.get("role") not in (
                            "provider", "requestor"):
                        writer.write(self._notice("error", {"ref": None, "reason": "say hello first"}))
                        return
                    old = self._peers.get(envelope.sender)
                    if old is not None:
                        old.writer.close()  # a reconnecting peer replaces its old link
                    peer = self._peers[envelope.sender] = _Peer(envelope.sender, payload["role"], writer)
                    await peer.send(self._notice("welcome", {"hub": self.address}))
                    continue
                try:
                    await self._handle(peer, envelope, payload)
                except (ProtocolError, MarketError, TypeError, ValueError, KeyError) as e:
                    self.stats["refused"] += 1
                    await peer.send(self._notice("error", {"ref": envelope.nonce, "reason": str(e)}))
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self.stats["disconnected"] += 1
            if peer is not None and self._peers.get(peer.address) is peer:
                del self._peers[peer.address]
                await self._forget(peer)
            writer.close()

    async def _forget(self, peer: _Peer) -> None:
        if peer.role == "provider":
            # Its requestors must know: a provider that is gone sends no activity event.
            notice = self._notice("event", {"gone": peer.address})
            for other in list(self._peers.values()):
                if other.role == "requestor":
                    await self._to(other.address, notice)
            for offer_id in [k for k, v in self._offers.items() if v.provider == peer.address]:
                await self._withdraw(offer_id)
        for key in [k for k in self._subs if k[0] == peer.address]:
            del self._subs[key]

    async def _handle(self, peer: _Peer, envelope: wire.Envelope, payload: Any) -> None:
        kind = envelope.kind
        if kind == "publish":
            if peer.role != "provider" or not isinstance(payload, Offer) or payload.provider_id != peer.address:
                raise ProtocolError("only a provider may publish, and only its own offers")
            stored = _StoredOffer(payload, wire.frame(envelope), peer.address, time.monotonic())
            fresh = payload.id not in self._offers
            self._offers[payload.id] = stored
            if fresh:
                for (requestor, sub_id), demand in list(self._subs.items()):
                    if matches(demand, payload):
                        await self._to(requestor, self._notice("event", {"sub": sub_id, "offer": stored.frame}))
        elif kind == "withdraw":
            known = self._offers.get(str(payload.get("offer_id")))
            if known is not None and known.provider == peer.address:
                await self._withdraw(known.offer.id)
        elif kind == "subscribe":
            demand, sub_id = payload["demand"], str(payload["sub"])
            if not isinstance(demand, Demand):
                raise ProtocolError("subscribe needs a Demand")
            self._subs[(peer.address, sub_id)] = demand
            # Matching offers go out in as few notices as fit in a frame: the hub signs
            # each notice, and a thousand signatures would cost more than the matching.
            batch: list[bytes] = []
            size = 0
            for stored in list(self._offers.values()):
                if matches(demand, stored.offer):
                    if batch and size + len(stored.frame) > self.max_frame // 2:
                        await peer.send(self._notice("event", {"sub": sub_id, "offers": batch}))
                        batch, size = [], 0
                    batch.append(stored.frame)
                    size += len(stored.frame) + 8
            if batch:
                await peer.send(self._notice("event", {"sub": sub_id, "offers": batch}))
        elif kind == "unsubscribe":
            self._subs.pop((peer.address, str(payload["sub"])), None)
        elif kind == "scan":
            frames = [s.frame for s in self._offers.values()]
            await peer.send(self._notice("scan_result", {"ref": payload["ref"], "offers": frames}))
        elif kind in ("call", "reply", "push"):
            target = str(payload["to"])
            if not await self._to(target, wire.frame(envelope)) and kind == "call":
                await peer.send(self._notice("error", {"ref": payload.get("call_id"),
                                                       "reason": f"provider {target} is not connected"}))
        elif kind == "ping":
            await peer.send(self._notice("pong", {}))
        else:
            raise ProtocolError(f"unknown message kind {kind!r}")

    async def _to(self, address: str, data: bytes) -> bool:
        peer = self._peers.get(address)
        if peer is None:
            return False
        try:
            await peer.send(data)
        except (ConnectionError, OSError):
            return False
        return True

    async def _withdraw(self, offer_id: str) -> None:
        stored = self._offers.pop(offer_id, None)
        if stored is None:
            return
        for (requestor, sub_id), demand in list(self._subs.items()):
            if matches(demand, stored.offer):
                await self._to(requestor, self._notice("event", {"sub": sub_id, "withdrawn": offer_id}))
