"""Long runs on the embedded market: renewal, paying as it goes, catching a short delivery.

Three measurements (each can be skipped):

1. **Renewal**: ``GolemCluster(n_workers=2)`` with the agreement lifetime shortened
   (default 60 s) runs for ``--minutes`` (default 10), computing on a persisted array every
   second.  Reports workers lost, keys recomputed (a scheduler plugin watches the persisted
   keys) and the renewal gap: for each hand-over, how long after the old agreement expired
   the successor joined (0 when it joined before).
2. **Pay as you go**: 8 workers for ``--intervals`` payment intervals (``--interval``,
   default 10 s, standing in for 10 minutes); counts the transactions that paid providers
   (the distinct hashes of the cluster's payments) against 8 per interval paid one by one,
   and reports every transaction sent (the nonce: one more, the batch contract's approval).
3. **Short delivery**: ``--throttle-runs`` runs (default 10) of a cheaper provider whose
   worker is let run a quarter of the time (SIGSTOP/SIGCONT, like a CPU quota) beside a
   fair one; reports how often and how fast it is caught and what share of its invoice is
   paid.

    python benchmarks/bench_longrun.py [--minutes 10] [--lifetime 60s] [--intervals 6] [--throttle-runs 10]

Targets: 0 workers lost, 0 keys recomputed, renewal gap 0 s; at most one transaction per
interval plus one (the invoices); the short delivery caught within 60 s in every run and
paid at most its delivered share plus the tolerance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

from _common import finish, log, quiet_logs, report_targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def renewal(minutes: float, lifetime: str) -> dict[str, float]:
    import dask
    import dask.array as da
    import numpy as np
    from distributed import Client
    from test_upkeep import Recomputes, wait_until

    from golem_dask import GolemCluster

    data = np.arange(1_000_000, dtype="f8")
    gaps: list[float] = []
    # A hand-over rents the successor before the old worker leaves: the provider needs a
    # free slot beside the two workers (the embedded default sells this machine's 2 cores).
    local = [{"name": "local", "cpu": 4, "memory": "8GiB", "storage": "10GiB", "runtime": "auto",
              "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}]
    with dask.config.set({"golem.market.agreement-lifetime": lifetime, "golem.provider.local": local}), \
            GolemCluster(n_workers=2, cpu=1, budget="5") as cluster, Client(cluster) as client:
        plugin = Recomputes()
        cluster.scheduler.add_plugin(plugin)
        x = da.from_array(data, chunks=100_000).persist()
        wait_until("persisted keys", lambda: len(cluster.scheduler.tasks) >= 10
                   and all(ts.state == "memory" for ts in cluster.scheduler.tasks.values()))
        plugin.watched = {str(k) for k in cluster.scheduler.tasks}
        expiry: dict[str, int] = {}
        started = time.monotonic()
        while time.monotonic() - started < minutes * 60:
            assert float(x.sum().compute()) == float(data.sum())
            for name, worker in cluster.workers.items():
                if worker.deal is not None:
                    expiry.setdefault(name, worker.deal.agreement.valid_to_ms)
            time.sleep(1)
        for event in cluster.events.of_kind("renewal"):
            successor = event.data.get("successor")
            if successor:
                gaps.append(max(0.0, event.time - expiry.get(str(event.data["worker"]), 0) / 1000))
        lost = sum("lost" in str(e) for e in cluster.events.of_kind("warning"))
        handovers = len(gaps)
    return {"workers lost": lost, "keys recomputed": len(plugin.recomputed), "hand-overs": handovers,
            "renewal gap max (s)": max(gaps, default=0.0)}


def pay_as_you_go(intervals: int, interval: str) -> dict[str, float]:
    import dask
    from distributed import Client

    from golem_dask import GolemCluster

    workers = 8
    config = {"golem.payment.pay-interval": interval, "golem.provider.debit-note-interval": "1s",
              "golem.provider.local": [{"name": "big", "cpu": workers, "memory": "64GiB", "storage": "64GiB",
                                        "runtime": "process", "price-per-cpu-hour": "0.1",
                                        "price-per-hour": "0.02", "start-price": "0"}],
              "golem.demand.memory": "1GiB"}
    seconds = float(dask.utils.parse_timedelta(interval))
    with dask.config.set(config), GolemCluster(n_workers=workers, cpu=1, budget="20") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers)
        time.sleep(intervals * seconds + seconds / 2)
        rounds = len({p.tx_hash for p in cluster.accountant.payments})
    # Every transaction the requestor sent, and those that paid someone: the rest is the
    # one approval of the batch contract, made once per payer.
    sent = int(cluster.payer.w3.eth.get_transaction_count(cluster.payer.address))
    payments = len({p.tx_hash for p in cluster.accountant.payments})
    return {"workers": workers, "intervals": intervals, "payment transactions": payments,
            "transactions sent (with the one approval)": sent, "mid-run rounds": rounds,
            "paid one by one": workers * (intervals + 1)}


def short_delivery(runs: int) -> dict[str, float]:
    import dask
    from distributed import Client
    from test_upkeep import Throttle, _agents, wait_until

    from golem_dask import GolemCluster
    from golem_dask.market.local import LocalMarket
    from golem_dask.protocol import properties as P

    caught, times, shares = 0, [], []
    config = {"golem.cluster.capacity-window": "10s", "golem.payment.metering-interval": "500ms"}
    for run in range(runs):
        slow_key, fair_key = f"{0x61 + run:02x}" * 32, f"{0x81 + run:02x}" * 32
        with dask.config.set(config), GolemCluster(n_workers=2, cpu=1, budget="2",
                                                    market=LocalMarket(_agents(slow_key, fair_key))) as cluster, \
                Client(cluster) as client:
            slow = next(w for w in cluster.workers.values() if w.deal.candidate.name == "slow")
            (pid,) = client.run(os.getpid, workers=[slow.address]).values()
            throttle = Throttle(pid)
            try:
                started = time.monotonic()
                work = client.map(lambda i: sum(range(12_000_000)) + i, range(1000), pure=False)
                try:
                    wait_until("the catch", lambda: any("delivered" in str(e) for e in
                                                        cluster.events.of_kind("warning")), 60)
                    caught += 1
                    times.append(time.monotonic() - started)
                except AssertionError:
                    pass
                client.cancel(work)
            finally:
                throttle.stop()
        account = cluster.accountant.accounts[slow.agreement_id]
        if account.invoice is not None and account.delivered_share:
            # Paid, against what the time it billed would cost with every sold thread busy.
            # Its delivered share: as caught, or over its whole life (billed CPU / sold threads).
            duration = Decimal(account.invoice.usage.get(P.USAGE_DURATION_SEC, 0))
            cpu = Decimal(account.invoice.usage.get(P.USAGE_CPU_SEC, 0))
            full = account.pricing.cost({P.USAGE_DURATION_SEC: duration, P.USAGE_CPU_SEC: duration * account.threads})
            share = max(account.delivered_share, cpu / (duration * account.threads))
            shares.append(float(account.amount / full / share))
    return {"runs": runs, "caught": caught, "time to catch median (s)": statistics.median(times) if times else -1,
            "time to catch max (s)": max(times, default=-1),
            "paid / (delivered share x full price), max": max(shares, default=-1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--lifetime", default="60s")
    parser.add_argument("--intervals", type=int, default=6)
    parser.add_argument("--interval", default="10s")
    parser.add_argument("--throttle-runs", type=int, default=10)
    parser.add_argument("--skip", action="append", default=[], choices=["renewal", "payments", "throttle"])
    parser.add_argument("--json")
    args = parser.parse_args()
    quiet_logs()
    figures: dict[str, object] = {}
    targets = []
    if "renewal" not in args.skip:
        r = renewal(args.minutes, args.lifetime)
        figures["renewal"] = r
        log(f"renewal over {args.minutes:g} min, lifetime {args.lifetime}: {r}")
        targets.append({"name": "0 workers lost, 0 keys recomputed, renewal gap 0 s",
                        "value": r["workers lost"] + r["keys recomputed"] + r["renewal gap max (s)"],
                        "pass": r["workers lost"] == 0 and r["keys recomputed"] == 0 and r["renewal gap max (s)"] == 0})
    if "payments" not in args.skip:
        p = pay_as_you_go(args.intervals, args.interval)
        figures["payments"] = p
        log(f"pay as you go: {p}")
        targets.append({"name": f"transactions <= intervals + 1 ({args.intervals + 1})",
                        "value": p["payment transactions"], "pass": p["payment transactions"] <= args.intervals + 1})
    if "throttle" not in args.skip:
        t = short_delivery(args.throttle_runs)
        figures["throttle"] = t
        log(f"short delivery: {t}")
        targets.append({"name": "caught in every run within 60 s", "value": t["caught"],
                        "pass": t["caught"] == t["runs"] and 0 <= t["time to catch max (s)"] <= 60})
        paid = t["paid / (delivered share x full price), max"]
        targets.append({"name": "paid at most its delivered share of the full price + the tolerance (1.25)",
                        "value": paid, "pass": 0 <= paid <= 1.25})
    report_targets(targets)
    return finish(args.json, targets, **figures)


if __name__ == "__main__":
    sys.exit(main())
