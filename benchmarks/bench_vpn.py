"""Dask over the yagna VPN (``golem.yagna.connectivity: vpn``) against direct dials.

An offline stack (the tests' :mod:`yagna_stack`) and one test provider (:mod:`yagna_provider`)
that runs an activity deployed on a VPN in a test VM (:mod:`yagna_vpn`: a network namespace
whose frames a test exe-unit carries over the daemon's bus) and any other one on this
machine.  Two clusters of 2 workers are compared, in alternating order each round:

* vpn: workers in test VMs, reaching the scheduler on this machine through the daemon's
  tunnels and each VM's backchannel, and each other over the VPN;
* direct: workers on this machine, dialling the scheduler on loopback.

Per round: the time from ``GolemCluster(market="yagna", n_workers=2)`` to both workers
registered; a sum of ``da.from_array`` of an array made here (``--mb`` MB, its chunks travel
in the task graph: scheduler to workers, through the tunnels on vpn); and ``(x + x.T).sum()``
on an array the workers make (chunks move worker to worker: over the VPN on vpn).  Each
figure is the geometric mean of the rounds' vpn/direct ratios, with a bootstrap 95%
interval.  Needs root, iproute2 and ``/dev/net/tun``.

    python benchmarks/bench_vpn.py [--rounds 5] [--mb 8]

The ratios say what the VPN path costs through this test stack, whose frames cross a Python
process and the daemon's bus; on the public network the link between daemons sets it.
No target: the figures are for comparison between changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import bootstrap_interval, finish, geometric_mean, log, median, quiet_logs, report_targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

IMAGE = "hash:sha3:" + hashlib.sha3_224(b"bench").hexdigest() + ":http://127.0.0.1:1/worker.gvmi"
MEASURES = ("time to 2 workers", "graph-carried array sum", "worker-to-worker transpose sum")


def cluster(connectivity: str) -> tuple[Any, Any, float]:
    """A started cluster of 2 workers, its client, and seconds to both registered."""
    import dask
    from distributed import Client

    from golem_dask import GolemCluster

    started = time.perf_counter()
    with dask.config.set({"golem.yagna.connectivity": connectivity}):
        c = GolemCluster(n_workers=2, market="yagna", budget="1", cpu=1, memory="1GiB")
    up = time.perf_counter() - started
    return c, Client(c), up


def workloads(client: Any, data: Any) -> tuple[float, float]:
    """Seconds for the graph-carried sum and for the worker-to-worker transpose sum."""
    import dask.array as da

    started = time.perf_counter()
    x = da.from_array(data, chunks=(data.shape[0] // 4, data.shape[1]))
    assert float(client.compute(x.sum()).result()) == float(data.sum())
    carried = time.perf_counter() - started
    started = time.perf_counter()
    y = da.ones((2000, 2000), chunks=500)
    assert float(client.compute((y + y.T).sum()).result()) == 2.0 * 2000 * 2000
    between = time.perf_counter() - started
    return carried, between


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=float, default=8.0, help="size of the array carried in the graph")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    quiet_logs("aiohttp")

    import dask
    import numpy as np
    from yagna_provider import YagnaTestProvider
    from yagna_stack import YagnaStack, subnet
    from yagna_vpn import vpn_unavailable

    reason = vpn_unavailable()
    if reason:
        log(f"cannot run: {reason}")
        return 1
    side = int((args.mb * 1e6 / 8) ** 0.5)
    data = np.arange(side * side, dtype="f8").reshape(side, side)
    ratios: dict[str, list[float]] = {m: [] for m in MEASURES}
    rows = []
    with YagnaStack() as stack, tempfile.TemporaryDirectory(prefix="bench-vpn-") as tmp:
        name = subnet()
        os.environ.update(YAGNA_API_URL=stack.api_url, YAGNA_APPKEY=stack.requestor_key)
        provider = YagnaTestProvider(stack.api_url, stack.provider_key, stack.provider_id, stack.platform, name,
                                     threads=4, debit_note_interval_s=5, workdir=Path(tmp) / "provider",
                                     price_per_second=Decimal("0.0001"), price_per_cpu_second=Decimal("0.0002"),
                                     gsb_url=stack.gsb_url)
        config = {"golem.yagna.subnet": name, "golem.yagna.collection-window": 0, "golem.yagna.image": IMAGE,
                  "golem.market.agreement-lifetime": "10m"}
        with provider, dask.config.set(config):
            for i in range(-1, args.rounds):  # round -1 warms up: imports, TLS material, first VMs
                order = ("vpn", "direct") if i % 2 else ("direct", "vpn")
                figures: dict[str, tuple[float, float, float]] = {}
                for connectivity in order:
                    c, client, up = cluster(connectivity)
                    try:
                        figures[connectivity] = (up, *workloads(client, data))
                    finally:
                        client.close()
                        c.close()
                if i < 0:
                    continue
                row = {"round": i}
                for k, measure in enumerate(MEASURES):
                    vpn, direct = figures["vpn"][k], figures["direct"][k]
                    ratios[measure].append(vpn / direct)
                    row[measure] = {"vpn_s": vpn, "direct_s": direct}
                rows.append(row)
                log(f"round {i}: " + "; ".join(f"{m} vpn {figures['vpn'][k]:.3f} s, direct "
                                              f"{figures['direct'][k]:.3f} s" for k, m in enumerate(MEASURES)))
    summary = {}
    for k, measure in enumerate(MEASURES):
        low, high = bootstrap_interval(ratios[measure])
        vpn_median = median([r[measure]["vpn_s"] for r in rows])
        direct_median = median([r[measure]["direct_s"] for r in rows])
        log(f"{measure} vpn/direct: {geometric_mean(ratios[measure]):.3f} [{low:.3f}-{high:.3f}] "
            f"(median vpn {vpn_median:.3f} s, direct {direct_median:.3f} s)")
        summary[measure] = {"ratio": geometric_mean(ratios[measure]), "interval": [low, high],
                            "vpn_s": vpn_median, "direct_s": direct_median}
    log(f"graph-carried array: {data.nbytes / 1e6:.1f} MB")
    report_targets([])
    return finish(args.json, [], rounds=rows, summary=summary, carried_mb=data.nbytes / 1e6)


if __name__ == "__main__":
    sys.exit(main())
