"""Benchmark GolemCluster against LocalCluster: worker start-up time and task throughput.

Run from the repository root::

    python benchmarks/bench_cluster.py            # full run (~5-6 min on 2 cores)
    python benchmarks/bench_cluster.py --quick    # smoke run (~1-2 min)
    python benchmarks/bench_cluster.py --repeats 9 --json bench.json

What is measured (all in one process, implementations alternated round by round, after
warm-up rounds; figures are medians of the repeats):

1. Start-up: wall time of the cluster constructor returning with N workers registered,
   for ``GolemCluster(n_workers=N)`` and ``LocalCluster(n_workers=N, threads_per_worker=1,
   processes=True)``.  Close time is not counted (every cluster is closed each round).
   An informative floor: N bare ``python -m dask worker --no-nanny`` processes started in
   parallel against an in-process Scheduler, until all are registered.
2. Throughput on N=2 workers with 1 thread each: many tiny tasks (``client.map``) and a
   chunked dask.array reduction, on a GolemCluster and a LocalCluster that are both up.
   Each round runs A B B A (which side is A alternates), so a drift in the machine's speed
   cancels within the round; the figure is the geometric mean of the rounds' ratios, with
   a bootstrap 95% interval.

3. Close: ``close()`` of 4 workers after a task run, Golem (workers retired, invoices
   checked and paid on the embedded devnet) against LocalCluster, A B B A per round.

Targets: start-up Golem/Local <= 1.10 for every N; throughput Local time / Golem time >=
0.97 for both workloads (the geometric mean of the rounds); close Golem/Local <= 2.0.  The process exits with status 1 if a target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from _common import bootstrap_interval, finish, geometric_mean, log, median, paired_median, quiet_logs, report_targets, spread
import dask
from distributed import Client, LocalCluster, Scheduler

#: The embedded provider sells this much; enough for 4 workers of WORKER_MEMORY each.
PROVIDER = {
    "name": "local",
    "cpu": 8,
    "memory": "16GiB",
    "storage": "10GiB",
    "runtime": "process",
    "price-per-cpu-hour": "0.1",
    "price-per-hour": "0.02",
    "start-price": "0",
}
#: Memory per worker: the Golem demand, and LocalCluster's memory_limit (same workers).
WORKER_MEMORY = "2GiB"
BUDGET = "5"
STARTUP_TARGET = 1.10  # Golem start-up time / Local start-up time, at most
THROUGHPUT_TARGET = 0.97  # Local time / Golem time, at least
CLOSE_TARGET = 2.0  # Golem close time / Local close time, at most
CLOSE_WORKERS = 4
SETTLE_S = 0.5  # pause after each close so the next measurement starts on a quiet machine
SCHEDULER_OPTIONS = {"host": "127.0.0.1", "port": 0, "dashboard_address": ":0"}


def inc(x: int) -> int:
    return x + 1


def configure() -> None:
    dask.config.set(
        {
            "golem.provider.local": [PROVIDER],
            "golem.demand.memory": WORKER_MEMORY,
            "golem.payment.budget": BUDGET,
        }
    )


# -- start-up ---------------------------------------------------------------------------


@dataclass
class Started:
    seconds: float
    close: Callable[[], None]


def _check_workers(scheduler: Any, n: int, what: str) -> None:
    got = len(scheduler.workers)
    if got != n:
        raise RuntimeError(f"{what}: constructor returned with {got} workers registered, expected {n}")


def start_golem(n: int) -> Started:
    from golem_dask import GolemCluster

    t0 = time.perf_counter()
    cluster = GolemCluster(n_workers=n, budget=BUDGET, silence_logs=logging.ERROR)
    elapsed = time.perf_counter() - t0
    try:
        _check_workers(cluster.scheduler, n, "GolemCluster")
    except BaseException:
        cluster.close()
        raise
    return Started(elapsed, cluster.close)


def start_local(n: int) -> Started:
    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        memory_limit=WORKER_MEMORY,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    elapsed = time.perf_counter() - t0
    try:
        _check_workers(cluster.scheduler, n, "LocalCluster")
    except BaseException:
        cluster.close()
        raise
    return Started(elapsed, cluster.close)


async def _bare_workers(n: int) -> float:
    """Scheduler start + N ``dask worker --no-nanny`` processes registered (seconds)."""
    t0 = time.perf_counter()
    async with Scheduler(**SCHEDULER_OPTIONS) as scheduler:
        cmd = [sys.executable, "-m", "dask", "worker", scheduler.address,
               "--no-nanny", "--nthreads", "1", "--no-dashboard"]
        procs = [
            subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
            for _ in range(n)
        ]
        try:
            while len(scheduler.workers) < n:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a bare dask worker exited before registering")
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("bare dask workers did not register within 120 s")
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - t0
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
            for p in procs:
                try:
                    await asyncio.to_thread(p.wait, 15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return elapsed


def start_floor(n: int) -> Started:
    # The processes are already gone when this returns: teardown is outside the timing.
    return Started(asyncio.run(_bare_workers(n)), lambda: None)


STARTERS: dict[str, Callable[[int], Started]] = {
    "golem": start_golem,
    "local": start_local,
    "floor": start_floor,
}


def measure_start(kind: str, n: int) -> float:
    started = STARTERS[kind](n)
    try:
        return started.seconds
    finally:
        started.close()
        gc.collect()
        time.sleep(SETTLE_S)


def bench_startup(ns: Sequence[int], repeats: int, warmup_ns: Sequence[int]) -> dict[str, Any]:
    kinds = list(STARTERS)
    samples: dict[int, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in ns}
    log(f"start-up warm-up (N={', '.join(map(str, warmup_ns))}) ...")
    for n in warmup_ns:
        for kind in kinds:
            measure_start(kind, n)
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]  # rotate who goes first
        line = []
        for n in ns:
            for kind in order:
                samples[n][kind].append(measure_start(kind, n))
            line.append(f"N={n}: golem {samples[n]['golem'][-1]:.2f} local {samples[n]['local'][-1]:.2f} "
                        f"floor {samples[n]['floor'][-1]:.2f}")
        log(f"  round {r + 1}/{repeats} ({'/'.join(order)} first): " + "; ".join(line))
    result: dict[str, Any] = {}
    for n in ns:
        s = samples[n]
        result[str(n)] = {
            "samples_s": s,
            "median_s": {k: median(v) for k, v in s.items()},
            "ratio_golem_local": median(s["golem"]) / median(s["local"]),
            "paired_ratio_golem_local": paired_median(s["golem"], s["local"]),
            "ratio_golem_floor": median(s["golem"]) / median(s["floor"]),
        }
    return result


def bench_payer_start(repeats: int) -> list[float]:
    """Informative: what funding a fresh embedded wallet costs (GolemCluster does it at its first payment, not at start)."""
    from decimal import Decimal

    from golem_dask.payment.ethereum import EthereumPayer

    async def one() -> float:
        payer = EthereumPayer.embedded(Decimal(BUDGET))
        t0 = time.perf_counter()
        await payer.start()
        elapsed = time.perf_counter() - t0
        await payer.close()
        return elapsed

    return [asyncio.run(one()) for _ in range(repeats)]


# -- close ------------------------------------------------------------------------------


def measure_close(kind: str, n: int) -> float:
    """Start a cluster of ``n`` workers, run tasks on it, and time ``close()``.

    For GolemCluster, close() retires the workers, waits for the invoices, checks them
    against the requestor's own metering and pays them on the embedded devnet.
    """
    from golem_dask import GolemCluster

    if kind == "golem":
        cluster: Any = GolemCluster(n_workers=n, budget=BUDGET, silence_logs=logging.ERROR)
    else:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=WORKER_MEMORY,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    try:
        with Client(cluster, set_as_default=False) as client:
            assert client.gather(client.map(inc, range(200), pure=False))[-1] == 200
    except BaseException:
        cluster.close()
        raise
    t0 = time.perf_counter()
    cluster.close()
    elapsed = time.perf_counter() - t0
    if kind == "golem":
        bill = cluster.bill()
        paid = [e for e in bill.entries if e.status == "paid"]
        if len(paid) != n:
            raise RuntimeError(f"close left {n - len(paid)} of {n} agreements unpaid:\n{bill}")
    gc.collect()
    time.sleep(SETTLE_S)
    return elapsed


def bench_close(rounds: int, n: int) -> dict[str, Any]:
    """A B then B A per round: the round's ratio is Golem close time / Local close time."""
    log(f"close warm-up (N={n}) ...")
    measure_close("golem", n)
    measure_close("local", n)
    samples: dict[str, list[float]] = {"golem": [], "local": []}
    ratios: list[float] = []
    for r in range(rounds):
        order = ["golem", "local", "local", "golem"] if r % 2 == 0 else ["local", "golem", "golem", "local"]
        took = {"golem": 0.0, "local": 0.0}
        for kind in order:
            t = measure_close(kind, n)
            samples[kind].append(t)
            took[kind] += t
        ratios.append(took["golem"] / took["local"])
        log(f"  round {r + 1}/{rounds} ({' '.join(order)}): golem {took['golem'] / 2:.3f} "
            f"local {took['local'] / 2:.3f} ratio {ratios[-1]:.3f}")
    low, high = bootstrap_interval(ratios)
    return {"workers": n, "samples_s": samples, "round_ratios_golem_local": ratios,
            "median_s": {k: median(v) for k, v in samples.items()},
            "ratio_golem_local": geometric_mean(ratios), "ratio_interval_95": [low, high]}


