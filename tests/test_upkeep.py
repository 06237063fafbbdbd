"""A cluster that runs longer than its agreements, idles, and scales by cores and budget."""

from __future__ import annotations

import time
from decimal import Decimal

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from golem_dask import GolemCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Recomputes(SchedulerPlugin):
    """Counts tasks of the watched keys that start running (again)."""

    name = "test-recomputes"

    def __init__(self) -> None:
        self.watched: set[str] = set()
        self.recomputed: list[str] = []

    def transition(self, key, start, finish, *args, **kwargs):  # type: ignore[no-untyped-def]
        if finish == "processing" and str(key) in self.watched:
            self.recomputed.append(str(key))


def wait_until(what: str, check, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s"
        time.sleep(0.1)


def test_workers_outlive_their_agreements_and_keep_their_data() -> None:
    """Three agreement lifetimes: each worker is handed over before its agreement expires;
    the persisted keys move with it and are never recomputed; every agreement is paid."""
    data = np.arange(300_000, dtype="f8")
    with dask.config.set({"golem.market.agreement-lifetime": "12s"}), \
            GolemCluster(n_workers=1, cpu=1, budget="2") as cluster, Client(cluster) as client:
        plugin = Recomputes()
        cluster.scheduler.add_plugin(plugin)
        x = da.from_array(data, chunks=50_000).persist()
        client.wait_for_workers(1)
        wait_until("persisted keys", lambda: len(cluster.scheduler.tasks) >= len(x.__dask_keys__())
                   and all(ts.state == "memory" for ts in cluster.scheduler.tasks.values()))
        plugin.watched = {str(k) for k in cluster.scheduler.tasks}
        started = time.monotonic()
        while time.monotonic() - started < 38:
            assert float(x.sum().compute()) == float(data.sum())
            time.sleep(1)
        assert plugin.recomputed == []
        assert len(cluster.workers) == 1
        handovers = [str(e) for e in cluster.events.of_kind("renewal") if "handed over" in str(e)]
        assert len(handovers) >= 3, handovers
        assert not cluster.events.of_kind("warning"), [str(e) for e in cluster.events.of_kind("warning")]
    entries = cluster.bill().entries
    assert len(entries) >= 4 and {e.status for e in entries} == {"paid"}


def test_an_idle_cluster_retires_and_pays_its_workers_and_rents_again() -> None:
    with GolemCluster(n_workers=1, budget="1", idle_timeout="2s") as cluster, Client(cluster) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        wait_until("the idle guard", lambda: not cluster.workers and cluster.bill().entries
                   and cluster.bill().entries[0].status == "paid", 30)
        assert any("no task ran for 2s" in str(e) for e in cluster.events.of_kind("idle"))
        cluster.scale(1)
        client.wait_for_workers(1, timeout=60)
        assert client.submit(sum, [3, 4]).result() == 7
    assert [e.status for e in cluster.bill().entries] == ["paid", "paid"]


def test_busy_workers_are_not_idle() -> None:
    with GolemCluster(n_workers=1, budget="1", idle_timeout="1s") as cluster, Client(cluster) as client:
        assert client.submit(time.sleep, 3).result() is None
        assert len(cluster.workers) == 1 and not cluster.events.of_kind("idle")


def test_scale_by_cores_and_memory_and_never_past_the_budget() -> None:
    # Worst case per worker over the 1h lifetime: 0.1 (1 cpu-hour) + 0.02 = 0.12 GLM.
    with GolemCluster(n_workers=0, cpu=1, memory="1GiB", budget="0.25") as cluster, Client(cluster) as client:
        cluster.scale(cores=2)
        client.wait_for_workers(2, timeout=60)
        cluster.scale(memory="1GiB")
        wait_until("the scale-down", lambda: len(cluster.workers) == 1)
        cluster.scale(5)
        cluster.scale(6)
        budget = [str(e) for e in cluster.events.of_kind("budget")]
        assert len(budget) == 1 and "can reserve agreements for 2" in budget[0]
        client.wait_for_workers(2, timeout=60)
        time.sleep(1)
        assert len(cluster.workers) == 2 and cluster.budget.reserved <= Decimal("0.25")
        adaptive = cluster.adapt(minimum_cores=1, maximum_cores=8)  # SpecCluster's raised here
        assert adaptive.maximum == 8 and len(cluster.events.of_kind("budget")) == 1


def test_a_scale_down_moves_the_leaving_workers_data() -> None:
    """Even from a provider that kills a stopped worker at once (no chance to hand over)."""
    data = np.arange(200_000, dtype="f8")
    with dask.config.set({"golem.provider.stop-grace": "0s"}), \
            GolemCluster(n_workers=2, cpu=1, budget="1") as cluster, Client(cluster) as client:
        plugin = Recomputes()
        cluster.scheduler.add_plugin(plugin)
        x = da.from_array(data, chunks=20_000).persist()
        wait_until("persisted keys", lambda: len(cluster.scheduler.tasks) >= len(x.__dask_keys__())
                   and all(ts.state == "memory" for ts in cluster.scheduler.tasks.values()))
        assert len({ws.address for ts in cluster.scheduler.tasks.values() for ws in ts.who_has}) == 2
        plugin.watched = {str(k) for k in cluster.scheduler.tasks}
        cluster.scale(1)
        wait_until("the scale-down", lambda: len(cluster.workers) == 1 and len(cluster.scheduler.workers) == 1)
        assert float(x.sum().compute()) == float(data.sum())
        assert plugin.recomputed == []


def test_accepted_debit_notes_are_paid_while_workers_run() -> None:
    """Each round pays every running agreement's accepted debit notes in one transaction;
    the invoices at the end pay only the rest, and each provider gets exactly its invoices."""
    from test_cluster_e2e import token_balance

    with dask.config.set({"golem.payment.pay-interval": "2s", "golem.provider.debit-note-interval": "1s"}), \
            GolemCluster(n_workers=2, cpu=1, budget="1") as cluster, Client(cluster) as client:
        busy = client.map(lambda i: sum(range(30_000_000)) + i, range(8))
        assert client.gather(busy) == [sum(range(30_000_000)) + i for i in range(8)]
        wait_until("a mid-run payment round for both", lambda: any(
            len(p.agreement_ids) == 1 and sum(q.tx_hash == p.tx_hash for q in cluster.accountant.payments) == 2
            for p in cluster.accountant.payments), 30)
        provider = cluster.bill().entries[0].provider
        paid_while_running = token_balance(cluster, provider)
        assert paid_while_running > 0 and all(e.status == "running" for e in cluster.bill().entries)
    bill = cluster.bill()
    assert {e.status for e in bill.entries} == {"paid"}
    assert all(e.paid == e.amount for e in bill.entries)
    assert token_balance(cluster, provider) == sum(e.amount for e in bill.entries) > paid_while_running


def test_a_lost_workers_outputs_are_collected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A worker that dies leaves its files with the provider; the cluster collects its
    outputs while replacing it, then the provider removes them."""
    import os

    out = tmp_path / "collected"
    with GolemCluster(n_workers=1, runtime="process", budget="1", outputs={"/golem/output/": f"file://{out}/"}) \
            as cluster, Client(cluster) as client:

        def write() -> str:  # the worker's working directory is its sandbox, /golem
            os.makedirs("output", exist_ok=True)
            with open("output/result.txt", "w") as f:
                f.write("42")
            return os.getcwd()

        sandbox = client.submit(write, pure=False).result()
        (lost,) = cluster.workers.values()
        client.submit(os._exit, 1, workers=[lost.address], pure=False)  # dies without a goodbye
        wait_until("the lost worker's outputs", lambda: (out / "result.txt").exists(), 60)
        assert (out / "result.txt").read_text() == "42"
        wait_until("its files removed", lambda: not os.path.exists(sandbox), 30)
        client.wait_for_workers(1, timeout=60)
        assert any("lost" in str(e) for e in cluster.events.of_kind("warning"))
