"""Benchmark the docker runtime: container worker start-up, and file transfer throughput.

Run from the repository root (needs a Docker engine and the worker image, see
``golem-dask image build``)::

    python benchmarks/bench_docker.py            # full run (~5-6 min on 2 cores)
    python benchmarks/bench_docker.py --quick    # smoke run (~2 min)
    python benchmarks/bench_docker.py --repeats 9 --json bench-docker.json

What is measured (all in one process, implementations alternated round by round, after
warm-up rounds; figures are medians of the repeats):

1. Start-up: wall time of ``GolemCluster(n_workers=N, runtime="docker")`` returning with
   N containerised workers registered (TLS, the default for docker), the same with
   ``tls=False``, and the floor: an in-process ``distributed.Scheduler`` plus N bare
   containers of the same image started in parallel with the docker SDK
   (``docker run -d --network host <image> python -m dask worker ... --no-nanny``), timed
   until all N are registered; the floor is measured over plain TCP and over TLS
   (``Security.temporary()``, certificate files mounted into the containers).  Closing
   and container removal are not counted.
2. Transfer: a file copied local -> local with ``golem_dask.transfer.copy``, into an
   activity's sandbox the way a provider's ``transfer`` command does
   (``golem_dask.provider.runtime.sandbox.copy_into``: the destination created by
   descriptor without following links, the copy handed ``/proc/self/fd/N``), and with
   ``cp`` (a subprocess), alternating, from the same source file; the destination is
   deleted after every run.  Also the extra resident memory of this process during
   ``copy`` (peak minus the RSS before it).

3. Remote transfer: the same file downloaded from S3 (moto's server, a subprocess on
   loopback), uploaded to it, and downloaded over HTTP (``python -m http.server``), with
   ``golem_dask.transfer.copy`` and with fsspec's own ``get``/``put``, alternating.

Targets: start-up GolemCluster (default, TLS) / bare-container floor (TCP) <= 1.10 for
every N; ``copy`` throughput / ``cp`` throughput >= 0.8, and the same for the sandbox
copy; peak extra RSS during ``copy`` < 64 MiB; for each remote path ``copy`` throughput /
fsspec's own >= 0.9 with the same memory bound.  The process exits with status 1 if a
target fails.

Every bare container carries the label ``golem-dask-bench.pid=<this pid>`` and is removed
after its round; on exit (also after Ctrl-C or SIGTERM) every container this process
made, bare or through GolemCluster, is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import gc
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (bootstrap_interval, finish, geometric_mean, log, median, paired_median, quiet_logs,
                     report_targets, spread)
import dask
import xxhash
from distributed import Scheduler  # imported before quiet_logs(): its import sets log levels

#: The embedded provider sells this much: enough for 4 workers of WORKER_MEMORY each.
PROVIDER = {
    "name": "dock",
    "cpu": 8,
    "memory": "16GiB",
    "storage": "10GiB",
    "runtime": "docker",
    "price-per-cpu-hour": "0.1",
    "price-per-hour": "0.02",
    "start-price": "0",
}
WORKER_MEMORY = "1GiB"  # Golem demand, and --memory-limit of the bare workers
BUDGET = "5"
STARTUP_TARGET = 1.10  # GolemCluster time / bare-container floor time, at most
TRANSFER_TARGET = 0.80  # copy throughput / cp throughput, at least
REMOTE_TARGET = 0.90  # copy throughput / fsspec's own get or put, at least (S3 and HTTP)
MEMORY_TARGET_MIB = 64.0  # peak extra RSS during copy, below
SETTLE_S = 0.5  # pause after each close so the next measurement starts on a quiet machine
SETTLE_MAX_EXTRA_S = 1.0  # ... plus up to this long while the machine is still busy
SETTLE_BUSY_PERCENT = 30.0  # system-wide CPU use above which the machine counts as busy
REGISTER_TIMEOUT_S = 120.0
BENCH_LABEL = "golem-dask-bench.pid"  # bare containers: value is this process's pid
MB = 10**6
MIB = 2**20








def configure() -> None:
    dask.config.set(
        {
            "golem.provider.local": [PROVIDER],
            "golem.demand.memory": WORKER_MEMORY,
            "golem.payment.budget": BUDGET,
        }
    )


# -- statistics -------------------------------------------------------------------------











# -- containers: creation and guaranteed removal ----------------------------------------


class Containers:
    """The docker client of the floor measurements, and the sweep of leftover containers."""

    def __init__(self) -> None:
        import docker

        self.docker = docker
        self.client = docker.from_env(timeout=60)
        self.client.ping()
        self.pid = str(os.getpid())
        self.label = f"{BENCH_LABEL}={self.pid}"

    def run(self, image: str, command: list[str], volumes: dict[str, Any] | None) -> Any:
        return self.client.containers.run(
            image,
            command,
            detach=True,
            network_mode="host",
            labels={BENCH_LABEL: self.pid},
            volumes=volumes or {},
        )

    def remove(self, containers: Sequence[Any]) -> None:
        """Force-remove containers in parallel (SIGKILL: the floor's teardown is not timed)."""

        def one(container: Any) -> None:
            with contextlib.suppress(self.docker.errors.NotFound):
                container.remove(force=True)

        if containers:
            with ThreadPoolExecutor(len(containers)) as pool:
                list(pool.map(one, containers))

    def sweep(self, include_orphans: bool = False) -> int:
        """Remove this process's containers (bare, or made by GolemCluster's provider).

        With ``include_orphans``, also bare containers of benchmark runs that died.
        """
        import psutil

        found: dict[str, Any] = {}
        filters = [
            {"label": self.label},
            {"label": ["golem-dask=1", f"golem-dask.agent-pid={self.pid}"]},
        ]
        if include_orphans:
            filters.append({"label": BENCH_LABEL})
        for f in filters:
            for c in self.client.containers.list(all=True, filters=f):
                found[c.id] = c
        doomed = []
        for c in found.values():
            pid = (c.labels or {}).get(BENCH_LABEL)
            if pid is not None and pid != self.pid and psutil.pid_exists(int(pid)):
                continue  # another benchmark that is still running
            doomed.append(c)
        self.remove(doomed)
        return len(doomed)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


_CONTAINERS: Containers | None = None


def _sweep_at_exit() -> None:
    if _CONTAINERS is not None:
        with contextlib.suppress(Exception):
            n = _CONTAINERS.sweep()
            if n:
                log(f"removed {n} leftover container(s)")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally, then atexit sweeps


# -- start-up ---------------------------------------------------------------------------


@dataclass
class Started:
    seconds: float
    close: Callable[[], None]


def start_golem(n: int, tls: bool | None) -> Started:
    from golem_dask import GolemCluster

    t0 = time.perf_counter()
    cluster = GolemCluster(n_workers=n, runtime="docker", budget=BUDGET, tls=tls, silence_logs=logging.ERROR)
    elapsed = time.perf_counter() - t0
    try:
        got = len(cluster.scheduler.workers)
        if got != n:
            raise RuntimeError(f"GolemCluster: constructor returned with {got} workers registered, expected {n}")
        want = "tls://" if tls is None else "tcp://"
        if not cluster.scheduler_address.startswith(want):
            raise RuntimeError(f"GolemCluster(tls={tls}): scheduler at {cluster.scheduler_address}")
    except BaseException:
        cluster.close()
        raise
    return Started(elapsed, cluster.close)


def _write_tls_files(security: Any, directory: str) -> list[str]:
    """The worker's certificate files, as GolemCluster ships them; returns dask worker flags."""
    files = {"ca.pem": security.tls_ca_file, "cert.pem": security.tls_worker_cert, "key.pem": security.tls_worker_key}
    for name, text in files.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(str(text))
        os.chmod(path, 0o644)  # read by root in the container; the directory is 0700
    return ["--tls-ca-file", "/tls/ca.pem", "--tls-cert", "/tls/cert.pem", "--tls-key", "/tls/key.pem"]


async def _bare_containers(n: int, tls: bool, containers: Containers, image: str) -> float:
    """Scheduler start + N bare worker containers registered (seconds)."""
    from distributed.security import Security

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        security = None
        volumes: dict[str, Any] = {}
        flags: list[str] = []
        if tls:
            security = Security.temporary()
            directory = tempfile.mkdtemp(prefix="golem-bench-tls-")
            stack.callback(shutil.rmtree, directory, True)
            flags = _write_tls_files(security, directory)
            volumes = {directory: {"bind": "/tls", "mode": "ro"}}
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0",
                             protocol="tls" if tls else "tcp", security=security) as scheduler:
            command = ["python", "-m", "dask", "worker", scheduler.address, "--no-nanny", "--nthreads", "1",
                       "--memory-limit", WORKER_MEMORY, "--no-dashboard", *flags]
            made: list[Any] = []
            try:
                results = await asyncio.gather(
                    *(asyncio.to_thread(containers.run, image, command, volumes) for _ in range(n)),
                    return_exceptions=True,
                )
                made = [c for c in results if not isinstance(c, BaseException)]
                errors = [e for e in results if isinstance(e, BaseException)]
                if errors:
                    raise RuntimeError(f"docker could not start a bare worker: {errors[0]}") from errors[0]
                while len(scheduler.workers) < n:
                    if time.perf_counter() - t0 > REGISTER_TIMEOUT_S:
                        logs = made[0].logs(tail=20).decode(errors="replace") if made else ""
                        raise RuntimeError(f"bare worker containers did not register within "
                                           f"{REGISTER_TIMEOUT_S:g} s; last log lines:\n{logs}")
                    await asyncio.sleep(0.005)
                elapsed = time.perf_counter() - t0
            finally:
                # Killed before the scheduler closes, so no worker tries to reconnect.
                await asyncio.to_thread(containers.remove, made)
    return elapsed


