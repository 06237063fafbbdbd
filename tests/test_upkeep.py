"""A cluster that runs longer than its agreements, idles, and scales by cores and budget."""

from __future__ import annotations

import os
import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin
from docker_support import docker_client, no_leaked_containers  # noqa: F401

from golem_dask import GolemCluster
from golem_dask.payment.bill import EntryStatus
from golem_dask.payment.budget import Budget
from golem_dask.upkeep import affordable

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(params=["process", "docker"])
def runtime(request) -> str:  # type: ignore[no-untyped-def]
    """Each capability on both runtimes of the embedded market; docker needs the engine and
    the worker image (a failure in CI, a skip elsewhere) and must leave no container."""
    if request.param == "docker":
        request.getfixturevalue("no_leaked_containers")
    return str(request.param)


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


def persist_watched(cluster: GolemCluster, data: np.ndarray, chunks: int) -> tuple[Any, Recomputes]:
    """``data`` persisted on the cluster's workers, and a plugin counting its keys recomputed."""
    plugin = Recomputes()
    cluster.scheduler.add_plugin(plugin)
    x = da.from_array(data, chunks=chunks).persist()
    wait_until("persisted keys", lambda: len(cluster.scheduler.tasks) >= len(x.__dask_keys__())
               and all(ts.state == "memory" for ts in cluster.scheduler.tasks.values()))
    plugin.watched = {str(k) for k in cluster.scheduler.tasks}
    return x, plugin


