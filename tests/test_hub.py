"""Many machines: a hub and provider daemons as separate OS processes, paid on anvil.

Everything listens on loopback.  The requestor is this test process; the hub and each
provider daemon are ``golem-dask`` processes of their own, each provider with its own key,
checking on chain that it was paid.
"""

from __future__ import annotations

import signal
import time

import pytest
from distributed import Client

from anvil_support import anvil  # noqa: F401
from fleet_support import fleet, kill_machine, requestor, stop, wait_until
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


def test_a_provider_stopped_mid_job_is_paid_its_invoice(anvil, tmp_path):
    """SIGINT to a provider daemon while its worker runs: it ends its agreement, invoices and
    leaves; the requestor cannot tell it that it accepts, and pays it anyway."""
    with fleet(anvil, tmp_path, {"p1": "0.1", "p2": "0.1"}) as f, requestor(anvil, tmp_path):
        with GolemCluster(n_workers=1, market=f.url, budget="2") as cluster:
            with Client(cluster) as client:
                (worker,) = cluster.workers.values()
                leaving = next(name for name, (_, a, _) in f.providers.items()
                               if a == worker.deal.agreement.provider_id)
                futures = client.map(lambda i: time.sleep(0.05) or i, range(100))
                time.sleep(1)
                stop(f.providers[leaving][0], signal.SIGINT)
                assert sorted(client.gather(futures)) == list(range(100))
        bill = cluster.bill()
    address = f.providers[leaving][1]
    (entry,) = [e for e in bill.entries if e.provider == address]
    assert entry.status == "paid" and entry.amount > 0, entry
    assert balance(anvil, address) == entry.amount
    assert "provider shutting down" in f.log(leaving) or "invoiced" in f.log(leaving)


def test_a_requestor_needs_neither_docker_nor_the_image_for_docker_providers() -> None:
    """Only providers run the image: the requestor's constructor probes nothing of docker
    (it used to refuse: "image ... is not on this machine")."""
    import asyncio

    async def main() -> tuple[str | None, str | None]:
        cluster = GolemCluster(market="tcp://127.0.0.1:9", runtime="docker", image="golem-dask-worker:not-here",
                               asynchronous=True)
        return cluster.runtime, cluster.spec.image

    assert asyncio.run(main()) == ("docker", "golem-dask-worker:not-here")
