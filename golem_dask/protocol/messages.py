"""The Golem protocol's messages as plain frozen data.

The flow reads top to bottom: a requestor's :class:`Demand` meets a provider's
:class:`Offer`; they exchange :class:`Proposal` s until one side turns the last one into
an :class:`Agreement`; the agreement gets one :class:`Activity` driven by
:class:`ExeCommand` scripts; the provider reports usage in :class:`DebitNote` s and bills
an :class:`Invoice`; the requestor answers with a :class:`Payment`.

Times are integer milliseconds since the epoch (as in ``golem.srv.comp.expiration``),
ids are strings, money is ``Decimal`` token units.  Every class encodes to msgpack and
back without loss (:mod:`golem_dask.protocol.wire`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Any

from golem_dask.protocol.properties import freeze


def new_id() -> str:
    """A fresh random id (32 hex characters)."""
    return uuid.uuid4().hex


def now_ms() -> int:
    """The current time in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def _freeze_props(obj: Any, name: str = "properties") -> None:
    object.__setattr__(obj, name, freeze(getattr(obj, name)))


def _amount(value: Any, what: str) -> None:
    """Refuse what can never be an amount of money or of usage (decoding turns the
    ValueError into a ProtocolError)."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise ValueError(f"{what} must be a Decimal, not {type(value).__name__}")
    if not Decimal(value).is_finite() or value < 0:
        raise ValueError(f"{what} must be a finite amount >= 0, not {value}")


def _usage(usage: Mapping[str, Any]) -> None:
    for name, value in usage.items():
        _amount(value, f"usage {name}")


@dataclass(frozen=True, slots=True)
class Demand:
    """What a requestor needs: properties it states and constraints on offers."""

    properties: Mapping[str, Any]
    constraints: str
    id: str = field(default_factory=new_id)

    def __post_init__(self) -> None:
        _freeze_props(self)


@dataclass(frozen=True, slots=True)
class Offer:
    """What a provider sells: node properties, prices, and constraints on demands."""

    properties: Mapping[str, Any]
    constraints: str
    provider_id: str
    id: str = field(default_factory=new_id)
    timestamp_ms: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        _freeze_props(self)


class Issuer(str, Enum):
    """Which side wrote a proposal."""

    REQUESTOR = "requestor"
    PROVIDER = "provider"


@dataclass(frozen=True, slots=True)
class Proposal:
    """One step of a negotiation between a demand and an offer."""

    issuer: Issuer
    properties: Mapping[str, Any]
    constraints: str
    offer_id: str
    demand_id: str
    provider_id: str
    prev_proposal_id: str | None = None
    id: str = field(default_factory=new_id)
    timestamp_ms: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        _freeze_props(self)
        object.__setattr__(self, "issuer", Issuer(self.issuer))


class AgreementState(str, Enum):
    PROPOSAL = "Proposal"
    APPROVED = "Approved"
    TERMINATED = "Terminated"


@dataclass(frozen=True, slots=True)
class Agreement:
    """Terms both sides signed: the requestor's and the provider's final proposals.

    The signatures cover the terms (:mod:`golem_dask.protocol.terms`), not the state.
    """

    id: str
    demand: Proposal
    offer: Proposal
    requestor_id: str
    provider_id: str
    valid_to_ms: int
    state: AgreementState = AgreementState.PROPOSAL
    approved_at_ms: int | None = None
    terminated_reason: str | None = None
    # Hidden from repr: 65 opaque bytes each.
    requestor_signature: bytes = field(default=b"", repr=False)
    provider_signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", AgreementState(self.state))
        for name in ("requestor_signature", "provider_signature"):
            if not isinstance(getattr(self, name), bytes):
                raise ValueError(f"{name} must be bytes")

    @property
    def properties(self) -> dict[str, Any]:
        """The agreed properties: the offer's, overridden by the demand's."""
        return {**self.offer.properties, **self.demand.properties}


class ActivityState(str, Enum):
    NEW = "New"
    INITIALIZED = "Initialized"
    DEPLOYED = "Deployed"
    READY = "Ready"
    RUNNING = "Running"
    TERMINATED = "Terminated"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class Activity:
    """The one execution environment an agreement buys (a process or a container)."""

    id: str
    agreement_id: str
    state: ActivityState = ActivityState.NEW
    reason: str | None = None
    timestamp_ms: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", ActivityState(self.state))


@dataclass(frozen=True, slots=True)
class ExeCommand:
    """One command of an exe-script: deploy, start, run, transfer or terminate.

    ``args`` holds the command's arguments (``{"entry_point": ..., "args": [...]}`` for
    ``run``, ``{"from": url, "to": path}`` for ``transfer``).
    """

    command: str
    # Hidden from repr: a transfer's args may carry storage credentials.
    args: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.command not in {"deploy", "start", "run", "transfer", "terminate"}:
            raise ValueError(f"unknown exe-script command {self.command!r}")
        _freeze_props(self, "args")


@dataclass(frozen=True, slots=True)
class DebitNote:
    """Usage and amount due so far on a running activity."""

    agreement_id: str
    activity_id: str
    usage: Mapping[str, Decimal]
    total_amount_due: Decimal
    issuer_id: str
    recipient_id: str
    id: str = field(default_factory=new_id)
    timestamp_ms: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        _freeze_props(self, "usage")
        _usage(self.usage)
        _amount(self.total_amount_due, "total_amount_due")


@dataclass(frozen=True, slots=True)
class Invoice:
    """The provider's final bill for an agreement."""

    agreement_id: str
    activity_ids: tuple[str, ...]
    usage: Mapping[str, Decimal]
    amount: Decimal
    issuer_id: str
    recipient_id: str
    payee_addr: str
    payer_addr: str
    payment_platform: str
    id: str = field(default_factory=new_id)
    timestamp_ms: int = field(default_factory=now_ms)

    def __post_init__(self) -> None:
        _freeze_props(self, "usage")
        _usage(self.usage)
        _amount(self.amount, "amount")
        object.__setattr__(self, "activity_ids", tuple(self.activity_ids))


@dataclass(frozen=True, slots=True)
class Payment:
    """A transfer the requestor made to settle invoices."""

    payer_addr: str
    payee_addr: str
    amount: Decimal
    payment_platform: str
    invoice_ids: tuple[str, ...]
    tx_hash: str
    id: str = field(default_factory=new_id)
    timestamp_ms: int = field(default_factory=now_ms)
    #: The agreements the payment is for (a payee credits it to them, up to what the
    #: transaction really moved).
    agreement_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _amount(self.amount, "amount")
        object.__setattr__(self, "invoice_ids", tuple(self.invoice_ids))
        object.__setattr__(self, "agreement_ids", tuple(self.agreement_ids))


MESSAGE_TYPES: tuple[type, ...] = (
    Demand,
    Offer,
    Proposal,
    Agreement,
    Activity,
    ExeCommand,
    DebitNote,
    Invoice,
    Payment,
)
