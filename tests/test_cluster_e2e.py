"""GolemCluster end to end on the embedded default: real worker processes, a real EVM.

Each test negotiates real agreements with in-process provider agents, runs real
``dask worker`` processes, and pays on the embedded devnet; the assertions read computed
values, on-chain token balances and the bill.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from decimal import Decimal

import dask
import dask.array as da
import numpy as np
import pandas as pd
import psutil
import pytest
from distributed import Client

from golem_dask import GolemCluster
from golem_dask.payment.bill import plain
from golem_dask.provider.factory import embedded_agents
from golem_dask.errors import ConfigError, ConstraintSyntaxError, NoOffersError
from golem_dask.market.local import LocalMarket
from golem_dask.chain.units import from_wei
from golem_dask.protocol import properties as P
from golem_dask.provider.agent import ProviderAgent
from golem_dask.worker import Rental

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("golem_config", "no_leaked_workers")]


def token_balance(cluster: GolemCluster, address: str) -> Decimal:
    return from_wei(cluster.payer.token.functions.balanceOf(address).call())


def provider(name: str, cpu: int, cpu_hour: str, hour: str = "0.02") -> dict:
    return {"name": name, "cpu": cpu, "memory": "4GiB", "storage": "10GiB", "runtime": "process",
            "price-per-cpu-hour": cpu_hour, "price-per-hour": hour, "start-price": "0"}


def test_two_workers_compute_and_pay_exactly_what_the_bill_says() -> None:
    data = np.random.RandomState(42).random_sample((1000, 1000))
    started = time.time()
    with GolemCluster(n_workers=2, budget="2") as cluster:
        ready = time.time()
        with Client(cluster) as client:
            pids = client.run(os.getpid)
            assert len(pids) == 2
            x = da.from_array(data, chunks=250)
            result = (x @ x.T).sum().compute()
            time.sleep(1.5)  # let a debit note and some metering happen
        agents = list(cluster.market.providers.values())
        closing = time.time()
    closed = time.time()

    assert result == pytest.approx((data @ data.T).sum(), rel=1e-12)
    assert not any(psutil.pid_exists(pid) for pid in pids.values())
    assert all(agent.live_agreements == [] for agent in agents)

    bill = cluster.bill()
    assert len(bill.entries) == 2
    assert {e.status for e in bill.entries} == {"paid"}
    assert all(e.tx_hash and e.tx_hash.startswith("0x") for e in bill.entries)
    assert bill.total == sum(e.amount for e in bill.entries) > 0

    # On chain: each provider got exactly its billed amount; the requestor paid the total.
    for agent in agents:
        billed = sum((e.amount for e in bill.entries if e.provider == agent.id), Decimal(0))
        assert token_balance(cluster, agent.id) == billed
        assert sum(p.amount for p in agent.payments) == billed
    assert token_balance(cluster, cluster.payer.address) == Decimal(2) - bill.total

    # Usage agrees with the wall time the workers ran.
    for e in bill.entries:
        assert closing - ready - 0.5 <= float(e.duration_sec) <= closed - started
        assert abs(e.duration_sec - e.observed_duration_sec) < 2
        assert 0 < e.cpu_sec <= e.duration_sec * 1 + 1  # one thread each
        expected = e.cpu_sec * Decimal("0.1") / 3600 + e.duration_sec * Decimal("0.02") / 3600
        assert abs(e.amount - expected) < Decimal("1e-17")
    assert "total paid" in str(bill)
    assert cluster.events.of_kind("payment")
    check_bill_as_data(bill, {a.id: token_balance(cluster, a.id) for a in agents}, started, closed)


def check_bill_as_data(bill, on_chain: dict[str, Decimal], started: float, closed: float) -> None:  # type: ignore[no-untyped-def]
    """The bill as a DataFrame, CSV, JSON and a figure, each agreeing with what the chain says."""
    import io
    import json

    frame = bill.to_frame()
    assert frame.paid.sum() == bill.total == sum(on_chain.values())  # Decimals: exact
    assert frame.groupby("provider").paid.sum().to_dict() == on_chain
    assert all(started <= t.timestamp() <= closed for t in [*frame.started, *frame.stopped])
    csv = pd.read_csv(io.StringIO(bill.to_csv()), dtype={"paid": str})
    assert sum(Decimal(v) for v in csv.paid) == bill.total and list(csv.worker) == list(frame.worker)
    data = json.loads(bill.to_json())
    assert Decimal(data["total"]) == sum(Decimal(e["paid"]) for e in data["entries"]) == bill.total
    figure = bill.plot()
    per_provider, over_time = figure.axes
    assert sorted(b.get_height() for b in per_provider.patches) == pytest.approx(sorted(map(float, on_chain.values())))
    assert over_time.lines[0].get_ydata()[-1] == pytest.approx(float(bill.total))


def test_the_widget_and_the_status_table_show_providers_prices_states_and_money(capsys) -> None:
    from golem_dask.display import status_text

    providers = [provider("<i>lab</i>", 1, "0.05"), provider("mid", 1, "0.1", hour="0"), provider("dear", 1, "0.9")]
    with dask.config.set({"golem.provider.local": providers, "golem.cluster.progress": True}), \
            GolemCluster(n_workers=2, budget="1", max_price_per_cpu_hour="0.5") as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        time.sleep(1.5)  # a debit note each
        progress = "3 offers (1 refused: 1 over max_price_per_cpu_hour=0.5); 2 agreements; workers 2/2 running"
        # Not a terminal here: the progress is printed as plain lines, the last one settled.
        printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("golem: ")]
        assert printed[-1] == f"golem: {progress}" and len(printed) >= 3, printed
        assert status_text(cluster).splitlines()[4] == f"progress: {progress}"
        text = status_text(cluster).splitlines()
        assert text[0].split() == ["worker", "provider", "price", "GLM", "state", "CPU", "s", "time", "s", "cost", "GLM"]
        rows = {line.split()[0]: line for line in text[1:3]}
        assert set(rows) == {"golem-0", "golem-1"} and all(" running " in r for r in rows.values())
        assert any("<i>lab</i> (0x" in r and "0.05/cpu-h + 0.02/h" in r for r in rows.values())
        assert any("mid (0x" in r and "0.1/cpu-h + 0/h" in r for r in rows.values())
        assert text[3].startswith("spent 0 GLM, ") and text[3].endswith(" of 1 GLM left (erc20-devnet-glm)")
        page = cluster._repr_html_()  # what the notebook and dask's widget show
        assert "&lt;i&gt;lab&lt;/i&gt;" in page and "<i>lab" not in page and "GolemCluster" in page
        assert page.count("<td style='text-align:left'>running</td>") == 2
        assert f"<p style='margin:0'>progress: {progress}</p>" in page
    after = status_text(cluster).splitlines()
    bill = {e.worker: e for e in cluster.bill().entries}
    for line in after[1:3]:
        worker, cost = line.split()[0], line.split()[-1]
        assert " paid " in line and Decimal(cost) == bill[worker].amount > 0
    assert after[3].startswith(f"spent {plain(cluster.bill().total)} GLM, 0 GLM accruing, 0 GLM reserved")


def test_cheapest_matching_offers_win_and_over_cap_is_refused() -> None:
    providers = [provider("dear", 1, "0.9"), provider("cheap", 1, "0.05"), provider("mid", 1, "0.1"),
                 provider("midplus", 1, "0.2")]
    with dask.config.set({"golem.provider.local": providers}):
        with GolemCluster(n_workers=2, budget="5", max_price_per_cpu_hour="0.5") as cluster:
            names = {a.id: a.settings.name for a in cluster.market.providers.values()}
            used = sorted(names[w.deal.agreement.provider_id] for w in cluster.workers.values())
            refused = dict(cluster.negotiator.refused)
    assert used == ["cheap", "mid"]
    assert list(refused.values()) == ["over max_price_per_cpu_hour=0.5 (asks 0.9)"]
    assert any("refused" in str(e) and "dear" in str(e) for e in cluster.events.of_kind("rejected"))
    assert {e.status for e in cluster.bill().entries} == {"paid"}


def test_no_match_explains_offer_by_offer() -> None:
    providers = [provider("small", 2, "0.1"), provider("dear", 4, "0.9"), provider("dearer", 4, "1.5")]
    with dask.config.set({"golem.provider.local": providers, "golem.market.negotiation-timeout": "1s"}):
        with pytest.raises(NoOffersError) as info:
            GolemCluster(n_workers=1, cpu=3, max_price_per_cpu_hour="0.5")
    message = str(info.value)
    assert "(golem.inf.cpu.threads>=3)" in message
    assert "2 over max_price_per_cpu_hour=0.5" in message
    assert "1 short of cpu threads" in message


def test_scale_down_pays_the_retired_worker_at_once() -> None:
    with GolemCluster(n_workers=2, budget="2") as cluster:
        with Client(cluster) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
            cluster.scale(1)
            client.wait_for_workers(1)
            deadline = time.time() + 30
            while len(cluster.workers) > 1 and time.time() < deadline:
                time.sleep(0.1)
            # wait until the retired worker's payment is recorded
            while not any(e.status == "paid" for e in cluster.bill().entries) and time.time() < deadline:
                time.sleep(0.1)
            bill = cluster.bill()
            statuses = sorted(e.status for e in bill.entries)
            assert statuses == ["paid", "running"]
            paid = next(e for e in bill.entries if e.status == "paid")
            assert token_balance(cluster, paid.provider) == paid.amount
            assert client.submit(sum, [4, 5]).result() == 9
    assert {e.status for e in cluster.bill().entries} == {"paid"}


#: An embedded provider selling 4 threads whatever this machine has.
FOUR_THREADS = [{"name": "local", "cpu": 4, "memory": "8GiB", "storage": "10GiB", "runtime": "auto",
                 "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}]


def test_budget_too_small_stops_at_what_it_can_afford() -> None:
    # Paid at the end, each agreement reserves its worst case over the 1h lifetime:
    # 0.1 (1 cpu-hour) + 0.02 = 0.12 GLM.
    with dask.config.set({"golem.payment.pay-interval": None, "golem.provider.local": FOUR_THREADS}), \
            GolemCluster(n_workers=3, budget="0.25") as cluster:
        assert len(cluster.workers) == 2
        assert cluster.budget.reserved == Decimal("0.24")
        warnings = [str(e) for e in cluster.events.of_kind("budget")]
        assert any("allows 2 workers" in w for w in warnings)
        before = len(cluster.events.of_kind("budget"))
        cluster.scale(4)
        # The cluster tries, finds the budget short, and says so again: then it has settled.
        deadline = time.monotonic() + 30
        while len(cluster.events.of_kind("budget")) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cluster.events.of_kind("budget")) > before
        assert len(cluster.workers) == 2 and len(cluster.scheduler.workers) == 2
    assert len(cluster.bill().entries) == 2


class InflatingAgent(ProviderAgent):
    """A dishonest provider that bills ten times the CPU it measured."""

    def invoice_usage(self, deal):  # type: ignore[no-untyped-def]
        usage = dict(super().invoice_usage(deal))
        usage[P.USAGE_CPU_SEC] = usage[P.USAGE_CPU_SEC] * 10 + 20
        return usage


def test_inflated_invoice_is_rejected_and_not_paid() -> None:
    honest, = embedded_agents("erc20-devnet-glm", [provider("honest", 1, "0.1")])
    template, = embedded_agents("erc20-devnet-glm", [provider("cheat", 1, "0.01")])
    cheat = InflatingAgent(template.settings, template.runtime, template.wallet)
    market = LocalMarket([honest, cheat])
    with GolemCluster(n_workers=2, budget="2", market=market) as cluster:
        with Client(cluster) as client:
            assert client.submit(lambda: 41 + 1).result() == 42
    bill = cluster.bill()
    by_provider = {e.provider: e for e in bill.entries}
    rejected = by_provider[cheat.id]
    assert rejected.status == "rejected"
    assert "cpu_sec" in (rejected.reason or "") and "exceeds our metering" in (rejected.reason or "")
    assert rejected.tx_hash is None
    assert token_balance(cluster, cheat.id) == 0
    assert list(cheat.rejections.values()) == [rejected.reason]
    assert by_provider[honest.id].status == "paid"
    assert bill.total == by_provider[honest.id].amount
    assert "rejected" in str(bill)


def test_constraint_syntax_error_is_raised_before_negotiation() -> None:
    before = time.perf_counter()
    with pytest.raises(ConstraintSyntaxError) as info:
        GolemCluster(n_workers=1, constraints="(&(golem.inf.mem.gib>=4)(golem.runtime.name=docker")
    assert time.perf_counter() - before < 1.0
    assert "position" in str(info.value) and "^" in str(info.value)


def test_killed_worker_is_replaced_and_billed_for_what_it_ran() -> None:
    data = np.arange(400_000, dtype="f8")
    with GolemCluster(n_workers=2, budget="2") as cluster:
        with Client(cluster) as client:
            victim_name = "golem-0"
            pid = client.run(os.getpid, workers=[cluster.workers[victim_name].address])
            os.kill(next(iter(pid.values())), signal.SIGKILL)
            x = da.from_array(data, chunks=10_000)
            assert float((x * 2).sum().compute()) == float((data * 2).sum())
            deadline = time.time() + 60
            while (victim_name in cluster.workers or len(cluster.workers) < 2) and time.time() < deadline:
                time.sleep(0.1)
            client.wait_for_workers(2, timeout=60)
            assert victim_name not in cluster.workers
            time.sleep(1)
    bill = cluster.bill()
    assert len(bill.entries) == 3
    dead = next(e for e in bill.entries if e.worker == victim_name)
    others = [e for e in bill.entries if e.worker != victim_name]
    assert dead.status == "paid" and dead.amount > 0
    assert all(dead.duration_sec < e.duration_sec + Decimal(60) for e in others)
    survivor = next(e for e in others if e.worker == "golem-1")
    assert dead.duration_sec < survivor.duration_sec
    assert any("lost" in str(e) for e in cluster.events.of_kind("warning"))


def test_adapt_scales_up_under_load_and_down_when_idle() -> None:
    with dask.config.set({"distributed.adaptive.interval": "200ms", "distributed.adaptive.wait-count": 2,
                          "distributed.adaptive.target-duration": "1s"}):
        with GolemCluster(n_workers=0, budget="2") as cluster:
            cluster.adapt(minimum=0, maximum=2)
            with Client(cluster) as client:
                futures = client.map(lambda i: time.sleep(0.5) or i, range(8))
                assert client.gather(futures) == list(range(8))
                assert len(cluster.bill().entries) == 2
                del futures  # results held on a worker keep it alive
                deadline = time.time() + 30
                while cluster.workers and time.time() < deadline:
                    time.sleep(0.2)
                assert not cluster.workers
            assert cluster.bill().entries and {e.status for e in cluster.bill().entries} == {"paid"}


def test_asynchronous_cluster() -> None:
    async def main() -> GolemCluster:
        async with GolemCluster(n_workers=1, budget="1", asynchronous=True) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                assert await client.submit(pow, 2, 10) == 1024
            logs = await cluster.get_logs()
            address = cluster.workers["golem-0"].address
            assert "Scheduler" in logs and address in logs
            assert "Start worker at" in logs[address]
            # The cluster manager's log is the events, timestamped: what a user watched go by.
            cluster_log = logs["Cluster"].splitlines()
            assert any(line.endswith("[worker] worker golem-0 ready at " + address + " " + "(agreement "
                                     f"{cluster.workers['golem-0'].agreement_id[:8]} with local)")
                       for line in cluster_log), cluster_log
            assert len(cluster_log) >= len(cluster.events) and re.match(r"\d{4}-\d\d-\d\d ", cluster_log[0])
        return cluster

    cluster = asyncio.run(main())
    assert [e.status for e in cluster.bill().entries] == ["paid"]


def test_rentals_prepared_ahead_are_ended_when_no_worker_takes_them() -> None:
    """The first workers' agreements are signed, and their activities started, while the
    scheduler starts; a rental no worker took (the cluster closed first) is stopped, its
    agreement terminated and its reservation released, and nothing is paid for it."""
    async def main() -> None:
        async with GolemCluster(n_workers=0, budget="1", asynchronous=True) as cluster:
            (agent,) = cluster.market.providers.values()
            rental = Rental(cluster._parts, "never-started").prepare_soon()
            cluster._parts.early["never-started"] = rental
            await rental.prepared()
            assert agent.live_agreements == [rental.deal.agreement.id]
            assert rental.activity_id is not None and cluster.budget.reserved > 0
        assert agent.live_agreements == []
        assert cluster.budget.reserved == 0 and cluster.budget.spent == 0
        (entry,) = cluster.bill().entries
        assert (entry.worker, entry.status, entry.paid) == ("never-started", "nothing due", 0)
        from golem_dask.chain.devnet import Devnet

        assert Devnet.shared().token_balance(entry.provider) == 0

    asyncio.run(main())


def test_closing_while_a_rental_is_prepared_cancels_it_and_leaks_nothing() -> None:
    async def main() -> None:
        async with GolemCluster(n_workers=0, budget="1", asynchronous=True) as cluster:
            (agent,) = cluster.market.providers.values()
            rental = Rental(cluster._parts, "cut-short").prepare_soon()
            cluster._parts.early["cut-short"] = rental
            await asyncio.sleep(0)  # negotiation under way, nothing signed yet
        assert agent.live_agreements == []
        assert cluster.budget.reserved == 0 and cluster.budget.spent == 0

    asyncio.run(main())


def test_without_the_docker_sdk_the_default_is_the_process_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install golem-dask` has no docker extra: the default must still start."""
    from golem_dask.errors import ConfigError
    from golem_dask.provider.runtime import docker as docker_runtime

    def missing() -> None:
        raise ConfigError("the docker runtime needs the docker SDK: pip install 'golem-dask[docker]'")

    monkeypatch.setattr(docker_runtime, "_docker", missing)
    auto = [{**dask.config.get("golem.provider.local")[0], "runtime": "auto"}]
    with dask.config.set({"golem.provider.local": auto}), GolemCluster(n_workers=0, budget="1") as cluster:
        assert cluster.runtime == "process"
    with pytest.raises(ConfigError, match="docker SDK"):
        GolemCluster(n_workers=0, budget="1", runtime="docker")


