"""A private fleet for tests: a hub and provider daemons as OS processes, and a requestor.

The hub and each provider are ``golem-dask`` processes of their own, each provider with its
own key, its own data directory and its own log; a provider may run on a far host (a
network namespace, :mod:`netns_support`).  Stopped by PID, with what they started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import dask
import psutil

from golem_dask.chain.deploy import fund
from golem_dask.protocol.identity import Wallet
from net_support import free_port, wait_port
from test_payment_durability import chain_config

#: Fast debit notes, so that a provider that dies mid-job has some accepted.
PROVIDER_CONFIG = {"DASK_GOLEM__PROVIDER__DEBIT_NOTE_INTERVAL": "1s", "DASK_GOLEM__PROVIDER__INVOICE_RESEND": "2s"}


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Stop a daemon and whatever it started, by PID."""
    if proc.poll() is None:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:
            if child.is_running():
                child.kill()


def kill_machine(proc: subprocess.Popen) -> None:
    """A provider's machine dies: the daemon and its workers vanish at once."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


class Fleet:
    def __init__(self, node, tmp: Path, host: str = "127.0.0.1") -> None:
        self.node = node
        self.tmp = tmp
        self.host = host
        self.port = free_port(host)
        self.url = f"tcp://{host}:{self.port}"
        self.env = {**os.environ, **chain_config(node, False), **PROVIDER_CONFIG}
        self.hub: subprocess.Popen | None = None
        self.providers: dict[str, tuple[subprocess.Popen, str, Path]] = {}

    def start_hub(self) -> None:
        log = open(self.tmp / "hub.log", "ab")
        self.hub = subprocess.Popen([sys.executable, "-m", "golem_dask.cli", "hub", "--listen", f"{self.host}:{self.port}",
                                     "--data-dir", str(self.tmp / "hub")],
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, host=self.host)

    def start_provider(self, name: str, price: str, far: Any = None, key: str | None = None,
                       extra: tuple[str, ...] = ()) -> str:
        """A provider daemon selling 1 thread, here or on ``far`` (a :class:`netns_support.FarHost`).

        Workers run as plain processes (the tests' far host is this machine's kernel);
        the sandbox and docker tests cover isolation.
        """
        key = key or os.urandom(32).hex()
        address = Wallet.from_key(key).address
        log_path = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "golem_dask.cli", "provider", "--hub", self.url, "--name", name, "--cpu", "1",
               "--memory", "2GiB", "--price-per-cpu-hour", price, "--runtime", "process", "--allow-unisolated-process",
               "--data-dir", str(self.tmp / name), *extra]
        env = {**self.env, "GOLEM_DASK_PROVIDER_KEY": key}
        log = open(log_path, "ab")
        if far is None:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            proc = far.popen(cmd, env={k: v for k, v in env.items() if k.startswith(("DASK_", "GOLEM_", "PATH", "HOME"))},
                             stdout=log, stderr=subprocess.STDOUT)
        self.providers[name] = (proc, address, log_path)
        return address

    def log(self, name: str) -> str:
        return self.providers[name][2].read_text()

    def close(self) -> None:
        for proc, _, _ in self.providers.values():
            stop(proc)
        if self.hub is not None:
            stop(self.hub)


@contextmanager
def fleet(node, tmp: Path, prices: dict[str, str], host: str = "127.0.0.1"):
    f = Fleet(node, tmp, host)
    try:
        f.start_hub()
        for name, price in prices.items():
            f.start_provider(name, price)
        yield f
    finally:
        f.close()


@contextmanager
def requestor(node, tmp: Path, **settings: Any):
    key = os.urandom(32).hex()
    address = Wallet.from_key(key).address
    fund(node.web3(), node.contracts["token"], node.accounts[0], address, Decimal(10), 10**18)
    config = {f"golem.{k.removeprefix('DASK_GOLEM__').lower().replace('__', '.').replace('_', '-')}": v
              for k, v in chain_config(node, False).items()}
    os.environ["GOLEM_DASK_PRIVATE_KEY"] = key
    try:
        with dask.config.set({**config, "golem.demand.memory": "1GiB", "golem.payment.batch-window": "0s",
                              "golem.market.negotiation-timeout": "30s",
                              "golem.payment.data-dir": str(tmp / "requestor"), **settings}):
            yield address
    finally:
        del os.environ["GOLEM_DASK_PRIVATE_KEY"]


def wait_until(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout}s")




def provider_banner(args: list[str], env: dict[str, str], until: str) -> str:
    """What ``golem-dask provider ARGS`` prints until a line holding ``until`` (or it exits)."""
    proc = subprocess.Popen([sys.executable, "-m", "golem_dask.cli", "provider", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if until in line:
                break
    finally:
        proc.kill()
        proc.wait()
    return "".join(lines)
