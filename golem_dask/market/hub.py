"""The market on the network: a hub server, and the requestor's client for it.

``golem-dask hub`` runs :class:`HubServer`.  Providers connect and publish offers (which
expire unless refreshed); requestors connect and subscribe demands.  The hub matches
offers to demands both ways and forwards every other message (a requestor's calls on a
provider agent, the provider's replies, activity states, debit notes, invoices) between
the two parties unchanged.  Every frame is an :class:`~golem_dask.protocol.wire.Envelope`
signed by its author's Ethereum key: the hub checks signatures so that nobody can speak
for another address, and the receiving party checks them again, so the hub cannot forge
what it forwards.  It holds no money and no secrets (its own key is made at start and
only signs its notices).

Bad input never takes the hub down: a malformed or oversized frame, a bad signature, a
replayed message or a flood from one peer gets that peer an error or a disconnect, and
every other peer keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from golem_dask import config
from golem_dask.errors import (
    ActivityError,
    GolemDaskError,
    MarketError,
    NetworkError,
    ProposalRejected,
    ProtocolError,
)
from golem_dask.market.base import MarketEvent, OfferReceived, OfferWithdrawn
from golem_dask.market.local import matches, offer_proposal
from golem_dask.market.relay import FINAL_STATES, PROVIDER_METHODS, RelayMarket, drain
from golem_dask.protocol import wire
from golem_dask.protocol.messages import Activity, ActivityState, DebitNote, Demand, Invoice, Offer, new_id

logger = logging.getLogger(__name__)

#: Exceptions a provider's reply may carry back, by name.
REMOTE_ERRORS: dict[str, type[GolemDaskError]] = {
    "ProposalRejected": ProposalRejected,
    "ActivityError": ActivityError,
    "MarketError": MarketError,
}


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
        from golem_dask.protocol.identity import Wallet

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


class HubMarket(RelayMarket):
    """The requestor's side of a hub: ``GolemCluster(market="tcp://HOST:PORT")``.

    Parameters
    ----------
    url:
        ``tcp://HOST:PORT`` of a ``golem-dask hub``.
    wallet:
        The requestor's wallet: it signs every message (the requestor's identity is its
        payment address).
    """

    collection_window_s = 0.3

    def __init__(self, url: str, wallet: Any) -> None:
        super().__init__()
        self.url = url
        self.link = HubLink(url, wallet, "requestor", self._on_message, self._on_connect)
        self._subs: dict[str, tuple[Demand, asyncio.Queue[MarketEvent | None]]] = {}
        self._sent_offers: dict[str, set[str]] = {}
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._call_timeout_s = config.seconds("hub.call-timeout")

    def __repr__(self) -> str:
        return f"<HubMarket {self.url} connected={self.link.connected}>"

    async def start(self) -> None:
        await self.link.start(config.seconds("hub.connect-timeout"))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.link.close()
        for _, queue in self._subs.values():
            queue.put_nowait(None)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(NetworkError("market closed"))
        self._end_streams()

    async def _on_connect(self) -> None:
        # After a hub restart: subscribe again; the hub resends matching offers.
        for sub_id, (demand, _) in self._subs.items():
            await self.link.send("subscribe", {"sub": sub_id, "demand": demand})

    async def _on_message(self, envelope: wire.Envelope, payload: Any) -> None:
        kind = envelope.kind
        if kind == "event" and envelope.sender == self.link.hub_address:
            self._on_event(payload)
        elif kind in ("scan_result", "error") and envelope.sender == self.link.hub_address:
            fut = self._waiting.pop(str(payload.get("ref")), None)
            if fut is not None and not fut.done():
                if kind == "error":
                    fut.set_exception(MarketError(f"hub: {payload.get('reason')}"))
                else:
                    fut.set_result(payload["offers"])
            elif kind == "error":
                logger.warning("hub error: %s", payload.get("reason"))
        elif kind == "reply":
            fut = self._waiting.get(str(payload.get("call_id")))
            expected = getattr(fut, "provider", None) if fut is not None else None
            if fut is None or envelope.sender != expected:
                return  # not ours, or not from the provider we called: ignore
            del self._waiting[str(payload["call_id"])]
            if payload.get("ok"):
                fut.set_result(payload.get("value"))
            else:
                error = REMOTE_ERRORS.get(str(payload.get("error_type")), MarketError)
                fut.set_exception(error(f"provider {envelope.sender}: {payload.get('error')}"))
        elif kind == "push":
            message = payload.get("message")
            if isinstance(message, Activity | DebitNote | Invoice) and self._from_its_provider(envelope.sender, message):
                self._deliver(message)

    def _from_its_provider(self, sender: str, message: Activity | DebitNote | Invoice) -> bool:
        agreement = self._agreements.get(message.agreement_id)
        return agreement is not None and agreement.provider_id == sender

    def _offer_from_frame(self, data: bytes) -> Offer | None:
        try:
            envelope = wire.unframe(data, self.link.max_frame)
            offer = wire.verify(envelope)
        except ProtocolError as e:
            logger.warning("dropping an offer the hub forwarded: %s", e)
            return None
        if not isinstance(offer, Offer) or offer.provider_id != envelope.sender:
            logger.warning("dropping an offer not signed by its provider")
            return None
        return offer

    def _on_event(self, payload: dict[str, Any]) -> None:
        if "gone" in payload:
            gone = str(payload["gone"])
            for activity_id, provider in list(self._activity_provider.items()):
                history = self._activity_history.get(activity_id, [])
                if provider == gone and not any(h.state in FINAL_STATES for h in history):
                    self._deliver(Activity(activity_id, self._activity_agreement[activity_id], ActivityState.FAILED,
                                           f"provider {gone} disconnected from the hub"))
            return
        sub = self._subs.get(str(payload.get("sub")))
        if sub is None:
            return
        demand, queue = sub
        sent = self._sent_offers.setdefault(str(payload["sub"]), set())
        if "withdrawn" in payload:
            offer_id = str(payload["withdrawn"])
            if offer_id in sent:
                sent.discard(offer_id)
                queue.put_nowait(OfferWithdrawn(offer_id))
            return
        frames = payload["offers"] if "offers" in payload else [payload["offer"]]
        for data in frames if isinstance(frames, list) else []:
            offer = self._offer_from_frame(data)
            if offer is None or offer.id in sent or not matches(demand, offer):
                continue
            sent.add(offer.id)
            proposal = offer_proposal(offer, demand)
            self._remember_offer_proposal(proposal)
            queue.put_nowait(OfferReceived(proposal))

    async def _request(self, ref: str, kind: str, payload: Any, timeout_s: float, provider: str | None = None) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.provider = provider  # type: ignore[attr-defined]
        self._waiting[ref] = fut
        try:
            await self.link.send(kind, payload)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiting.pop(ref, None)

    async def _call(self, provider_id: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        self._check_open()
        if method not in PROVIDER_METHODS:
            raise MarketError(f"{method!r} is not a provider call")
        call_id = new_id()
        payload = {"to": provider_id, "call_id": call_id, "method": method, "args": list(args)}
        timeout = timeout_s if timeout_s is not None else self._call_timeout_s
        try:
            return await self._request(call_id, "call", payload, timeout, provider=provider_id)
        except asyncio.TimeoutError as e:
            if method == "approve":
                raise ProposalRejected(f"provider {provider_id} did not approve within {timeout:g}s") from e
            raise NetworkError(f"provider {provider_id} did not answer {method} within {timeout:g}s") from e

    async def subscribe(self, demand: Demand) -> str:
        self._check_open()
        sub_id = new_id()
        self._subs[sub_id] = (demand, asyncio.Queue())
        await self.link.send("subscribe", {"sub": sub_id, "demand": demand})
        return sub_id

    async def unsubscribe(self, subscription_id: str) -> None:
        sub = self._subs.pop(subscription_id, None)
        if sub is not None:
            sub[1].put_nowait(None)
            with contextlib.suppress(NetworkError):
                await self.link.send("unsubscribe", {"sub": subscription_id})

    def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise MarketError(f"no subscription {subscription_id}")
        return drain(sub[1])

    async def scan(self) -> list[Offer]:
        ref = new_id()
        frames = await self._request(ref, "scan", {"ref": ref}, self._call_timeout_s)
        return [o for o in (self._offer_from_frame(f) for f in frames) if o is not None]

