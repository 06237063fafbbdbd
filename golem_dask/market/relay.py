"""What every market backend that talks to provider agents has in common.

A requestor's counter-proposal, agreement, activity and payment calls all end up as a
call of one provider agent method (:data:`~golem_dask.market.link.PROVIDER_METHODS`) on the provider's
side (``on_proposal``, ``approve``, ``exec``, ...), and what providers send back (activity
states, debit notes, invoices) arrives as pushed messages.  :class:`RelayMarket` keeps the
requestor's bookkeeping (proposals, agreements, which provider runs which activity, event
queues) and leaves to subclasses how offers arrive and how a call reaches a provider:
in-process for the embedded market, over TCP through a hub for the networked one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from golem_dask.errors import ActivityError, MarketError, ProposalRejected, ProtocolError
from golem_dask.market.base import Market, PaymentDocument
from golem_dask.protocol import properties as P
from golem_dask.protocol import terms
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import (
    Activity,
    ActivityState,
    Agreement,
    AgreementState,
    DebitNote,
    Demand,
    ExeCommand,
    Invoice,
    Issuer,
    Payment,
    Proposal,
    new_id,
)

T = TypeVar("T")
FINAL_STATES = {ActivityState.TERMINATED, ActivityState.FAILED}
#: Activity states kept per activity for followers that come late (a provider may send many).
ACTIVITY_HISTORY = 32


def check_approval(ours: Agreement, approved: Any) -> None:
    """Refuse an approval unless it is our agreement, approved and signed by its provider
    over exactly the terms we signed (a provider may not change its prices after it was
    chosen)."""
    provider = ours.provider_id
    if not isinstance(approved, Agreement) or approved.id != ours.id:
        raise ProposalRejected(f"provider {provider} approved something else than agreement {ours.id}")
    if terms.digest(approved) != terms.digest(ours) or approved.requestor_signature != ours.requestor_signature:
        changed = [f.name for f in dataclasses.fields(Agreement)
                   if f.name in ("demand", "offer", "requestor_id", "provider_id", "valid_to_ms")
                   and getattr(approved, f.name) != getattr(ours, f.name)]
        raise ProposalRejected(f"provider {provider} approved other terms than agreement {ours.id} "
                               f"(changed: {', '.join(changed) or 'signature'}); refused")
    if approved.state is not AgreementState.APPROVED:
        raise ProposalRejected(f"provider {provider} answered agreement {ours.id} in state {approved.state.value}")
    try:
        terms.check(approved, "provider")
    except ProtocolError as e:
        raise ProposalRejected(f"provider {provider}'s approval of {ours.id} is not valid: {e}") from None


async def drain(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """Items of ``queue`` until a ``None`` ends it."""
    while (item := await queue.get()) is not None:
        yield item


class RelayMarket(Market):
    """A market whose providers are reached through :meth:`_call`."""

    def __init__(self, wallet: Wallet | None = None) -> None:
        self.wallet = wallet  # the requestor's: it signs every agreement's terms
        self._proposals: dict[str, Proposal] = {}
        self._agreements: dict[str, Agreement] = {}
        self._activity_provider: dict[str, str] = {}
        self._activity_agreement: dict[str, str] = {}
        self._activity_history: dict[str, list[Activity]] = {}
        self._activity_queues: dict[str, list[asyncio.Queue[Activity | None]]] = {}
        self._payments: asyncio.Queue[PaymentDocument | None] = asyncio.Queue()
        self._closed = False

    def bind_wallet(self, wallet: Wallet) -> None:
        if self.wallet is None:
            self.wallet = wallet

    @abc.abstractmethod
    async def _call(self, provider_id: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """Call ``method`` of the provider agent ``provider_id`` with ``args``."""

    def _check_open(self) -> None:
        if self._closed:
            raise MarketError(f"{type(self).__name__} is closed")

    def _end_streams(self) -> None:
        for queues in self._activity_queues.values():
            for q in queues:
                q.put_nowait(None)
        self._payments.put_nowait(None)

    def adopt(self, agreement: Agreement) -> None:
        """Know an agreement signed by an earlier run of this requestor (its ledger has
        it), so that its provider's documents are delivered and can be answered."""
        self._agreements.setdefault(agreement.id, agreement)

    def _remember_offer_proposal(self, proposal: Proposal) -> None:
        self._proposals[proposal.id] = proposal

    def _deliver(self, message: Activity | DebitNote | Invoice) -> None:
        """A message a provider pushed: an activity state or a payment document."""
        if isinstance(message, Activity):
            history = self._activity_history.setdefault(message.id, [])
            if history and history[-1].state in FINAL_STATES:
                return  # an ended activity has nothing more to say
            history.append(message)
            del history[:-ACTIVITY_HISTORY]  # a late follower needs the latest states, not all
            final = message.state in FINAL_STATES
            # An ended activity's followers are told and then forgotten.
            queues = self._activity_queues.pop(message.id, []) if final else self._activity_queues.get(message.id, [])
            for q in queues:
                q.put_nowait(message)
                if final:
                    q.put_nowait(None)
        elif isinstance(message, DebitNote | Invoice):
            self._payments.put_nowait(message)

    # -- negotiation ----------------------------------------------------------------------

    async def counter(self, subscription_id: str, proposal_id: str, demand: Demand) -> Proposal:
        self._check_open()
        theirs = self._proposals.get(proposal_id)
        if theirs is None or theirs.issuer is not Issuer.PROVIDER:
            raise MarketError(f"no provider proposal {proposal_id}")
        ours = Proposal(
            issuer=Issuer.REQUESTOR,
            properties=demand.properties,
            constraints=demand.constraints,
            offer_id=theirs.offer_id,
            demand_id=demand.id,
            provider_id=theirs.provider_id,
            prev_proposal_id=proposal_id,
        )
        self._proposals[ours.id] = ours
        reply = await self._call(theirs.provider_id, "on_proposal", ours)
        if not isinstance(reply, Proposal) or reply.provider_id != theirs.provider_id or reply.prev_proposal_id != ours.id:
            raise MarketError(f"provider {theirs.provider_id} answered with something that is not its reply")
        self._proposals[reply.id] = reply
        return reply

    async def create_agreement(self, proposal_id: str, valid_to_ms: int) -> Agreement:
        self._check_open()
        theirs = self._proposals.get(proposal_id)
        ours = self._proposals.get(theirs.prev_proposal_id or "") if theirs else None
        if theirs is None or ours is None or theirs.issuer is not Issuer.PROVIDER:
            raise MarketError(f"proposal {proposal_id} is not a provider's reply to our counter-proposal")
        if self.wallet is None:
            raise MarketError(f"{type(self).__name__} has no requestor wallet to sign agreements with; "
                              "pass one (GolemCluster does: its payer's)")
        platform = ours.properties.get(P.CHOSEN_PLATFORM, "")
        requestor = str(ours.properties.get(P.payment_address(platform), ""))
        if requestor != self.wallet.address:
            raise MarketError(f"the demand names {requestor} as the payer, but this market signs as "
                              f"{self.wallet.address}")
        agreement = terms.sign(Agreement(
            id=new_id(),
            demand=ours,
            offer=theirs,
            requestor_id=requestor,
            provider_id=theirs.provider_id,
            valid_to_ms=valid_to_ms,
        ), self.wallet)
        self._agreements[agreement.id] = agreement
        return agreement

    def _agreement(self, agreement_id: str) -> Agreement:
        agreement = self._agreements.get(agreement_id)
        if agreement is None:
            raise MarketError(f"no agreement {agreement_id}")
        return agreement

    async def confirm_agreement(self, agreement_id: str, timeout_s: float) -> Agreement:
        agreement = self._agreement(agreement_id)
        approved = await self._call(agreement.provider_id, "approve", agreement, timeout_s=timeout_s)
        try:
            check_approval(agreement, approved)
        except ProposalRejected:
            # The provider may think it holds an agreement: tell it that it does not.
            with contextlib.suppress(Exception):
                await self._call(agreement.provider_id, "terminate", agreement_id, "approved other terms")
            raise
        self._agreements[agreement_id] = approved
        return approved

    async def terminate_agreement(self, agreement_id: str, reason: str) -> None:
        agreement = self._agreement(agreement_id)
        await self._call(agreement.provider_id, "terminate", agreement_id, reason)

    # -- activity ---------------------------------------------------------------------

    async def create_activity(self, agreement_id: str) -> Activity:
        self._check_open()
        agreement = self._agreement(agreement_id)
        activity = await self._call(agreement.provider_id, "create_activity", agreement_id)
        if not isinstance(activity, Activity) or activity.agreement_id != agreement_id:
            raise MarketError(f"provider {agreement.provider_id} created no activity for {agreement_id}")
        self._activity_provider[activity.id] = agreement.provider_id
        self._activity_agreement[activity.id] = agreement_id
        return activity

    def _activity(self, activity_id: str) -> str:
        provider = self._activity_provider.get(activity_id)
        if provider is None:
            raise ActivityError(f"no activity {activity_id}")
        return provider

    async def exec(self, activity_id: str, commands: Sequence[ExeCommand], timeout_s: float) -> list[str]:
        provider = self._activity(activity_id)
        try:
            return list(await self._call(provider, "exec", activity_id, list(commands), timeout_s=timeout_s))
        except asyncio.TimeoutError as e:
            raise ActivityError(f"exe-script on activity {activity_id} took longer than {timeout_s}s") from e

    def activity_events(self, activity_id: str) -> AsyncIterator[Activity]:
        q: asyncio.Queue[Activity | None] = asyncio.Queue()
        history = self._activity_history.get(activity_id, [])
        for event in history:
            q.put_nowait(event)
        if history and history[-1].state in FINAL_STATES:
            q.put_nowait(None)
        else:
            self._activity_queues.setdefault(activity_id, []).append(q)
        return drain(q)

    async def destroy_activity(self, activity_id: str) -> None:
        await self._call(self._activity(activity_id), "destroy_activity", activity_id)

    # -- payment ----------------------------------------------------------------------

    def payment_events(self) -> AsyncIterator[PaymentDocument]:
        return drain(self._payments)

    async def accept(self, document: PaymentDocument, amount: Decimal) -> None:
        await self._call(document.issuer_id, "on_accepted", document.id, amount)

    async def reject(self, document: PaymentDocument, reason: str) -> None:
        await self._call(document.issuer_id, "on_rejected", document.id, reason)

    async def notify_payment(self, payment: Payment) -> None:
        await self._call(payment.payee_addr, "on_payment", payment)