def test_a_worker_that_cannot_reach_the_scheduler_names_the_address_and_what_to_check(monkeypatch) -> None:
    """The error says where the worker dialled and the market's hint; the rental is paid nothing
    more than it ran, and nothing is left running."""
    from golem_dask.worker import GolemWorker

    monkeypatch.setattr(GolemWorker, "scheduler_for_worker", property(lambda self: "tcp://127.0.0.1:9"))
    monkeypatch.setattr(LocalMarket, "unreachable_hint", "open the port", raising=False)
    with dask.config.set({"golem.worker.start-timeout": "3s", "golem.worker.death-timeout": "2s"}), \
            pytest.raises(Exception, match=r"died before joining the scheduler at tcp://127\.0\.0\.1:9, which it "
                                           "could not reach; open the port: worker exited"):
        GolemCluster(n_workers=1, budget="1")
    with dask.config.set({"golem.worker.start-timeout": "2s", "golem.worker.death-timeout": "30s"}), \
            pytest.raises(Exception, match=r"did not join the scheduler at tcp://127\.0\.0\.1:9 within 2s "
                                           r"\(golem.worker.start-timeout\); open the port"):
        GolemCluster(n_workers=1, budget="1")
    assert not [p for p in psutil.process_iter(["cmdline"]) if "tcp://127.0.0.1:9" in (p.info["cmdline"] or [])]


