"""The ``Market`` seam: everything the requestor says to providers.

It mirrors the three parts of Golem's requestor API so that every backend (the
embedded market, a TCP hub, the ``yagna`` daemon's REST API in :mod:`golem_dask.yagna`)
plugs in behind it:

* market: subscribe a demand, receive matching offers, counter-propose, make, confirm
  and terminate agreements;
* activity: create an activity on an agreement, run exe-script commands in it, watch
  its state, destroy it;
* payment: receive debit notes and invoices, accept or reject them, announce payments.

Every method is async and may raise :class:`~golem_dask.errors.NetworkError`; events
arrive as async iterators; ids are strings.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import (
    Activity,
    Agreement,
    DebitNote,
    Demand,
    ExeCommand,
    Invoice,
    Offer,
    Payment,
    Proposal,
)


@dataclass(frozen=True, slots=True)
class OfferReceived:
    """A provider's offer matched the demand; ``proposal`` is its initial proposal."""

    proposal: Proposal


@dataclass(frozen=True, slots=True)
class OfferWithdrawn:
    """A provider withdrew an offer (sold out, or re-published with new terms)."""

    offer_id: str


MarketEvent = OfferReceived | OfferWithdrawn
PaymentDocument = DebitNote | Invoice


class WorkerLink(Protocol):
    """A worker's connections to the scheduler through the market's network (see
    :meth:`Market.worker_link`): joined before deploy, started as the worker is run."""

    async def join(self) -> dict[str, Any]:
        """Add the worker's machine to the network; the deploy command's arguments."""

    async def start(self, entry_point: str, args: Sequence[str]) -> tuple[str, list[str]]:
        """Carry the worker's connections to its scheduler (``args`` are ``worker <scheduler>
        ...``) and back; the worker's command as its machine runs it."""

    async def close(self) -> None:
        """Stop carrying them and take the machine off the network."""


class Market(abc.ABC):
    """The requestor's side of a market backend."""

    #: Seconds to keep collecting offers after the first one before choosing; a
    #: backend whose offers all arrive at once (the embedded one) needs none.
    collection_window_s: float = 0.0
    #: Whether transfers are sealed to the provider's key (golem-dask providers open
    #: them); a backend whose providers cannot (yagna's VMs) carries them as they are.
    seals_secrets: bool = True
    #: Whether providers bill an activity from its creation (VM exe-units do) rather
    #: than from the worker's start: the requestor's metering starts there too.
    bills_whole_activity: bool = False
    #: What to check when a worker cannot reach the scheduler, said with the error.
    unreachable_hint: str = ""

    def bind_wallet(self, wallet: Wallet) -> None:  # noqa: B027 - optional hook
        """The requestor's key, for backends that sign agreements themselves.

        The cluster calls this before :meth:`start` with its payer's wallet; a backend
        given a wallet at construction keeps that one.
        """

    async def worker_link(self, agreement: Agreement) -> WorkerLink | None:
        """How the worker of ``agreement`` and the scheduler reach each other where the
        worker cannot dial this machine (a VPN of the market's), or None: it dials the
        scheduler directly."""
        return None

    def scheduler_host(self) -> str | None:
        """The address of this machine that the market's providers can reach (the
        requestor's scheduler listens there), or None for loopback."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect.  Called once before anything else."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect and end every event iterator.  Safe to call twice."""

    # -- market -------------------------------------------------------------------

    @abc.abstractmethod
    async def subscribe(self, demand: Demand) -> str:
        """Publish ``demand``; returns the subscription id."""

    @abc.abstractmethod
    async def unsubscribe(self, subscription_id: str) -> None:
        """Withdraw the demand; ends its event iterator."""

    @abc.abstractmethod
    def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        """Offers that match the demand both ways, and their withdrawals."""

    @abc.abstractmethod
    async def scan(self) -> list[Offer]:
        """Every offer the market knows, matching or not (to explain a failed search)."""

    @abc.abstractmethod
    async def counter(self, subscription_id: str, proposal_id: str, demand: Demand) -> Proposal:
        """Answer a provider's proposal with ours; returns the provider's reply.

        Raises :class:`~golem_dask.errors.ProposalRejected` with the provider's reason.
        """

    @abc.abstractmethod
    async def create_agreement(self, proposal_id: str, valid_to_ms: int) -> Agreement:
        """Turn the provider's last proposal into an agreement (not yet confirmed)."""

    @abc.abstractmethod
    async def confirm_agreement(self, agreement_id: str, timeout_s: float) -> Agreement:
        """Sign the agreement and wait for the provider's approval.

        Returns the agreement as approved, only if the provider signed exactly the terms
        the requestor signed; raises :class:`~golem_dask.errors.ProposalRejected` if it
        declined, or approved anything else.
        """

    @abc.abstractmethod
    async def terminate_agreement(self, agreement_id: str, reason: str) -> None:
        """End an agreement; the provider then sends its invoice."""

    # -- activity -------------------------------------------------------------------

    @abc.abstractmethod
    async def create_activity(self, agreement_id: str) -> Activity:
        """Create the agreement's activity on the provider."""

    @abc.abstractmethod
    async def exec(
        self, activity_id: str, commands: Sequence[ExeCommand], timeout_s: float
    ) -> list[str]:
        """Run exe-script commands in order; returns each command's output.

        Raises :class:`~golem_dask.errors.ActivityError` naming the failed command.
        """

    @abc.abstractmethod
    def activity_events(self, activity_id: str) -> AsyncIterator[Activity]:
        """State changes of an activity, ending after its final state."""

    @abc.abstractmethod
    async def destroy_activity(self, activity_id: str) -> None:
        """Stop the activity and free what it holds on the provider."""

    # -- payment ----------------------------------------------------------------------

    @abc.abstractmethod
    def payment_events(self) -> AsyncIterator[PaymentDocument]:
        """Debit notes and invoices addressed to this requestor."""

    @abc.abstractmethod
    async def accept(self, document: PaymentDocument, amount: Decimal) -> None:
        """Accept a debit note or invoice for ``amount``."""

    @abc.abstractmethod
    async def reject(self, document: PaymentDocument, reason: str) -> str | None:
        """Reject a debit note or invoice, telling the provider why.

        Returns a note for the bill when the backend had to do something else (the yagna
        daemon cannot reject a debit note: its agreement is terminated instead).
        """

    @abc.abstractmethod
    async def notify_payment(self, payment: Payment) -> None:
        """Tell the provider that a payment was made (with its transaction hash)."""