def check_sum_for(x: Any, data: np.ndarray, seconds: float, until: Any = None) -> None:
    """Compute ``x``'s sum against ``data``'s every second for ``seconds``, or until
    ``until()`` holds (which it must within ``seconds``)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds and not (until is not None and until()):
        assert float(x.sum().compute()) == float(data.sum())
        time.sleep(1)
    assert until is None or until(), f"not done within {seconds}s"


def test_workers_outlive_their_agreements_and_keep_their_data(runtime: str) -> None:
    """Three agreement lifetimes: each worker is handed over before its agreement expires;
    the persisted keys move with it and are never recomputed; every agreement is paid."""
    data = np.arange(300_000, dtype="f8")
    with dask.config.set({"golem.market.agreement-lifetime": "12s"}), \
            GolemCluster(n_workers=1, cpu=1, budget="2", runtime=runtime) as cluster, Client(cluster) as client:
        client.wait_for_workers(1)
        x, plugin = persist_watched(cluster, data, 50_000)
        check_sum_for(x, data, 38)
        events = [str(e) for e in cluster.events]
        assert plugin.recomputed == [], (plugin.recomputed, events)
        assert len(cluster.workers) == 1
        handovers = [str(e) for e in cluster.events.of_kind("renewal") if "handed over" in str(e)]
        assert len(handovers) >= 3, handovers
        assert not cluster.events.of_kind("warning"), [str(e) for e in cluster.events.of_kind("warning")]
    entries = cluster.bill().entries
    assert len(entries) >= 4 and {e.status for e in entries} == {"paid"}


def test_workers_on_a_full_machine_step_aside_before_their_agreements_expire() -> None:
    """The provider holds only the cluster's two workers, so no successor can be rented
    beside an expiring one: each in turn hands its data to the other, is paid, and is
    replaced in the room it left.  No key is recomputed, no worker is lost."""
    data = np.arange(300_000, dtype="f8")
    local = [{"name": "local", "cpu": 2, "memory": "4GiB", "storage": "10GiB", "runtime": "process",
              "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}]
    with dask.config.set({"golem.market.agreement-lifetime": "20s", "golem.provider.local": local}), \
            GolemCluster(n_workers=2, cpu=1, memory="1GiB", budget="2") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        x, plugin = persist_watched(cluster, data, 30_000)
        # Both step aside 10 s in (the margin is half the lifetime), one after the other;
        # the test ends before their successors' turn.
        check_sum_for(x, data, 60, until=lambda: len(cluster.workers) == 2 and len(
            [e for e in cluster.events.of_kind("renewal") if "stepped aside" in str(e)]) >= 2)
        events = [str(e) for e in cluster.events]
        assert plugin.recomputed == [], (plugin.recomputed, events)
        assert not cluster.events.of_kind("warning"), events
        assert float(x.sum().compute()) == float(data.sum())
    entries = cluster.bill().entries
    assert len(entries) >= 4 and {e.status for e in entries} == {"paid"}, cluster.bill()


def test_an_idle_cluster_retires_and_pays_its_workers_and_rents_again(runtime: str) -> None:
    with GolemCluster(n_workers=1, budget="1", idle_timeout="2s", runtime=runtime) as cluster, Client(cluster) as client:
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


def test_scale_by_cores_and_memory_and_never_past_the_budget(runtime: str) -> None:
    # Paid at the end, the worst case of a 2-thread worker over the 1h lifetime:
    # 2 * 0.1 (cpu-hours) + 0.02 = 0.22 GLM; 0.5 holds two.  The provider sells 4 threads.
    local = [{"name": "local", "cpu": 4, "memory": "8GiB", "storage": "10GiB", "runtime": "auto",
              "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}]
    with dask.config.set({"golem.payment.pay-interval": None, "golem.provider.local": local}), \
            GolemCluster(n_workers=0, cpu=2, memory="1GiB", budget="0.5", runtime=runtime) as cluster, \
            Client(cluster) as client:
        cluster.scale(cores=4)
        client.wait_for_workers(2, timeout=60)
        assert sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()) == 4
        cluster.scale(memory="1GiB")
        wait_until("the scale-down", lambda: len(cluster.workers) == 1)
        cluster.scale(5)
        cluster.scale(6)
        budget = [str(e) for e in cluster.events.of_kind("budget")]
        assert len(budget) == 1 and "can reserve agreements for 2" in budget[0]
        client.wait_for_workers(2, timeout=60)
        time.sleep(1)
        assert len(cluster.workers) == 2 and cluster.budget.reserved <= Decimal("0.5")
        adaptive = cluster.adapt(minimum_cores=2, maximum_cores=16)  # SpecCluster's raised here
        assert adaptive.maximum == 8 and len(cluster.events.of_kind("budget")) == 1


def test_a_scale_right_after_another_counts_a_worker_being_started_once() -> None:
    """A worker being started holds its reservation before the cluster lists it among its
    workers: whether it has reserved yet, is signing, or runs, a second scale grants the
    same.  (Counted twice, a scale(6) right after scale(5) shrank the cluster to 1.)"""
    worst = Decimal("0.22")
    budget = Budget(Decimal("0.5"))
    budget.reserve("agr-0", worst)  # golem-0 runs
    accounts = {"agr-0": SimpleNamespace(worker="golem-0", status=EntryStatus.RUNNING)}
    negotiator = SimpleNamespace(candidates={"offer": SimpleNamespace(worst_case=worst)}, signing=set())
    cluster = SimpleNamespace(worker_spec={"golem-0": {}, "golem-1": {}}, workers={"golem-0": SimpleNamespace()},
                              negotiator=negotiator, accountant=SimpleNamespace(accounts=accounts), budget=budget)
    assert affordable(cluster, 6) == 2  # golem-1 will reserve 0.22 of the 0.28 left
    budget.reserve("r-1", worst)
    negotiator.signing.add("golem-1")
    assert affordable(cluster, 6) == 2  # it holds 0.22 while its agreement is signed
    negotiator.signing.clear()
    budget.rekey("r-1", "agr-1")
    accounts["agr-1"] = SimpleNamespace(worker="golem-1", status=EntryStatus.RUNNING)
    assert affordable(cluster, 6) == 2  # and while it starts
    budget.total = Decimal("1")
    assert affordable(cluster, 6) == 4 and affordable(cluster, 3) == 3  # room left is still given
    assert affordable(cluster, 1) == 1  # scaling down is never capped


def test_a_scale_down_moves_the_leaving_workers_data() -> None:
    """Even from a provider that kills a stopped worker at once (no chance to hand over)."""
    data = np.arange(200_000, dtype="f8")
    with dask.config.set({"golem.provider.stop-grace": "0s"}), \
            GolemCluster(n_workers=2, cpu=1, budget="1") as cluster, Client(cluster):
        x, plugin = persist_watched(cluster, data, 20_000)
        assert len({ws.address for ts in cluster.scheduler.tasks.values() for ws in ts.who_has}) == 2
        cluster.scale(1)
        wait_until("the scale-down", lambda: len(cluster.workers) == 1 and len(cluster.scheduler.workers) == 1)
        assert float(x.sum().compute()) == float(data.sum())
        assert plugin.recomputed == []


def test_accepted_debit_notes_are_paid_while_workers_run(runtime: str) -> None:
    """Each round pays every running agreement's accepted debit notes in one transaction;
    the invoices at the end pay only the rest, and each provider gets exactly its invoices."""
    from test_cluster_e2e import token_balance

    with dask.config.set({"golem.payment.pay-interval": "2s", "golem.provider.debit-note-interval": "1s"}), \
            GolemCluster(n_workers=2, cpu=1, budget="1", runtime=runtime) as cluster, Client(cluster) as client:
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


def test_a_long_agreement_reserves_two_payment_periods_and_stops_when_the_budget_cannot() -> None:
    """Paid as it goes, an hour-long agreement holds two payment periods of its worst case,
    topped up after each payment; when the budget left cannot hold the next one, the worker
    is retired and paid, and the total spent stays within the budget."""
    from golem_dask.protocol.pricing import LinearPricing

    pricing = LinearPricing.per_hour(Decimal("0.1"), Decimal("0.02"))
    period = pricing.worst_case(1, Decimal(4))  # 2 x pay-interval
    budget = 3 * period
    terms = {"golem.payment.pay-interval": "2s", "golem.provider.debit-note-interval": "1s",
             "golem.market.agreement-lifetime": "1h"}
    with dask.config.set(terms), GolemCluster(n_workers=1, cpu=1, budget=str(budget), runtime="process") as cluster, \
            Client(cluster) as client:
        assert cluster.budget.reserved == period < pricing.worst_case(1, Decimal(3600)) / 100

        def spin(seconds: float) -> int:
            end = time.process_time() + seconds
            while time.process_time() < end:
                pass
            return 1

        busy = client.submit(spin, 60, pure=False)
        try:
            wait_until("the worker retired for the budget", lambda: not cluster.workers and cluster.bill().entries
                       and cluster.bill().entries[0].status == "paid", 60)
        except AssertionError:
            raise AssertionError(([str(e) for e in cluster.events], cluster.budget.spent, cluster.budget.reserved,
                                  cluster.accountant.payments)) from None
        said = [str(e) for e in cluster.events.of_kind("budget")]
        assert any("cannot reserve the next payment period of golem-0" in e for e in said), said
        assert len(cluster.accountant.payments) >= 3  # paid as it went, then the rest
        client.cancel(busy)
    from test_cluster_e2e import token_balance

    (entry,) = cluster.bill().entries
    assert entry.paid == entry.amount and cluster.budget.spent == entry.amount <= budget
    assert token_balance(cluster, entry.provider) == entry.amount  # on chain, mid-run payments and the rest


def test_a_provider_ends_an_agreement_whose_accepted_debit_notes_are_not_paid_in_time(monkeypatch) -> None:
    """Paid as agreed, a worker runs on; a requestor that stops paying loses it once an
    accepted debit note is past the payment timeout (+ the provider's grace)."""
    from golem_dask.payment.accountant import Accountant

    terms = {"golem.payment.pay-interval": "2s", "golem.provider.debit-note-interval": "1s",
             "golem.provider.payment-grace": "2s"}
    with dask.config.set(terms), GolemCluster(n_workers=1, cpu=1, budget="1") as cluster, Client(cluster) as client:
        assert client.submit(time.sleep, 8).result() is None  # four payment rounds
        assert len(cluster.workers) == 1 and not cluster.events.of_kind("warning")
        assert len(cluster.accountant.payments) >= 2

    async def pays_nothing(self, market, account):  # type: ignore[no-untyped-def]
        return Decimal(0)

    monkeypatch.setattr(Accountant, "_pay_accepted", pays_nothing)
    with dask.config.set(terms), GolemCluster(n_workers=1, cpu=1, budget="1") as cluster, Client(cluster):
        wait_until("the unpaid provider ending its agreement", lambda: any(
            "not paid on time" in str(e) for e in cluster.events.of_kind("warning")), 30)
    bill = cluster.bill()
    first = bill.entries[0]
    assert first.status == "paid" and first.paid == first.amount > 0, first


def test_a_lost_workers_outputs_are_collected(tmp_path, runtime, request) -> None:  # type: ignore[no-untyped-def]
    """A worker that dies leaves its files with the provider; the cluster collects its
    outputs while replacing it, then the provider removes them."""
    import os

    out = tmp_path / "collected"
    with GolemCluster(n_workers=1, runtime=runtime, budget="1", outputs={"/golem/output/": f"file://{out}/"}) \
            as cluster, Client(cluster) as client:

        def write() -> str:  # the worker's working directory is its sandbox, /golem
            os.makedirs("output", exist_ok=True)
            with open("output/result.txt", "w") as f:
                f.write("42")
            return os.getcwd()

        sandbox = client.submit(write, pure=False).result()
        (lost,) = cluster.workers.values()
        if runtime == "docker":  # the container's /golem is a folder of the provider's
            from golem_dask.provider.runtime.docker import LABEL_AGREEMENT

            engine = request.getfixturevalue("docker_client")
            (container,) = engine.containers.list(filters={"label": f"{LABEL_AGREEMENT}={lost.agreement_id}"})
            sandbox = next(m["Source"] for m in container.attrs["Mounts"] if m["Destination"] == "/golem")
        assert os.path.exists(os.path.join(sandbox, "output", "result.txt"))
        client.submit(os._exit, 1, workers=[lost.address], pure=False)  # dies without a goodbye
        # The copy writes in place: the file exists a moment before its bytes are in.
        wait_until("the lost worker's outputs", lambda: (out / "result.txt").exists()
                   and (out / "result.txt").read_text() == "42", 60)
        wait_until("its files removed", lambda: not os.path.exists(sandbox), 30)
        client.wait_for_workers(1, timeout=60)
        assert any("lost" in str(e) for e in cluster.events.of_kind("warning"))


def _agents(slow_key: str, fair_key: str, runtime: str = "process"):  # type: ignore[no-untyped-def]
    """Two providers on this machine: 'slow' (cheaper, 1 thread) and 'fair' (2 threads)."""
    from golem_dask.protocol.identity import Wallet
    from golem_dask.protocol.pricing import LinearPricing
    from golem_dask.protocol.properties import Resources
    from golem_dask.provider.agent import ProviderAgent, ProviderSettings
    from golem_dask.provider.runtime.policy import TransferPolicy
    from golem_dask.provider.runtime.process import ProcessRuntime

    def agent(name: str, threads: int, cpu_hour: str, key: str) -> ProviderAgent:
        settings = ProviderSettings(name=name, capacity=Resources(threads, 4 * 2**30, 4 * 2**30),
                                    pricing=LinearPricing.per_hour(Decimal(cpu_hour), Decimal("0.01")),
                                    platform="erc20-devnet-glm", debit_note_interval_s=1)
        if runtime == "docker":
            from golem_dask.image import default_tag
            from golem_dask.provider.runtime.docker import DockerRuntime

            rt: Any = DockerRuntime(default_tag(), provider_name=name, policy=TransferPolicy.trusting())
        else:
            rt = ProcessRuntime(policy=TransferPolicy.trusting(), inherit_environment=True)
        return ProviderAgent(settings, rt, Wallet.from_key(key))

    return [agent("slow", 1, "0.05", slow_key), agent("fair", 2, "0.1", fair_key)]


class DockerQuota:
    """Gives a running container a quarter of a CPU (``docker update --cpus 0.25``)."""

    def __init__(self, agreement_id: str) -> None:
        import subprocess

        from golem_dask.provider.runtime.docker import LABEL_AGREEMENT

        self.container = subprocess.run(["docker", "ps", "-q", "--filter", f"label={LABEL_AGREEMENT}={agreement_id}"],
                                        capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["docker", "update", "--cpus", "0.25", self.container], capture_output=True, check=True)

    def stop(self) -> None:
        pass  # the container goes with its agreement


class Throttle:
    """Lets a process run a quarter of the time (SIGSTOP/SIGCONT), like a CPU quota."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.done = pid, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import os
        import signal

        try:
            while not self.done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(0.09)
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(0.03)
        except ProcessLookupError:
            return
        finally:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)


def test_a_provider_delivering_a_quarter_is_caught_replaced_paid_its_share_and_avoided(runtime: str) -> None:
    import os

    from golem_dask.market.local import LocalMarket
    from golem_dask.market.reputation import Reputation

    slow_key, fair_key = "51" * 32, "52" * 32
    Reputation._shared.pop(":memory:", None)  # a fresh memory for this test
    config = {"golem.cluster.capacity-window": "5s", "golem.payment.metering-interval": "200ms"}
    with dask.config.set(config), GolemCluster(n_workers=2, cpu=1, budget="2",
                                                market=LocalMarket(_agents(slow_key, fair_key, runtime))) as cluster, \
            Client(cluster) as client:
        slow = next(w for w in cluster.workers.values() if w.deal.candidate.name == "slow")
        if runtime == "docker":
            throttle: Any = DockerQuota(slow.agreement_id)
        else:
            (pid,) = client.run(os.getpid, workers=[slow.address]).values()
            throttle = Throttle(pid)
        caught_at = None
        try:
            started = time.monotonic()
            work = client.map(lambda i: sum(range(12_000_000)) + i, range(400), pure=False)
            wait_until("the slow provider caught", lambda: any(
                "delivered" in str(e) and "slow" in str(e) for e in cluster.events.of_kind("warning")), 60)
            caught_at = time.monotonic() - started
            wait_until("its replacement", lambda: len(cluster.workers) == 2 and all(
                w.deal.candidate.name == "fair" for w in cluster.workers.values() if w.deal), 60)
            client.cancel(work)
        finally:
            throttle.stop()
    assert caught_at is not None and caught_at < 60
    entry = next(e for e in cluster.bill().entries if e.agreement_id == slow.agreement_id)
    assert entry.status == "paid" and "delivered" in (entry.reason or ""), entry
    asked = cluster.accountant.accounts[slow.agreement_id].invoice.amount
    assert entry.paid == entry.amount < asked
    record = Reputation.for_ledger(None).record(slow.deal.agreement.provider_id)
    assert record is not None and record.flagged == 1 and record.delivered is not None and record.delivered < 0.5
    # Another cluster, the same two providers: the cheaper slow one is no longer first choice.
    with GolemCluster(n_workers=1, cpu=1, budget="2", market=LocalMarket(_agents(slow_key, fair_key, runtime))) \
            as again:
        (worker,) = again.workers.values()
        assert worker.deal.candidate.name == "fair"


def test_slow_io_beside_busy_cpu_is_not_taken_for_a_short_delivery() -> None:
    config = {"golem.cluster.capacity-window": "3s", "golem.payment.metering-interval": "200ms"}
    with dask.config.set(config), GolemCluster(n_workers=2, cpu=1, budget="2") as cluster, \
            Client(cluster) as client:
        a, b = (w.address for w in cluster.workers.values())
        def spin(i: int) -> int:  # half a second of CPU
            end = time.process_time() + 0.5
            while time.process_time() < end:
                pass
            return i

        cpu = client.map(spin, range(16), workers=[a], pure=False)
        io = client.map(lambda i: time.sleep(1.5) or i, range(6), workers=[b], pure=False)
        client.gather(cpu + io)
        assert not [str(e) for e in cluster.events.of_kind("warning") if "delivered" in str(e)]
        assert len(cluster.workers) == 2


def test_golem_dask_providers_lists_what_is_remembered(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from golem_dask.cli import main
    from golem_dask.market.reputation import Reputation

    path = str(tmp_path / "reputation.sqlite")
    assert main(["providers", "--path", path]) == 0 and not os.path.exists(path)  # reading makes no file
    assert "no providers remembered yet" in capsys.readouterr().err
    store = Reputation(path)
    store.agreement("0xA", "lab-1")
    store.delivered("0xA", "lab-1", bought_cpu_sec=Decimal(40), delivered_cpu_sec=Decimal(10))
    store.flag("0xA", "lab-1")
    store.failure("0xB", "lab-2")
    assert main(["providers", "--path", path, "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["lab-1"]["delivered"] == "0.25" and listed["lab-1"]["flagged"] == 1
    assert listed["lab-2"]["failures"] == 1 and listed["lab-2"]["delivered"] is None
    assert main(["providers", "--path", path]) == 0
    table = capsys.readouterr().out
    assert "lab-1" in table and "25%" in table


def test_no_worker_is_rented_once_the_cluster_closes() -> None:
    """A renewal under way when the cluster starts closing rents no successor: one added
    after close's ``scale(0)`` would be left running by the closed cluster."""
    import asyncio
    from types import SimpleNamespace

    from distributed.core import Status

    from golem_dask.upkeep import rent_one

    async def never() -> None:
        raise AssertionError("no worker may start")

    closing = SimpleNamespace(status=Status.closing, worker_spec={}, workers={}, _i=0, _correct_state=never,
                              _new_worker_name=lambda i: f"golem-{i}")
    assert asyncio.run(rent_one(closing, {"cls": object}, "the successor of golem-0")) is None
    assert closing.worker_spec == {} and closing._i == 0
