"""Agreements both sides can prove: a provider approves only terms it stated, signed by
their requestor, under a fresh id; a requestor keeps only an approval of exactly the terms
it signed.  Real agents and the embedded market, every message through the wire format."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal

import pytest

from golem_dask.errors import ProposalRejected, ProtocolError
from golem_dask.market.demand import DemandSpec
from golem_dask.market.local import LocalMarket
from golem_dask.market.relay import ACTIVITY_HISTORY, check_approval
from golem_dask.protocol import properties as P
from golem_dask.protocol import terms
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.messages import Activity, ActivityState, Agreement, AgreementState, Proposal, new_id, now_ms
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.provider.agent import ProviderAgent
from golem_dask.provider.factory import embedded_agents

PLATFORM = "erc20-devnet-glm"
ENTRY = {"name": "p", "cpu": 2, "memory": "4GiB", "storage": "10GiB", "runtime": "process",
         "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}


class Setup:
    """A requestor wallet, one real provider agent on the embedded market, a demand."""

    def __init__(self, agent: ProviderAgent | None = None) -> None:
        self.requestor = Wallet.generate()
        self.agent = agent or embedded_agents(PLATFORM, [ENTRY])[0]
        self.market = LocalMarket([self.agent], wallet=self.requestor)
        self.spec = DemandSpec.from_kwargs(cpu=1, memory="1GiB", storage="1GiB", platform=PLATFORM)

    async def offer(self) -> tuple[str, Proposal]:
        """Subscribe and take the provider's first proposal: (subscription, proposal)."""
        await self.market.start()
        sub = await self.market.subscribe(self.spec.build(self.requestor.address, now_ms()))
        event = await asyncio.wait_for(self.market.events(sub).__anext__(), 5)
        return sub, event.proposal

    async def agreement(self) -> Agreement:
        """An agreement signed by the requestor over the provider's real reply."""
        sub, proposal = await self.offer()
        demand = self.spec.build(self.requestor.address, now_ms())
        reply = await self.market.counter(sub, proposal.id, demand)
        return await self.market.create_agreement(reply.id, int(demand.properties[P.EXPIRATION]))


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_an_honest_agreement_is_signed_by_both_and_checked() -> None:
    async def main() -> Agreement:
        s = Setup()
        agreement = await s.agreement()
        approved = await s.market.confirm_agreement(agreement.id, 5)
        await s.market.close()
        return approved

    approved = run(main())
    assert approved.state is AgreementState.APPROVED
    terms.check(approved, "requestor")
    terms.check(approved, "provider")


def _approve(s: Setup, agreement: Agreement) -> Agreement:
    return asyncio.get_event_loop().run_until_complete(s.agent.approve(agreement))


@pytest.mark.parametrize("attack", ["cheaper offer", "other demand", "more threads", "unsigned", "signed by another",
                                    "other payer", "past its demand", "reused id"])
def test_the_provider_refuses_terms_it_did_not_state(attack: str) -> None:
    async def main() -> str:
        s = Setup()
        agreement = await s.agreement()
        mallory = Wallet.generate()
        if attack == "cheaper offer":
            props = {**agreement.offer.properties,
                     **LinearPricing.per_hour(Decimal("0.0001"), Decimal(0)).to_properties()}
            forged = dataclasses.replace(agreement, offer=dataclasses.replace(agreement.offer, properties=props))
        elif attack == "other demand":
            forged = dataclasses.replace(agreement, demand=dataclasses.replace(
                agreement.demand, properties={**agreement.demand.properties, P.CPU_THREADS: 2}))
        elif attack == "more threads":  # the demand as answered, but the agreement re-signed with 64 threads
            forged = dataclasses.replace(agreement, demand=dataclasses.replace(
                agreement.demand, properties={**agreement.demand.properties, P.CPU_THREADS: 64}))
        elif attack == "unsigned":
            forged = dataclasses.replace(agreement, requestor_signature=b"")
        elif attack == "signed by another":
            forged = terms.sign(dataclasses.replace(agreement, requestor_id=mallory.address), mallory)
        elif attack == "other payer":
            forged = terms.sign(dataclasses.replace(agreement, requestor_id=mallory.address), mallory)
        elif attack == "past its demand":
            forged = dataclasses.replace(agreement, valid_to_ms=agreement.valid_to_ms + 3_600_000)
        else:  # reuse an id another requestor's agreement already has
            await s.agent.approve(agreement)
            second = await s.agreement()
            forged = terms.sign(dataclasses.replace(second, id=agreement.id), s.requestor)
        if attack in ("other demand", "more threads", "past its demand", "cheaper offer"):
            forged = terms.sign(forged, s.requestor)  # a valid signature over the altered terms
        before = s.agent.free
        with pytest.raises(ProposalRejected) as info:
            await s.agent.approve(forged)
        assert s.agent.free == before  # nothing was reserved
        await s.market.close()
        return str(info.value)

    reason = run(main())
    expected = {
        "cheaper offer": "is not a proposal provider p made",
        "other demand": "is not the counter-proposal this provider answered",
        "more threads": "is not the counter-proposal this provider answered",
        "unsigned": "not signed by its requestor",
        "signed by another": "is not the payer its demand names",
        "other payer": "is not the payer its demand names",
        "past its demand": "runs past its demand's expiration",
        "reused id": "was used before",
    }[attack]
    assert expected in reason


