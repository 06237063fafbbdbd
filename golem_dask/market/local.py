"""The embedded market: providers and requestor in one process.

This is the default behind ``GolemCluster()``: no daemon, no network.  It still does the
whole protocol (two-way matching, counter-proposals, agreements the provider approves,
activities, debit notes and invoices), and every message crosses it encoded and decoded
with the wire format, so what works here also works between machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from golem_dask.errors import ActivityError, MarketError, ProposalRejected
from golem_dask.market.base import Market, MarketEvent, OfferReceived, OfferWithdrawn, PaymentDocument
from golem_dask.protocol import constraints as C
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import (
    Activity,
    ActivityState,
    Agreement,
    DebitNote,
    Demand,
    ExeCommand,
    Invoice,
    Issuer,
    Offer,
    Payment,
    Proposal,
    new_id,
)
from golem_dask.protocol.wire import decode, encode
from golem_dask.provider.agent import ProviderAgent

T = TypeVar("T")
_FINAL = {ActivityState.TERMINATED, ActivityState.FAILED}


def _wire(message: T) -> T:
    """Pass a message through the wire format, as a networked backend would."""
    return decode(encode(message))  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1024)
def _filter(text: str) -> C.Filter:
    return C.parse(text)


def matches(demand: Demand | Proposal, offer: Offer | Proposal) -> bool:
    """Two-way matching: each side's properties satisfy the other's constraints."""
    return C.evaluate(_filter(demand.constraints), offer.properties) and C.evaluate(
        _filter(offer.constraints), demand.properties
    )


async def _drain(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not None:
        yield item


@dataclass(slots=True)
class _Subscription:
    demand: Demand
    queue: asyncio.Queue[MarketEvent | None] = field(default_factory=asyncio.Queue)
    sent: set[str] = field(default_factory=set)


class _Link:
    """One provider agent's connection to the embedded market."""

    def __init__(self, market: LocalMarket) -> None:
        self._market = market

    async def publish(self, offer: Offer) -> None:
        self._market._publish(_wire(offer))

    async def withdraw(self, offer_id: str) -> None:
        self._market._withdraw(offer_id)

    async def send(self, message: Activity | DebitNote | Invoice) -> None:
        self._market._deliver(_wire(message))


