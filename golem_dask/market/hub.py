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
every other peer keeps working.  Every resource a stranger can make the hub spend has a
limit in ``golem.hub.*``: connections in total and per remote address, a deadline for the
hello, replay state per sender, subscriptions per peer, bytes waiting for a peer that does
not read (and a deadline for it to read them), and the offline store.  A push for a peer
that is away is kept on disk (:class:`~golem_dask.market.offline.OfflineStore`) and handed
over, in a hub-signed ``stored`` notice, when that peer says hello again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from golem_dask import config
from golem_dask.errors import MarketError, ProtocolError
from golem_dask.market.matching import matches
from golem_dask.market.offline import OfflineStore
from golem_dask.protocol import wire
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import Demand, Offer, now_ms
from golem_dask.tasks import Tasks

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


class ConnectionLimits:
    """Open connections, at most ``max_total`` in all and ``max_per_ip`` from one address.

    Examples
    --------
    >>> limits = ConnectionLimits(max_total=3, max_per_ip=2)
    >>> limits.admit("10.0.0.1"), limits.admit("10.0.0.1")
    (None, None)
    >>> limits.admit("10.0.0.1")
    'too many connections from 10.0.0.1 (golem.hub.max-connections-per-ip=2)'
    >>> limits.release("10.0.0.1"); limits.admit("10.0.0.1") is None
    True
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.per_ip: Counter[str] = Counter()
        self.total = 0

    def admit(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; ``None`` if admitted, else why not."""
        if self.total >= self.max_total:
            return f"the hub has too many connections (golem.hub.max-connections={self.max_total}); try again later"
        if self.per_ip[ip] >= self.max_per_ip:
            return f"too many connections from {ip} (golem.hub.max-connections-per-ip={self.max_per_ip})"
        self.per_ip[ip] += 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class SenderGuards:
    """Replay state per sender: a flood of one sender's messages fills only its own guard.

    Each sender with an open connection has a :class:`~golem_dask.protocol.wire.ReplayGuard`
    of at most ``per_sender`` nonces (senders are bounded by connections).  When its last
    connection closes the guard goes, and only the stamp of its latest hello stays (for at
    most the window, at most ``max_senders`` of them): a new hello must be stamped later,
    so an old hello cannot be replayed to open a connection in its name, and every other
    frame is only accepted on a connection opened by its sender's hello.

    Examples
    --------
    >>> alice = Wallet.from_key("11" * 32)
    >>> guards = SenderGuards(window_ms=60_000, per_sender=2, max_senders=100)
    >>> hello = wire.seal(alice, "hello", {"role": "requestor"})
    >>> guards.hello(hello); guards.check(wire.seal(alice, "ping", {}))
    >>> guards.check(wire.seal(alice, "ping", {}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: 2 messages within 60000 ms are too many to check for replays; slow down
    >>> guards.release(alice.address); guards.hello(hello)  # gone, and its hello is not replayable
    Traceback (most recent call last):
    ...
    golem_dask.errors.ProtocolError: replayed message refused: a hello stamped no later than this sender's last one
    """

    def __init__(self, window_ms: int, per_sender: int, max_senders: int) -> None:
        self.window_ms, self.per_sender, self.max_senders = window_ms, per_sender, max_senders
        self._guards: dict[str, tuple[wire.ReplayGuard, int]] = {}  # guard, open connections
        self._hellos: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        """Nonces remembered in all guards together."""
        return sum(len(guard) for guard, _ in self._guards.values())

    def hello(self, envelope: wire.Envelope) -> None:
        """Admit a verified hello (and count one more connection of its sender)."""
        sender = envelope.sender
        last = self._hellos.get(sender)
        if last is not None and envelope.timestamp_ms <= last:
            raise ProtocolError("replayed message refused: a hello stamped no later than this sender's last one")
        guard, connections = self._guards.get(sender) or (wire.ReplayGuard(self.window_ms, self.per_sender), 0)
        guard.check(envelope)
        self._guards[sender] = (guard, connections + 1)
        self._hellos[sender] = envelope.timestamp_ms
        self._hellos.move_to_end(sender)
        while len(self._hellos) > self.max_senders:
            self._hellos.popitem(last=False)

    def check(self, envelope: wire.Envelope) -> None:
        """Refuse a replay of a verified frame from a sender that said hello."""
        self._guards[envelope.sender][0].check(envelope)

    def release(self, sender: str) -> None:
        """One connection of ``sender`` closed."""
        guard, connections = self._guards[sender]
        if connections <= 1:
            del self._guards[sender]
        else:
            self._guards[sender] = (guard, connections - 1)

    def prune(self, now: int | None = None) -> None:
        """Forget hello stamps the window refuses anyway."""
        cutoff = (now_ms() if now is None else now) - self.window_ms
        for sender in [s for s, stamp in self._hellos.items() if stamp < cutoff]:
            del self._hellos[sender]


