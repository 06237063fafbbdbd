"""Signed envelopes and length-prefixed frames: round trips, tampering, replays, hostile bytes."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from golem_dask.errors import ProtocolError
from golem_dask.protocol import identity
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol import properties as P
from golem_dask.protocol import wire
from golem_dask.protocol.messages import (
    Agreement,
    AgreementState,
    DebitNote,
    Invoice,
    Issuer,
    Offer,
    Payment,
    Proposal,
    now_ms,
)
from golem_dask.protocol.wire import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    ReplayGuard,
    frame,
    read_frame,
    seal,
    unframe,
    verify,
)

ALICE = Wallet.from_key("11" * 32)
BOB = Wallet.from_key("22" * 32)
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
NOW = 1_700_000_000_000

#: Inputs each hypothesis test tried (shrinking included), printed when the module ends.
TRIED: collections.Counter[str] = collections.Counter()
FAST = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def report_hypothesis_inputs(request: pytest.FixtureRequest):
    yield
    lines = [f"  {name}: {count}" for name, count in sorted(TRIED.items())]
    text = "\n".join([f"hypothesis inputs tried in {__name__}: {sum(TRIED.values())}", *lines])
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:  # pragma: no cover
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(text)


def payloads() -> list[Any]:
    provider = ALICE.address
    usage = {P.USAGE_CPU_SEC: Decimal("12.500"), P.USAGE_DURATION_SEC: Decimal("3.000001")}
    proposal = Proposal(Issuer.PROVIDER, {P.CPU_THREADS: 4, P.MEM_GIB: Decimal("7.5")}, "(&)", "o1", "d1", provider)
    return [
        Offer(properties={P.LINEAR_COEFFS: [Decimal("1e-5"), Decimal("0.02"), Decimal(0)], P.CPU_THREADS: 8},
              constraints="(golem.srv.comp.expiration>0)", provider_id=provider),
        proposal,
        Agreement("a1", dataclasses.replace(proposal, issuer=Issuer.REQUESTOR), proposal, BOB.address, provider,
                  NOW, AgreementState.APPROVED, NOW, None),
        DebitNote("a1", "act1", usage, Decimal("0.000081961111111111"), provider, BOB.address),
        Invoice("a1", ["act1", "act2"], usage, Decimal("0.00002"), provider, BOB.address, provider,
                BOB.address, "erc20-devnet-glm"),
        Payment(BOB.address, provider, Decimal("0.00002"), "erc20-devnet-glm", ["inv1"], "0x" + "ab" * 32),
        {"role": "provider", "amounts": [Decimal("0.1"), Decimal("-3E+2")], "blob": b"\x00\xff"},
    ]


PAYLOADS = payloads()
INVOICE_ENVELOPE = seal(ALICE, "invoice", PAYLOADS[4], now_ms=NOW)
INVOICE_FRAME = frame(INVOICE_ENVELOPE)


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_seal_frame_unframe_verify_round_trip(payload: Any) -> None:
    env = seal(ALICE, "msg", payload, now_ms=NOW)
    assert (env.version, env.kind, env.sender, env.timestamp_ms) == (PROTOCOL_VERSION, "msg", ALICE.address, NOW)
    assert len(env.nonce) == 32 and int(env.nonce, 16) >= 0 and len(env.signature) == 65
    again = unframe(frame(env))
    assert again == env
    result = verify(again)
    assert result == payload and type(result) is type(payload)


def test_a_frame_in_non_canonical_msgpack_is_refused() -> None:
    """The same fields with the timestamp spelled as an int64 instead of a uint64: equal
    meaning, other bytes.  Only frame()'s own spelling is accepted (hypothesis found this
    by flipping one byte of a valid frame)."""
    stamp = b"\xcf" + NOW.to_bytes(8, "big")
    assert INVOICE_FRAME.count(stamp) == 1
    respelled = INVOICE_FRAME.replace(stamp, b"\xd3" + NOW.to_bytes(8, "big"))
    assert msgpack.unpackb(respelled[4:]) == msgpack.unpackb(INVOICE_FRAME[4:])
    with pytest.raises(ProtocolError, match="canonical"):
        unframe(respelled)


def test_money_stays_decimal() -> None:
    invoice = verify(unframe(INVOICE_FRAME))
    assert invoice.amount == Decimal("0.00002") and isinstance(invoice.amount, Decimal)
    assert all(isinstance(v, Decimal) for v in invoice.usage.values())


def test_nonces_are_fresh_and_now_is_the_default() -> None:
    first, second = seal(ALICE, "ping", None), seal(ALICE, "ping", None)
    assert first.nonce != second.nonce
    assert abs(first.timestamp_ms - now_ms()) < 60_000


def test_read_and_write_frame_over_a_real_socket() -> None:
    envelopes = [seal(ALICE, "msg", p) for p in PAYLOADS]

    async def main() -> list[Any]:
        received: list[Any] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    received.append(verify(await read_frame(reader)))
            except ConnectionError:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for env in envelopes:
            writer.write(frame(env))
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        for _ in range(200):
            if len(received) == len(envelopes):
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return received

    assert asyncio.run(asyncio.wait_for(main(), 10)) == PAYLOADS


def test_seal_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ProtocolError):
        seal(ALICE, "msg", object())
    with pytest.raises(ProtocolError):
        seal(ALICE, 7, None)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        seal(ALICE, "msg", None, now_ms=1.5)  # type: ignore[arg-type]


# -- signatures ---------------------------------------------------------------------------------

def _signed(wallet: Wallet, **fields: Any) -> Envelope:
    """An envelope with arbitrary fields, properly signed by ``wallet``."""
    unsigned = dataclasses.replace(seal(wallet, "msg", "x", now_ms=NOW), signature=b"", **fields)
    return dataclasses.replace(unsigned, signature=wallet.sign_message_hash(unsigned.digest()))


def _tamper(env: Envelope, name: str, data: st.DataObject) -> Envelope:
    value = getattr(env, name)
    if isinstance(value, int):
        new: Any = value ^ (1 << data.draw(st.integers(0, 63), label="bit"))
    else:
        raw = bytearray(value if isinstance(value, bytes) else value.encode())
        raw[data.draw(st.integers(0, len(raw) - 1), label="position")] ^= data.draw(st.integers(1, 255), label="mask")
        new = bytes(raw) if isinstance(value, bytes) else raw.decode("utf-8", "surrogateescape")
    return dataclasses.replace(env, **{name: new})


@given(st.sampled_from(["body", "kind", "nonce", "timestamp_ms", "sender", "signature", "version"]), st.data())
@FAST
def test_tampering_with_any_field_is_refused(name: str, data: st.DataObject) -> None:
    TRIED["tamper_field"] += 1
    with pytest.raises(ProtocolError):
        verify(_tamper(INVOICE_ENVELOPE, name, data))


@given(st.integers(0, len(INVOICE_FRAME) - 1), st.integers(1, 255))
@FAST
def test_tampering_with_any_frame_byte_is_refused(position: int, mask: int) -> None:
    TRIED["tamper_frame"] += 1
    data = bytearray(INVOICE_FRAME)
    data[position] ^= mask
    with pytest.raises(ProtocolError):
        verify(unframe(bytes(data)))


def test_forged_sender_is_refused() -> None:
    env = seal(ALICE, "publish", PAYLOADS[0], now_ms=NOW)
    with pytest.raises(ProtocolError, match="bad signature: signed by 0x.*not by " + BOB.address):
        verify(dataclasses.replace(env, sender=BOB.address))
    # Alice signs a digest that names Bob as the sender: the signer is still Alice.
    forged = dataclasses.replace(env, sender=BOB.address, signature=b"")
    forged = dataclasses.replace(forged, signature=ALICE.sign_message_hash(forged.digest()))
    with pytest.raises(ProtocolError, match=f"bad signature: signed by {ALICE.address}, not by {BOB.address}"):
        verify(forged)


def test_sender_must_be_checksummed() -> None:
    lower = _signed(ALICE, sender=ALICE.address.lower())
    with pytest.raises(ProtocolError, match="bad signature: sender .* is not checksummed"):
        verify(lower)
    for sender in ["", "0x", ALICE.address[:-1], ALICE.address + "0", "0x" + "zz" * 20, " " + ALICE.address[1:]]:
        with pytest.raises(ProtocolError, match="bad signature"):
            verify(dataclasses.replace(INVOICE_ENVELOPE, sender=sender))


def test_malformed_signatures_are_refused() -> None:
    sig = INVOICE_ENVELOPE.signature
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high_s = r + (N - s).to_bytes(32, "big") + bytes([55 - v])  # the same signature, malleated
    cases = {
        "empty": b"",
        "short": sig[:64],
        "long": sig + b"\x00",
        "v=0": sig[:64] + b"\x00",
        "v=1": sig[:64] + b"\x01",
        "v=29": sig[:64] + b"\x1d",
        "v=255": sig[:64] + b"\xff",
        "r=0": bytes(32) + sig[32:],
        "r=N": N.to_bytes(32, "big") + sig[32:],
        "s=0": r + bytes(32) + sig[64:],
        "high s": high_s,
        "all ff": b"\xff" * 65,
        "all zero": bytes(65),
        "r not on curve": (5).to_bytes(32, "big") + sig[32:],
    }
    assert verify(INVOICE_ENVELOPE) == PAYLOADS[4]  # the unaltered signature verifies
    for name, bad in cases.items():
        assert bad != INVOICE_ENVELOPE.signature, name
        with pytest.raises(ProtocolError, match="bad signature"):
            verify(dataclasses.replace(INVOICE_ENVELOPE, signature=bad))


def test_other_protocol_version_is_refused_naming_both() -> None:
    with pytest.raises(ProtocolError, match=r"version 2\b.*version 1\b"):
        verify(_signed(ALICE, version=2))


def test_undecodable_signed_body_raises_protocol_error() -> None:
    # An Offer whose properties are not a mapping, signed correctly: refused by name.
    body = msgpack.packb(msgpack.ExtType(2, msgpack.packb(["Offer", [5, "c", "p", "i", 0]])))
    with pytest.raises(ProtocolError, match="malformed Offer"):
        verify(_signed(ALICE, body=body))


@given(st.binary(max_size=300))
@settings(FAST, max_examples=200)
def test_hostile_signed_bodies_raise_protocol_error_only(body: bytes) -> None:
    TRIED["signed_body"] += 1
    try:
        verify(_signed(BOB, body=body))
    except ProtocolError:
        pass


def test_coincurve_and_eth_keys_backends_agree() -> None:
    fast, slow = identity.load_crypto(prefer_coincurve=True), identity.load_crypto(prefer_coincurve=False)
    assert slow.name == "eth_keys"
    for i in range(3):
        digest = os.urandom(32)
        sig = (ALICE if i % 2 else BOB).sign_message_hash(digest)
        assert fast.recover(digest, sig[:64], sig[64] - 27) == slow.recover(digest, sig[:64], sig[64] - 27)
    expected = bytes.fromhex(ALICE.address[2:])
    digest = os.urandom(32)
    sig = ALICE.sign_message_hash(digest)
    assert slow.recover(digest, sig[:64], sig[64] - 27) == expected
    with pytest.raises(Exception):  # noqa: B017 - verify turns any of these into ProtocolError
        slow.recover(digest, (5).to_bytes(32, "big") + sig[32:64], 0)


def test_verify_without_coincurve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "_crypto_backend", identity.load_crypto(prefer_coincurve=False))
    assert verify(INVOICE_ENVELOPE) == PAYLOADS[4]
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(dataclasses.replace(INVOICE_ENVELOPE, sender=BOB.address))


@given(st.binary(min_size=20, max_size=20))
@FAST
def test_checksum_matches_eth_utils(address: bytes) -> None:
    from eth_utils import to_checksum_address

    TRIED["checksum"] += 1
    assert identity.checksum_address(address) == to_checksum_address(address)


# -- replays -------------------------------------------------------------------------------------

def _unsigned(timestamp_ms: int, nonce: str | None = None) -> Envelope:
    return Envelope(1, "msg", ALICE.address, nonce or os.urandom(16).hex(), timestamp_ms, b"\xc0", b"")


def test_replay_is_refused() -> None:
    guard = ReplayGuard(window_ms=60_000)
    env = seal(ALICE, "ping", None, now_ms=NOW)
    guard.check(env, now_ms=NOW + 10)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(env, now_ms=NOW + 20)
    # A different sender may use the same nonce; the same sender in another case may not.
    guard.check(dataclasses.replace(env, sender=BOB.address), now_ms=NOW + 30)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(dataclasses.replace(env, sender=env.sender.lower()), now_ms=NOW + 40)


def test_timestamps_outside_the_window_are_refused() -> None:
    guard = ReplayGuard(window_ms=60_000)
    with pytest.raises(ProtocolError, match="outside"):
        guard.check(_unsigned(NOW - 60_001), now_ms=NOW)
    with pytest.raises(ProtocolError, match="outside"):
        guard.check(_unsigned(NOW + 60_001), now_ms=NOW)
    guard.check(_unsigned(NOW - 60_000), now_ms=NOW)
    guard.check(_unsigned(NOW + 60_000), now_ms=NOW)
    guard.check(_unsigned(now_ms()))  # the default clock
    with pytest.raises(ProtocolError, match="outside"):
        guard.check(_unsigned(0))


def test_a_clock_stepping_back_does_not_readmit_forgotten_nonces() -> None:
    guard = ReplayGuard(window_ms=1_000)
    old = _unsigned(NOW)
    guard.check(old, now_ms=NOW)
    guard.check(_unsigned(NOW + 5_000), now_ms=NOW + 5_000)  # forgets `old`
    assert len(guard) == 1
    with pytest.raises(ProtocolError):
        guard.check(old, now_ms=NOW)


def test_memory_stays_bounded() -> None:
    guard = ReplayGuard(window_ms=1_000)
    for i in range(30_000):  # one message per millisecond for 30 s
        guard.check(_unsigned(NOW + i), now_ms=NOW + i)
        assert len(guard) <= 1_000 + guard._bucket_ms + 1
    assert len(guard._buckets) <= 1_000 // guard._bucket_ms + 2


def test_guard_refuses_rather_than_grows() -> None:
    guard = ReplayGuard(window_ms=60_000, max_remembered=100)
    for _ in range(100):
        guard.check(_unsigned(NOW), now_ms=NOW)
    with pytest.raises(ProtocolError, match="slow down"):
        guard.check(_unsigned(NOW), now_ms=NOW)
    assert len(guard) == 100
    guard.check(_unsigned(NOW + 61_000), now_ms=NOW + 61_000)
    assert len(guard) == 1


def test_guard_refuses_malformed_envelopes() -> None:
    guard = ReplayGuard()
    for env in [_unsigned(NOW, nonce="x"), _unsigned(NOW, nonce="A" * 32), _unsigned(NOW, nonce="0" * 10_000),
                dataclasses.replace(_unsigned(NOW), sender="me"),
                dataclasses.replace(_unsigned(NOW), timestamp_ms="now"), "not an envelope"]:
        with pytest.raises(ProtocolError):
            guard.check(env, now_ms=NOW)  # type: ignore[arg-type]
    assert len(guard) == 0
    with pytest.raises(ValueError):
        ReplayGuard(window_ms=-1)


# -- hostile bytes -------------------------------------------------------------------------------

def _prefixed(content: bytes) -> bytes:
    return len(content).to_bytes(4, "big") + content


def _unframe_and_verify(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Raise only ProtocolError; an envelope that parses must then fail to verify."""
    try:
        env = unframe(data, max_bytes)
    except ProtocolError:
        return
    with pytest.raises(ProtocolError):
        verify(env)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=40),
    st.binary(max_size=80), st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
