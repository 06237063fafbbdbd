"""Time to N ready workers on another host with TLS, against the same on loopback without.

Needs root and iproute2: the far host is a network namespace joined by a veth pair (the
tests' :mod:`netns_support`).  Two private fleets run side by side, each a hub and N
provider daemons (``golem-dask provider --runtime process``, one thread each):

* far:  hub on this machine's end of the link, providers on the far host; the cluster's
  default for a hub, TLS with per-worker certificates, the scheduler on the routable address;
* near: hub and providers on loopback, ``tls=False``.

Each round starts ``GolemCluster(n_workers=N, market=...)`` on both (the order alternates)
and times the constructor until N workers are registered; closing is not timed.  The figure
is the geometric mean of the rounds' far/near ratios, with a bootstrap 95% interval.
Payments go to the embedded devnet (the providers do not check them: no chain is given).

    python benchmarks/bench_hosts.py [--ns 1,2] [--rounds 8]

Target: far (TLS) / near (no TLS) <= 1.15 for each N.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import bootstrap_interval, finish, geometric_mean, log, median, quiet_logs, report_targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TARGET = 1.15


class Fleet:
    """A hub and ``n`` provider daemons, here or on ``far`` (a FarHost)."""

    def __init__(self, host: str, n: int, tmp: Path, far: object = None) -> None:
        from net_support import free_port, wait_port

        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port(host)
        self.url = f"tcp://{host}:{self.port}"
        env = {**os.environ, "DASK_GOLEM__PROVIDER__DEBIT_NOTE_INTERVAL": "10s"}
        cli = [sys.executable, "-m", "golem_dask.cli"]
        self.procs.append(subprocess.Popen([*cli, "hub", "--listen", f"{host}:{self.port}", "--data-dir",
                                            str(tmp / f"hub-{self.port}")], env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))
        wait_port(self.port, host=host)
        for i in range(n):
            cmd = [*cli, "provider", "--hub", self.url, "--name", f"p{i}", "--cpu", "1", "--memory", "2GiB",
                   "--runtime", "process", "--allow-unisolated-process", "--data-dir", str(tmp / f"p{self.port}-{i}")]
            penv = {"GOLEM_DASK_PROVIDER_KEY": os.urandom(32).hex()}
            if far is None:
                proc = subprocess.Popen(cmd, env={**env, **penv}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                keep = {k: v for k, v in env.items() if k.startswith(("DASK_", "PATH", "HOME"))}
                proc = far.popen(cmd, env={**keep, **penv}, stdout=subprocess.DEVNULL,  # type: ignore[attr-defined]
                                 stderr=subprocess.DEVNULL)
            self.procs.append(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def start(url: str, n: int, tls: bool) -> float:
    from golem_dask import GolemCluster

    t0 = time.perf_counter()
    cluster = GolemCluster(n_workers=n, market=url, tls=tls, budget="5", silence_logs=logging.ERROR)
    elapsed = time.perf_counter() - t0
    try:
        assert len(cluster.scheduler.workers) == n
        assert cluster.scheduler_address.startswith("tls://" if tls else "tcp://")
    finally:
        cluster.close()
    time.sleep(0.5)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    quiet_logs()
    import tempfile

    import dask
    from netns_support import make_far_host, remove

    from golem_dask.chain.devnet import Devnet

    dask.config.set({"golem.demand.memory": "1GiB", "golem.market.negotiation-timeout": "30s"})
    Devnet.shared()
    ns = [int(n) for n in args.ns.split(",")]
    far_host = make_far_host()
    results: dict[str, dict[str, object]] = {}
    targets = []
    try:
        with tempfile.TemporaryDirectory(prefix="golem-bench-hosts-") as tmp:
            for n in ns:
                far = Fleet(far_host.host_ip, n, Path(tmp), far_host)
                near = Fleet("127.0.0.1", n, Path(tmp))
                try:
                    time.sleep(2)  # providers connected and published
                    start(far.url, n, True), start(near.url, n, False)  # warm-up
                    samples: dict[str, list[float]] = {"far": [], "near": []}
                    ratios = []
                    for r in range(args.rounds):
                        order = [("far", far.url, True), ("near", near.url, False)]
                        if r % 2:
                            order.reverse()
                        took = {name: start(url, n, tls) for name, url, tls in order}
                        for name, t in took.items():
                            samples[name].append(t)
                        ratios.append(took["far"] / took["near"])
                        log(f"  N={n} round {r + 1}/{args.rounds}: far (TLS) {took['far']:.3f} s, near (TCP) "
                            f"{took['near']:.3f} s, ratio {ratios[-1]:.3f}")
                finally:
                    far.close()
                    near.close()
                low, high = bootstrap_interval(ratios)
                ratio = geometric_mean(ratios)
                results[str(n)] = {"samples_s": samples, "ratio_far_near": ratio, "interval_95": [low, high]}
                log(f"N={n}: far {median(samples['far']):.3f} s, near {median(samples['near']):.3f} s (medians); "
                    f"far/near {ratio:.3f} [{low:.3f}-{high:.3f}]")
                targets.append({"name": f"N={n}: far host with TLS / loopback without TLS <= {TARGET}",
                                "value": ratio, "pass": ratio <= TARGET})
    finally:
        remove(far_host)
    report_targets(targets)
    return finish(args.json, targets, results=results)


if __name__ == "__main__":
    sys.exit(main())