def start_floor(n: int, tls: bool, containers: Containers, image: str) -> Started:
    # The containers are already gone when this returns: teardown is outside the timing.
    return Started(asyncio.run(_bare_containers(n, tls, containers, image)), lambda: None)


def settle() -> None:
    """Pause, then wait (briefly) for the engine and the previous cluster's teardown to calm down."""
    import psutil

    time.sleep(SETTLE_S)
    deadline = time.monotonic() + SETTLE_MAX_EXTRA_S
    while time.monotonic() < deadline and psutil.cpu_percent(interval=0.1) > SETTLE_BUSY_PERCENT:
        pass


def measure_start(starter: Callable[[int], Started], n: int) -> float:
    started = starter(n)
    try:
        return started.seconds
    finally:
        started.close()
        gc.collect()
        settle()


#: label -> description, in the order of the table's columns
STARTUP_KINDS = {
    "golem": "GolemCluster(runtime='docker') (TLS)",
    "golem_tcp": "GolemCluster(runtime='docker', tls=False)",
    "floor": "bare containers, TCP",
    "floor_tls": "bare containers, TLS",
}


def bench_startup(ns: Sequence[int], repeats: int, warmup_ns: Sequence[int], containers: Containers,
                  image: str, tls_floor: bool) -> dict[str, Any]:
    starters: dict[str, Callable[[int], Started]] = {
        "golem": lambda n: start_golem(n, None),
        "golem_tcp": lambda n: start_golem(n, False),
        "floor": lambda n: start_floor(n, False, containers, image),
    }
    if tls_floor:
        starters["floor_tls"] = lambda n: start_floor(n, True, containers, image)
    kinds = list(starters)
    samples: dict[int, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in ns}
    log(f"start-up warm-up (N={', '.join(map(str, warmup_ns))}) ...")
    for n in warmup_ns:
        for kind in kinds:
            measure_start(starters[kind], n)
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]  # rotate who goes first
        line = []
        for n in ns:
            for kind in order:
                samples[n][kind].append(measure_start(starters[kind], n))
            line.append(f"N={n}: " + " ".join(f"{k} {samples[n][k][-1]:.2f}" for k in kinds))
        log(f"  round {r + 1}/{repeats} ({order[0]} first): " + "; ".join(line))
    result: dict[str, Any] = {}
    for n in ns:
        s = samples[n]
        m = {k: median(v) for k, v in s.items()}
        per_round = [g / f for g, f in zip(s["golem"], s["floor"], strict=True)]
        entry: dict[str, Any] = {
            "samples_s": s,
            "median_s": m,
            "ratio_golem_floor": m["golem"] / m["floor"],
            "paired_ratio_golem_floor": paired_median(s["golem"], s["floor"]),
            "geomean_ratio_golem_floor": geometric_mean(per_round),
            "geomean_ratio_golem_floor_ci95": bootstrap_interval(per_round),
            "ratio_golem_tcp_floor": m["golem_tcp"] / m["floor"],
            "tls_overhead_s": m["golem"] - m["golem_tcp"],
        }
        if tls_floor:
            entry["ratio_golem_floor_tls"] = m["golem"] / m["floor_tls"]
        result[str(n)] = entry
    return result


