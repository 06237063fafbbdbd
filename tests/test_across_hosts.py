"""Strangers' machines: the README's many-machines commands across two real hosts.

The far host is a network namespace with its own address (:mod:`netns_support`); the hub
and an anvil chain listen on this machine's end of the link, the requestor is this test
process (or a process of its own), and ``golem-dask provider`` runs on the far host.
Scheduler traffic is TLS; the far provider checks its payments on chain.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
from distributed import Client

from anvil_support import running_anvil
from fleet_support import fleet, requestor, wait_until
from golem_dask import GolemCluster
from golem_dask.chain.anvil import AnvilNode
from golem_dask.chain.deploy import fund
from golem_dask.protocol.identity import Wallet
from netns_support import FarHost, far_host  # noqa: F401
from test_payment_durability import balance, chain_config, transfers_to

pytestmark = pytest.mark.e2e


@pytest.fixture
def chain(far_host: FarHost) -> Iterator[AnvilNode]:  # noqa: F811
    """anvil on this machine's end of the link, where the far provider checks its payments."""
    with running_anvil(far_host.host_ip) as node:
        yield node


def invoiced(log: str) -> list[Decimal]:
    return [Decimal(m) for m in re.findall(r"invoiced ([0-9.E+-]+) GLM for agreement", log)]


def test_the_readme_many_machines_example_across_two_hosts(far_host, chain, tmp_path):  # noqa: F811
    with fleet(chain, tmp_path, {}, host=far_host.host_ip) as f, requestor(chain, tmp_path):
        far = f.start_provider("far-1", "0.1", far=far_host)
        # The README's line, as written: GolemCluster(n_workers=..., market="tcp://HUB:PORT", budget=...)
        with GolemCluster(n_workers=1, market=f.url, budget="5") as cluster:
            assert cluster.scheduler_address.startswith(f"tls://{far_host.host_ip}:")
            with Client(cluster) as client:
                assert client.submit(sum, range(1000)).result() == 499500
                (info,) = client.scheduler_info()["workers"].values()
                assert info["host"] == far_host.far_ip  # the worker really runs on the far host
        (entry,) = cluster.bill().entries
        assert entry.status == "paid" and entry.provider == far
        assert balance(chain, far) == entry.amount == sum(invoiced(f.log("far-1")))
        wait_until(lambda: f"payment verified: {entry.amount} GLM in {entry.tx_hash}" in f.log("far-1"), 30,
                   "the far provider verifying its payment on chain")


def test_the_far_machine_dies_mid_job(far_host, chain, tmp_path):  # noqa: F811
    with fleet(chain, tmp_path, {}, host=far_host.host_ip) as f, \
            requestor(chain, tmp_path, **{"golem.payment.invoice-timeout": "3s"}):
        far = f.start_provider("far-1", "0.05", far=far_host)  # the cheapest: chosen first
        near = f.start_provider("near-1", "0.1")
        with GolemCluster(n_workers=1, market=f.url, budget="5") as cluster:
            with Client(cluster) as client:
                assert {w.deal.agreement.provider_id for w in cluster.workers.values()} == {far}
                futures = client.map(lambda i: time.sleep(0.05) or i, range(100))
                time.sleep(2.5)  # the far worker's debit notes are accepted meanwhile
                far_host.kill_all()
                assert sorted(client.gather(futures)) == list(range(100))
                client.wait_for_workers(1, timeout=60)
        bill = cluster.bill()
        (gone,) = [e for e in bill.entries if e.provider == far]
        (replacement,) = [e for e in bill.entries if e.provider == near]
        assert replacement.status == "paid" and balance(chain, near) == replacement.amount
        # The dead machine is paid for its time, as far as its accepted debit notes went.
        assert gone.paid > 0 and balance(chain, far) == gone.paid


REQUESTOR = """
import sys, time
from distributed import Client
from golem_dask import GolemCluster

with GolemCluster(n_workers=2, market=sys.argv[1], budget="5") as cluster:
    with Client(cluster) as client:
        assert client.submit(sum, range(10)).result() == 45
        print("computed", flush=True)
        time.sleep(3600)
"""


def test_a_requestor_killed_before_its_invoices_pays_every_agreement_once(far_host, chain, tmp_path):  # noqa: F811
    key = os.urandom(32).hex()
    payer = Wallet.from_key(key).address
    fund(chain.web3(), chain.contracts["token"], chain.accounts[0], payer, Decimal(10), 10**18)
    env = {**os.environ, **chain_config(chain, False), "GOLEM_DASK_PRIVATE_KEY": key,
           "DASK_GOLEM__PAYMENT__DATA_DIR": str(tmp_path / "requestor"),
           "DASK_GOLEM__DEMAND__MEMORY": "1GiB",
           # Its workers exit soon after the requestor is gone; their providers then invoice.
           "DASK_GOLEM__WORKER__DEATH_TIMEOUT": "5s"}
    script = tmp_path / "requestor.py"
    script.write_text(REQUESTOR)
    with fleet(chain, tmp_path, {}, host=far_host.host_ip) as f:
        providers = {"far-1": f.start_provider("far-1", "0.1", far=far_host), "near-1": f.start_provider("near-1", "0.1")}
        proc = subprocess.Popen([sys.executable, str(script), f.url], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out = ""
            deadline = time.monotonic() + 90
            while "computed" not in out and time.monotonic() < deadline and proc.poll() is None:
                out += proc.stdout.readline()  # type: ignore[union-attr]
            assert "computed" in out, out
            time.sleep(2.5)  # debit notes accepted, none paid
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # The workers notice, exit; each provider ends its agreement and invoices a requestor that is gone.
        for name in providers:
            wait_until(lambda name=name: invoiced(f.log(name)), 60, f"{name} invoicing")
        assert all(balance(chain, a) == 0 for a in providers.values())
        pay = subprocess.run([sys.executable, "-m", "golem_dask.cli", "pay", "--hub", f.url, "--wait", "30s"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert pay.returncode == 0, pay.stdout + pay.stderr
        assert "debts still owed" in pay.stdout and pay.stdout.rstrip().endswith("0 debts still owed; 0 agreements still open"), pay.stdout
        for name, address in providers.items():
            (amount,) = invoiced(f.log(name))
            # Exactly what it invoiced: what was accepted before the crash, and the rest, once.
            assert balance(chain, address) == amount > 0, (name, pay.stdout)
            wait_until(lambda name=name: "paid in full" in f.log(name), 30, f"{name} seeing itself paid in full")
        # A second run pays nothing more.
        again = subprocess.run([sys.executable, "-m", "golem_dask.cli", "pay", "--hub", f.url, "--wait", "2s"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "debts paid" not in again.stdout.replace("0 debts", ""), again.stdout
        counts = transfers_to(chain, list(providers.values()))
        assert all(1 <= n <= 2 for n in counts.values()), counts  # the accepted part, then the rest
        assert all(balance(chain, a) == sum(invoiced(f.log(n))) for n, a in providers.items())