# -- throughput -------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    cluster: Any
    client: Client
    workers: list[tuple[int, int]] = field(default_factory=list)  # (nthreads, memory_limit)


def _wait_idle(side: Side, timeout: float = 10.0) -> None:
    """Wait until the scheduler has forgotten every task of the previous run."""
    deadline = time.monotonic() + timeout
    while side.cluster.scheduler.tasks and time.monotonic() < deadline:
        time.sleep(0.01)


def run_tiny(side: Side, k: int) -> float:
    t0 = time.perf_counter()
    futures = side.client.map(inc, range(k), pure=False)
    results = side.client.gather(futures)
    elapsed = time.perf_counter() - t0
    assert results[-1] == k
    del futures, results
    _wait_idle(side)
    return elapsed


def run_array(side: Side, n: int, chunk: int) -> float:
    # Imported here, not at the top: LocalCluster's nannies spawn processes that re-import
    # this module, and numpy there would be a cost only the LocalCluster side pays.
    import dask.array as da

    t0 = time.perf_counter()
    x = da.random.random((n, n), chunks=chunk)  # a new random name: nothing is cached
    value = side.client.compute((x + x.T).mean(axis=0).sum()).result()
    elapsed = time.perf_counter() - t0
    assert 0.9 * n < value < 1.1 * n, value  # mean of x + x.T is ~1 per column
    _wait_idle(side)
    return elapsed