# -- transfer ---------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory above the level at start: a sampling thread, and VmHWM.

    On Linux the kernel's high-water mark (VmHWM) is reset to the current RSS at start
    (``/proc/self/clear_refs``), so it catches peaks shorter than the sampling interval.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self.baseline = 0
        self.peak = 0
        self.hwm_supported = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    @staticmethod
    def _vm_hwm() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_supported = True
        except OSError:
            self.hwm_supported = False
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        hwm = self._vm_hwm() if self.hwm_supported else None
        self.hwm = hwm if hwm is not None else self.peak
        self.sampled_extra = self.peak - self.baseline
        self.hwm_extra = self.hwm - self.baseline


def _make_file(path: Path, nbytes: int) -> str:
    """Random (incompressible) content, written in 8 MiB blocks; returns its checksum."""
    digest = xxhash.xxh3_128()
    block = 8 * MIB
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            data = os.urandom(min(block, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    os.sync()
    return digest.hexdigest()


def _cp_command() -> list[str]:
    """``cp``, made to copy the data (no reflink) where this cp supports the flag."""
    probe = subprocess.run(["cp", "--reflink=never", "--help"], capture_output=True)
    return ["cp", "--reflink=never"] if probe.returncode == 0 else ["cp"]


def bench_transfer(repeats: int, size_mb: int, directory: str | None) -> dict[str, Any]:
    from golem_dask.provider.runtime.policy import TransferPolicy
    from golem_dask.provider.runtime.sandbox import copy_into
    from golem_dask.transfer import copy

    nbytes = size_mb * MB
    work = Path(tempfile.mkdtemp(prefix="golem-bench-transfer-", dir=directory))
    try:
        src = work / "source.bin"
        t0 = time.perf_counter()
        want = _make_file(src, nbytes)
        log(f"  {size_mb} MB source file written to {work} in {time.perf_counter() - t0:.1f} s (not counted)")
        cp = _cp_command()
        dst = work / "destination.bin"

        def run_copy() -> None:
            result = copy(str(src), str(dst))
            if result.nbytes != nbytes:
                raise RuntimeError(f"copy moved {result.nbytes} bytes, expected {nbytes}")

        def run_cp() -> None:
            subprocess.run([*cp, str(src), str(dst)], check=True)

        sandbox = work / "sandbox"
        (sandbox / "input").mkdir(parents=True)
        trusting = TransferPolicy.trusting()

        def run_sandbox() -> None:
            result = copy_into(sandbox, f"file://{src}", "/golem/input/destination.bin", None, trusting)
            if result.nbytes != nbytes:
                raise RuntimeError(f"sandbox copy moved {result.nbytes} bytes, expected {nbytes}")

        methods: dict[str, Callable[[], None]] = {"copy": run_copy, "sandbox": run_sandbox, "cp": run_cp}
        landed = {"copy": dst, "cp": dst, "sandbox": sandbox / "input" / "destination.bin"}

        def once(kind: str) -> float:
            gc.collect()
            t = time.perf_counter()
            methods[kind]()
            elapsed = time.perf_counter() - t
            size = landed[kind].stat().st_size
            landed[kind].unlink()  # dirty pages of a deleted file are dropped, not written back
            os.sync()
            if size != nbytes:
                raise RuntimeError(f"{kind}: destination has {size} bytes, expected {nbytes}")
            return elapsed

        # Correctness once, outside the timing: copy's reported hash is the source's.
        result = copy(str(src), str(dst))
        if list(result.checksums.values()) != [want]:
            raise RuntimeError("copy reported a checksum that is not the source's")
        dst.unlink()
        os.sync()

        log("transfer warm-up ...")
        for kind in methods:
            once(kind)
        kinds = list(methods)
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(repeats):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                samples[kind].append(once(kind))
            log(f"  rep {r + 1}/{repeats} ({order[0]} first): "
                + " ".join(f"{k} {samples[k][-1]:.3f} s" for k in kinds))

        # Memory, in runs of their own (the sampler thread must not disturb the timing).
        memory_runs = []
        for _ in range(3):
            with PeakRSS() as peak:
                run_copy()
            dst.unlink()
            os.sync()
            memory_runs.append({"sampled_extra_bytes": peak.sampled_extra, "hwm_extra_bytes": peak.hwm_extra,
                                "hwm_supported": peak.hwm_supported})
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        try:
            run_copy()
            traced_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        dst.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = {k: median(v) for k, v in samples.items()}
    extra = max(max(r["sampled_extra_bytes"], r["hwm_extra_bytes"]) for r in memory_runs)
    return {
        "size_bytes": nbytes,
        "cp_command": cp,
        "samples_s": samples,
        "median_s": m,
        "mb_per_s": {k: nbytes / MB / v for k, v in m.items()},
        "ratio_copy_cp": m["cp"] / m["copy"],  # throughput ratio
        "paired_ratio_copy_cp": paired_median(samples["cp"], samples["copy"]),
        "ratio_sandbox_cp": m["cp"] / m["sandbox"],
        "paired_ratio_sandbox_cp": paired_median(samples["cp"], samples["sandbox"]),
        "memory_runs": memory_runs,
        "peak_extra_rss_bytes": extra,
        "tracemalloc_peak_bytes": traced_peak,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(argv: list[str], port: int, cwd: str | None = None) -> subprocess.Popen[bytes]:
    """A server subprocess on loopback, once it accepts connections."""
    import socket

    server = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"{argv[0]} did not listen on port {port}")


def bench_remote(repeats: int, size_mb: int, directory: str | None) -> dict[str, Any]:
    """``golem_dask.transfer.copy`` against fsspec's own ``get``/``put`` on remote ends: S3
    (moto's server, a subprocess) down and up, and HTTP (``python -m http.server``) down."""
    import boto3
    import fsspec

    from golem_dask.transfer import copy

    nbytes = size_mb * MB
    work = Path(tempfile.mkdtemp(prefix="golem-bench-remote-", dir=directory))
    s3_port, http_port = _free_port(), _free_port()
    servers = [_serve([sys.executable, "-m", "moto.server", "-p", str(s3_port)], s3_port)]
    try:
        servers.append(_serve([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(http_port)], http_port,
                              cwd=str(work)))
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{s3_port}", "region_name": "us-east-1"}}
        boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                     **options["client_kwargs"]).create_bucket(Bucket="bench")
        s3 = fsspec.filesystem("s3", **options)
        http = fsspec.filesystem("http")
        src = work / "source.bin"
        _make_file(src, nbytes)
        s3.put_file(str(src), "bench/source.bin")
        url = f"http://127.0.0.1:{http_port}/source.bin"
        dst = work / "landed.bin"

        def gone() -> None:
            dst.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                s3.rm_file("bench/up.bin")
            os.sync()

        runs: dict[str, dict[str, Callable[[], Any]]] = {
            "s3 get": {"fsspec": lambda: s3.get("bench/source.bin", str(dst)),
                       "copy": lambda: copy("s3://bench/source.bin", str(dst), source_options=options)},
            "s3 put": {"fsspec": lambda: s3.put(str(src), "bench/up.bin"),
                       "copy": lambda: copy(str(src), "s3://bench/up.bin", destination_options=options)},
            "http get": {"fsspec": lambda: http.get(url, str(dst)),
                         "copy": lambda: copy(url, str(dst))},
        }
        samples: dict[str, dict[str, list[float]]] = {path: {"fsspec": [], "copy": []} for path in runs}
        memory: dict[str, float] = {}
        log("remote transfer warm-up ...")
        for path, methods in runs.items():
            for method in methods.values():
                method()
                gone()
        for r in range(repeats):
            for path, methods in runs.items():
                for kind in (("fsspec", "copy") if r % 2 == 0 else ("copy", "fsspec")):
                    gc.collect()
                    t = time.perf_counter()
                    methods[kind]()
                    samples[path][kind].append(time.perf_counter() - t)
                    gone()
            log(f"  rep {r + 1}/{repeats}: " + "  ".join(
                f"{path} fsspec {v['fsspec'][-1]:.3f} s / copy {v['copy'][-1]:.3f} s" for path, v in samples.items()))
        for path, methods in runs.items():
            with PeakRSS() as peak:
                methods["copy"]()
            gone()
            memory[path] = max(peak.sampled_extra, peak.hwm_extra)
    finally:
        for server in servers:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(10)
            if server.poll() is None:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "size_bytes": nbytes,
        "samples_s": samples,
        "ratio": {p: median(v["fsspec"]) / median(v["copy"]) for p, v in samples.items()},  # throughput
        "paired_ratio": {p: paired_median(v["fsspec"], v["copy"]) for p, v in samples.items()},
        "peak_extra_rss_bytes": memory,
    }


