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
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from golem_dask.errors import ActivityError, ProposalRejected
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol import constraints as C
from golem_dask.protocol import properties as P
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
from golem_dask.provider.metering import UsageMeter
from golem_dask.provider.runtime.base import Runtime, RuntimeActivity

logger = logging.getLogger(__name__)


class ProviderLink(Protocol):
    """What an agent needs from its market: publish offers, send messages."""

    async def publish(self, offer: Offer) -> None: ...

    async def withdraw(self, offer_id: str) -> None: ...

    async def send(self, message: Activity | DebitNote | Invoice) -> None: ...


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """What a provider sells and at what price.

    Examples
    --------
    >>> from golem_dask.protocol.pricing import LinearPricing
    >>> ProviderSettings(
    ...     name="laptop",
    ...     capacity=Resources(cpu_threads=2, memory_bytes=4 * 2**30, storage_bytes=2**30),
    ...     pricing=LinearPricing.per_hour(cpu=Decimal("0.1"), duration=Decimal("0.02")),
    ...     platform="erc20-devnet-glm",
    ... ).name
    'laptop'
    """

    name: str
    capacity: Resources
    pricing: LinearPricing
    platform: str
    debit_note_interval_s: float = 10.0


@dataclass(slots=True)
class _Deal:
    """The agent's state for one agreement."""

    agreement: Agreement
    resources: Resources
    activity: RuntimeActivity | None = None
    meter: UsageMeter = field(default_factory=UsageMeter)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    ending: bool = False
    stopped: bool = False
    invoice: Invoice | None = None