def test_an_agreement_ending_when_its_demand_expires_is_approved_while_the_clock_ticks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The requestor ends an agreement exactly at its demand's expiration; the provider reads
    the clock once for both checks, so a millisecond passing between them refuses nothing."""
    import golem_dask.provider.agent as agent_module

    ticks = iter(range(10**6))
    base = now_ms()
    monkeypatch.setattr(agent_module, "now_ms", lambda: base + next(ticks))  # a ms per reading

    async def main() -> Agreement:
        s = Setup()
        agreement = await s.agreement()
        assert agreement.valid_to_ms == int(agreement.demand.properties[P.EXPIRATION])
        approved = await s.market.confirm_agreement(agreement.id, 5)
        await s.market.close()
        return approved

    assert run(main()).state is AgreementState.APPROVED


def test_a_demand_for_no_threads_or_negative_memory_is_refused() -> None:
    async def main() -> list[str]:
        s = Setup()
        sub, proposal = await s.offer()
        reasons = []
        for cpu, memory in ((0, 2**30), (-4, 2**30), (1, -(2**30))):
            demand = s.spec.build(s.requestor.address, now_ms())
            props = {**demand.properties, P.CPU_THREADS: cpu, P.MEM_GIB: P.gib(memory) if memory > 0 else -1}
            bad = dataclasses.replace(demand, properties=props)
            with pytest.raises(ProposalRejected) as info:
                await s.market.counter(sub, proposal.id, bad)
            reasons.append(str(info.value))
        await s.market.close()
        return reasons

    for reason in run(main()):
        assert "must be positive" in reason or "does not satisfy" in reason


class PriceRaisingAgent(ProviderAgent):
    """Approves, but returns the agreement with its prices raised ten times, re-signed."""

    async def approve(self, agreement: Agreement) -> Agreement:
        approved = await super().approve(agreement)
        pricing = LinearPricing.from_properties(approved.offer.properties)
        raised = LinearPricing(pricing.price_per_cpu_second * 10, pricing.price_per_second * 10)
        offer = dataclasses.replace(approved.offer, properties={**approved.offer.properties, **raised.to_properties()})
        return terms.sign(dataclasses.replace(approved, offer=offer), self.wallet)


class UnsignedApprovalAgent(ProviderAgent):
    async def approve(self, agreement: Agreement) -> Agreement:
        return dataclasses.replace(await super().approve(agreement), provider_signature=b"")


@pytest.mark.parametrize("cls,expected", [(PriceRaisingAgent, "approved other terms"),
                                          (UnsignedApprovalAgent, "not signed by its provider")])
def test_the_requestor_refuses_an_approval_of_other_terms(cls: type, expected: str) -> None:
    template = embedded_agents(PLATFORM, [ENTRY])[0]
    agent = cls(template.settings, template.runtime, template.wallet)

    async def main() -> tuple[str, list[str]]:
        s = Setup(agent)
        agreement = await s.agreement()
        with pytest.raises(ProposalRejected) as info:
            await s.market.confirm_agreement(agreement.id, 5)
        live = agent.live_agreements  # the requestor told the provider it holds nothing
        await s.market.close()
        return str(info.value), live

    reason, live = run(main())
    assert expected in reason
    assert live == []


def test_check_approval_needs_our_agreement_back() -> None:
    requestor, provider = Wallet.generate(), Wallet.generate()
    demand = Proposal("requestor", {}, "(&)", "o", "d", provider.address, id="p1")
    offer = Proposal("provider", {}, "(&)", "o", "d", provider.address, "p1", id="p2")
    ours = terms.sign(Agreement(new_id(), demand, offer, requestor.address, provider.address, now_ms() + 60_000),
                      requestor)
    approved = terms.sign(dataclasses.replace(ours, state=AgreementState.APPROVED), provider)
    check_approval(ours, approved)
    for bad in (None, dataclasses.replace(approved, id="other"), dataclasses.replace(approved, state="Proposal"),
                dataclasses.replace(approved, valid_to_ms=approved.valid_to_ms + 1)):
        with pytest.raises(ProposalRejected):
            check_approval(ours, bad)
    with pytest.raises(ProtocolError, match="carries a provider signature by"):
        terms.check(dataclasses.replace(approved, provider_signature=requestor.sign_message_hash(terms.digest(ours))),
                    "provider")


def test_a_provider_flooding_activity_states_fills_no_memory_and_an_ended_activity_stays_ended() -> None:
    """A provider may send any number of states for its activity: the requestor keeps the
    latest few for followers that come late, and nothing after the activity ended."""
    async def run() -> None:
        market = LocalMarket()
        early = market.activity_events("a1")
        for i in range(10_000):
            market._deliver(Activity("a1", "agr", ActivityState.READY if i % 2 else ActivityState.DEPLOYED))
        market._deliver(Activity("a1", "agr", ActivityState.TERMINATED, "done"))
        market._deliver(Activity("a1", "agr", ActivityState.READY, "back from the dead"))
        assert len(market._activity_history["a1"]) == ACTIVITY_HISTORY
        seen = [a async for a in early]
        assert len(seen) == 10_001 and seen[-1].state == ActivityState.TERMINATED
        late = [a async for a in market.activity_events("a1")]
        assert len(late) == ACTIVITY_HISTORY and late[-1].reason == "done"
        assert "a1" not in market._activity_queues  # no follower is kept for an ended activity

    asyncio.run(run())