msgpack_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=25,
)
field_like = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.text(max_size=50), st.binary(max_size=70),
    st.just(ALICE.address), st.just("ab" * 16), st.just(1), st.none(), st.booleans(),
)


@given(st.binary(max_size=400))
@FAST
def test_random_bytes_raise_protocol_error_only(data: bytes) -> None:
    TRIED["random_bytes"] += 1
    _unframe_and_verify(data)
    _unframe_and_verify(_prefixed(data))


@given(msgpack_values)
@FAST
def test_wrong_msgpack_shapes_raise_protocol_error_only(value: Any) -> None:
    TRIED["msgpack_shapes"] += 1
    with pytest.raises(ProtocolError):
        unframe(_prefixed(msgpack.packb(value, use_bin_type=True)))


@given(st.lists(field_like, min_size=5, max_size=9))
@FAST
def test_envelope_like_arrays_raise_protocol_error_only(fields: list[Any]) -> None:
    TRIED["envelope_arrays"] += 1
    _unframe_and_verify(_prefixed(msgpack.packb(fields, use_bin_type=True)))


@given(st.integers(0, 6), st.one_of(field_like, msgpack_values, st.text(), st.integers()))
@FAST
def test_hostile_envelope_fields_raise_protocol_error_only(index: int, value: Any) -> None:
    TRIED["envelope_fields"] += 1
    name = wire._FIELD_NAMES[index]
    original = getattr(INVOICE_ENVELOPE, name)
    assume(not (type(value) is type(original) and value == original))
    env = dataclasses.replace(INVOICE_ENVELOPE, **{name: value})
    with pytest.raises(ProtocolError):
        verify(env)
    try:
        ReplayGuard().check(env, now_ms=NOW)
    except ProtocolError:
        pass
    try:
        again = unframe(frame(env))
    except ProtocolError:
        return
    assert again == env