class _Peer:
    """One connection, and the frames waiting to be written to it by its own task.

    Nothing the hub does waits on a peer's reading except that peer's own requests: other
    peers' traffic is queued (:meth:`send_nowait`), and a peer that lets more than
    ``max_queued`` bytes pile up, or takes no bytes for ``write_timeout_s``, is
    disconnected.
    """

    def __init__(self, writer: asyncio.StreamWriter, ip: str, write_timeout_s: float, max_queued: int,
                 on_closed: Callable[[_Peer], None]) -> None:
        self.writer, self.ip = writer, ip
        self.write_timeout_s, self.max_queued = write_timeout_s, max_queued
        self.address: str | None = None  # once welcomed
        self.role: str | None = None
        self.sender: str | None = None  # whose hello its replay guard counted
        self.slow = False
        self.closed = False
        self._on_closed = on_closed
        self._queue: list[bytes] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._finishing = False
        self.task = asyncio.create_task(self._pump(), name=f"hub-peer-{ip}")

    def send_nowait(self, data: bytes) -> bool:
        """Queue ``data``; False (and the peer disconnected, if it is slow) if it cannot be."""
        if self.closed or self._finishing:
            return False
        if self._queue and self._queued + len(data) > self.max_queued:
            logger.info("disconnecting %s: %d bytes wait for it (golem.hub.send-queue)", self.address or self.ip,
                        self._queued)
            self.abort(slow=True)
            return False
        self._queue.append(data)
        self._queued += len(data)
        if self._queued >= self.max_queued:
            self._room.clear()
        self._wake.set()
        return True

    async def send(self, data: bytes) -> None:
        """Queue an answer to the peer's own request, waiting (bounded) while its queue is full."""
        deadline = time.monotonic() + self.write_timeout_s
        while self._queue and self._queued + len(data) > self.max_queued and not self.closed:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.abort(slow=True)
        if not self.send_nowait(data):
            raise ConnectionError(f"peer {self.address or self.ip} is gone")

    def finish(self) -> None:
        """Close once what is queued is written (within the write timeout)."""
        self._finishing = True
        self._wake.set()

    def abort(self, slow: bool = False) -> None:
        """Close at once, dropping what is queued."""
        self.slow = self.slow or slow
        if not self.closed:
            self.closed = True
            self.writer.transport.abort()
            self._wake.set()

    async def _drain(self) -> None:
        # A peer on a slow line that keeps taking bytes is served; one that takes nothing
        # for the write timeout is cut off.
        waiting = self.writer.transport.get_write_buffer_size()
        while not self.closed:
            try:
                await asyncio.wait_for(self.writer.drain(), self.write_timeout_s)
                return
            except TimeoutError:
                left = self.writer.transport.get_write_buffer_size()
                if left >= waiting:
                    logger.info("disconnecting %s: it took nothing for %gs (golem.hub.write-timeout)",
                                self.address or self.ip, self.write_timeout_s)
                    self.abort(slow=True)
                waiting = left

    async def _pump(self) -> None:
        try:
            while not self.closed:
                if not self._queue:
                    if self._finishing:
                        break
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                self._queue.clear()
                self._queued = 0
                self._room.set()
                self.writer.write(batch)
                await self._drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._room.set()
            if self.slow:
                self.writer.transport.abort()
            else:
                self.writer.close()
            self._on_closed(self)


@dataclass(slots=True)
class _StoredOffer:
    offer: Offer
    frame: bytes  # the provider's own signed publish envelope, forwarded as is
    provider: str
    received: float


def _batches(frames: list[bytes], budget: int) -> list[list[bytes]]:
    """``frames`` cut into lists whose sizes (with msgpack overhead) stay within ``budget``."""
    out: list[list[bytes]] = [[]]
    size = 0
    for data in frames:
        if out[-1] and size + len(data) + 8 > budget:
            out.append([])
            size = 0
        out[-1].append(data)
        size += len(data) + 8
    return out if out[0] else []


