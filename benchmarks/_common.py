"""Helpers the benchmark scripts share: quiet logging and robust statistics."""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Sequence


def log(message: str = "") -> None:
    print(message, flush=True)


def quiet_logs(*extra: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("distributed", "golem_dask", "web3", "eth", "asyncio", "tornado", *extra):
        logging.getLogger(name).setLevel(logging.ERROR)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_median(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios num[i]/den[i] (both measured in the same round)."""
    return median([a / b for a, b in zip(num, den, strict=True) if b > 0])


def geometric_mean(xs: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else float("nan")


def bootstrap_interval(xs: Sequence[float], level: float = 0.95, resamples: int = 4000,
                       seed: int = 20261128) -> tuple[float, float]:
    """Percentile bootstrap interval of the geometric mean of ``xs`` (ratios).

    A fixed seed makes a report reproducible from its samples.
    """
    if len(xs) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    logs = [math.log(x) for x in xs]
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return math.exp(lo), math.exp(hi)


def spread(xs: Sequence[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


def finish(json_path: str | None, targets: Sequence[dict], **figures: object) -> int:
    """Write the run to ``json_path`` (if given) and return the exit status: 1 if a target failed.

    The document holds the platform (Python, dask, CPUs), ``figures`` in the given
    order, then the targets.
    """
    if json_path:
        import json
        import os
        import platform

        import dask

        doc = {"python": platform.python_version(), "dask": dask.__version__, "cpus": os.cpu_count(),
               **figures, "targets": list(targets)}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
        log(f"wrote {json_path}")
    return 0 if all(t["pass"] for t in targets) else 1


def report_targets(targets: Sequence[dict]) -> None:
    """Print each target as PASS/FAIL with its measured value, then the overall verdict."""
    log()
    log("== targets ==")
    for t in targets:
        log(f"   {'PASS' if t['pass'] else 'FAIL'}  {t['name']}  (measured {t['value']:.3f})")
    ok = all(t["pass"] for t in targets)
    log(f"   overall: {'PASS' if ok else 'FAIL'} ({sum(t['pass'] for t in targets)}/{len(targets)})")
