"""Hostile input never takes the hub down, and the frame decoder only ever says no.

A real hub runs in a thread; hostile clients are plain sockets sending random bytes,
truncated and oversized frames, forged signatures, replays, unknown kinds and floods.
After each, well-behaved peers must still be served.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter

import dask
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golem_dask.errors import ProtocolError
from golem_dask.market.hub import HubServer
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol import wire
from golem_dask.protocol.messages import Offer

TRIED: Counter[str] = Counter()
ALICE = Wallet.generate()
MALLORY = Wallet.generate()


def signed(kind: str, payload, wallet: Wallet = ALICE) -> bytes:
    return wire.frame(wire.seal(wallet, kind, payload))


# -- the frame decoder ---------------------------------------------------------------------

@given(st.binary(max_size=300))
@settings(max_examples=1500, deadline=None)
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    TRIED["decoder: random bytes"] += 1
    with pytest.raises(ProtocolError):
        wire.verify(wire.unframe(data))


@given(st.integers(min_value=0, max_value=10_000), st.data())
@settings(max_examples=300, deadline=None)
def test_truncated_and_extended_frames_are_refused(cut: int, data) -> None:
    TRIED["decoder: truncated/extended"] += 1
    good = signed("ping", {"n": cut})
    cut %= len(good)
    with pytest.raises(ProtocolError):
        wire.unframe(good[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(ProtocolError):
        wire.unframe(good + extra)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_any_flipped_byte_breaks_the_signature_or_the_frame(data) -> None:
    TRIED["decoder: flipped byte"] += 1
    good = bytearray(signed("publish", Offer({"golem.inf.cpu.threads": 2}, "(&)", ALICE.address)))
    i = data.draw(st.integers(min_value=4, max_value=len(good) - 1))
    good[i] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(ProtocolError):
        wire.verify(wire.unframe(bytes(good)))


def test_forged_sender_and_replay_are_refused() -> None:
    honest = wire.seal(ALICE, "ping", {})
    forged = wire.Envelope(honest.version, honest.kind, MALLORY.address, honest.nonce, honest.timestamp_ms,
                           honest.body, honest.signature)
    with pytest.raises(ProtocolError, match="bad signature"):
        wire.verify(forged)
    guard = wire.ReplayGuard(window_ms=1000)
    guard.check(honest)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(honest)
    with pytest.raises(ProtocolError, match="window"):
        guard.check(wire.seal(ALICE, "ping", {}, now_ms=honest.timestamp_ms - 5000))
    small = wire.ReplayGuard(window_ms=60_000, max_remembered=100)
    for _ in range(100):
        small.check(wire.seal(ALICE, "ping", {}))
    with pytest.raises(ProtocolError, match="slow down"):
        small.check(wire.seal(ALICE, "ping", {}))
    assert len(small) == 100


def test_oversized_length_is_refused_before_reading_the_body() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", 50 * 2**20))  # claims 50 MiB, sends nothing more
        with pytest.raises(ProtocolError, match="exceeds the maximum"):
            await asyncio.wait_for(wire.read_frame(reader, 2**20), 2)

    asyncio.run(main())


# -- the hub -----------------------------------------------------------------------------------


class HubThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.data_dir = tempfile.mkdtemp(prefix="hub-hostile-")
        with dask.config.set({"golem.hub.messages-per-second": 200, "golem.hub.data-dir": self.data_dir}):
            self.hub = HubServer("127.0.0.1", 0)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.hub.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.hub.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def refused(self) -> int:
        return self.hub.stats["refused"]


@pytest.fixture(scope="module")
def hub():
    h = HubThread()
    yield h
    h.close()


def connect(hub: HubThread) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", hub.hub.port), timeout=5)
    return s


def read_frames_until_closed(s: socket.socket, limit: float = 5.0) -> bytes:
    s.settimeout(limit)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, socket.timeout, ConnectionResetError):
        pass
    return data


def read_until_closed(s: socket.socket, limit: float = 5.0) -> tuple[list[wire.Envelope], bool]:
    """Every frame the hub sent, and whether it closed the connection within ``limit``."""
    s.settimeout(limit)
    data, closed = b"", False
    try:
        while chunk := s.recv(65536):
            data += chunk
        closed = True
    except ConnectionResetError:
        closed = True
    except (TimeoutError, socket.timeout):
        pass
    frames = []
    while len(data) >= 4:
        end = 4 + int.from_bytes(data[:4], "big")
        frames.append(wire.unframe(data[:end]))
        data = data[end:]
    assert not data, "the hub sent a partial frame"
    return frames, closed


def assert_refused(frames: list[wire.Envelope], closed: bool, reason: str, before: int, hub: HubThread,
                   welcomed: bool = False) -> None:
    """The hub said no (an error naming ``reason``), hung up, and counted the refusal."""
    kinds = [f.kind for f in frames]
    assert kinds == (["welcome", "error"] if welcomed else ["error"]), kinds
    assert reason in str(wire.verify(frames[-1])["reason"])
    assert frames[-1].sender == hub.hub.address
    assert closed, "the hub kept the connection open"
    assert hub.refused == before + 1


def hello(s: socket.socket, wallet: Wallet, role: str) -> None:
    s.sendall(signed("hello", {"role": role}, wallet))
    head = s.recv(4, socket.MSG_WAITALL)
    body = s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
    assert wire.unframe(head + body).kind == "welcome"


def request(s: socket.socket, kind: str, payload, wallet: Wallet) -> wire.Envelope:
    s.sendall(signed(kind, payload, wallet))
    head = s.recv(4, socket.MSG_WAITALL)
    body = s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
    return wire.unframe(head + body)


def assert_hub_serves(hub: HubThread) -> None:
    """A well-behaved requestor still gets answers."""
    wallet = Wallet.generate()
    with connect(hub) as s:
        hello(s, wallet, "requestor")
        assert request(s, "ping", {}, wallet).kind == "pong"


@given(st.binary(min_size=1, max_size=400))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_get_a_disconnect_not_a_crash(hub, data: bytes) -> None:
    TRIED["hub: random bytes"] += 1
    before = hub.refused
    with connect(hub) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        frames, closed = read_until_closed(s, 5.0)
    # Random bytes are never a signed hello: no welcome, at most an error, a hang-up,
    # and one more refusal counted (a frame cut short by the end of input included).
    assert [f.kind for f in frames] in ([], ["error"])
    assert closed
    assert hub.refused == before + 1


@pytest.mark.parametrize("attack", ["oversized", "forged", "replay", "unknown-kind", "no-hello", "truncated"])
def test_each_attack_is_refused_and_others_keep_working(hub, attack: str) -> None:
    TRIED["hub: crafted attacks"] += 1
    before = hub.refused
    with connect(hub) as s:
        if attack == "oversized":
            s.sendall(struct.pack(">I", 64 * 2**20) + b"x" * 1024)
            assert_refused(*read_until_closed(s), "exceeds the maximum", before, hub)
        elif attack == "forged":
            honest = wire.seal(MALLORY, "hello", {"role": "provider"})
            s.sendall(wire.frame(wire.Envelope(honest.version, honest.kind, ALICE.address, honest.nonce,
                                               honest.timestamp_ms, honest.body, honest.signature)))
            assert_refused(*read_until_closed(s), "bad signature", before, hub)
            assert ALICE.address not in hub.hub._peers
        elif attack == "replay":
            first = signed("hello", {"role": "requestor"}, MALLORY)
            s.sendall(first)
            s.sendall(first)
            assert_refused(*read_until_closed(s), "replayed", before, hub, welcomed=True)
        elif attack == "unknown-kind":
            hello(s, MALLORY, "requestor")
            reply = request(s, "steal-everything", {}, MALLORY)
            assert reply.kind == "error" and "unknown message kind" in str(wire.verify(reply))
            assert hub.refused == before + 1
            assert request(s, "ping", {}, MALLORY).kind == "pong"  # the sender stays connected
        elif attack == "no-hello":
            s.sendall(signed("subscribe", {"sub": "x", "demand": None}, MALLORY))
            assert_refused(*read_until_closed(s), "say hello first", before, hub)
        elif attack == "truncated":
            s.sendall(signed("hello", {"role": "provider"}, MALLORY)[:20])
            s.shutdown(socket.SHUT_WR)
            frames, closed = read_until_closed(s)
            assert frames == [] and closed  # no welcome: a hello cut short is no hello
            assert hub.refused == before + 1
    assert_hub_serves(hub)


def test_a_flood_disconnects_only_the_flooder(hub) -> None:
    TRIED["hub: flood"] += 1
    before = hub.refused
    good = Wallet.generate()
    with connect(hub) as calm:
        hello(calm, good, "requestor")
        with connect(hub) as noisy:
            hello(noisy, MALLORY, "requestor")
            frames = b"".join(signed("ping", {}, MALLORY) for _ in range(600))
            try:
                noisy.sendall(frames)
            except OSError:
                pass
            data = read_frames_until_closed(noisy)
            assert b"too many messages" in data
        assert hub.refused == before + 1
        assert request(calm, "ping", {}, good).kind == "pong"


def test_a_provider_cannot_publish_for_another(hub) -> None:
    with connect(hub) as s:
        hello(s, MALLORY, "provider")
        fake = Offer({"golem.inf.cpu.threads": 64}, "(&)", ALICE.address)
        before = hub.refused
        reply = request(s, "publish", fake, MALLORY)
        assert reply.kind == "error" and "its own offers" in str(wire.verify(reply))
        assert hub.refused == before + 1 and fake.id not in hub.hub.book.offers
    assert_hub_serves(hub)


def test_a_provider_cannot_take_over_anothers_offer_id(hub) -> None:
    """Publishing under another provider's offer id, then withdrawing it, would take that
    provider's offer off the market for every requestor."""
    theirs = Offer({"golem.inf.cpu.threads": 4}, "(&)", ALICE.address)
    with connect(hub) as alice, connect(hub) as s:
        hello(alice, ALICE, "provider")
        alice.sendall(signed("publish", theirs, ALICE))  # answered only when refused
        deadline = time.monotonic() + 5
        while theirs.id not in hub.hub.book.offers:
            assert time.monotonic() < deadline, "alice's offer never reached the book"
            time.sleep(0.01)
        hello(s, MALLORY, "provider")
        before = hub.refused
        reply = request(s, "publish", Offer({"golem.inf.cpu.threads": 64}, "(&)", MALLORY.address, id=theirs.id),
                        MALLORY)
        assert reply.kind == "error" and "another provider's" in str(wire.verify(reply))
        assert hub.refused == before + 1
        assert hub.hub.book.offers[theirs.id].provider == ALICE.address
    assert_hub_serves(hub)


def test_report_inputs_tried() -> None:
    # Runs last in this module: the figure goes into the closing note.
    print(f"\nhostile inputs tried: {dict(TRIED)} total {sum(TRIED.values())}")
    assert sum(TRIED.values()) > 0
    time.sleep(0)
