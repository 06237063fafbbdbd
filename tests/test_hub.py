"""Many machines: a hub and provider daemons as separate OS processes, paid on anvil.

Everything listens on loopback.  The requestor is this test process; the hub and each
provider daemon are ``golem-dask`` processes of their own, each provider with its own key,
checking on chain that it was paid.
"""

from __future__ import annotations

import time

import pytest
from distributed import Client

from anvil_support import anvil  # noqa: F401
from fleet_support import fleet, kill_machine, requestor, wait_until
from golem_dask import GolemCluster
from test_payment_durability import balance

pytestmark = pytest.mark.e2e


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
                futures = client.map(lambda i: time.sleep(0.1) or i, range(120))
                time.sleep(2.5)  # debit notes every second: the victim's are accepted meanwhile
                kill_machine(f.providers[victim][0])
                assert sorted(client.gather(futures)) == list(range(120))
                wait_until(lambda: len(cluster.workers) == 2 and all(w.address for w in cluster.workers.values()),
                           60, "a replacement worker")
                client.wait_for_workers(2, timeout=60)
        bill = cluster.bill()
        dead = f.providers[victim][1]
        (gone,) = [e for e in bill.entries if e.provider == dead]
        # It never sent an invoice: it is paid for its time as its accepted debit notes said, no more.
        assert gone.status == "awaiting invoice" and gone.paid > 0
        assert balance(anvil, dead) == gone.paid
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