def open_side(name: str, n: int) -> Side:
    if name == "golem":
        from golem_dask import GolemCluster

        cluster = GolemCluster(n_workers=n, budget=BUDGET, silence_logs=logging.ERROR)
    else:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               memory_limit=WORKER_MEMORY, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(n)
    info = client.scheduler_info(n_workers=-1)["workers"]
    workers = sorted((w["nthreads"], int(w["memory_limit"])) for w in info.values())
    return Side(name, cluster, client, workers)


def bench_throughput(repeats: int, n_workers: int, tasks: int, array_n: int, chunk: int) -> dict[str, Any]:
    sides = [open_side("golem", n_workers), open_side("local", n_workers)]
    try:
        for side in sides:
            log(f"  {side.name} workers (nthreads, memory_limit): {side.workers}")
        if sides[0].workers != sides[1].workers:
            log("  WARNING: the two clusters' workers differ")
        workloads: dict[str, Callable[[Side], float]] = {
            f"tiny tasks (K={tasks})": lambda s: run_tiny(s, tasks),
            f"array {array_n}^2/{chunk}": lambda s: run_array(s, array_n, chunk),
        }
        log("throughput warm-up ...")
        for side in sides:
            run_tiny(side, max(tasks // 5, 100))
            run_array(side, array_n, chunk)
        samples: dict[str, dict[str, list[float]]] = {w: {s.name: [] for s in sides} for w in workloads}
        rounds: dict[str, list[float]] = {w: [] for w in workloads}
        for r in range(repeats):
            # A B B A: a drift in the machine's speed during a round hits both sides alike.
            first, second = (sides if r % 2 == 0 else sides[::-1])
            line = []
            for w, fn in workloads.items():
                took: dict[str, float] = {s.name: 0.0 for s in sides}
                for side in (first, second, second, first):
                    gc.collect()
                    t = fn(side)
                    samples[w][side.name].append(t)
                    took[side.name] += t
                rounds[w].append(took["local"] / took["golem"])
                line.append(f"{w.split(' (')[0].split(' ')[0]}: golem {took['golem'] / 2:.2f} "
                            f"local {took['local'] / 2:.2f} ratio {rounds[w][-1]:.3f}")
            log(f"  round {r + 1}/{repeats} ({first.name} {second.name} {second.name} {first.name}): "
                + "; ".join(line))
    finally:
        for side in sides:
            side.client.close()
            side.cluster.close()
    result: dict[str, Any] = {"workers": {s.name: s.workers for s in sides}}
    for w, s in samples.items():
        low, high = bootstrap_interval(rounds[w])
        result[w] = {
            "samples_s": s,
            "round_ratios_local_golem": rounds[w],
            "median_s": {k: median(v) for k, v in s.items()},
            "ratio_local_golem": geometric_mean(rounds[w]),
            "ratio_interval_95": [low, high],
        }
    return result


# -- report -----------------------------------------------------------------------------


def report(startup: dict[str, Any] | None, payer: list[float] | None,
           throughput: dict[str, Any] | None, repeats: int, close: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    log()
    log(f"== results: medians of {repeats} repeats, seconds [min-max] ==")
    if startup:
        log()
        log("1. time to N ready workers (constructor returns with N workers registered)")
        log(f"   {'N':>2}  {'Golem':>16}  {'Local':>16}  {'bare floor':>16}  {'Golem/Local':>11}  "
            f"{'paired':>6}  {'Golem/floor':>11}")
        for n, r in startup.items():
            s, m = r["samples_s"], r["median_s"]
            cells = [f"{m[k]:6.2f} [{spread(s[k])}]" for k in ("golem", "local", "floor")]
            log(f"   {n:>2}  {cells[0]:>16}  {cells[1]:>16}  {cells[2]:>16}  "
                f"{r['ratio_golem_local']:>11.3f}  {r['paired_ratio_golem_local']:>6.3f}  "
                f"{r['ratio_golem_floor']:>11.3f}")
            targets.append({
                "name": f"start-up N={n}: Golem/Local <= {STARTUP_TARGET:.2f}",
                "value": r["ratio_golem_local"],
                "pass": r["ratio_golem_local"] <= STARTUP_TARGET,
            })
    if payer:
        log(f"   (informative: funding a fresh embedded wallet, done at a GolemCluster's first payment, "
            f"not at start: median {median(payer):.3f} s [{spread(payer)}])")
    if throughput:
        log()
        log("2. throughput, 2 workers x 1 thread (wall time per run; each round runs A B B A)")
        log(f"   {'workload':<24}  {'Golem':>16}  {'Local':>16}  {'Local/Golem':>11}  {'95% interval':>14}")
        for w, r in throughput.items():
            if w == "workers":
                continue
            s, m = r["samples_s"], r["median_s"]
            cells = [f"{m[k]:6.2f} [{spread(s[k])}]" for k in ("golem", "local")]
            low, high = r["ratio_interval_95"]
            log(f"   {w:<24}  {cells[0]:>16}  {cells[1]:>16}  {r['ratio_local_golem']:>11.3f}  "
                f"{f'{low:.3f}-{high:.3f}':>14}")
            targets.append({
                "name": f"throughput {w}: Local/Golem >= {THROUGHPUT_TARGET:.2f}",
                "value": r["ratio_local_golem"],
                "pass": r["ratio_local_golem"] >= THROUGHPUT_TARGET,
            })
        log("   Local/Golem is the geometric mean of the rounds' ratios (Local time / Golem time); the")
        log("   interval is a bootstrap over rounds. Both clusters' workers run the same dask code, so")
        log("   the question is whether anything Golem adds costs time: an interval that holds 1.0 and")
        log("   stays above the target says it does not, within what this machine can resolve.")
    if close:
        log()
        log(f"3. close(), {close['workers']} workers after a task run (Golem: retire, invoices checked, paid "
            "on the embedded devnet)")
        s, m = close["samples_s"], close["median_s"]
        low, high = close["ratio_interval_95"]
        log(f"   Golem {m['golem']:.3f} [{spread(s['golem'])}]  Local {m['local']:.3f} [{spread(s['local'])}]  "
            f"Golem/Local {close['ratio_golem_local']:.3f} ({low:.3f}-{high:.3f})")
        targets.append({
            "name": f"close N={close['workers']}: Golem/Local <= {CLOSE_TARGET:.1f}",
            "value": close["ratio_golem_local"],
            "pass": close["ratio_golem_local"] <= CLOSE_TARGET,
        })
    report_targets(targets)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, smaller workloads")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 5, quick 2)")
    parser.add_argument("--rounds", type=int, help="A B B A throughput rounds (default 10, quick 2)")
    parser.add_argument("--json", metavar="PATH", help="write every sample and figure to PATH")
    parser.add_argument("--ns", default="1,2,4", help="worker counts for the start-up benchmark")
    parser.add_argument("--tasks", type=int, help="tiny tasks per run (default 2000, quick 500)")
    parser.add_argument("--array-n", type=int, help="array side (default 8000, quick 4000)")
    parser.add_argument("--chunk", type=int, default=1000, help="array chunk side")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-close", action="store_true")
    parser.add_argument("--close-rounds", type=int, help="A B B A close rounds (default 6, quick 2)")
    args = parser.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 5)
    rounds = args.rounds or (2 if args.quick else 10)
    tasks = args.tasks or (500 if args.quick else 2000)
    array_n = args.array_n or (4000 if args.quick else 8000)
    ns = [int(n) for n in args.ns.split(",") if n.strip()]
    warmup_ns = ns[:1] if args.quick else ns

    quiet_logs()
    configure()
    log(f"golem-dask benchmark: python {platform.python_version()}, dask {dask.__version__}, "
        f"{os.cpu_count()} cpus, repeats={repeats}{' (quick)' if args.quick else ''}")
    started = time.perf_counter()

    # Imports and the process-wide devnet are paid here, outside every measurement.
    import golem_dask.cluster  # noqa: F401
    from golem_dask.chain.devnet import Devnet

    t0 = time.perf_counter()
    Devnet.shared()
    log(f"embedded devnet ready in {time.perf_counter() - t0:.2f} s (not counted)")

    startup = payer = throughput = close = None
    if not args.skip_startup:
        log()
        startup = bench_startup(ns, repeats, warmup_ns)
        payer = bench_payer_start(max(repeats, 3))
    if not args.skip_throughput:
        log()
        log("throughput: starting a GolemCluster and a LocalCluster with 2 workers x 1 thread")
        throughput = bench_throughput(rounds, 2, tasks, array_n, args.chunk)

    if not args.skip_close:
        log()
        log(f"close: {CLOSE_WORKERS} workers, a task run, then close(), Golem and Local in turn")
        close = bench_close(args.close_rounds or (2 if args.quick else 6), CLOSE_WORKERS)

    targets = report(startup, payer, throughput, repeats, close)
    total = time.perf_counter() - started
    log(f"\n(total benchmark time {total:.0f} s)")
    return finish(args.json, targets, repeats=repeats, throughput_rounds=rounds, quick=args.quick,
                  worker_memory=WORKER_MEMORY, provider=PROVIDER, startup=startup,
                  embedded_payer_start_s=payer, throughput=throughput, close=close, total_s=total)


if __name__ == "__main__":  # LocalCluster's nannies spawn processes that re-import this file
    sys.exit(main())
