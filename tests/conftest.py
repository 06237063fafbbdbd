"""Shared test settings: fast debit notes and metering, and a check that no worker leaks."""

from __future__ import annotations

import time

import dask
import psutil
import pytest


def is_worker(cmd: list[str]) -> bool:
    """A rented worker (the entry script in a sandbox's ``.golem`` folder), or a plain ``dask worker``."""
    return any(arg.endswith("/.golem/entry.py") for arg in cmd) or ("dask" in " ".join(cmd) and "worker" in cmd)


def dask_worker_children() -> list[psutil.Process]:
    """Worker processes started (directly or not) by this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if is_worker(cmd):
            found.append(child)
    return found


@pytest.fixture
def golem_config():
    """Short intervals so that debit notes and metering happen within a test."""
    with dask.config.set(
        {
            "golem.provider.debit-note-interval": "1s",
            "golem.payment.metering-interval": "200ms",
            "golem.market.negotiation-timeout": "10s",
            "golem.demand.memory": "1GiB",
            "golem.provider.local": [
                {"name": "local", "cpu": 4, "memory": "8GiB", "storage": "10GiB", "runtime": "process",
                 "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}
            ],
        }
    ):
        yield


@pytest.fixture
def no_leaked_workers():
    yield
    deadline = time.monotonic() + 10
    while dask_worker_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    leaked = dask_worker_children()
    for p in leaked:
        p.kill()
    assert not leaked, f"worker processes left behind: {[p.cmdline() for p in leaked]}"


#: What a failing test shows of its yagna daemon's log: the last lines that are not routine.
DAEMON_LOG_LINES = 60
#: Errors and warnings every offline daemon logs (no release check, the restart at start).
ROUTINE = ("new Yagna release", "unbind error", "Config file found", "Format of the file may change",
           "connection lost", "Handlers disconnected", "Failed to bind handlers")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails while using a yagna stack shows the daemon's last errors and warnings
    (the stack's directory, and its log, are gone once the session ends)."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    logs = {getattr(v, "log_path", None) or getattr(getattr(v, "stack", None), "log_path", None)
            for v in funcargs.values()}
    for path in sorted(str(p) for p in logs if p is not None):
        try:
            with open(path, errors="replace") as log:
                lines = log.read().splitlines()
        except OSError:
            continue
        notable = [line for line in lines if any(w in line for w in ("ERROR", "WARN", "panicked", "$ yagna"))
                   and not any(r in line for r in ROUTINE)]
        report.sections.append((f"yagna log {path} (errors and warnings)", "\n".join(notable[-DAEMON_LOG_LINES:])))