def test_a_worker_stream_closing_at_close_is_one_line_not_a_traceback(capsys) -> None:  # type: ignore[no-untyped-def]
    """distributed logs every stream a leaving worker closes with its traceback; a user
    reading the close sees a line, not a failure."""
    import logging

    from distributed.comm.core import CommClosedError

    with GolemCluster(n_workers=0, budget="1"):
        pass
    stream = logging.StreamHandler()
    logger = logging.getLogger("distributed.batched")
    logger.addHandler(stream)
    try:
        try:
            raise CommClosedError()
        except CommClosedError:
            logger.warning("Batched Comm Closed %r", "<TCP (closed)>", exc_info=True)
            logger.warning("another failure", exc_info=True)
    finally:
        logger.removeHandler(stream)
    err = capsys.readouterr().err
    assert "Batched Comm Closed '<TCP (closed)>'\n" in err and err.count("Traceback") == 1  # the other one keeps it


def test_more_workers_than_the_machine_holds_fail_at_once_and_a_later_scale_is_capped() -> None:
    two = [{**FOUR_THREADS[0], "cpu": 2}]
    with dask.config.set({"golem.provider.local": two}):
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"room for 2 workers of 1 cpu, .* asked for 3: ask for fewer workers"):
            GolemCluster(n_workers=3, cpu=1, memory="1GiB")
        assert time.monotonic() - started < 5  # not the negotiation timeout
        with GolemCluster(n_workers=1, cpu=1, memory="1GiB") as cluster, Client(cluster) as client:
            cluster.scale(5)
            cluster.scale(6)
            client.wait_for_workers(2, timeout=60)
            assert len(cluster.worker_spec) == 2
            (said,) = [str(e) for e in cluster.events.of_kind("capacity")]
            assert "asked for 5; scaling to 2" in said
            assert client.submit(sum, [1, 2]).result() == 3


def test_a_retired_workers_late_heartbeat_is_answered_without_a_warning(caplog) -> None:
    with GolemCluster(n_workers=1, cpu=1, memory="1GiB") as cluster, Client(cluster) as client:
        (address,) = client.scheduler_info()["workers"]
        cluster.scale(0)
        deadline = time.monotonic() + 30
        while cluster.scheduler.workers and time.monotonic() < deadline:
            time.sleep(0.05)

        async def heartbeats() -> list[dict]:
            return [cluster.scheduler.heartbeat_worker(address=a, now=time.time(), metrics={})
                    for a in (address, "tls://127.0.0.1:9")]

        caplog.clear()
        with caplog.at_level("WARNING", logger="distributed.scheduler"):
            answers = cluster.sync(heartbeats)
    assert answers == [{"status": "missing"}, {"status": "missing"}]
    warned = [r.getMessage() for r in caplog.records if "unregistered worker" in r.getMessage()]
    assert warned == ["Received heartbeat from unregistered worker 'tls://127.0.0.1:9'."]  # never ours: dask's warning

