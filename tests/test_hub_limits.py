"""Every limit of the hub, shown on a real hub: a hostile peer is refused, others are served.

A real :class:`HubServer` runs in a thread (or as a ``golem-dask hub`` process, for the
offline store across a restart); peers are raw sockets sending signed frames, or real
:class:`HubLink` / :class:`HubMarket` clients.  Each limit's test shows the stranger
refused with a named reason (and counted in ``hub.stats``) and a well-behaved peer
still served.  The last tests check that the requestor's intake shortcuts never change
an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import dask
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from net_support import free_port, wait_port
from test_constraints import POOL_LEAF, PROPS, filters

from golem_dask.errors import ProtocolError
from golem_dask.market.hub import HubServer
from golem_dask.market.hub_market import HubMarket
from golem_dask.market.link import HubLink
from golem_dask.market.matching import VerifiedOffers, matches
from golem_dask.protocol import constraints as C
from golem_dask.protocol import wire
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import Demand, Invoice, Offer

# -- a hub in a thread, and raw clients --------------------------------------------------------


class HubThread:
    """A real HubServer on its own event loop, built under ``settings`` (golem.hub.* keys)."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        conf = {"golem.hub.data-dir": str(data_dir), **{f"golem.hub.{k}": v for k, v in settings.items()}}
        with dask.config.set(conf):
            self.hub = HubServer("127.0.0.1", 0)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.hub.start())

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def stats(self) -> dict[str, int]:
        return self.hub.stats

    @property
    def url(self) -> str:
        return self.hub.url

    def close(self) -> None:
        self.run(self.hub.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextlib.contextmanager
def running_hub(tmp_path: Path, **settings: Any) -> Iterator[HubThread]:
    h = HubThread(tmp_path / "hub", **settings)
    try:
        yield h
    finally:
        h.close()


class Raw:
    """A peer on a plain socket: signs what it sends, parses what it gets."""

    def __init__(self, port: int, wallet: Wallet | None = None, source: str | None = None,
                 rcvbuf: int | None = None) -> None:
        self.wallet = wallet or Wallet.generate()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))

    @property
    def address(self) -> str:
        return self.wallet.address

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: str, payload: Any, wallet: Wallet | None = None) -> bytes:
        data = wire.frame(wire.seal(wallet or self.wallet, kind, payload))
        self.sock.sendall(data)
        return data

    def recv(self, timeout: float = 10) -> wire.Envelope | None:
        """The next frame, or None if the hub closed the connection."""
        self.sock.settimeout(timeout)
        try:
            head = self._exactly(4)
            body = self._exactly(int.from_bytes(head, "big")) if head is not None else None
        except ConnectionResetError:
            return None
        if head is None or body is None:
            return None  # closed (inside a frame or between frames)
        return wire.unframe(head + body, 64 * 2**20)

    def _exactly(self, n: int) -> bytes | None:
        # A socket with a timeout is non-blocking underneath: MSG_WAITALL does not wait.
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(min(n - got, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def hello(self, role: str) -> Raw:
        self.send("hello", {"role": role})
        welcome = self.recv()
        assert welcome is not None and welcome.kind == "welcome", welcome
        return self

    def request(self, kind: str, payload: Any) -> wire.Envelope:
        self.send(kind, payload)
        reply = self.recv()
        assert reply is not None, f"the hub hung up after {kind}"
        return reply

    def served(self) -> bool:
        reply = self.request("ping", {})
        return reply.kind == "pong"

    def refused_with(self, reason: str) -> wire.Envelope:
        """Read until an error naming ``reason`` arrives."""
        while (frame := self.recv()) is not None:
            if frame.kind == "error" and reason in str(wire.verify(frame)["reason"]):
                return frame
        raise AssertionError(f"the hub hung up without saying {reason!r}")

    def hung_up(self, timeout: float = 10) -> bool:
        """Whether the hub closes the connection within ``timeout`` (frames before that are read)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.recv(max(0.01, deadline - time.monotonic())) is None:
                    return True
            except TimeoutError:
                return False
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def offer_of(wallet: Wallet, padding: int = 0, **props: Any) -> Offer:
    return Offer({"golem.inf.cpu.threads": 4, "golem.node.id.name": "x" * padding, **props}, "(&)", wallet.address)


def invoice_for(provider: Wallet, requestor: str, n: int = 1) -> Invoice:
    return Invoice(f"agreement-{n}", ("activity",), {"golem.usage.cpu_sec": Decimal(n)}, Decimal("0.001") * n,
                   provider.address, requestor, provider.address, requestor, "erc20-devnet-glm")


# -- 1. connections ----------------------------------------------------------------------------


def test_connections_over_the_limits_are_refused_at_once(tmp_path: Path) -> None:
    with running_hub(tmp_path, **{"max-connections": 5, "max-connections-per-ip": 3}) as h:
        mine = [Raw(h.hub.port).hello("requestor") for _ in range(3)]
        refused_before = h.stats["refused"]
        # A fourth from the same address: an error naming the limit before it says a word.
        extra = Raw(h.hub.port)
        extra.refused_with("golem.hub.max-connections-per-ip=3")
        assert extra.hung_up()
        # Another address (127.0.0.2 is this machine too) is still served ...
        other = Raw(h.hub.port, source="127.0.0.2").hello("requestor")
        assert other.served() and all(peer.served() for peer in mine)
        # ... until the total is reached.
        fifth = Raw(h.hub.port, source="127.0.0.2").hello("requestor")
        late = Raw(h.hub.port, source="127.0.0.3")
        late.refused_with("golem.hub.max-connections=5")
        assert late.hung_up()
        assert h.stats["connections_refused"] == 2 and h.stats["refused"] == refused_before + 2
        # A slot freed is a slot usable again.
        mine.pop().close()
        wait_until(lambda: h.stats["connections"] == 4, what="the hub seeing the close")
        assert Raw(h.hub.port).hello("requestor").served()
        assert fifth.served()


def test_a_connection_that_says_nothing_is_closed_after_the_hello_timeout(tmp_path: Path) -> None:
    with running_hub(tmp_path, **{"hello-timeout": "300ms"}) as h:
        silent = Raw(h.hub.port)
        good = Raw(h.hub.port).hello("requestor")
        silent.refused_with("no hello within 0.3s")
        assert silent.hung_up()
        assert good.served()  # a peer that said hello is not timed out
        time.sleep(0.5)
        assert good.served()


# -- 2. replay state per sender --------------------------------------------------------------


def test_a_sender_flooding_its_replay_state_is_refused_alone(tmp_path: Path) -> None:
    settings = {"replay-nonces-per-sender": 50, "messages-per-second": 10_000}
    with running_hub(tmp_path, **settings) as h:
        alice = Raw(h.hub.port).hello("requestor")
        mallory = Raw(h.hub.port).hello("requestor")
        before = h.stats["refused"]
        # Fresh nonces, all within the window: more than its guard holds.
        flood = b"".join(wire.frame(wire.seal(mallory.wallet, "ping", {})) for _ in range(60))
        with contextlib.suppress(OSError):  # the hub hangs up before the end
            mallory.sock.sendall(flood)
        mallory.refused_with("too many to check for replays; slow down")
        assert mallory.hung_up()
        assert h.stats["refused"] == before + 1
        # Everyone else keeps its own replay state: served as before, and new senders too.
        assert alice.served()
        assert Raw(h.hub.port).hello("provider").served()
        assert mallory.address not in h.hub._peers
        # The flooder may come back (its state went with its connection) ...
        assert Raw(h.hub.port, wallet=mallory.wallet).hello("requestor").served()
        # ... but nobody can replay anyone's hello, on another connection or after it left.
        hello = wire.frame(wire.seal(alice.wallet, "hello", {"role": "requestor"}))
        alice.close()
        fresh = Raw(h.hub.port, wallet=alice.wallet)
        fresh.sock.sendall(hello)
        assert fresh.recv().kind == "welcome"  # type: ignore[union-attr]
        thief = Raw(h.hub.port)
        thief.sock.sendall(hello)
        thief.refused_with("replayed")
        fresh.close()
        wait_until(lambda: alice.address not in h.hub._peers, what="alice gone")
        thief = Raw(h.hub.port)
        thief.sock.sendall(hello)
        thief.refused_with("replayed")
        # And a connection speaks only for the sender that said hello on it.
        carol = Raw(h.hub.port).hello("requestor")
        carol.send("ping", {}, wallet=Wallet.generate())
        carol.refused_with("each peer speaks only for itself")


# -- 3. write timeouts -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["send-queue", "write-timeout"])
def test_a_peer_that_does_not_read_is_disconnected_and_others_are_served(tmp_path: Path, limit: str) -> None:
    # Either limit alone catches it: bytes piling up for it, or a write it does not take.
    settings = ({"write-timeout": "30s", "send-queue": "2MiB"} if limit == "send-queue"
                else {"write-timeout": "1s", "send-queue": "64MiB"})
    with running_hub(tmp_path, **settings, **{"messages-per-second": 1000, "max-offers-per-peer": 80}) as h:
        demand = Demand({"golem.srv.comp.expiration": 1}, "(&)")
        sloth = Raw(h.hub.port, rcvbuf=4096).hello("requestor")
        sloth.send("subscribe", {"sub": "s", "demand": demand})  # and then it never reads
        alice = Raw(h.hub.port).hello("requestor")
        alice.send("subscribe", {"sub": "a", "demand": demand})
        provider = Raw(h.hub.port).hello("provider")
        offers = [offer_of(provider.wallet, padding=100_000) for _ in range(80)]  # 8 MB to each subscriber
        received: list[str] = []

        def read_events() -> None:
            while len(received) < len(offers) and (frame := alice.recv(30)) is not None:
                if frame.kind == "event":
                    offer = wire.verify(wire.unframe(wire.verify(frame)["offer"], 2**20))
                    received.append(offer.id)

        reader = threading.Thread(target=read_events, daemon=True)
        reader.start()
        started = time.monotonic()
        for offer in offers:
            provider.send("publish", offer)
            time.sleep(0.01)  # a pace a requestor that reads keeps up with
        reader.join(30)
        # Alice got every offer, without waiting for the sloth's write timeout each time.
        assert received == [o.id for o in offers]
        assert time.monotonic() - started < 15
        wait_until(lambda: h.stats["slow_disconnected"] == 1, what="the sloth disconnected")
        assert sloth.address not in h.hub._peers
        assert alice.served() and provider.served()
        # The sloth, reading at last, finds the connection closed.
        assert sloth.hung_up(10)


# -- 4. subscriptions --------------------------------------------------------------------------


def test_subscriptions_per_peer_are_limited(tmp_path: Path) -> None:
    with running_hub(tmp_path, **{"max-subscriptions-per-peer": 3}) as h:
        demand = Demand({"golem.srv.comp.expiration": 1}, "(&)")
        mallory = Raw(h.hub.port).hello("requestor")
        for i in range(3):
            mallory.send("subscribe", {"sub": f"s{i}", "demand": demand})
        assert mallory.served()
        before = h.stats["refused"]
        reply = mallory.request("subscribe", {"sub": "s3", "demand": demand})
        assert reply.kind == "error" and "golem.hub.max-subscriptions-per-peer" in wire.verify(reply)["reason"]
        assert h.stats["refused"] == before + 1
        assert len([k for k in h.hub.book.subs if k[0] == mallory.address]) == 3
        # Renewing one of its own is no new subscription; dropping one makes room.
        mallory.send("subscribe", {"sub": "s0", "demand": demand})
        mallory.send("unsubscribe", {"sub": "s1"})
        mallory.send("subscribe", {"sub": "s4", "demand": demand})
        assert mallory.served() and h.stats["refused"] == before + 1
        # The limit is per peer: another requestor subscribes and gets offers.
        provider = Raw(h.hub.port).hello("provider")
        provider.send("publish", offer_of(provider.wallet))
        assert provider.served()
        alice = Raw(h.hub.port).hello("requestor")
        event = alice.request("subscribe", {"sub": "a", "demand": demand})
        assert event.kind == "event" and len(wire.verify(event)["offers"]) == 1


def test_offers_per_provider_are_limited(tmp_path: Path) -> None:
    """One provider cannot fill the hub's memory with offers: past the limit a new offer
    is refused; refreshing one it has, or withdrawing one, works as before."""
    with running_hub(tmp_path, **{"max-offers-per-peer": 3}) as h:
        mallory = Raw(h.hub.port).hello("provider")
        offers = [offer_of(mallory.wallet) for _ in range(4)]
        for offer in offers[:3]:
            mallory.send("publish", offer)
        assert mallory.served()
        before = h.stats["refused"]
        reply = mallory.request("publish", offers[3])
        assert reply.kind == "error" and "golem.hub.max-offers-per-peer" in wire.verify(reply)["reason"]
        assert h.stats["refused"] == before + 1
        assert sorted(h.hub.book.offers) == sorted(o.id for o in offers[:3])
        mallory.send("publish", offers[0])  # a refresh is no new offer
        mallory.send("withdraw", {"offer_id": offers[1].id})
        mallory.send("publish", offers[3])
        assert mallory.served() and h.stats["refused"] == before + 1
        assert sorted(h.hub.book.offers) == sorted(o.id for o in (offers[0], offers[2], offers[3]))
        # The limit is per provider: another one publishes, and a requestor sees all four.
        honest = Raw(h.hub.port).hello("provider")
        honest.send("publish", offer_of(honest.wallet))
        assert honest.served()
        alice = Raw(h.hub.port).hello("requestor")
        event = alice.request("subscribe", {"sub": "a", "demand": Demand({"golem.srv.comp.expiration": 1}, "(&)")})
        assert event.kind == "event" and len(wire.verify(event)["offers"]) == 4


# -- 5. scan pages -----------------------------------------------------------------------------


def test_scan_is_paged_within_the_frame_limit(tmp_path: Path) -> None:
    settings = {"max-frame": "64KiB", "call-timeout": "5s", "max-offers-per-peer": 150}
    with running_hub(tmp_path, **settings) as h:
        provider = Raw(h.hub.port).hello("provider")
        offers = {offer.id: offer for offer in (offer_of(provider.wallet, padding=1000) for _ in range(150))}
        for offer in offers.values():
            provider.send("publish", offer)
        assert provider.served()
        assert len(h.hub.book.offers) == 150  # ~170 KB of offers: more than one frame

        with dask.config.set({"golem.hub.max-frame": "64KiB", "golem.hub.call-timeout": "5s"}):
            async def scan() -> list[Offer]:
                market = HubMarket(h.url, Wallet.generate())
                await market.start()
                try:
                    return await market.scan()
                finally:
                    await market.close()

            found = asyncio.run(scan())
        assert sorted(o.id for o in found) == sorted(offers)
        assert all(found_offer == offers[found_offer.id] for found_offer in found)
        # Every page fits, and the pages go in order of offer id.
        raw = Raw(h.hub.port).hello("requestor")
        after, pages = None, 0
        while True:
            page = raw.request("scan", {"ref": "r", "after": after})
            assert len(wire.frame(page)) - 4 <= 64 * 1024
            pages, after = pages + 1, wire.verify(page)["next"]
            if after is None:
                break
        assert pages > 2


# -- 6. pushes for a peer that is away --------------------------------------------------------


class HubProcess:
    """``golem-dask hub --data-dir`` as a process of its own, on a fixed port."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.data_dir, self.log = data_dir, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "golem_dask.cli", "hub", "--listen", f"127.0.0.1:{self.port}",
                 "--data-dir", str(self.data_dir)], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def kill(self) -> None:
        """SIGKILL, by PID: no goodbye, what is on disk is all there is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def kept(self) -> int:
        path = self.data_dir / "hub.sqlite"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("SELECT COUNT(*) FROM pushes").fetchone()[0])


class Inbox:
    """A requestor's HubLink that records every message handed to its owner."""

    def __init__(self, url: str, wallet: Wallet) -> None:
        self.messages: list[tuple[wire.Envelope, Any]] = []
        self.link = HubLink(url, wallet, "requestor", self._on_message)

    async def _on_message(self, envelope: wire.Envelope, payload: Any) -> None:
        self.messages.append((envelope, payload))

    def pushes(self) -> list[wire.Envelope]:
        return [e for e, _ in self.messages if e.kind == "push"]


async def settle(seconds: float = 0.5) -> None:
    await asyncio.sleep(seconds)


def test_an_invoice_for_an_offline_requestor_survives_a_hub_restart_and_arrives_once(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub-data", tmp_path / "hub.log")
    hub.start()
    try:
        requestor, provider_wallet = Wallet.generate(), Wallet.generate()

        async def main() -> None:
            first = Inbox(hub.url, requestor)
            await first.link.start(10)
            await first.link.close()  # the requestor crashes
            provider = Raw(hub.port, wallet=provider_wallet).hello("provider")
            invoice = invoice_for(provider_wallet, requestor.address)
            signed_push = provider.send("push", {"to": requestor.address, "message": invoice})
            assert provider.served()  # no error: the hub kept it
            assert hub.kept() == 1
            hub.kill()
            hub.start()  # the hub restarts from its data dir
            again = Inbox(hub.url, requestor)
            await again.link.start(10)
            await settle()
            (envelope,) = again.pushes()  # exactly once, exactly the provider's signed frame
            assert wire.frame(envelope) == signed_push and envelope.sender == provider_wallet.address
            assert dict(again.messages[0][1]) == {"to": requestor.address, "message": invoice}
            wait_until(lambda: hub.kept() == 0, what="the acknowledgement")  # then forgotten
            await again.link.close()
            third = Inbox(hub.url, requestor)
            await third.link.start(10)
            await settle()
            assert third.pushes() == []
            await third.link.close()
            # A live peer still gets its pushes live.
            live = Inbox(hub.url, requestor)
            await live.link.start(10)
            provider = Raw(hub.port, wallet=provider_wallet).hello("provider")
            provider.send("push", {"to": requestor.address, "message": invoice_for(provider_wallet, requestor.address, 2)})
            await settle()
            assert len(live.pushes()) == 1 and hub.kept() == 0
            await live.link.close()

        asyncio.run(main())
    finally:
        hub.kill()


def test_offline_pushes_are_bounded_per_peer_and_in_time(tmp_path: Path) -> None:
    settings = {"offline-max-messages": 3, "offline-max-bytes": "8KiB", "offline-retention": "1s"}
    requestor, other = Wallet.generate(), Wallet.generate()

    async def collect() -> list[wire.Envelope]:
        inbox = Inbox(h.url, requestor)
        await inbox.link.start(10)
        await settle()
        await inbox.link.close()
        return inbox.pushes()

    async def purge() -> int:
        return h.hub.store.purge()  # on the hub's own thread, like its maintenance task

    with running_hub(tmp_path, **settings) as h:
        provider = Raw(h.hub.port).hello("provider")
        pushes = [provider.send("push", {"to": requestor.address,
                                         "message": invoice_for(provider.wallet, requestor.address, n)})
                  for n in range(5)]
        for _ in range(2):  # the fourth and fifth: refused, and the sender is told why
            provider.refused_with("golem.hub.offline-max-messages")
        assert h.stats["stored"] == 3 and h.stats["stored_refused"] == 2
        # Per sender: this provider has used its share, for anyone.
        provider.send("push", {"to": other.address, "message": invoice_for(provider.wallet, other.address)})
        provider.refused_with(f"from {provider.address} for peers that are away")
        # Bytes per recipient: a big push does not fit.
        second = Raw(h.hub.port).hello("provider")
        big = Invoice("agreement-big", ("a" * 64,) * 200, {}, Decimal(1), second.address, other.address,
                      second.address, other.address, "erc20-devnet-glm")
        second.send("push", {"to": other.address, "message": big})
        second.refused_with("golem.hub.offline-max-bytes")
        assert h.stats["stored_refused"] == 4
        # The requestor comes back within the retention: the first three, in order, once.
        assert [wire.frame(e) for e in asyncio.run(collect())] == pushes[:3]
        wait_until(lambda: h.hub.store.waiting_for(requestor.address) == 0, what="the acknowledgement")
        # Past the retention, a kept push is dropped unread.
        second.send("push", {"to": requestor.address, "message": invoice_for(second.wallet, requestor.address, 9)})
        assert second.served() and h.hub.store.waiting_for(requestor.address) == 1
        time.sleep(1.2)
        assert asyncio.run(collect()) == []
        assert h.run(purge()) == 1 and h.hub.store.waiting_for(requestor.address) == 0
        assert provider.served() and second.served()


def test_a_stored_push_is_handed_over_once_per_process(tmp_path: Path) -> None:
    requestor = Wallet.generate()
    with running_hub(tmp_path / "a") as first:
        provider = Raw(first.hub.port).hello("provider")
        provider.send("push", {"to": requestor.address, "message": invoice_for(provider.wallet, requestor.address)})
        assert provider.served() and first.stats["stored"] == 1
        # A second hub holding the same store (a restored backup, a hub that never got the ack).
        (tmp_path / "b" / "hub").mkdir(parents=True)

        async def backup() -> None:
            with contextlib.closing(sqlite3.connect(tmp_path / "b" / "hub" / "hub.sqlite")) as copy:
                first.hub.store._open().backup(copy)

        first.run(backup())
        with running_hub(tmp_path / "b") as second:
            async def main() -> tuple[list[wire.Envelope], list[wire.Envelope]]:
                one, two = Inbox(first.url, requestor), Inbox(second.url, requestor)
                await one.link.start(10)
                await settle()
                await two.link.start(10)
                await settle()
                await one.link.close()
                await two.link.close()
                return one.pushes(), two.pushes()

            seen_first, seen_second = asyncio.run(main())
            assert len(seen_first) == 1 and seen_second == []
            assert second.stats["stored_delivered"] == 1  # it was delivered, and acknowledged
            wait_until(lambda: second.hub.store.waiting_for(requestor.address) == 0, what="the acknowledgement")


def test_a_link_hands_over_only_verified_pushes_addressed_to_it(tmp_path: Path) -> None:
    """A hub that delivers stored frames cannot slip in forged, misaddressed or other frames."""
    me, provider, hub_wallet = Wallet.generate(), Wallet.generate(), Wallet.generate()
    good = wire.frame(wire.seal(provider, "push", {"to": me.address, "message": invoice_for(provider, me.address)},
                                now_ms=1))  # old: stored pushes are older than any replay window
    misaddressed = wire.frame(wire.seal(provider, "push", {"to": provider.address, "message": "x"}))
    not_a_push = wire.frame(wire.seal(provider, "call", {"to": me.address, "method": "x"}))
    honest = wire.seal(provider, "push", {"to": me.address, "message": "forged"})
    forged = wire.frame(wire.Envelope(honest.version, honest.kind, honest.sender, honest.nonce, honest.timestamp_ms,
                                      wire.encode({"to": me.address, "message": "changed"}), honest.signature))
    acks: list[Any] = []

    async def fake_hub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.read_frame(reader)
        writer.write(wire.frame(wire.seal(hub_wallet, "welcome", {"hub": hub_wallet.address})))
        frames = [forged, misaddressed, not_a_push, good, b"junk", good]
        writer.write(wire.frame(wire.seal(hub_wallet, "stored", {"ids": [7, 8], "frames": frames})))
        ack = await wire.read_frame(reader)
        acks.append((ack.kind, wire.verify(ack)))
        with contextlib.suppress(ConnectionError):
            await wire.read_frame(reader)

    async def main() -> list[wire.Envelope]:
        server = await asyncio.start_server(fake_hub, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        inbox = Inbox(f"tcp://127.0.0.1:{port}", me)
        await inbox.link.start(10)
        await settle()
        await inbox.link.close()
        server.close()
        return inbox.pushes()

    (only,) = asyncio.run(main())
    assert wire.frame(only) == good
    assert acks == [("stored_ack", {"ids": [7, 8]})]


# -- the requestor's intake shortcuts never change an answer ---------------------------------


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_a_remembered_offer_frame_changed_in_any_byte_is_checked_again(data: st.DataObject) -> None:
    seen = VerifiedOffers(size=4)
    alice = Wallet.from_key("11" * 32)
    frame = wire.frame(wire.seal(alice, "publish", offer_of(alice)))
    assert seen.offer(frame).provider_id == alice.address
    changed = bytearray(frame)
    i = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    changed[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(ProtocolError):
        seen.offer(bytes(changed))
    # Someone else's signed offer naming alice is refused, remembered frames or not.
    mallory = Wallet.generate()
    with pytest.raises(ProtocolError, match="not signed by its provider"):
        seen.offer(wire.frame(wire.seal(mallory, "publish", offer_of(alice))))


@given(filters(POOL_LEAF), PROPS)
@settings(max_examples=500, deadline=None)
def test_compiled_filters_agree_with_evaluate(f: C.Filter, props: dict[str, object]) -> None:
    assert C.predicate(f)(props) is C.evaluate(f, props)
    demand, offer = Demand(props, str(f)), Offer(props, str(f), "0x" + "00" * 20)
    assert matches(demand, offer) is (C.evaluate(f, props) and C.evaluate(f, props))


def test_the_defaults_stay_strict() -> None:
    """The defaults stay strict: the benchmark raises its limits through config."""
    conf = dask.config.get("golem.hub")
    assert conf["max-connections-per-ip"] <= 64 and conf["max-connections"] <= 1000
    assert os.path.basename(conf["data-dir"]) == "hub"