# -- report -----------------------------------------------------------------------------


def report(startup: dict[str, Any] | None, transfer: dict[str, Any] | None, repeats: int,
           remote: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    log()
    log(f"== results: medians of {repeats} repeats, seconds [min-max] ==")
    if startup:
        kinds = [k for k in STARTUP_KINDS if k in next(iter(startup.values()))["samples_s"]]
        log()
        log("1. time to N ready docker workers (constructor / scheduler returns with N registered)")
        for k in kinds:
            log(f"   {k:<10} {STARTUP_KINDS[k]}")
        header = "".join(f"  {k:>17}" for k in kinds)
        extra = "  Golem/floorTLS" if "floor_tls" in kinds else ""
        log(f"   {'N':>2}{header}  {'Golem/floor':>11}  {'paired':>6}  {'geomean [95% CI]':>22}  {'tcp/floor':>9}  "
            f"{'TLS cost':>8}{extra}")
        for n, r in startup.items():
            s, m = r["samples_s"], r["median_s"]
            cells = "".join(f"  {f'{m[k]:5.2f} [{spread(s[k])}]':>17}" for k in kinds)
            tail = f"  {r['ratio_golem_floor_tls']:>14.3f}" if "floor_tls" in kinds else ""
            low, high = r["geomean_ratio_golem_floor_ci95"]
            geo = f"{r['geomean_ratio_golem_floor']:.3f} [{low:.3f}-{high:.3f}]"
            log(f"   {n:>2}{cells}  {r['ratio_golem_floor']:>11.3f}  {r['paired_ratio_golem_floor']:>6.3f}  {geo:>22}  "
                f"{r['ratio_golem_tcp_floor']:>9.3f}  {r['tls_overhead_s']:>+7.2f}s{tail}")
            targets.append({
                "name": f"start-up N={n}: GolemCluster (TLS) / bare floor (TCP) <= {STARTUP_TARGET:.2f}",
                "value": r["ratio_golem_floor"],
                "pass": r["ratio_golem_floor"] <= STARTUP_TARGET,
            })
    if transfer:
        s, m, rate = transfer["samples_s"], transfer["median_s"], transfer["mb_per_s"]
        log()
        log(f"2. transfer of a {transfer['size_bytes'] / MB:.0f} MB file, local -> local "
            f"(cp = {' '.join(transfer['cp_command'])})")
        log(f"   {'method':<26}  {'seconds':>18}  {'MB/s':>7}")
        for k, what in (("copy", "golem_dask.transfer.copy"), ("sandbox", "into a sandbox (copy_into)"),
                        ("cp", "cp (subprocess)")):
            log(f"   {what:<26}  {f'{m[k]:6.3f} [{spread(s[k])}]':>18}  {rate[k]:>7.0f}")
        log(f"   throughput copy/cp: {transfer['ratio_copy_cp']:.3f} (paired {transfer['paired_ratio_copy_cp']:.3f})")
        log(f"   throughput sandbox/cp: {transfer['ratio_sandbox_cp']:.3f} "
            f"(paired {transfer['paired_ratio_sandbox_cp']:.3f})")
        runs = transfer["memory_runs"]
        log("   extra RSS during copy, per run (sampled / VmHWM): "
            + ", ".join(f"{r['sampled_extra_bytes'] / MIB:.1f}/{r['hwm_extra_bytes'] / MIB:.1f}" for r in runs)
            + f" MiB; tracemalloc peak {transfer['tracemalloc_peak_bytes'] / MIB:.1f} MiB")
        targets.append({
            "name": f"transfer: copy throughput / cp throughput >= {TRANSFER_TARGET:.2f}",
            "value": transfer["ratio_copy_cp"],
            "pass": transfer["ratio_copy_cp"] >= TRANSFER_TARGET,
        })
        targets.append({
            "name": f"transfer: sandbox copy throughput / cp throughput >= {TRANSFER_TARGET:.2f}",
            "value": transfer["ratio_sandbox_cp"],
            "pass": transfer["ratio_sandbox_cp"] >= TRANSFER_TARGET,
        })
        peak_mib = transfer["peak_extra_rss_bytes"] / MIB
        targets.append({
            "name": f"transfer: peak extra RSS during copy < {MEMORY_TARGET_MIB:.0f} MiB",
            "value": peak_mib,
            "pass": peak_mib < MEMORY_TARGET_MIB,
        })
    if remote:
        log()
        log(f"3. transfer of a {remote['size_bytes'] / MB:.0f} MB file to and from remote ends: "
            "golem_dask.transfer.copy vs fsspec's own get/put")
        log(f"   {'path':<9}  {'fsspec s':>18}  {'copy s':>18}  {'ratio':>6}  {'paired':>6}  {'extra RSS':>9}")
        for path, v in remote["samples_s"].items():
            ratio = remote["ratio"][path]
            extra = remote["peak_extra_rss_bytes"][path] / MIB
            theirs = f"{median(v['fsspec']):6.3f} [{spread(v['fsspec'])}]"
            ours = f"{median(v['copy']):6.3f} [{spread(v['copy'])}]"
            log(f"   {path:<9}  {theirs:>18}  {ours:>18}  {ratio:>6.3f}  {remote['paired_ratio'][path]:>6.3f}  "
                f"{extra:>7.1f} MiB")
            targets.append({"name": f"transfer {path}: copy throughput / fsspec's own >= {REMOTE_TARGET:.2f}",
                            "value": ratio, "pass": ratio >= REMOTE_TARGET})
            targets.append({"name": f"transfer {path}: peak extra RSS during copy < {MEMORY_TARGET_MIB:.0f} MiB",
                            "value": extra, "pass": extra < MEMORY_TARGET_MIB})
    report_targets(targets)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    global _CONTAINERS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, fewer warm-ups")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 5, quick 2)")
    parser.add_argument("--json", metavar="PATH", help="write every sample and figure to PATH")
    parser.add_argument("--ns", default="1,2,4", help="worker counts for the start-up benchmark")
    parser.add_argument("--size-mb", type=int, default=200, help="transfer file size in MB (10^6 bytes)")
    parser.add_argument("--tmpdir", default=None, help="directory for the transfer files (default: $TMPDIR or /tmp)")
    parser.add_argument("--no-tls-floor", action="store_true", help="skip the TLS variant of the bare floor")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--skip-remote", action="store_true", help="skip the S3 and HTTP transfers")
    args = parser.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 5)
    transfer_repeats = max(repeats, 3) if args.quick else 2 * repeats + 1
    ns = [int(n) for n in args.ns.split(",") if n.strip()]
    warmup_ns = ns[:1] if args.quick else ns

    quiet_logs("docker", "urllib3")
    configure()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C raises KeyboardInterrupt even when a shell started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(_sweep_at_exit)
    log(f"golem-dask docker benchmark: python {platform.python_version()}, dask {dask.__version__}, "
        f"{os.cpu_count()} cpus, repeats={repeats}{' (quick)' if args.quick else ''}")
    started = time.perf_counter()

    startup = transfer = remote = None
    image = None
    try:
        if not args.skip_startup:
            # Imports, the engine connection and the process-wide devnet are paid here,
            # outside every measurement.
            import golem_dask.cluster  # noqa: F401
            from golem_dask.image import default_tag
            from golem_dask.chain.devnet import Devnet

            image = default_tag()
            _CONTAINERS = Containers()
            _CONTAINERS.client.images.get(image)  # fails early if the image is missing
            removed = _CONTAINERS.sweep(include_orphans=True)
            if removed:
                log(f"removed {removed} container(s) left by an earlier run")
            t0 = time.perf_counter()
            Devnet.shared()
            log(f"image {image}; embedded devnet ready in {time.perf_counter() - t0:.2f} s (not counted)")
            log()
            startup = bench_startup(ns, repeats, warmup_ns, _CONTAINERS, image, not args.no_tls_floor)
        if not args.skip_transfer:
            log()
            log(f"transfer: golem_dask.transfer.copy and the sandbox copy vs cp, {args.size_mb} MB, "
                f"{transfer_repeats} repeats")
            transfer = bench_transfer(transfer_repeats, args.size_mb, args.tmpdir)
        if not args.skip_remote:
            log()
            log(f"remote transfer: golem_dask.transfer.copy vs fsspec's get/put on S3 (moto) and HTTP, "
                f"{args.size_mb} MB, {transfer_repeats} repeats")
            remote = bench_remote(transfer_repeats, args.size_mb, args.tmpdir)
    finally:
        if _CONTAINERS is not None:
            left = _CONTAINERS.sweep()
            if left:
                log(f"removed {left} leftover container(s)")
            _CONTAINERS.close()
            _CONTAINERS = None

    targets = report(startup, transfer, repeats, remote)
    total = time.perf_counter() - started
    log(f"\n(total benchmark time {total:.0f} s)")
    return finish(args.json, targets, repeats=repeats, transfer_repeats=transfer_repeats, quick=args.quick,
                  image=image, worker_memory=WORKER_MEMORY, provider=PROVIDER, startup=startup,
                  transfer=transfer, remote=remote, total_s=total)


if __name__ == "__main__":
    sys.exit(main())
