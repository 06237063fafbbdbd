"""Negotiation at scale: a hub with 1,000 simulated providers, each with its own key.

Everything runs in this process on loopback: a HubServer, N provider daemons (a real
ProviderAgent and HubLink each, their own wallet, signed offers), and a requestor
(HubMarket + Negotiator) that needs K agreements.  Prints:

* offers scored per second (the pure scoring step, and the requestor's whole intake:
  signature check + two-way match + score);
* time from subscribing a demand to K approved agreements, signatures checked at every
  hop;
* memory per connected provider (process RSS growth / N; the hub's and the providers'
  objects together, so an upper bound for the hub alone).

The requestor verifies each offer frame once per process (``VerifiedOffers``: a frame
byte-identical to one already verified is not checked again); the intake is measured
both ways: with the frames already seen in this process (every requestor after the
first, as the figure has always been measured) and at first sight (that cache emptied).

Targets: >= 10,000 offers scored per second; requestor intake >= 20,000 offers per second;
8 agreements from the 1,000-provider hub in under 0.5 s.  The hub's connection limits are
raised through config for the N providers of this one address.

Run: python benchmarks/bench_hub.py [--providers 1000] [--agreements 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from decimal import Decimal

import psutil


async def main(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import dask

    from golem_dask.market.base import OfferReceived
    from golem_dask.market.demand import DemandSpec
    from golem_dask.market.hub import HubServer
    from golem_dask.market.hub_market import HubMarket
    from golem_dask.market.matching import verified_offers
    from golem_dask.market.negotiation import Negotiator, score
    from golem_dask.payment.budget import Budget
    from golem_dask.protocol.identity import Wallet
    from golem_dask.protocol.messages import Issuer, Proposal, now_ms
    from golem_dask.protocol.pricing import LinearPricing
    from golem_dask.protocol.properties import Resources
    from golem_dask.provider.agent import ProviderAgent, ProviderSettings
    from golem_dask.provider.daemon import ProviderDaemon
    from golem_dask.provider.runtime.process import ProcessRuntime

    # N providers from 127.0.0.1: the hub's connection limits must allow them (the
    # defaults are for strangers), and its offline store goes to a scratch folder.
    dask.config.set({"golem.hub.messages-per-second": 100_000, "golem.hub.offer-refresh": "1h",
                     "golem.hub.max-connections": args.providers + 64,
                     "golem.hub.max-connections-per-ip": args.providers + 64,
                     "golem.hub.data-dir": (scratch := tempfile.mkdtemp(prefix="bench-hub-"))})
    platform = "erc20-devnet-glm"
    spec = DemandSpec.from_kwargs(cpu=1, memory="1GiB", storage="1GiB", platform=platform)
    figures: dict[str, object] = {}

    # 1. Pure scoring throughput.
    proposals = []
    for i in range(10_000):
        pricing = LinearPricing.per_hour(Decimal("0.05") + Decimal(i % 97) / 1000, Decimal("0.01"))
        props = {**Resources(4, 8 * 2**30, 10 * 2**30).to_properties(), **pricing.to_properties()}
        proposals.append(Proposal(Issuer.PROVIDER, props, "(&)", f"o{i}", "d", "0x" + "00" * 20))
    started = time.perf_counter()
    for p in proposals:
        score(p, spec, Decimal(3600), Decimal(1))
    pure_rate = len(proposals) / (time.perf_counter() - started)
    figures["offers scored per second (pure)"] = round(pure_rate)

    # 2. A hub with N providers.
    process = psutil.Process()
    rss_before = process.memory_info().rss
    hub = HubServer("127.0.0.1", 0)
    await hub.start()
    daemons = []
    started = time.perf_counter()
    for i in range(args.providers):
        wallet = Wallet.generate()
        settings = ProviderSettings(
            name=f"sim-{i}",
            capacity=Resources(4, 8 * 2**30, 10 * 2**30),
            pricing=LinearPricing.per_hour(Decimal("0.05") + Decimal(i % 97) / 1000, Decimal("0.01")),
            platform=platform,
            debit_note_interval_s=3600,
        )
        daemon = ProviderDaemon(ProviderAgent(settings, ProcessRuntime(), wallet), wallet, hub.url)
        daemons.append(daemon)
    await asyncio.gather(*(d.start() for d in daemons))
    while len(hub.book.offers) < args.providers:
        await asyncio.sleep(0.05)
    connect_s = time.perf_counter() - started
    per_provider = (process.memory_info().rss - rss_before) / args.providers
    figures["providers"] = args.providers
    figures["connect and publish all (s)"] = round(connect_s, 2)
    figures["memory per connected provider (KiB, hub + provider objects)"] = round(per_provider / 1024, 1)

    async def intake() -> float:
        """A fresh subscription receives every offer, each checked, matched and scored."""
        market = HubMarket(hub.url, Wallet.generate())
        await market.start()
        started = time.perf_counter()
        subscription = await market.subscribe(spec.build(market.link.wallet.address, now_ms()))
        seen = 0
        async for event in market.events(subscription):
            if isinstance(event, OfferReceived):
                score(event.proposal, spec, Decimal(3600), Decimal(1))
                seen += 1
                if seen == args.providers:
                    break
        rate = seen / (time.perf_counter() - started)
        await market.close()
        return rate

    # 3. Time to K agreements, several times over (fresh requestor each time).
    times, intake_rates, first_sight_rates = [], [], []
    for _ in range(args.repeats):
        requestor = Wallet.generate()
        market = HubMarket(hub.url, requestor)
        await market.start()
        negotiator = Negotiator(market, spec, requestor.address, Budget(Decimal(1000)),
                                negotiation_timeout_s=30, approval_timeout_s=10,
                                expected_s=Decimal(3600), utilisation=Decimal(1))
        started = time.perf_counter()
        await negotiator.start()
        deals = await asyncio.gather(*(negotiator.acquire(f"w{i}") for i in range(args.agreements)))
        elapsed = time.perf_counter() - started
        times.append(elapsed)
        assert len({d.agreement.id for d in deals}) == args.agreements
        for d in deals:
            await market.terminate_agreement(d.agreement.id, "benchmark done")
        await negotiator.close()
        await market.close()

        # Intake by a fresh requestor; then again with nothing verified yet in this process.
        intake_rates.append(await intake())
        verified_offers.clear()
        first_sight_rates.append(await intake())
    figures[f"time to {args.agreements} agreements (s, median of {args.repeats})"] = round(statistics.median(times), 3)
    figures[f"time to {args.agreements} agreements, first requestor (s)"] = round(times[0], 3)
    figures["all offers verified+matched+scored per second (requestor intake)"] = round(statistics.median(intake_rates))
    figures["  same, every frame verified at first sight (cache emptied)"] = round(statistics.median(first_sight_rates))

    await asyncio.gather(*(d.close() for d in daemons))
    await hub.close()
    shutil.rmtree(scratch, ignore_errors=True)

    targets = {
        "offers scored >= 10,000/s": pure_rate >= 10_000,
        "requestor intake >= 20,000 offers/s": statistics.median(intake_rates) >= 20_000,
        f"{args.agreements} agreements from {args.providers} providers < 0.5 s": statistics.median(times) < 0.5,
    }
    for name, value in figures.items():
        print(f"{name:70s} {value}")
    print("\n== targets ==")
    for name, ok in targets.items():
        print(f"   {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"figures": figures, "targets": targets}, f, indent=2)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, default=1000)
    parser.add_argument("--agreements", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    sys.exit(asyncio.run(main(parser.parse_args())))