def test_every_truncation_of_a_valid_frame_is_refused() -> None:
    for end in range(len(INVOICE_FRAME)):
        with pytest.raises(ProtocolError, match="truncated"):
            unframe(INVOICE_FRAME[:end])
    with pytest.raises(ProtocolError, match="trailing"):
        unframe(INVOICE_FRAME + b"\x00")
    with pytest.raises(ProtocolError, match="trailing"):
        unframe(INVOICE_FRAME + INVOICE_FRAME)


def test_oversized_length_prefixes_are_refused() -> None:
    for length in [MAX_FRAME_BYTES + 1, 2**31, 2**32 - 1]:
        with pytest.raises(ProtocolError, match=f"frame of {length} bytes exceeds the maximum {MAX_FRAME_BYTES}"):
            unframe(length.to_bytes(4, "big") + b"\x00" * 16)
    with pytest.raises(ProtocolError, match="exceeds the maximum 100"):
        unframe(INVOICE_FRAME, max_bytes=100)
    assert unframe(INVOICE_FRAME, max_bytes=len(INVOICE_FRAME) - 4) == INVOICE_ENVELOPE


def test_non_bytes_are_refused() -> None:
    for data in [None, "abcd", 1234, [0, 0, 0, 0]]:
        with pytest.raises(ProtocolError):
            unframe(data)  # type: ignore[arg-type]
    assert unframe(bytearray(INVOICE_FRAME)) == unframe(memoryview(INVOICE_FRAME)) == INVOICE_ENVELOPE


