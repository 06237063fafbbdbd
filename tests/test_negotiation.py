"""Pure negotiation policy: matching, scoring under linear pricing, refusals, budget."""

from __future__ import annotations

from decimal import Decimal

import dask
import pytest

from golem_dask.errors import BudgetExceededError, ConfigError, ConstraintSyntaxError
from golem_dask.market.demand import DemandSpec, PriceCaps
from golem_dask.market.matching import matches
from golem_dask.market.negotiation import Candidate, rank, score, summarize
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.payment.budget import Budget
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Issuer, Offer, Proposal

ADDR = "0x" + "cd" * 20
PLATFORM = "erc20-devnet-glm"


def offer_props(cpu: int = 4, mem: str = "8", cpu_hour: str = "0.1", hour: str = "0.02", start: str = "0", **extra):
    return {
        P.CPU_THREADS: cpu,
        P.MEM_GIB: Decimal(mem),
        P.STORAGE_GIB: Decimal(10),
        P.RUNTIME_NAME: "process",
        P.payment_address(PLATFORM): ADDR,
        **LinearPricing.per_hour(Decimal(cpu_hour), Decimal(hour), Decimal(start)).to_properties(),
        **extra,
    }


def offer(**kw) -> Offer:
    return Offer(properties=offer_props(**kw), constraints="(&(golem.inf.cpu.threads=*)(golem.srv.comp.expiration>=1))",
                 provider_id=ADDR)


def as_proposal(o: Offer) -> Proposal:
    return Proposal(Issuer.PROVIDER, o.properties, o.constraints, o.id, "d", o.provider_id)


def spec(**kw) -> DemandSpec:
    base = dict(cpu=2, memory="4GiB", storage="1GiB")
    base.update(kw)
    return DemandSpec.from_kwargs(**base)


def test_demand_constraint_text() -> None:
    text = str(spec().constraints)
    assert text.startswith("(&(golem.inf.cpu.threads>=2)(golem.inf.mem.gib>=4)(golem.inf.storage.gib>=1)")
    assert "(golem.com.pricing.model=linear)" in text


def test_two_way_matching() -> None:
    demand = spec().build(ADDR, now_ms=1_000)
    assert matches(demand, offer())
    assert not matches(demand, offer(mem="2"))  # the offer fails the demand
    assert not matches(demand, offer(cpu=1))
    picky = Offer(properties=offer_props(), constraints="(golem.node.id.name=lab-*)", provider_id=ADDR)
    assert not matches(demand, picky)  # the demand fails the offer
    assert matches(spec(constraints="(golem.runtime.name=process)").build(ADDR, 1_000), offer())


def test_scoring_order_under_linear_pricing() -> None:
    s = spec()
    hour, util = Decimal(3600), Decimal(1)
    cheap_cpu = score(as_proposal(offer(cpu_hour="0.05", hour="0.05")), s, hour, util)
    cheap_start = score(as_proposal(offer(cpu_hour="0.1", hour="0", start="0.01")), s, hour, util)
    dear = score(as_proposal(offer(cpu_hour="0.2", hour="0")), s, hour, util)
    assert all(isinstance(c, Candidate) for c in (cheap_cpu, cheap_start, dear))
    # 2 threads for an hour: 0.05*2 + 0.05 = 0.15; 0.1*2 + 0.01 = 0.21; 0.2*2 = 0.4
    assert [c.expected_cost for c in (cheap_cpu, cheap_start, dear)] == [Decimal("0.15"), Decimal("0.21"), Decimal("0.4")]
    assert rank([dear, cheap_start, cheap_cpu]) == [cheap_cpu, cheap_start, dear]
    # A short expected run makes the start price dominate.
    short = [score(as_proposal(o), s, Decimal(60), util) for o in (offer(cpu_hour="0.1", hour="0", start="0.01"),
                                                                   offer(cpu_hour="0.3", hour="0"))]
    assert rank(short)[0] is short[1]


def test_worst_case_over_lifetime_or_two_payment_periods() -> None:
    priced = as_proposal(offer(cpu_hour="0.1", hour="0.02", start="0.001"))
    with dask.config.set({"golem.payment.pay-interval": None}):  # paid at the end: the whole lifetime
        c = score(priced, spec(lifetime="30m"), Decimal(3600), Decimal("0.5"))
    assert isinstance(c, Candidate)
    assert c.worst_case == Decimal("0.001") + Decimal("0.1") + Decimal("0.01")  # 2 threads * 0.5h + 0.5h
    with dask.config.set({"golem.payment.pay-interval": "5m"}):  # paid as it goes: 2 * 5 minutes
        c = score(priced, spec(lifetime="30m"), Decimal(3600), Decimal("0.5"))
    ten_minutes = Decimal("0.001") + (2 * Decimal("0.1") + Decimal("0.02")) / 6  # 2 threads * 1/6 h + 1/6 h
    assert isinstance(c, Candidate) and c.worst_case == ten_minutes.quantize(Decimal("1e-18"))  # to the wei