class LocalMarket(Market):
    """An in-process market with the given provider agents.

    Parameters
    ----------
    providers:
        The agents selling here.  The market connects them on ``start`` and closes them
        on ``close``.

    Examples
    --------
    >>> from golem_dask.market.local import LocalMarket
    >>> market = LocalMarket([])  # providers are added with add_provider()
    """

    def __init__(self, providers: Sequence[ProviderAgent] = ()) -> None:
        self.providers: dict[str, ProviderAgent] = {p.id: p for p in providers}
        self._offers: dict[str, Offer] = {}
        self._subs: dict[str, _Subscription] = {}
        self._proposals: dict[str, Proposal] = {}
        self._agreements: dict[str, Agreement] = {}
        self._activity_agent: dict[str, ProviderAgent] = {}
        self._activity_history: dict[str, list[Activity]] = {}
        self._activity_queues: dict[str, list[asyncio.Queue[Activity | None]]] = {}
        self._payments: asyncio.Queue[PaymentDocument | None] = asyncio.Queue()
        self._documents: dict[str, PaymentDocument] = {}
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<LocalMarket providers={len(self.providers)} offers={len(self._offers)}>"

    async def add_provider(self, agent: ProviderAgent) -> None:
        """Let another agent sell here (connects it at once if the market runs)."""
        self.providers[agent.id] = agent
        if self._started:
            await agent.connect(_Link(self))

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for agent in self.providers.values():
            await agent.connect(_Link(self))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for agent in self.providers.values():
            with contextlib.suppress(Exception):
                await agent.close()
        for sub in self._subs.values():
            sub.queue.put_nowait(None)
        for queues in self._activity_queues.values():
            for q in queues:
                q.put_nowait(None)
        self._payments.put_nowait(None)

    # -- provider side ----------------------------------------------------------------

    def _publish(self, offer: Offer) -> None:
        self._offers[offer.id] = offer
        for sub in self._subs.values():
            self._maybe_send(sub, offer)

    def _maybe_send(self, sub: _Subscription, offer: Offer) -> None:
        if matches(sub.demand, offer):
            proposal = Proposal(
                issuer=Issuer.PROVIDER,
                properties=offer.properties,
                constraints=offer.constraints,
                offer_id=offer.id,
                demand_id=sub.demand.id,
                provider_id=offer.provider_id,
            )
            self._proposals[proposal.id] = proposal
            sub.sent.add(offer.id)
            sub.queue.put_nowait(OfferReceived(proposal))

    def _withdraw(self, offer_id: str) -> None:
        self._offers.pop(offer_id, None)
        for sub in self._subs.values():
            if offer_id in sub.sent:
                sub.sent.discard(offer_id)
                sub.queue.put_nowait(OfferWithdrawn(offer_id))

    def _deliver(self, message: Activity | DebitNote | Invoice) -> None:
        if isinstance(message, Activity):
            self._activity_history.setdefault(message.id, []).append(message)
            for q in self._activity_queues.get(message.id, []):
                q.put_nowait(message)
                if message.state in _FINAL:
                    q.put_nowait(None)
        else:
            self._documents[message.id] = message
            self._payments.put_nowait(message)

    # -- market -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MarketError("the embedded market is closed")

    async def subscribe(self, demand: Demand) -> str:
        self._check_open()
        _filter(demand.constraints)
        sub_id = new_id()
        sub = self._subs[sub_id] = _Subscription(_wire(demand))
        for offer in list(self._offers.values()):
            self._maybe_send(sub, offer)
        return sub_id

    async def unsubscribe(self, subscription_id: str) -> None:
        sub = self._subs.pop(subscription_id, None)
        if sub is not None:
            sub.queue.put_nowait(None)

    def events(self, subscription_id: str) -> AsyncIterator[MarketEvent]:
        sub = self._subs.get(subscription_id)
        if sub is None:
            raise MarketError(f"no subscription {subscription_id}")
        return _drain(sub.queue)

    async def scan(self) -> list[Offer]:
        return list(self._offers.values())

    def _agent(self, provider_id: str) -> ProviderAgent:
        agent = self.providers.get(provider_id)
        if agent is None:
            raise MarketError(f"provider {provider_id} left the market")
        return agent

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
        reply = _wire(await self._agent(theirs.provider_id).on_proposal(_wire(ours)))
        self._proposals[reply.id] = reply
        return reply

    async def create_agreement(self, proposal_id: str, valid_to_ms: int) -> Agreement:
        self._check_open()
        theirs = self._proposals.get(proposal_id)
        ours = self._proposals.get(theirs.prev_proposal_id or "") if theirs else None
        if theirs is None or ours is None or theirs.issuer is not Issuer.PROVIDER:
            raise MarketError(f"proposal {proposal_id} is not a provider's reply to our counter-proposal")
        platform = ours.properties.get(P.CHOSEN_PLATFORM, "")
        agreement = Agreement(
            id=new_id(),
            demand=ours,
            offer=theirs,
            requestor_id=str(ours.properties.get(P.payment_address(platform), "")),
            provider_id=theirs.provider_id,
            valid_to_ms=valid_to_ms,
        )
        self._agreements[agreement.id] = agreement
        return agreement

    async def confirm_agreement(self, agreement_id: str, timeout_s: float) -> Agreement:
        agreement = self._agreements.get(agreement_id)
        if agreement is None:
            raise MarketError(f"no agreement {agreement_id}")
        try:
            approved = await asyncio.wait_for(self._agent(agreement.provider_id).approve(_wire(agreement)), timeout_s)
        except asyncio.TimeoutError as e:
            raise ProposalRejected(f"provider did not approve agreement {agreement_id} within {timeout_s}s") from e
        approved = _wire(approved)
        self._agreements[agreement_id] = approved
        return approved

    async def terminate_agreement(self, agreement_id: str, reason: str) -> None:
        agreement = self._agreements.get(agreement_id)
        if agreement is None:
            raise MarketError(f"no agreement {agreement_id}")
        await self._agent(agreement.provider_id).terminate(agreement_id, reason)

    # -- activity ---------------------------------------------------------------------

    async def create_activity(self, agreement_id: str) -> Activity:
        self._check_open()
        agreement = self._agreements.get(agreement_id)
        if agreement is None:
            raise MarketError(f"no agreement {agreement_id}")
        agent = self._agent(agreement.provider_id)
        activity = _wire(await agent.create_activity(agreement_id))
        self._activity_agent[activity.id] = agent
        return activity

    def _activity(self, activity_id: str) -> ProviderAgent:
        agent = self._activity_agent.get(activity_id)
        if agent is None:
            raise ActivityError(f"no activity {activity_id}")
        return agent

    async def exec(self, activity_id: str, commands: Sequence[ExeCommand], timeout_s: float) -> list[str]:
        agent = self._activity(activity_id)
        commands = [_wire(c) for c in commands]
        try:
            return await asyncio.wait_for(agent.exec(activity_id, commands), timeout_s)
        except asyncio.TimeoutError as e:
            raise ActivityError(f"exe-script on activity {activity_id} took longer than {timeout_s}s") from e

    def activity_events(self, activity_id: str) -> AsyncIterator[Activity]:
        q: asyncio.Queue[Activity | None] = asyncio.Queue()
        for event in self._activity_history.get(activity_id, []):
            q.put_nowait(event)
            if event.state in _FINAL:
                q.put_nowait(None)
        self._activity_queues.setdefault(activity_id, []).append(q)
        return _drain(q)

    async def destroy_activity(self, activity_id: str) -> None:
        await self._activity(activity_id).destroy_activity(activity_id)

    # -- payment ----------------------------------------------------------------------

    def payment_events(self) -> AsyncIterator[PaymentDocument]:
        return _drain(self._payments)

    async def accept(self, document: PaymentDocument, amount: Decimal) -> None:
        agent = self._agent(document.issuer_id)
        await agent.on_accepted(document.id, amount)

    async def reject(self, document: PaymentDocument, reason: str) -> None:
        await self._agent(document.issuer_id).on_rejected(document.id, reason)

    async def notify_payment(self, payment: Payment) -> None:
        await self._agent(payment.payee_addr).on_payment(_wire(payment))