class OfferBook:
    """Offers (dropped unless refreshed) and the demands subscribed to them, matched both ways.

    It tells requestors what changed through ``notify(address, kind, payload)``, which the
    hub turns into a signed notice queued for that peer.

    Examples
    --------
    >>> provider = Wallet.from_key("11" * 32)
    >>> told = []
    >>> book = OfferBook(max_frame=2**20, max_subscriptions=1, notify=lambda *event: told.append(event),
    ...                  max_offers=4)
    >>> [len(e["offers"]) for e in book.subscribe("0xR", "s1", Demand({}, "(&)"))]
    []
    >>> offer = Offer({"golem.inf.cpu.threads": 4}, "(&)", provider.address)
    >>> book.publish(provider.address, wire.seal(provider, "publish", offer), offer)
    >>> [(to, kind, sorted(payload)) for to, kind, payload in told]
    [('0xR', 'event', ['offer', 'sub'])]
    >>> book.subscribe("0xR", "s2", Demand({}, "(&)"))
    Traceback (most recent call last):
    ...
    golem_dask.errors.MarketError: too many subscriptions (1; golem.hub.max-subscriptions-per-peer); unsubscribe first
    """

    def __init__(self, max_frame: int, max_subscriptions: int, notify: Callable[[str, str, Any], None],
                 max_offers: int) -> None:
        self.budget = max_frame // 2  # a notice carrying offers must fit in a frame
        self.max_subscriptions = max_subscriptions
        self.max_offers = max_offers
        self.notify = notify
        self.offers: dict[str, _StoredOffer] = {}
        self.subs: dict[tuple[str, str], Demand] = {}
        self._sub_count: Counter[str] = Counter()
        self._offer_count: Counter[str] = Counter()

    def publish(self, provider: str, envelope: wire.Envelope, offer: Any) -> None:
        if not isinstance(offer, Offer) or offer.provider_id != provider:
            raise ProtocolError("only a provider may publish, and only its own offers")
        held = self.offers.get(offer.id)
        if held is not None and held.provider != provider:  # else it could withdraw the other's
            raise ProtocolError(f"offer id {offer.id} is another provider's: publish under an id of your own")
        stored = _StoredOffer(offer, wire.frame(envelope), provider, time.monotonic())
        if len(stored.frame) > self.budget:
            # Offers travel inside the hub's notices, which must fit in a frame too.
            raise ProtocolError(f"an offer of {len(stored.frame)} bytes is too large (at most "
                                f"{self.budget}, half of golem.hub.max-frame)")
        fresh = offer.id not in self.offers
        if fresh:
            if self._offer_count[provider] >= self.max_offers:
                raise MarketError(f"too many offers ({self._offer_count[provider]}; golem.hub.max-offers-per-peer); "
                                  "withdraw one first")
            self._offer_count[provider] += 1
        self.offers[offer.id] = stored
        if fresh:
            for (requestor, sub_id), demand in list(self.subs.items()):
                if matches(demand, offer):
                    self.notify(requestor, "event", {"sub": sub_id, "offer": stored.frame})

    def withdraw(self, offer_id: str, provider: str | None = None) -> None:
        stored = self.offers.get(offer_id)
        if stored is None or (provider is not None and stored.provider != provider):
            return
        del self.offers[offer_id]
        self._offer_count[stored.provider] -= 1
        if not self._offer_count[stored.provider]:
            del self._offer_count[stored.provider]
        for (requestor, sub_id), demand in list(self.subs.items()):
            if matches(demand, stored.offer):
                self.notify(requestor, "event", {"sub": sub_id, "withdrawn": offer_id})

    def expire(self, ttl_s: float) -> None:
        cutoff = time.monotonic() - ttl_s
        for offer_id in [k for k, v in self.offers.items() if v.received < cutoff]:
            self.withdraw(offer_id)

    def subscribe(self, requestor: str, sub_id: str, demand: Any) -> list[dict[str, Any]]:
        """Subscribe (or renew) ``demand``; the events with the offers it matches now."""
        if not isinstance(demand, Demand):
            raise ProtocolError("subscribe needs a Demand")
        key = (requestor, sub_id)
        if key not in self.subs:
            if self._sub_count[requestor] >= self.max_subscriptions:
                raise MarketError(f"too many subscriptions ({self._sub_count[requestor]}; "
                                  f"golem.hub.max-subscriptions-per-peer); unsubscribe first")
            self._sub_count[requestor] += 1
        self.subs[key] = demand
        # Matching offers go out in as few notices as fit in a frame: the hub signs
        # each notice, and a thousand signatures would cost more than the matching.
        frames = [s.frame for s in list(self.offers.values()) if matches(demand, s.offer)]
        return [{"sub": sub_id, "offers": batch} for batch in _batches(frames, self.budget)]

    def unsubscribe(self, requestor: str, sub_id: str) -> None:
        if self.subs.pop((requestor, sub_id), None) is not None:
            self._sub_count[requestor] -= 1

    def scan(self, after: str | None) -> tuple[list[bytes], str | None]:
        """One page of offer frames in order of id after ``after``, and where the next starts."""
        ids = sorted(k for k in self.offers if after is None or k > after)
        frames = [self.offers[k].frame for k in ids]
        page = (_batches(frames, self.budget) or [[]])[0]
        return page, (ids[len(page) - 1] if len(page) < len(frames) else None)

    def forget(self, address: str, role: str | None) -> None:
        """A peer is gone: its offers and its subscriptions go too."""
        if role == "provider":
            for offer_id in [k for k, v in self.offers.items() if v.provider == address]:
                self.withdraw(offer_id)
        for key in [k for k in self.subs if k[0] == address]:
            del self.subs[key]
        self._sub_count.pop(address, None)


