"""Helpers the benchmark scripts share: quiet logging and robust statistics."""

from __future__ import annotations

import logging
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


def spread(xs: Sequence[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


def report_targets(targets: Sequence[dict]) -> None:
    """Print each target as PASS/FAIL with its measured value, then the overall verdict."""
    log()
    log("== targets ==")
    for t in targets:
        log(f"   {'PASS' if t['pass'] else 'FAIL'}  {t['name']}  (measured {t['value']:.3f})")
    ok = all(t["pass"] for t in targets)
    log(f"   overall: {'PASS' if ok else 'FAIL'} ({sum(t['pass'] for t in targets)}/{len(targets)})")