class ProviderAgent:
    """Sells this machine's capacity on a market.

    Parameters
    ----------
    settings:
        Capacity, prices and payment platform.
    runtime:
        How activities run (``ProcessRuntime()``, ``DockerRuntime(...)``).
    address:
        The provider's payment address, which is also its identity.
    """

    def __init__(self, settings: ProviderSettings, runtime: Runtime, address: str) -> None:
        self.settings = settings
        self.runtime = runtime
        self.id = address
        self.offer: Offer | None = None
        self.payments: list[Payment] = []
        self.rejections: dict[str, str] = {}
        self.accepted: dict[str, Decimal] = {}
        self._link: ProviderLink | None = None
        self._deals: dict[str, _Deal] = {}
        self._activities: dict[str, _Deal] = {}
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

    def _offer_constraints(self) -> str:
        return str(
            C.all_of(
                C.present(P.CPU_THREADS),
                C.present(P.MEM_GIB),
                C.ge(P.EXPIRATION, 1),
                C.present(P.payment_address(self.settings.platform)),
            )
        )

    def _make_offer(self, free: Resources) -> Offer:
        props: dict[str, Any] = {
            P.NODE_NAME: self.settings.name,
            **free.to_properties(),
            P.RUNTIME_NAME: self.runtime.name,
            **self.runtime.properties(),
            **self.settings.pricing.to_properties(),
            P.SCHEME: "payu",
            P.DEBIT_NOTE_INTERVAL: int(self.settings.debit_note_interval_s),
            P.payment_address(self.settings.platform): self.id,
        }
        return Offer(properties=props, constraints=self._offer_constraints(), provider_id=self.id)

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

    def _check_demand(self, demand: Proposal) -> Resources:
        """The slice a demand asks for, or ProposalRejected saying why not."""
        if self.offer is None:
            raise ProposalRejected(f"provider {self.settings.name} has nothing left to sell")
        props = demand.properties
        reasons = C.explain(C.parse(self.offer.constraints), props)
        if reasons:
            raise ProposalRejected("demand does not satisfy the offer: " + "; ".join(reasons))
        reasons = C.explain(C.parse(demand.constraints), self.offer.properties)
        if reasons:
            raise ProposalRejected("offer does not satisfy the demand: " + "; ".join(reasons))
        if props.get(P.CHOSEN_PLATFORM, self.settings.platform) != self.settings.platform:
            raise ProposalRejected(f"payment platform {props.get(P.CHOSEN_PLATFORM)!r} not supported")
        if int(props[P.EXPIRATION]) <= now_ms():
            raise ProposalRejected("demand expired")
        try:
            wanted = Resources.from_properties(props)
        except (KeyError, ValueError, ArithmeticError) as e:
            raise ProposalRejected(f"demand does not say what slice it wants: {e}") from e
        if wanted.cpu_threads < 1 or not wanted.fits_in(self.free):
            raise ProposalRejected(f"only {self.free} free, demand wants {wanted}")
        return wanted

    async def on_proposal(self, demand: Proposal) -> Proposal:
        """Answer a requestor's counter-proposal with ours, or reject it."""
        self._check_demand(demand)
        assert self.offer is not None
        return Proposal(
            issuer=Issuer.PROVIDER,
            properties=self.offer.properties,
            constraints=self.offer.constraints,
            offer_id=self.offer.id,
            demand_id=demand.demand_id,
            provider_id=self.id,
            prev_proposal_id=demand.id,
        )

    async def approve(self, agreement: Agreement) -> Agreement:
        """Approve an agreement if its slice is still free; reserve it."""
        async with self._lock:
            if self._closed:
                raise ProposalRejected("provider is shutting down")
            if agreement.provider_id != self.id:
                raise ProposalRejected("agreement names another provider")
            if agreement.valid_to_ms <= now_ms():
                raise ProposalRejected("agreement already expired")
            wanted = Resources.from_properties(agreement.demand.properties)
            if not wanted.fits_in(self.free):
                raise ProposalRejected(f"sold out meanwhile: only {self.free} free, agreement wants {wanted}")
            approved = _replace_agreement(agreement, state=AgreementState.APPROVED, approved_at_ms=now_ms())
            deal = _Deal(approved, wanted)
            self._deals[agreement.id] = deal
            self._spawn(deal, self._expire(deal))
            await self._republish()
        logger.info("%s approved agreement %s for %s", self, agreement.id, wanted)
        return approved

    async def _expire(self, deal: _Deal) -> None:
        await asyncio.sleep(max(0.0, (deal.agreement.valid_to_ms - now_ms()) / 1000))
        await self.terminate(deal.agreement.id, "agreement expired")

    def _spawn(self, deal: _Deal, coro: Any) -> None:
        task = asyncio.create_task(coro)
        deal.tasks.add(task)
        task.add_done_callback(deal.tasks.discard)

    async def terminate(self, agreement_id: str, reason: str) -> Invoice | None:
        """End an agreement: stop its activity, bill it, free its slice."""
        deal = self._deals.get(agreement_id)
        if deal is None or deal.ending:
            return deal.invoice if deal else None
        deal.ending = True
        current = asyncio.current_task()
        for task in list(deal.tasks):
            if task is not current:
                task.cancel()
        if deal.activity is not None:
            await self._stop_activity(deal, ActivityState.TERMINATED, reason)
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
        if self._link is not None:
            await self._link.send(deal.invoice)
        logger.info("%s invoiced %s GLM for agreement %s (%s)", self, deal.invoice.amount, agreement_id, reason)
        return deal.invoice

    def invoice_usage(self, deal: _Deal) -> dict[str, Decimal]:
        """The usage billed in the invoice: what the meter counted."""
        return deal.meter.usage()

    def invoice_amount(self, deal: _Deal, usage: Mapping[str, Decimal]) -> Decimal:
        """The amount billed for ``usage`` under the agreed price."""
        return LinearPricing.from_properties(deal.agreement.offer.properties).cost(usage)

    # -- activities -------------------------------------------------------------------

    def _deal_for_activity(self, activity_id: str) -> _Deal:
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
        deal.activity = self.runtime.activity(activity_id, agreement_id, deal.resources, image)
        self._activities[activity_id] = deal
        await self._state(deal, ActivityState.INITIALIZED)
        return Activity(activity_id, agreement_id, ActivityState.INITIALIZED)

    async def _state(self, deal: _Deal, state: ActivityState, reason: str | None = None) -> None:
        if self._link is not None and deal.activity is not None:
            await self._link.send(Activity(deal.activity.activity_id, deal.agreement.id, state, reason))

    async def exec(self, activity_id: str, commands: Sequence[ExeCommand]) -> list[str]:
        """Run an exe-script; the first failing command fails the activity."""
        deal = self._deal_for_activity(activity_id)
        act = deal.activity
        assert act is not None
        outputs: list[str] = []
        for index, cmd in enumerate(commands):
            try:
                if cmd.command == "deploy":
                    outputs.append(await act.deploy())
                    await self._state(deal, ActivityState.DEPLOYED)
                elif cmd.command == "start":
                    outputs.append(await act.start())
                    await self._state(deal, ActivityState.READY)
                elif cmd.command == "run":
                    outputs.append(
                        await act.run(cmd.args["entry_point"], list(cmd.args.get("args", ())), dict(cmd.args.get("env", {})))
                    )
                    deal.meter.start()
                    self._spawn(deal, self._watch(deal))
                    self._spawn(deal, self._debit_notes(deal))
                    await self._state(deal, ActivityState.RUNNING)
                elif cmd.command == "transfer":
                    options = cmd.args.get("options")
                    outputs.append(await act.transfer(cmd.args["from"], cmd.args["to"], dict(options) if options else None))
                elif cmd.command == "terminate":
                    await self._stop_activity(deal, ActivityState.TERMINATED, "exe-script terminate")
                    outputs.append("terminated")
            except Exception as e:
                reason = f"command {index} ({cmd.command}) failed: {e}"
                logger.warning("%s activity %s: %s", self, activity_id, reason)
                await self._stop_activity(deal, ActivityState.FAILED, reason)
                raise ActivityError(reason) from e
        return outputs

    async def _watch(self, deal: _Deal) -> None:
        """Report a command that exits on its own as a failed activity."""
        act = deal.activity
        assert act is not None
        code = await act.wait()
        if not deal.ending and not deal.stopped:
            tail = "\n".join(act.logs().splitlines()[-20:])
            await self._stop_activity(deal, ActivityState.FAILED, f"worker exited with code {code}\n{tail}")

    async def _debit_notes(self, deal: _Deal) -> None:
        pricing = LinearPricing.from_properties(deal.agreement.offer.properties)
        act = deal.activity
        assert act is not None
        while True:
            await asyncio.sleep(self.settings.debit_note_interval_s)
            if deal.stopped:
                return
            deal.meter.record_cpu(await act.cpu_seconds())
            usage = deal.meter.usage()
            note = DebitNote(
                agreement_id=deal.agreement.id,
                activity_id=act.activity_id,
                usage=usage,
                total_amount_due=pricing.cost(usage),
                issuer_id=self.id,
                recipient_id=deal.agreement.requestor_id,
            )
            if self._link is not None:
                await self._link.send(note)

    async def _stop_activity(self, deal: _Deal, state: ActivityState, reason: str) -> None:
        act = deal.activity
        if act is None or deal.stopped:
            return
        deal.stopped = True
        try:
            deal.meter.record_cpu(await act.cpu_seconds())
            await act.terminate()
            deal.meter.record_cpu(await act.cpu_seconds())
        finally:
            deal.meter.stop()
            await self._state(deal, state, reason)

    async def destroy_activity(self, activity_id: str) -> None:
        """Stop an activity; the agreement stays until terminated."""
        deal = self._activities.get(activity_id)
        if deal is not None:
            await self._stop_activity(deal, ActivityState.TERMINATED, "destroyed by requestor")

    # -- payment ----------------------------------------------------------------------

    async def on_accepted(self, document_id: str, amount: Decimal) -> None:
        self.accepted[document_id] = amount

    async def on_rejected(self, document_id: str, reason: str) -> None:
        self.rejections[document_id] = reason
        logger.warning("%s: requestor rejected %s: %s", self, document_id, reason)

    async def on_payment(self, payment: Payment) -> None:
        self.payments.append(payment)
        logger.info("%s was paid %s GLM in %s", self, payment.amount, payment.tx_hash)


def _replace_agreement(agreement: Agreement, **changes: Any) -> Agreement:
    return dataclasses.replace(agreement, **changes)