class HubServer:
    """The market server.

    Parameters
    ----------
    host, port:
        Where to listen (port 0 picks a free one; see :attr:`url`).
    data_dir:
        Where pushes for peers that are away are kept (default ``golem.hub.data-dir``).

    Attributes
    ----------
    stats:
        Counters: ``frames`` accepted, ``refused`` (bad frames, refused requests and
        connections), ``disconnected``, open ``connections``, ``connections_refused``
        (over a limit), ``slow_disconnected`` (peers that did not read), and pushes for
        peers that were away: ``stored``, ``stored_delivered``, ``stored_refused``.

    Examples
    --------
    >>> import asyncio, tempfile
    >>> async def main():
    ...     hub = HubServer("127.0.0.1", 0, data_dir=tempfile.mkdtemp())
    ...     await hub.start()
    ...     print(hub.url.startswith("tcp://127.0.0.1:"))
    ...     await hub.close()
    >>> asyncio.run(main())
    True
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_dir: str | None = None) -> None:
        self.host, self.port = host, port
        self._wallet = Wallet.generate()  # signs the hub's own notices; holds nothing
        self.max_frame = config.byte_size(config.get("hub.max-frame"), "golem.hub.max-frame")
        self.offer_ttl_s = config.seconds("hub.offer-ttl")
        self.rate = float(config.get("hub.messages-per-second"))
        self.hello_timeout_s = config.seconds("hub.hello-timeout")
        self.write_timeout_s = config.seconds("hub.write-timeout")
        self.send_queue = config.byte_size(config.get("hub.send-queue"), "golem.hub.send-queue")
        self.limits = ConnectionLimits(int(config.get("hub.max-connections")),
                                       int(config.get("hub.max-connections-per-ip")))
        self.guards = SenderGuards(int(config.seconds("hub.replay-window") * 1000),
                                   int(config.get("hub.replay-nonces-per-sender")), int(config.get("hub.replay-senders")))
        folder = os.path.expanduser(str(data_dir or config.get("hub.data-dir")))
        self.store = OfflineStore(
            os.path.join(folder, "hub.sqlite"), retention_s=config.seconds("hub.offline-retention"),
            max_messages=int(config.get("hub.offline-max-messages")),
            max_bytes=config.byte_size(config.get("hub.offline-max-bytes"), "golem.hub.offline-max-bytes"),
            max_total_bytes=config.byte_size(config.get("hub.offline-max-total-bytes"),
                                             "golem.hub.offline-max-total-bytes"),
            max_frame_bytes=self.max_frame // 2)  # delivered inside a notice, which must fit in a frame
        self._peers: dict[str, _Peer] = {}  # by address, after hello
        self._conns: set[_Peer] = set()  # every open connection
        self.book = OfferBook(self.max_frame, int(config.get("hub.max-subscriptions-per-peer")), self._notify,
                              int(config.get("hub.max-offers-per-peer")))
        self._server: asyncio.AbstractServer | None = None
        self._tasks = Tasks()
        self._refusals: dict[str, tuple[float, bytes]] = {}
        self.stats = {"frames": 0, "refused": 0, "disconnected": 0, "connections": 0, "connections_refused": 0,
                      "slow_disconnected": 0, "stored": 0, "stored_delivered": 0, "stored_refused": 0}

    @property
    def address(self) -> str:
        return self._wallet.address

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=self.max_frame + 16)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.spawn(self._maintain(), "hub-maintenance")
        logger.info("hub listening on %s", self.url)

    async def close(self) -> None:
        """Stop listening and drop every connection.  Safe to call twice."""
        await self._tasks.cancelled()
        if self._server is not None:
            self._server.close()
            conns = list(self._conns)
            for conn in conns:
                conn.abort()
            if conns:
                await asyncio.wait([conn.task for conn in conns], timeout=self.write_timeout_s)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), self.write_timeout_s)
            self._server = None
        self.store.close()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    def _notice(self, kind: str, payload: Any) -> bytes:
        return wire.frame(wire.seal(self._wallet, kind, payload))

    def _refusal(self, reason: str) -> bytes:
        # Refusals repeat under attack: one signature a second per reason, not one per stranger.
        cached = self._refusals.get(reason)
        if cached is None or time.monotonic() - cached[0] > 1.0:
            if len(self._refusals) > 64:
                self._refusals.clear()
            cached = self._refusals[reason] = (time.monotonic(), self._notice("error", {"ref": None, "reason": reason}))
        return cached[1]

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.offer_ttl_s / 4))
            self.book.expire(self.offer_ttl_s)
            self.store.purge()
            self.guards.prune()

    def _closed(self, peer: _Peer) -> None:
        self._conns.discard(peer)
        self.limits.release(peer.ip)
        self.stats["connections"] = len(self._conns)
        if peer.slow:
            self.stats["slow_disconnected"] += 1

    def _refuse(self, peer: _Peer, reason: str) -> None:
        self.stats["refused"] += 1
        peer.send_nowait(self._refusal(reason))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        ip = str(peername[0]) if peername else "?"
        refusal = self.limits.admit(ip)
        if refusal is not None:
            # Refused at once, before reading a byte: a connection costs its slot only.
            self.stats["refused"] += 1
            self.stats["connections_refused"] += 1
            writer.write(self._refusal(refusal))
            writer.close()
            return
        peer = _Peer(writer, ip, self.write_timeout_s, self.send_queue, self._closed)
        self._conns.add(peer)
        self.stats["connections"] = len(self._conns)
        bucket = TokenBucket(self.rate, self.rate * 2)
        try:
            while not peer.closed:
                try:
                    envelope, payload = await self._read(peer, reader)
                except TimeoutError:
                    self._refuse(peer, f"no hello within {self.hello_timeout_s:g}s (golem.hub.hello-timeout)")
                    return
                except ProtocolError as e:
                    # Someone who cannot frame or sign is not worth a second chance.
                    self._refuse(peer, str(e))
                    return
                self.stats["frames"] += 1
                if not bucket.take():
                    self._refuse(peer, "too many messages; slow down")
                    return
                if peer.address is None:
                    await self._welcome(peer, envelope.sender, payload["role"])
                    continue
                try:
                    await self._handle(peer, envelope, payload)
                except (ProtocolError, MarketError, TypeError, ValueError, KeyError) as e:
                    self.stats["refused"] += 1
                    await peer.send(self._notice("error", {"ref": envelope.nonce, "reason": str(e)}))
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            if "inside a frame" in str(e):  # a frame cut short: refused, like any malformed one
                self.stats["refused"] += 1
        finally:
            self.stats["disconnected"] += 1
            if peer.sender is not None:
                self.guards.release(peer.sender)
            if peer.address is not None and self._peers.get(peer.address) is peer:
                del self._peers[peer.address]
                self._forget(peer)
            peer.finish()

    async def _read(self, peer: _Peer, reader: asyncio.StreamReader) -> tuple[wire.Envelope, Any]:
        """The next verified frame, refused if replayed or not its connection's sender's."""
        if peer.address is None:
            envelope = await asyncio.wait_for(wire.read_frame(reader, self.max_frame), self.hello_timeout_s)
            payload = wire.verify(envelope)
            if envelope.kind != "hello" or not isinstance(payload, dict) or payload.get("role") not in (
                    "provider", "requestor"):
                raise ProtocolError("say hello first")
            self.guards.hello(envelope)
            peer.sender = envelope.sender
            return envelope, payload
        envelope = await wire.read_frame(reader, self.max_frame)
        payload = wire.verify(envelope)
        if envelope.sender != peer.address:
            raise ProtocolError(f"a frame signed by {envelope.sender} on the connection of {peer.address}: "
                                "each peer speaks only for itself")
        self.guards.check(envelope)
        return envelope, payload

    async def _welcome(self, peer: _Peer, address: str, role: str) -> None:
        old = self._peers.get(address)
        if old is not None:
            old.abort()  # a reconnecting peer replaces its old link
        peer.address, peer.role = address, role
        self._peers[address] = peer
        await peer.send(self._notice("welcome", {"hub": self.address}))
        # What came for it while it was away, oldest first, before anything live.
        stored = self.store.pending(address)
        for batch in _batches([frame for _, frame in stored], self.max_frame // 2):
            ids = [i for i, _ in stored[:len(batch)]]
            stored = stored[len(batch):]
            await peer.send(self._notice("stored", {"ids": ids, "frames": batch}))
            self.stats["stored_delivered"] += len(batch)

    def _forget(self, peer: _Peer) -> None:
        if peer.role == "provider":
            # Its requestors must know: a provider that is gone sends no activity event.
            notice = self._notice("event", {"gone": peer.address})
            for other in list(self._peers.values()):
                if other.role == "requestor":
                    other.send_nowait(notice)
        self.book.forget(str(peer.address), peer.role)

    async def _handle(self, peer: _Peer, envelope: wire.Envelope, payload: Any) -> None:
        kind = envelope.kind
        assert peer.address is not None
        if kind == "publish":
            if peer.role != "provider":
                raise ProtocolError("only a provider may publish, and only its own offers")
            self.book.publish(peer.address, envelope, payload)
        elif kind == "withdraw":
            self.book.withdraw(str(payload.get("offer_id")), provider=peer.address)
        elif kind == "subscribe":
            for event in self.book.subscribe(peer.address, str(payload["sub"]), payload["demand"]):
                await peer.send(self._notice("event", event))
        elif kind == "unsubscribe":
            self.book.unsubscribe(peer.address, str(payload["sub"]))
        elif kind == "scan":
            after = payload.get("after")
            page, following = self.book.scan(None if after is None else str(after))
            await peer.send(self._notice("scan_result", {"ref": payload["ref"], "offers": page, "next": following}))
        elif kind in ("call", "reply", "push"):
            target = str(payload["to"])
            data = wire.frame(envelope)
            if self._to(target, data):
                return
            if kind == "call":
                await peer.send(self._notice("error", {"ref": payload.get("call_id"),
                                                       "reason": f"provider {target} is not connected"}))
            elif kind == "push":
                self._keep(peer, envelope, target, data)
        elif kind == "stored_ack":
            ids = payload.get("ids")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise ProtocolError("stored_ack needs a list of ids")
            self.store.ack(peer.address, ids)
        elif kind == "ping":
            await peer.send(self._notice("pong", {}))
        else:
            raise ProtocolError(f"unknown message kind {kind!r}")

    def _keep(self, peer: _Peer, envelope: wire.Envelope, target: str, data: bytes) -> None:
        """Keep a push for a peer that is away, or tell its sender why not."""
        reason = self.store.add(target, envelope.sender, data)
        if reason is None:
            self.stats["stored"] += 1
            return
        self.stats["stored_refused"] += 1
        peer.send_nowait(self._notice("error", {"ref": envelope.nonce,
                                                "reason": f"{target} is not connected and the hub cannot keep "
                                                          f"the message for it: {reason}"}))

    def _to(self, address: str, data: bytes) -> bool:
        peer = self._peers.get(address)
        return peer is not None and peer.send_nowait(data)

    def _notify(self, address: str, kind: str, payload: Any) -> None:
        peer = self._peers.get(address)
        if peer is not None:
            peer.send_nowait(self._notice(kind, payload))
