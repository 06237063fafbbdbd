"""Many machines: a hub and provider daemons as separate OS processes, paid on anvil.

Everything listens on loopback.  The requestor is this test process; the hub and each
provider daemon are ``golem-dask`` processes of their own, each provider with its own key,
checking on chain that it was paid.
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

import dask
import psutil
import pytest
from distributed import Client

from anvil_support import anvil  # noqa: F401
from net_support import free_port, wait_port
from golem_dask import GolemCluster
from golem_dask.chain.deploy import fund
from golem_dask.protocol.identity import Wallet
from test_payment_durability import balance, chain_config

pytestmark = pytest.mark.e2e


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
    def __init__(self, node, tmp: Path) -> None:
        self.node = node
        self.tmp = tmp
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.env = {**os.environ, **chain_config(node, False)}
        self.hub: subprocess.Popen | None = None
        self.providers: dict[str, tuple[subprocess.Popen, str, Path]] = {}

    def start_hub(self) -> None:
        log = open(self.tmp / "hub.log", "ab")
        self.hub = subprocess.Popen([sys.executable, "-m", "golem_dask.cli", "hub", "--listen", f"127.0.0.1:{self.port}"],
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def start_provider(self, name: str, price: str) -> str:
        key = os.urandom(32).hex()
        address = Wallet.from_key(key).address
        log_path = self.tmp / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "golem_dask.cli", "provider", "--hub", self.url, "--name", name, "--cpu", "1",
             "--memory", "2GiB", "--price-per-cpu-hour", price],
            env={**self.env, "GOLEM_DASK_PROVIDER_KEY": key}, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
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
def fleet(node, tmp: Path, prices: dict[str, str]):
    f = Fleet(node, tmp)
    try:
        f.start_hub()
        for name, price in prices.items():
            f.start_provider(name, price)
        yield f
    finally:
        f.close()


@contextmanager
def requestor(node, tmp: Path, **settings):
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


def test_hub_and_three_provider_processes_compute_and_get_paid(anvil, tmp_path):
    prices = {"p1": "0.1", "p2": "0.1", "p3": "0.1"}
    with fleet(anvil, tmp_path, prices) as f, requestor(anvil, tmp_path):
        with GolemCluster(n_workers=3, market=f.url, budget="2") as cluster:
            with Client(cluster) as client:
                futures = client.map(lambda i: i * i, range(100))
                assert sum(client.gather(futures)) == sum(i * i for i in range(100))
                assert len(client.scheduler_info()["workers"]) == 3
        bill = cluster.bill()
        assert len(bill.entries) == 3 and {e.status for e in bill.entries} == {"paid"}
        addresses = {name: address for name, (_, address, _) in f.providers.items()}
        assert {e.provider for e in bill.entries} == set(addresses.values())
        for name, address in addresses.items():
            (entry,) = [e for e in bill.entries if e.provider == address]
            assert balance(anvil, address) == entry.amount
            wait_until(lambda: f"payment verified: {entry.amount} GLM in {entry.tx_hash}" in f.log(name), 30,
                       f"{name} verifying its payment")


def test_provider_killed_mid_job_is_replaced(anvil, tmp_path):
    prices = {"p1": "0.1", "p2": "0.1", "p3": "0.1"}
    with fleet(anvil, tmp_path, prices) as f, requestor(anvil, tmp_path, **{"golem.payment.invoice-timeout": "3s"}):
        with GolemCluster(n_workers=2, market=f.url, budget="2") as cluster:
            with Client(cluster) as client:
                used = {w.deal.agreement.provider_id for w in cluster.workers.values()}
                victim = next(name for name, (_, a, _) in f.providers.items() if a in used)
                futures = client.map(lambda i: time.sleep(0.1) or i, range(60))
                time.sleep(0.5)
                kill_machine(f.providers[victim][0])
                assert sorted(client.gather(futures)) == list(range(60))
                wait_until(lambda: len(cluster.workers) == 2 and all(w.address for w in cluster.workers.values()),
                           60, "a replacement worker")
                client.wait_for_workers(2, timeout=60)
        bill = cluster.bill()
        dead = f.providers[victim][1]
        assert balance(anvil, dead) == 0  # it never invoiced: it is paid nothing
        paid = [e for e in bill.entries if e.status == "paid"]
        assert len(paid) == 2 and dead not in {e.provider for e in paid}
        assert any("disconnected" in str(e) for e in cluster.events.of_kind("warning"))


def test_hub_restart_mid_job(anvil, tmp_path):
    prices = {"p1": "0.1", "p2": "0.1"}
    with fleet(anvil, tmp_path, prices) as f, requestor(anvil, tmp_path):
        with GolemCluster(n_workers=1, market=f.url, budget="2") as cluster:
            with Client(cluster) as client:
                futures = client.map(lambda i: time.sleep(0.05) or i, range(60))
                assert f.hub is not None
                f.hub.kill()
                f.hub.wait()
                assert sorted(client.gather(futures)) == list(range(60))  # workers keep computing
                f.start_hub()
                wait_until(lambda: cluster.market.link.connected, 30, "the requestor reconnecting")
                cluster.scale(2)
                client.wait_for_workers(2, timeout=60)
                assert client.submit(sum, [1, 2, 3]).result() == 6
        bill = cluster.bill()
        assert len(bill.entries) == 2 and {e.status for e in bill.entries} == {"paid"}
        for e in bill.entries:
            assert balance(anvil, e.provider) == e.amount
