"""Scoring offers and negotiating them into agreements.

:func:`score` and :func:`summarize` are pure: they rank proposals by expected cost under
the linear pricing model and say why the others were refused.  :class:`Negotiator`
keeps the scored offers of one demand subscription up to date and turns the best of
them into an approved agreement whenever a worker needs one, reserving the agreement's
worst-case cost in the budget *before* signing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from golem_dask import config
from golem_dask.errors import (
    BudgetExceededError,
    NetworkError,
    NoOffersError,
    ProposalRejected,
    ProtocolError,
)
from golem_dask.market.base import Market, OfferReceived, OfferWithdrawn
from golem_dask.market.demand import DemandSpec, PriceCaps
from golem_dask.market.reputation import Reputation
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol import constraints as C
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Agreement, Demand, Proposal, new_id, now_ms

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A matching offer and what it would cost."""

    proposal: Proposal
    pricing: LinearPricing
    expected_cost: Decimal
    worst_case: Decimal

    @property
    def name(self) -> str:
        return str(self.proposal.properties.get(P.NODE_NAME, self.proposal.provider_id))


def score(
    proposal: Proposal, spec: DemandSpec, expected_s: Decimal, utilisation: Decimal
) -> Candidate | str:
    """Price one provider proposal for ``spec``: a Candidate, or why it is refused.

    Examples
    --------
    >>> from golem_dask.protocol.messages import Issuer
    >>> spec = DemandSpec.from_kwargs(cpu=1, memory="1GiB", max_price_per_cpu_hour="0.1")
    >>> props = LinearPricing.per_hour(Decimal("0.5"), Decimal("0")).to_properties()
    >>> p = Proposal(Issuer.PROVIDER, props, "(&)", "offer", "demand", "0xabc")
    >>> score(p, spec, Decimal(3600), Decimal(1))
    'over max_price_per_cpu_hour=0.1 (asks 0.5)'
    """
    try:
        pricing = LinearPricing.from_properties(proposal.properties)
    except ProtocolError as e:
        return f"unreadable prices: {e}"
    if spec.caps != _NO_CAPS:
        violations = spec.caps.violations(pricing)
        if violations:
            return "; ".join(violations)
    expected_cost, worst_case = _costs(pricing, spec.resources.cpu_threads, expected_s, utilisation, spec.reserve_s)
    return Candidate(proposal=proposal, pricing=pricing, expected_cost=expected_cost, worst_case=worst_case)


_NO_CAPS = PriceCaps()


@functools.lru_cache(maxsize=4096)
def _costs(pricing: LinearPricing, threads: int, expected_s: Decimal, utilisation: Decimal,
           lifetime_s: Decimal) -> tuple[Decimal, Decimal]:
    # Cached: many offers share a price, and both amounts are rounded to the wei and
    # normalized, so equal arguments (however spelled) give the same Decimals.
    return pricing.estimate(threads, expected_s, utilisation), pricing.worst_case(threads, lifetime_s)


