"""The provider agent: sells slices of a machine, runs activities, meters and bills.

An agent publishes one offer describing its *free* capacity and prices.  Each approved
agreement takes a slice (the threads, memory and disk the demand asked for); the agent
re-publishes its offer with what is left and withdraws it when nothing is.  Each
agreement gets one activity, run by the agent's :class:`~golem_dask.provider.runtime.base.Runtime`.
While an activity runs the agent sends debit notes; when the agreement ends it sends an
invoice priced by the offer's linear model.

The agent talks to its market through a :class:`ProviderLink`; it never imports the
requestor's cluster or accountant.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from golem_dask import config
from golem_dask.errors import ActivityError, ProposalRejected, ProtocolError
from golem_dask.protocol import properties as P
from golem_dask.protocol import terms
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import (
    Activity,
    ActivityState,
    Agreement,
    AgreementState,
    DebitNote,
    ExeCommand,
    Invoice,
    Issuer,
    Offer,
    Payment,
    Proposal,
    new_id,
    now_ms,
)
from golem_dask.protocol.properties import Resources
from golem_dask.provider.deal import Deal
from golem_dask.provider.offers import ProposalBook, ProviderSettings, check_demand, make_offer
from golem_dask.provider.runtime.base import Runtime

__all__ = ["ProviderAgent", "ProviderLink", "ProviderSettings"]

logger = logging.getLogger(__name__)


class ProviderLink(Protocol):
    """What an agent needs from its market: publish offers, send messages."""

    async def publish(self, offer: Offer) -> None: ...

    async def withdraw(self, offer_id: str) -> None: ...

    async def send(self, message: Activity | DebitNote | Invoice) -> None: ...


class ProviderAgent:
    """Sells this machine's capacity on a market.

    Parameters
    ----------
    settings:
        Capacity, prices and payment platform.
    runtime:
        How activities run (``ProcessRuntime()``, ``DockerRuntime(...)``).
    wallet:
        The provider's key: its address is the provider's identity and payment address;
        it signs the agreements the provider approves and opens what requestors
        encrypted for it.
    """

    def __init__(self, settings: ProviderSettings, runtime: Runtime, wallet: Wallet) -> None:
        if not isinstance(wallet, Wallet):
            raise TypeError(f"a provider agent needs its Wallet, not {type(wallet).__name__}")
        self.settings = settings
        self.runtime = runtime
        self.wallet = wallet
        self.id = wallet.address
        self.offer: Offer | None = None
        self.payments: list[Payment] = []
        self.rejections: dict[str, str] = {}
        self.accepted: dict[str, Decimal] = {}
        #: Whether announced payments count without a check on chain (a daemon sets False).
        self.trusts_announcements = True
        self._link: ProviderLink | None = None
        self._deals: dict[str, Deal] = {}
        self._activities: dict[str, Deal] = {}
        self._proposals = ProposalBook(config.seconds("provider.proposal-ttl"))
        self._agreement_ids: set[str] = set()  # every agreement ever approved here
        self._lock = asyncio.Lock()
        self._closed = False
        self._startup: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<ProviderAgent {self.settings.name!r} {self.id} runtime={self.runtime.name}>"

    # -- offers ---------------------------------------------------------------------

    def agreement_of(self, activity_id: str) -> Agreement | None:
        """The agreement an activity belongs to (None if unknown)."""
        deal = self._activities.get(activity_id)
        return deal.agreement if deal is not None else None

    def agreement(self, agreement_id: str) -> Agreement | None:
        deal = self._deals.get(agreement_id)
        return deal.agreement if deal is not None else None

    @property
    def live_agreements(self) -> list[str]:
        """Ids of the agreements this agent still holds."""
        return list(self._deals)

    @property
    def sold(self) -> Resources:
        total = Resources(0, 0, 0)
        for deal in self._deals.values():
            if not deal.ending:
                total = total + deal.resources
        return total

    @property
    def free(self) -> Resources:
        return self.settings.capacity - self.sold

    def _make_offer(self, free: Resources) -> Offer:
        runtime = {P.RUNTIME_NAME: self.runtime.name, **self.runtime.properties()}
        return make_offer(self.settings, runtime, free, self.id, self.wallet.public_key)

    async def _republish(self) -> None:
        """Offer exactly what is free now (or nothing)."""
        if self._link is None:
            return
        old = self.offer
        free = self.free
        self.offer = self._make_offer(free) if free.cpu_threads >= 1 and free.memory_bytes > 0 and not self._closed else None
        if self.offer is not None:
            await self._link.publish(self.offer)
        if old is not None:
            await self._link.withdraw(old.id)

    async def connect(self, link: ProviderLink) -> None:
        """Join a market: publish the offer; stale sandboxes are cleaned up meanwhile.

        The clean-up runs while the first negotiation does; no activity starts before it
        has finished.
        """
        self._link = link
        if self._startup is None:
            self._startup = asyncio.create_task(self._start_up(), name=f"golem-provider-startup-{self.settings.name}")
        async with self._lock:
            await self._republish()

    async def _start_up(self) -> None:
        """Remove stale sandboxes and get the runtime ready (``warm_up``) side by side."""
        try:
            removed, _ = await asyncio.gather(self.runtime.cleanup(set(self._deals)), self.runtime.warm_up())
            if removed:
                logger.info("%s removed %d sandboxes of ended agreements", self, removed)
        except Exception as e:  # the first activity reports a runtime that does not work
            logger.warning("%s: runtime start-up failed: %s", self, e)

    async def close(self) -> None:
        """Withdraw the offer and end every agreement.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for agreement_id in list(self._deals):
            with contextlib.suppress(Exception):
                await self.terminate(agreement_id, "provider shutting down")
        for deal in list(self._activities.values()):  # files kept for collection go too
            with contextlib.suppress(Exception):
                await deal.discard()
        if self._link is not None and self.offer is not None:
            with contextlib.suppress(Exception):
                await self._link.withdraw(self.offer.id)
        self.offer = None
        if self._startup is not None:
            await asyncio.wait([self._startup])
        try:
            await self.runtime.close()
        except Exception:
            logger.exception("%s: closing the runtime failed", self)

    # -- negotiation ----------------------------------------------------------------------

    async def on_proposal(self, demand: Proposal) -> Proposal:
        """Answer a requestor's counter-proposal with ours, or reject it."""
        check_demand(self.settings, self.offer, demand, self.free)
        assert self.offer is not None
        ours = Proposal(
            issuer=Issuer.PROVIDER,
            properties=self.offer.properties,
            constraints=self.offer.constraints,
            offer_id=self.offer.id,
            demand_id=demand.demand_id,
            provider_id=self.id,
            prev_proposal_id=demand.id,
        )
        self._proposals.add(ours, demand)
        return ours

    def _check_terms(self, agreement: Agreement) -> None:
        """Refuse an agreement unless it binds a proposal this agent made, to the demand it
        answered, signed by the requestor the demand names, under an id never used."""
        if agreement.provider_id != self.id:
            raise ProposalRejected("agreement names another provider")
        if agreement.id in self._agreement_ids:
            raise ProposalRejected(f"agreement id {agreement.id} was used before; make a new agreement")
        made = self._proposals.get(agreement.offer.id)
        if made is None or made[0] != agreement.offer:
            raise ProposalRejected(f"the agreement's offer {agreement.offer.id} is not a proposal provider "
                                   f"{self.settings.name} made (or it expired): agree to its latest proposal")
        if made[1] != agreement.demand:
            raise ProposalRejected("the agreement's demand is not the counter-proposal this provider answered")
        payer = agreement.demand.properties.get(P.payment_address(self.settings.platform))
        if payer != agreement.requestor_id:
            raise ProposalRejected(f"the agreement's requestor {agreement.requestor_id} is not the payer its demand "
                                   f"names ({payer})")
        now = now_ms()  # read once: a tick between two readings refused an agreement ending at expiration
        if not now < agreement.valid_to_ms <= int(agreement.demand.properties.get(P.EXPIRATION, 0)):
            raise ProposalRejected("agreement expired, or runs past its demand's expiration")
        try:
            terms.check(agreement, "requestor")
        except ProtocolError as e:
            raise ProposalRejected(str(e)) from None

    async def approve(self, agreement: Agreement) -> Agreement:
        """Approve an agreement if its terms are this provider's and its slice is free; reserve it."""
        async with self._lock:
            if self._closed:
                raise ProposalRejected("provider is shutting down")
            self._check_terms(agreement)
            # The slice is checked again now: other agreements may have taken capacity since.
            wanted = check_demand(self.settings, self.offer, agreement.demand, self.free)
            self._agreement_ids.add(agreement.id)
            approved = terms.sign(_replace_agreement(agreement, state=AgreementState.APPROVED,
                                                     approved_at_ms=now_ms()), self.wallet)
            deal = Deal(approved, wanted, self._send, self.settings.debit_note_interval_s, self.wallet.unseal,
                        on_end=lambda reason: self.terminate(approved.id, reason))
            self._deals[agreement.id] = deal
            deal.spawn(self._expire(deal))
            await self._republish()
        logger.info("%s approved agreement %s for %s", self, agreement.id, wanted)
        return approved

    async def _expire(self, deal: Deal) -> None:
        await asyncio.sleep(max(0.0, (deal.agreement.valid_to_ms - now_ms()) / 1000))
        await self.terminate(deal.agreement.id, "agreement expired")

    async def terminate(self, agreement_id: str, reason: str) -> Invoice | None:
        """End an agreement: stop its activity, bill it, free its slice."""
        deal = self._deals.get(agreement_id)
        if deal is None or deal.ending:
            return deal.invoice if deal else None
        deal.ending = True
        deal.cancel_tasks()
        # Its files stay for the requestor to collect outputs (an expired or ended worker).
        await deal.stop(ActivityState.TERMINATED, reason, keep_sandbox=True)
        deal.agreement = _replace_agreement(
            deal.agreement, state=AgreementState.TERMINATED, terminated_reason=reason
        )
        usage = self.invoice_usage(deal)
        activity_ids = (deal.activity.activity_id,) if deal.activity else ()
        deal.invoice = Invoice(
            agreement_id=agreement_id,
            activity_ids=activity_ids,
            usage=usage,
            amount=self.invoice_amount(deal, usage),
            issuer_id=self.id,
            recipient_id=deal.agreement.requestor_id,
            payee_addr=self.id,
            payer_addr=deal.agreement.requestor_id,
            payment_platform=self.settings.platform,
        )
        del self._deals[agreement_id]
        async with self._lock:
            await self._republish()
        await self._send(deal.invoice)
        logger.info("%s invoiced %s GLM for agreement %s (%s)", self, deal.invoice.amount, agreement_id, reason)
        return deal.invoice

    def invoice_usage(self, deal: Deal) -> dict[str, Decimal]:
        """The usage billed in the invoice: what the meter counted."""
        return deal.meter.usage()

    def invoice_amount(self, deal: Deal, usage: Mapping[str, Decimal]) -> Decimal:
        """The amount billed for ``usage`` under the agreed price."""
        return deal.pricing.cost(usage)

    # -- activities -------------------------------------------------------------------

    def _deal_for_activity(self, activity_id: str) -> Deal:
        deal = self._activities.get(activity_id)
        if deal is None or deal.ending or deal.stopped:
            raise ActivityError(f"no live activity {activity_id} on provider {self.settings.name}")
        return deal

    async def create_activity(self, agreement_id: str) -> Activity:
        """Create the one activity an agreement allows."""
        if self._startup is not None:  # first, so nothing below waits between check and use
            await asyncio.shield(self._startup)
        deal = self._deals.get(agreement_id)
        if deal is None or deal.ending:
            raise ActivityError(f"agreement {agreement_id} is not live on provider {self.settings.name}")
        if deal.activity is not None:
            raise ActivityError(f"agreement {agreement_id} already has an activity")
        activity_id = new_id()
        image = deal.agreement.demand.properties.get(P.IMAGE)
        deal.activity = self.runtime.activity(activity_id, agreement_id, deal.resources, image,
                                              _versions(deal.agreement.demand.properties.get(P.DASK_VERSIONS)))
        self._activities[activity_id] = deal
        await deal.state(ActivityState.INITIALIZED)
        return Activity(activity_id, agreement_id, ActivityState.INITIALIZED)

    async def _send(self, message: Activity | DebitNote | Invoice) -> None:
        if self._link is not None:
            await self._link.send(message)

    async def exec(self, activity_id: str, commands: Sequence[ExeCommand]) -> list[str]:
        """Run an exe-script; the first failing command fails the activity.  A stopped
        activity whose files are kept takes only output transfers."""
        deal = self._activities.get(activity_id)
        if deal is not None and deal.stopped:
            return await deal.collect(commands)
        return await self._deal_for_activity(activity_id).exec(commands)

    async def destroy_activity(self, activity_id: str) -> None:
        """Stop an activity and remove its files; the agreement stays until terminated."""
        deal = self._activities.get(activity_id)
        if deal is not None:
            await deal.stop(ActivityState.TERMINATED, "destroyed by requestor")
            await deal.discard()

    # -- payment ----------------------------------------------------------------------

    async def on_accepted(self, document_id: str, amount: Decimal) -> None:
        self.accepted[document_id] = amount
        any(deal.accepted(document_id, Decimal(amount)) for deal in list(self._deals.values()))

    async def on_rejected(self, document_id: str, reason: str) -> None:
        self.rejections[document_id] = reason
        logger.warning("%s: requestor rejected %s: %s", self, document_id, reason)

    async def on_payment(self, payment: Payment) -> None:
        """Counted at once with :attr:`trusts_announcements`; a daemon counts it through
        :meth:`credit` once it found the transaction on chain."""
        self.payments.append(payment)
        logger.info("%s was paid %s GLM in %s", self, payment.amount, payment.tx_hash)
        deal = self._deals.get(payment.agreement_ids[0]) if len(payment.agreement_ids) == 1 else None
        if self.trusts_announcements and deal is not None:
            deal.credit(deal.paid + payment.amount)

    def credit(self, agreement_id: str, paid: Decimal) -> None:
        """Checked payments for ``agreement_id`` now total ``paid``."""
        if (deal := self._deals.get(agreement_id)) is not None:
            deal.credit(paid)


def _versions(stated: Any) -> dict[str, str] | None:
    """The versions a demand says its worker image must run (None when it says nothing)."""
    if not stated:
        return None
    try:
        versions = json.loads(str(stated))
    except ValueError:
        raise ActivityError(f"the demand's {P.DASK_VERSIONS} is not JSON") from None
    if not isinstance(versions, dict):
        raise ActivityError(f"the demand's {P.DASK_VERSIONS} is not a mapping")
    return {str(k): str(v) for k, v in versions.items()}


def _replace_agreement(agreement: Agreement, **changes: Any) -> Agreement:
    return dataclasses.replace(agreement, **changes)
