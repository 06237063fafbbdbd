"""Every protocol message survives msgpack; malformed bytes raise ProtocolError."""

from __future__ import annotations

from decimal import Decimal

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golem_dask.errors import ProtocolError
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import (
    MESSAGE_TYPES,
    Activity,
    ActivityState,
    Agreement,
    AgreementState,
    DebitNote,
    Demand,
    ExeCommand,
    Invoice,
    Issuer,
    Offer,
    Payment,
    Proposal,
)
from golem_dask.protocol.wire import decode, encode

ADDR = "0x" + "ab" * 20

scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.decimals(allow_nan=False, allow_infinity=False, places=18),
    st.text(max_size=20),
    st.booleans(),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4).map(tuple))
props = st.dictionaries(st.from_regex(r"golem\.[a-z]{1,8}(\.[a-z_]{1,8}){0,3}", fullmatch=True), values, max_size=8)


def proposal(**kw) -> Proposal:
    base = dict(
        issuer=Issuer.PROVIDER,
        properties={P.CPU_THREADS: 2, P.MEM_GIB: Decimal("3.5"), P.USAGE_VECTOR: [P.USAGE_CPU_SEC]},
        constraints="(&(golem.inf.mem.gib>=1))",
        offer_id="o1",
        demand_id="d1",
        provider_id=ADDR,
    )
    base.update(kw)
    return Proposal(**base)


def examples() -> list[object]:
    usage = {P.USAGE_CPU_SEC: Decimal("1.250"), P.USAGE_DURATION_SEC: Decimal("3.001")}
    return [
        Demand(properties={P.EXPIRATION: 1_700_000_000_000, P.MEM_GIB: Decimal("0.5")}, constraints="(a=1)"),
        Offer(properties={P.LINEAR_COEFFS: [Decimal("1e-5"), Decimal(0), Decimal("0.1")]}, constraints="(&)", provider_id=ADDR),
        proposal(),
        proposal(issuer=Issuer.REQUESTOR, prev_proposal_id="p0"),
        Agreement("a1", proposal(issuer=Issuer.REQUESTOR), proposal(), ADDR, ADDR, 123, AgreementState.APPROVED, 5, None),
        Activity("act1", "a1", ActivityState.FAILED, "exit 1"),
        ExeCommand("run", {"entry_point": "dask", "args": ["worker", "tcp://x:1"], "env": {"A": "b"}}),
        DebitNote("a1", "act1", usage, Decimal("0.000001"), ADDR, ADDR),
        Invoice("a1", ["act1"], usage, Decimal("0.00002"), ADDR, ADDR, ADDR, ADDR, "erc20-devnet-glm"),
        Payment(ADDR, ADDR, Decimal("0.00002"), "erc20-devnet-glm", ["inv1"], "0x" + "00" * 32),
    ]


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m in examples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    again = decode(encode(message))
    assert again == message
    assert type(again) is type(message)


def test_decimal_stays_exact() -> None:
    amount = Decimal("0.000081961111111111")
    again = decode(encode(DebitNote("a", "b", {P.USAGE_CPU_SEC: amount}, amount, ADDR, ADDR)))
    assert isinstance(again.total_amount_due, Decimal)
    # Same digits, not merely an equal value: a float on the way would change them.
    assert str(again.total_amount_due) == "0.000081961111111111"
    assert str(again.usage[P.USAGE_CPU_SEC]) == "0.000081961111111111"


@given(props)
@settings(max_examples=200, deadline=None)
def test_offer_properties_round_trip(properties: dict) -> None:
    offer = Offer(properties=properties, constraints="(&)", provider_id=ADDR)
    assert decode(encode(offer)) == offer


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_garbage_raises_protocol_error_only(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError:
        pass


def test_unknown_type_and_wrong_arity_are_refused() -> None:
    import msgpack

    bogus = msgpack.ExtType(2, msgpack.packb(["Evil", [1, 2]]))
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(msgpack.packb(bogus))
    short = msgpack.ExtType(2, msgpack.packb(["Activity", ["only-one"]]))
    with pytest.raises(ProtocolError, match="fields"):
        decode(msgpack.packb(short))


@pytest.mark.parametrize("value", [[1], "x", 3, None, {"a": [1]}, -1.5, b"\x00"])
def test_hostile_field_values_raise_protocol_error_only(value: object) -> None:
    """Every message type, every field set to a value of the wrong shape."""
    import dataclasses

    import msgpack

    for cls in MESSAGE_TYPES:
        fields = [value] * len(dataclasses.fields(cls))
        frame = msgpack.packb(msgpack.ExtType(2, msgpack.packb([cls.__name__, fields], use_bin_type=True)))
        try:
            assert isinstance(decode(frame), cls)
        except ProtocolError:
            pass


def test_messages_are_frozen() -> None:
    offer = examples()[1]
    with pytest.raises(AttributeError):
        offer.provider_id = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        offer.properties["golem.x"] = 1  # type: ignore[index]


@pytest.mark.parametrize("bad", ["NaN", "sNaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_at_decoding(bad: str) -> None:
    import msgpack

    decimal = msgpack.ExtType(1, bad.encode())
    note = msgpack.ExtType(2, msgpack.packb(["DebitNote", ["a", "b", {P.USAGE_CPU_SEC: decimal}, decimal, ADDR, ADDR,
                                                           "id", 0]], use_bin_type=True))
    with pytest.raises(ProtocolError, match="non-finite"):
        decode(msgpack.packb(note))
    with pytest.raises(ProtocolError, match="non-finite"):
        decode(msgpack.packb({"price": float(bad.lstrip("s"))}))


@pytest.mark.parametrize("field", ["usage", "amount"])
def test_negative_amounts_and_usage_are_refused_at_decoding(field: str) -> None:
    usage = {P.USAGE_CPU_SEC: Decimal("-1") if field == "usage" else Decimal(1)}
    amount = Decimal("-0.5") if field == "amount" else Decimal("0.5")
    for cls, args in ((DebitNote, ("a", "b", usage, amount, ADDR, ADDR)),
                      (Invoice, ("a", ["b"], usage, amount, ADDR, ADDR, ADDR, ADDR, "p"))):
        with pytest.raises(ValueError, match="finite amount >= 0"):
            cls(*args)
        # The same values sent by a stranger who bypassed the constructor:
        fields = list(args) + ["id", 0]
        raw = msgpack.packb(msgpack.ExtType(2, msgpack.packb([cls.__name__, fields], default=_raw_default,
                                                             use_bin_type=True)), use_bin_type=True)
        with pytest.raises(ProtocolError, match="finite amount >= 0"):
            decode(raw)
    assert Payment(ADDR, ADDR, Decimal(0), "p", (), "0x").amount == 0
    with pytest.raises(ValueError):
        Payment(ADDR, ADDR, Decimal(-1), "p", (), "0x")


def _raw_default(obj: object) -> object:
    import msgpack

    if isinstance(obj, Decimal):
        return msgpack.ExtType(1, str(obj).encode())
    raise TypeError(obj)