def rank(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Cheapest expected cost first; earlier offers win ties."""
    return sorted(candidates, key=lambda c: (c.expected_cost, c.proposal.timestamp_ms, c.proposal.id))


_SHORT_OF = {
    P.CPU_THREADS: "short of cpu threads",
    P.MEM_GIB: "short of memory",
    P.STORAGE_GIB: "short of storage",
    P.RUNTIME_NAME: "wrong runtime",
    P.PRICING_MODEL: "unsupported pricing model",
}


def category(reason: str) -> str:
    """The kind of a refusal reason, for a one-line summary."""
    for name, label in _SHORT_OF.items():
        if reason.startswith(name):
            return label
    if reason.startswith("golem.com.payment.platform."):
        return "no address on our payment platform"
    return reason.split(" (")[0]


def summarize(reasons: Iterable[str]) -> str:
    """``"2 over max_price_per_cpu_hour=0.1, 1 short of memory"``.

    Examples
    --------
    >>> summarize(["over max_price_per_cpu_hour=0.1 (asks 0.5)", "golem.inf.mem.gib>=64 (offer has 24)",
    ...            "over max_price_per_cpu_hour=0.1 (asks 0.3)"])
    '2 over max_price_per_cpu_hour=0.1, 1 short of memory'
    """
    counts = Counter(category(r) for r in reasons)
    return ", ".join(f"{n} {label}" for label, n in counts.most_common())


#: What to change when many offers are refused for a reason (by :func:`category`).
_RELAX = {
    "short of cpu threads": "ask for fewer cpu per worker",
    "short of memory": "ask for less memory per worker",
    "short of storage": "ask for less storage per worker",
    "wrong runtime": "leave runtime unset or pick one providers run",
    "unsupported pricing model": "(providers price otherwise: nothing to relax)",
    "no address on our payment platform": "pay on a platform providers take (golem.payment.platform)",
}


def advice(reasons: Iterable[str]) -> str:
    """What to relax so more of the offers refused for ``reasons`` would match.

    Examples
    --------
    >>> advice(["over max_price_per_cpu_hour=0.1 (asks 0.5)", "golem.inf.mem.gib>=64 (offer has 24)"])
    'raise max_price_per_cpu_hour (0.1); ask for less memory per worker'
    """
    tips = []
    for label, _ in Counter(category(r) for r in reasons).most_common():
        if label.startswith("over max_") and "=" in label:
            cap, value = label.removeprefix("over ").split("=", 1)
            tip = f"raise {cap} ({value})"
        else:
            tip = _RELAX.get(label, "")
        if tip and tip not in tips:
            tips.append(tip)
    return "; ".join(tips)


class Reservations(Protocol):
    """What negotiation needs of the requestor's budget (:class:`~golem_dask.payment.budget.Budget`)."""

    @property
    def remaining(self) -> Decimal: ...

    def can_afford(self, amount: Decimal) -> bool: ...

    def reserve(self, key: str, amount: Decimal) -> None: ...

    def release(self, key: str) -> None: ...

    def shortfall(self, amount: Decimal) -> str: ...


@dataclass(frozen=True, slots=True)
class Deal:
    """An approved agreement and the budget reservation made for it."""

    agreement: Agreement
    candidate: Candidate
    reservation: str


class Negotiator:
    """Keeps one demand on the market and signs agreements from its best offers.

    Parameters
    ----------
    market:
        The backend.
    spec:
        What each worker needs.
    requestor_address:
        Our payment address (goes into the demand).
    budget:
        Reservations are made here before an agreement is signed.
    """

    def __init__(
        self,
        market: Market,
        spec: DemandSpec,
        requestor_address: str,
        budget: Reservations,
        *,
        negotiation_timeout_s: float,
        approval_timeout_s: float,
        expected_s: Decimal,
        utilisation: Decimal,
        events: Any = None,
        reputation: Reputation | None = None,
        hint_after_s: float = 0.0,
    ) -> None:
        self.market = market
        self.spec = spec
        self.requestor_address = requestor_address
        self.budget = budget
        self.negotiation_timeout_s = negotiation_timeout_s
        self.approval_timeout_s = approval_timeout_s
        self.expected_s = expected_s
        self.utilisation = utilisation
        self.events = events
        self.candidates: dict[str, Candidate] = {}
        self.refused: dict[str, str] = {}  # offer id -> why we refused it
        self.declined: dict[str, str] = {}  # offer id -> why the provider declined us
        self._providers_seen: set[str] = set()
        self._demand: Demand | None = None
        self._subscription: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._first_offer_at: float | None = None
        self._lock = asyncio.Lock()
        #: What we remember of providers: offers rank by price / delivered capacity.
        self.reputation = reputation
        #: Providers this cluster stopped renting from (caught delivering too little).
        self.excluded: set[str] = set()
        #: Workers whose agreement is being signed: their reservation is held, their account not open yet.
        self.signing: set[str] = set()
        self._budget_said: tuple[Decimal, Decimal] | None = None  # the last budget shortfall said
        #: After this long with nothing matching, say what is refused and what to relax (once).
        self.hint_after_s = hint_after_s
        self._waiting_since: float | None = None
        self._hinted = False

    @classmethod
    def from_config(cls, market: Market, spec: DemandSpec, requestor_address: str, budget: Reservations,
                    events: Any = None, reputation: Reputation | None = None) -> Negotiator:
        """A negotiator with the timeouts and scoring of ``golem.market.*`` config."""
        return cls(
            market, spec, requestor_address, budget,
            negotiation_timeout_s=config.seconds("market.negotiation-timeout"),
            approval_timeout_s=config.seconds("market.approval-timeout"),
            expected_s=Decimal(str(config.seconds("market.expected-duration"))),
            utilisation=Decimal(str(config.get("market.expected-utilisation"))),
            events=events,
            reputation=reputation,
            hint_after_s=config.seconds("market.hint-after"),
        )

    def _emit(self, kind: str, message: str, **data: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, message, **data)

    async def start(self) -> None:
        """Publish the demand and start following its offers."""
        self._demand = self.spec.build(self.requestor_address, now_ms())
        self._subscription = await self.market.subscribe(self._demand)
        self._task = asyncio.create_task(self._follow(self._subscription), name="golem-negotiator")

    async def close(self) -> None:
        """Stop following offers and withdraw the demand.  Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sub, self._subscription = self._subscription, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await self.market.unsubscribe(sub)

    async def _follow(self, subscription: str) -> None:
        async for event in self.market.events(subscription):
            if isinstance(event, OfferReceived):
                self._add(event.proposal)
            elif isinstance(event, OfferWithdrawn):
                self.candidates.pop(event.offer_id, None)
            async with self._changed:
                self._changed.notify_all()

    def _add(self, proposal: Proposal) -> None:
        result = score(proposal, self.spec, self.expected_s, self.utilisation)
        name = proposal.properties.get(P.NODE_NAME, proposal.provider_id)
        if isinstance(result, str):
            self.refused[proposal.offer_id] = result
            self._emit("rejected", f"offer from {name} refused: {result}", provider=proposal.provider_id,
                       reason=result)
            return
        if self.reputation is not None and (factor := self.reputation.factor(proposal.provider_id)) != 1:
            result = dataclasses.replace(result, expected_cost=result.expected_cost * factor)
        if self._first_offer_at is None:
            self._first_offer_at = asyncio.get_running_loop().time()
        self.candidates[proposal.offer_id] = result
        if proposal.provider_id in self._providers_seen:
            return  # a re-published offer (capacity changed), not news to the user
        self._providers_seen.add(proposal.provider_id)
        self._emit(
            "offer",
            f"offer from {name}: {result.pricing.price_per_cpu_hour} GLM/cpu-hour, "
            f"{result.pricing.price_per_hour} GLM/hour, expected {result.expected_cost} GLM",
            provider=proposal.provider_id,
        )

    async def _wait_for_offers(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        async with self._changed:
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))

    async def acquire(self, worker: str) -> Deal:
        """Sign an approved agreement for one worker with the cheapest fitting offer.

        Raises
        ------
        NoOffersError
            Nothing matched within the negotiation timeout; the message says why.
        BudgetExceededError
            Matching offers exist but the budget cannot cover another agreement.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.negotiation_timeout_s
        declined_here: set[str] = set()
        while True:
            window = self.market.collection_window_s
            if window and self._first_offer_at is not None and loop.time() < self._first_offer_at + window:
                await asyncio.sleep(self._first_offer_at + window - loop.time())
            options = [c for c in rank(self.candidates.values()) if c.proposal.offer_id not in declined_here
                       and c.proposal.provider_id not in self.excluded]
            if not options:
                if self._waiting_since is None:  # since the last agreement, or the first wait
                    self._waiting_since, self._hinted = loop.time(), False
                until = deadline if self._hinted or not self.hint_after_s else \
                    min(deadline, self._waiting_since + self.hint_after_s)
                try:
                    await self._wait_for_offers(until)
                except asyncio.TimeoutError:
                    if loop.time() >= deadline:
                        raise NoOffersError(await self.explain()) from None
                    self._hinted = True
                    self._emit("hint", f"nothing matched for {self.hint_after_s:g}s: {await self.explain(waited=True)}")
                continue
            affordable = [c for c in options if self.budget.can_afford(c.worst_case)]
            if not affordable:
                cheapest = min(c.worst_case for c in options)
                if self._budget_said != (cheapest, self.budget.remaining):  # once, not per worker asked
                    self._budget_said = (cheapest, self.budget.remaining)
                    self._emit("budget", f"budget cannot cover another agreement (worst case {cheapest} GLM, "
                               f"{self.budget.remaining} GLM left)")
                raise BudgetExceededError(self.budget.shortfall(cheapest))
            candidate = affordable[0]
            try:
                deal = await self._sign(candidate, worker)
                self._waiting_since = None
                return deal
            except ProposalRejected as e:
                declined_here.add(candidate.proposal.offer_id)
                self.declined[candidate.proposal.offer_id] = str(e)
                if self.reputation is not None:
                    self.reputation.refusal(candidate.proposal.provider_id, candidate.name)
                logger.info("%s declined by %s: %s", worker, candidate.name, e)
            except NetworkError as e:
                declined_here.add(candidate.proposal.offer_id)
                logger.warning("%s: market error with %s: %s", worker, candidate.name, e)
            if loop.time() > deadline:
                raise NoOffersError(await self.explain())

    async def _sign(self, candidate: Candidate, worker: str) -> Deal:
        assert self._demand is not None and self._subscription is not None
        reservation = new_id()
        self.budget.reserve(reservation, candidate.worst_case)
        self.signing.add(worker)
        try:
            demand = Demand(
                properties={**self._demand.properties, P.EXPIRATION: now_ms() + int(self.spec.lifetime_s * 1000)},
                constraints=self._demand.constraints,
                id=self._demand.id,
            )
            reply = await self.market.counter(self._subscription, candidate.proposal.id, demand)
            agreement = await self.market.create_agreement(reply.id, int(demand.properties[P.EXPIRATION]))
            approved = await self.market.confirm_agreement(agreement.id, self.approval_timeout_s)
        except BaseException:
            self.budget.release(reservation)
            raise
        finally:
            self.signing.discard(worker)
        if self.reputation is not None:
            self.reputation.agreement(approved.provider_id, candidate.name)
        self._emit(
            "agreement",
            f"agreement {approved.id[:8]} with {candidate.name} for {worker} "
            f"(reserved up to {candidate.worst_case} GLM)",
            agreement_id=approved.id,
            provider=approved.provider_id,
            worker=worker,
        )
        return Deal(approved, candidate, reservation)

    async def explain(self, waited: bool = False) -> str:
        """Why no offer could be used, offer by offer in summary, and what to relax
        (``waited``: said while still waiting, not at the timeout)."""
        constraint = str(self.spec.constraints)
        reasons: list[str] = list(self.refused.values()) + list(self.declined.values())
        seen = set(self.refused) | set(self.declined) | set(self.candidates)
        try:
            offers = await self.market.scan()
        except Exception:  # the explanation is best effort
            offers = []
        demand_filter = self.spec.constraints
        for offer in offers:
            if offer.id in seen:
                continue
            why = C.explain(demand_filter, offer.properties)
            if not why and self._demand is not None:
                why = [f"offer's own constraints refuse us: {r}" for r in C.explain(C.parse(offer.constraints), self._demand.properties)]
            reasons.extend(why[:1])
        within = "yet" if waited else f"within {self.negotiation_timeout_s:g}s"
        if not reasons:
            return f"no provider offered anything matching {constraint} {within} (the market has no offers)"
        relax = advice(reasons)
        return (f"no provider matched {constraint} {within}; {len(reasons)} offers were rejected: "
                f"{summarize(reasons)}" + (f"; to match more: {relax}" if relax else ""))