def test_caps_refuse_with_reasons() -> None:
    s = spec(max_price_per_cpu_hour="0.1", max_start_price="0")
    reason = score(as_proposal(offer(cpu_hour="0.5", start="0.2")), s, Decimal(3600), Decimal(1))
    assert reason == "over max_price_per_cpu_hour=0.1 (asks 0.5); over max_start_price=0 (asks 0.2)"
    bad = Offer(properties={**offer_props(), P.LINEAR_COEFFS: (Decimal(1),)}, constraints="(&)", provider_id=ADDR)
    assert "unreadable prices" in score(as_proposal(bad), s, Decimal(3600), Decimal(1))


def test_summary_counts_by_kind() -> None:
    assert summarize([
        "over max_price_per_cpu_hour=0.1 (asks 0.5)",
        "over max_price_per_cpu_hour=0.1 (asks 0.2)",
        "golem.inf.mem.gib>=64 (offer has 24)",
    ]) == "2 over max_price_per_cpu_hour=0.1, 1 short of memory"


def test_price_caps_none_means_uncapped() -> None:
    assert PriceCaps().violations(LinearPricing.per_hour(Decimal(1000), Decimal(1000))) == []


def test_malformed_constraint_fails_at_spec_time() -> None:
    with pytest.raises(ConstraintSyntaxError) as info:
        spec(constraints="(&(golem.inf.mem.gib>=4)")
    assert info.value.position == len("(&(golem.inf.mem.gib>=4)")


@pytest.mark.parametrize("kw", [dict(cpu=0), dict(memory="lots"), dict(max_price_per_cpu_hour="-1"),
                                dict(max_price_per_cpu_hour="cheap")])
def test_bad_kwargs_name_the_fix(kw: dict) -> None:
    with pytest.raises(ConfigError, match=list(kw)[0]):
        spec(**kw)


def test_pricing_round_trips_through_properties_and_rounds_to_wei() -> None:
    p = LinearPricing.per_hour(Decimal("0.1"), Decimal("0.02"), Decimal("0.001"))
    assert LinearPricing.from_properties(p.to_properties()) == p
    cost = p.cost({P.USAGE_CPU_SEC: Decimal("1.001"), P.USAGE_DURATION_SEC: Decimal("2.5")})
    assert cost == Decimal("0.001") + Decimal("1.001") * Decimal("0.1") / 3600 + Decimal("2.5") * Decimal("0.02") / 3600 \
        or abs(cost - (Decimal("0.001") + Decimal("1.001") * Decimal("0.1") / 3600 + Decimal("2.5") * Decimal("0.02") / 3600)) < Decimal("1e-18")
    assert cost.as_tuple().exponent >= -18


def test_budget_reserves_worst_case_and_releases_the_rest() -> None:
    b = Budget(Decimal("0.3"))
    b.reserve("a", Decimal("0.12"))
    b.reserve("b", Decimal("0.12"))
    with pytest.raises(BudgetExceededError, match="raise budget="):
        b.reserve("c", Decimal("0.12"))
    b.settle("a", Decimal("0.01"))
    assert b.remaining == Decimal("0.17")
    b.reserve("c", Decimal("0.12"))
    b.release("b")
    assert b.remaining == Decimal("0.17")
    assert b.spent == Decimal("0.01")


def test_a_cap_equal_to_the_offered_hourly_price_admits_it_at_every_price() -> None:
    """0.0500 to 0.5000 GLM per cpu-hour in 0.0001 steps: an offer made by a provider at
    that hourly price, sent over the wire, is within a cap equal to it and shows that
    exact price; one step more is refused.  (Prices used to be stored per second and
    converted back, which refused 633 of these 4,501 at their own cap.)"""
    from golem_dask.protocol.wire import decode, encode

    refused, shown = [], []
    for step in range(500, 5001):
        price = Decimal(step).scaleb(-4)
        received = decode(encode(as_proposal(offer(cpu_hour=str(price), hour=str(price)))))
        at_cap = score(received, spec(max_price_per_cpu_hour=str(price), max_price_per_hour=str(price)),
                       Decimal(3600), Decimal(1))
        if not isinstance(at_cap, Candidate):
            refused.append((price, at_cap))
            continue
        if at_cap.pricing.price_per_cpu_hour != price or at_cap.pricing.price_per_hour != price:
            shown.append((price, at_cap.pricing.price_per_cpu_hour))
        below = score(received, spec(max_price_per_cpu_hour=str(price - Decimal("0.0001"))), Decimal(3600), Decimal(1))
        assert isinstance(below, str) and below.startswith("over max_price_per_cpu_hour"), price
    assert refused == [] and shown == []


def test_prices_print_as_offered() -> None:
    pricing = LinearPricing.from_properties(offer_props(cpu_hour="0.0696", hour="0.02"))
    assert f"{pricing.price_per_cpu_hour} GLM/cpu-hour" == "0.0696 GLM/cpu-hour"
    assert str(pricing.price_per_hour) == "0.02"
    # The per-second coefficients are kept as the offer states them.
    stated = offer_props(cpu_hour="0.0696")[P.LINEAR_COEFFS]
    assert LinearPricing.from_properties(offer_props(cpu_hour="0.0696")).price_per_cpu_second == stated[0]
