"""Long runs on the hub: provider daemons (their own processes, each with its own key) that
check every payment on chain (anvil) and end an agreement whose accepted debit notes are not
paid within the agreed timeout.

The same capabilities as :mod:`test_upkeep` (renewal, paying as it goes, idle guard, scaling
by cores under a budget, outputs of a lost worker, a short-delivering provider), through
the hub and the daemons rather than in-process agents.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from anvil_support import running_anvil
from fleet_support import Fleet, requestor, wait_until
from golem_dask import GolemCluster
from golem_dask.chain.anvil import AnvilNode
from net_support import s3_server  # noqa: F401
from test_payment_durability import balance
from test_upkeep import Throttle, persist_watched

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: Pay-as-you-go terms short enough for a test; the daemons' grace is short too, so a late
#: or unverified payment would end the agreement and fail the test.
TERMS = {"golem.payment.pay-interval": "2s", "golem.provider.debit-note-interval": "1s"}
DAEMON_ENV = {"DASK_GOLEM__PROVIDER__PAYMENT_GRACE": "4s", "DASK_GOLEM__PROVIDER__DEBIT_NOTE_INTERVAL": "1s"}


@pytest.fixture(scope="module")
def chain() -> Iterator[AnvilNode]:
    with running_anvil("127.0.0.1") as node:
        yield node


@pytest.fixture
def hub(chain: AnvilNode, tmp_path: Path) -> Iterator[Fleet]:
    """A hub and two provider daemons of 2 threads each, at the same price."""
    f = Fleet(chain, tmp_path)
    f.env.update(DAEMON_ENV)
    try:
        f.start_hub()
        for name in ("lab-a", "lab-b"):
            f.start_provider(name, "0.1", extra=("--cpu", "2", "--allow-scheme", "s3", "--allow-private-addresses"))
        yield f
    finally:
        f.close()


def invoiced(log: str) -> Decimal:
    return sum((Decimal(m) for m in re.findall(r"invoiced ([0-9.E+-]+) GLM for agreement", log)), Decimal(0))


def test_workers_outlive_three_agreements_and_are_paid_as_they_go(hub: Fleet, chain: AnvilNode, tmp_path) -> None:
    data = np.arange(300_000, dtype="f8")
    with requestor(chain, tmp_path, **TERMS, **{"golem.market.agreement-lifetime": "14s"}), \
            GolemCluster(n_workers=1, cpu=1, market=hub.url, budget="2") as cluster, Client(cluster):
        x, plugin = persist_watched(cluster, data, 50_000)
        started = time.monotonic()
        while time.monotonic() - started < 44:
            assert float(x.sum().compute()) == float(data.sum())
            time.sleep(1)
        events = [str(e) for e in cluster.events]
        assert plugin.recomputed == [], (plugin.recomputed, events)
        assert len([e for e in events if "handed over" in e]) >= 3, events
        assert not cluster.events.of_kind("warning"), events
        # Paid while running, and each payment found on chain by the provider it paid.
        assert len(cluster.accountant.payments) >= 3
        verified = sum(len(re.findall("payment verified", hub.log(n))) for n in hub.providers)
        assert verified >= 3
    bill = cluster.bill()
    assert len(bill.entries) >= 4 and {e.status for e in bill.entries} == {"paid"}
    for name, (_, address, _) in hub.providers.items():
        log = hub.log(name)
        assert "not paid on time" not in log
        # Debit notes paid mid-run plus the rest at the invoice: exactly what it invoiced.
        assert balance(chain, address) == invoiced(log) == sum(e.paid for e in bill.entries if e.provider == address)


def test_an_unpaying_requestor_loses_its_workers(hub: Fleet, chain: AnvilNode, tmp_path, monkeypatch) -> None:
    """The daemon counts only payments it found on chain: announcing is not paying."""
    from golem_dask.payment.accountant import Accountant

    async def announces_without_paying(self, market, account):  # type: ignore[no-untyped-def]
        from golem_dask.protocol.messages import Payment

        note = account.last_debit_note
        if note is not None:
            await market.notify_payment(Payment(self.payer.address, account.agreement.provider_id,
                                                note.total_amount_due, self.payer.platform, (note.id,),
                                                "0x" + "ab" * 32, agreement_ids=(note.agreement_id,)))
        return Decimal(0)

    monkeypatch.setattr(Accountant, "_pay_accepted", announces_without_paying)
    with requestor(chain, tmp_path, **TERMS), GolemCluster(n_workers=1, cpu=1, market=hub.url, budget="2") as cluster:
        wait_until(lambda: any("not paid on time" in str(e) for e in cluster.events.of_kind("warning")), 40,
                   "the daemon ending the unpaid agreement")
    first = cluster.bill().entries[0]
    assert first.status == "paid" and first.paid == first.amount > 0
    assert balance(chain, first.provider) == invoiced(hub.log(next(
        n for n, (_, a, _) in hub.providers.items() if a == first.provider)))


def test_idle_guard_then_scale_by_cores_under_a_budget(hub: Fleet, chain: AnvilNode, tmp_path) -> None:
    # Paid at the end, the worst case of a 2-thread worker for the 1h lifetime is 0.22 GLM; 0.45 holds two.
    with requestor(chain, tmp_path, **{"golem.payment.pay-interval": None}), \
            GolemCluster(n_workers=1, cpu=2, market=hub.url, budget="0.45", idle_timeout="2s") as cluster, \
            Client(cluster) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        wait_until(lambda: not cluster.workers and cluster.bill().entries
                   and cluster.bill().entries[0].status == "paid", 30, "the idle guard")
        cluster.scale(cores=4)
        client.wait_for_workers(2, timeout=60)
        assert client.submit(sum, [3, 4]).result() == 7
        providers = {w.deal.agreement.provider_id for w in cluster.workers.values()}
        assert len(providers) == 2  # 4 cores: a worker from each 2-thread daemon
        busy = client.submit(time.sleep, 6, pure=False)  # not idle while the budget is tested
        cluster.scale(8)
        wait_until(lambda: cluster.events.of_kind("budget"), 30, "the budget cap said")
        adaptive = cluster.adapt(minimum_cores=2, maximum_cores=16)
        time.sleep(2)
        budget = [str(e) for e in cluster.events.of_kind("budget")]
        assert len(budget) == 1 and "can reserve agreements for 2" in budget[0], budget  # said once
        assert 1 <= len(cluster.workers) <= 2 and cluster.budget.reserved <= Decimal("0.45")
        assert adaptive.maximum == 8
        assert busy.result() is None
    bill = cluster.bill()
    assert {e.status for e in bill.entries} == {"paid"}
    for name, (_, address, _) in hub.providers.items():
        assert balance(chain, address) == invoiced(hub.log(name))


def test_a_lost_workers_outputs_are_collected_from_the_daemon(hub: Fleet, chain: AnvilNode, tmp_path,
                                                              s3_server) -> None:  # noqa: F811
    import boto3
    import s3fs

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **s3_server["client_kwargs"]).create_bucket(Bucket="results")
    with requestor(chain, tmp_path), \
            GolemCluster(n_workers=1, cpu=1, market=hub.url, budget="1", outputs={"/golem/output/": "s3://results/run/"},
                         storage_options={"s3": s3_server}) as cluster, Client(cluster) as client:

        def write() -> None:
            os.makedirs("output", exist_ok=True)
            with open("output/result.txt", "w") as f:
                f.write("42")

        client.submit(write, pure=False).result()
        (lost,) = cluster.workers.values()
        client.submit(os._exit, 1, workers=[lost.address], pure=False)  # dies without a goodbye
        fs = s3fs.S3FileSystem(**s3_server)
        wait_until(lambda: fs.exists("results/run/result.txt"), 60, "the lost worker's outputs")
        assert fs.cat("results/run/result.txt") == b"42"
        client.wait_for_workers(1, timeout=60)
        assert client.submit(sum, [1, 1]).result() == 2


def test_a_daemon_delivering_a_quarter_is_caught_and_avoided(chain: AnvilNode, tmp_path) -> None:
    """A cheaper daemon whose worker gets a quarter of a CPU: flagged within the window,
    replaced, paid its delivered share, and passed over by the next cluster."""
    f = Fleet(chain, tmp_path)
    f.env.update(DAEMON_ENV)
    try:
        f.start_hub()
        slow = f.start_provider("slow", "0.05")
        f.start_provider("fair", "0.1")
        config = {"golem.cluster.capacity-window": "5s", "golem.payment.metering-interval": "200ms"}
        with requestor(chain, tmp_path, **config):
            with GolemCluster(n_workers=2, cpu=1, market=f.url, budget="2") as cluster, Client(cluster) as client:
                worker = next(w for w in cluster.workers.values() if w.deal.agreement.provider_id == slow)
                (pid,) = client.run(os.getpid, workers=[worker.address]).values()
                throttle = Throttle(pid)
                try:
                    started = time.monotonic()
                    work = client.map(lambda i: sum(range(12_000_000)) + i, range(400), pure=False)
                    wait_until(lambda: any("delivered" in str(e) for e in cluster.events.of_kind("warning")), 60,
                               "the slow daemon caught")
                    assert time.monotonic() - started < 60
                    client.cancel(work)
                finally:
                    throttle.stop()
            entry = next(e for e in cluster.bill().entries if e.agreement_id == worker.agreement_id)
            asked = cluster.accountant.accounts[worker.agreement_id].invoice.amount
            assert entry.status == "paid" and entry.paid == entry.amount < asked
            with GolemCluster(n_workers=1, cpu=1, market=f.url, budget="2") as again:
                (chosen,) = again.workers.values()
                assert chosen.deal.agreement.provider_id != slow
    finally:
        f.close()