async def _read_all(data: bytes, max_bytes: int, eof: bool = True) -> list[Envelope]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    envelopes = []
    while True:
        envelopes.append(await asyncio.wait_for(read_frame(reader, max_bytes), timeout=2))


def _read_outcome(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> type[BaseException]:
    try:
        asyncio.run(_read_all(data, max_bytes))
    except (ProtocolError, ConnectionError) as e:
        return type(e)
    raise AssertionError("unreachable")  # pragma: no cover


@given(st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: INVOICE_FRAME + b),
                 st.integers(0, len(INVOICE_FRAME)).map(lambda n: INVOICE_FRAME[:n])))
@FAST
def test_read_frame_on_hostile_bytes_raises_only_protocol_or_connection_error(data: bytes) -> None:
    TRIED["read_frame"] += 1
    # asyncio.TimeoutError (a hang) or anything else fails the test.
    assert _read_outcome(data, max_bytes=1_000) in (ProtocolError, ConnectionError)


def test_read_frame_outcomes() -> None:
    assert _read_outcome(b"") is ConnectionError
    assert _read_outcome(b"\x00\x00") is ConnectionError
    assert _read_outcome(INVOICE_FRAME[:-1]) is ConnectionError
    assert _read_outcome(INVOICE_FRAME * 3) is ConnectionError  # three frames, then EOF
    assert _read_outcome(_prefixed(b"\x93\x01\x02\x03")) is ProtocolError
    assert _read_outcome(_prefixed(b"")) is ProtocolError


def test_read_frame_refuses_an_oversized_length_before_reading_the_body() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))  # no body, no EOF: reading would hang
        with pytest.raises(ProtocolError, match=f"frame of {MAX_FRAME_BYTES + 1} bytes exceeds the maximum"):
            await asyncio.wait_for(read_frame(reader), timeout=2)

    asyncio.run(main())
