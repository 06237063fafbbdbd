"""``GolemCluster(market="yagna")`` and the yagna backend through a real, offline daemon.

The daemon (``yagna_stack``: anvil as its chain, a central net of its own) holds two
identities: the requestor's, which golem-dask uses through ``YAGNA_APPKEY``, and a
provider's, which :class:`~yagna_provider.YagnaTestProvider` plays over the REST API,
serving each activity's exe-unit through the daemon's GSB API and really starting the
commands (``dask worker`` among them).  Every test keeps to a subnet of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import psutil
import pytest
from distributed import Client
from yagna_provider import YagnaTestProvider
from yagna_stack import subnet as new_subnet
from yagna_stack import yagna_stack  # noqa: F401

from golem_dask import GolemCluster
from golem_dask.chain.units import to_wei
from golem_dask.errors import ConfigError, NetworkError
from golem_dask.market.demand import DemandSpec
from golem_dask.market.negotiation import Negotiator
from golem_dask.payment.accountant import Accountant, AgreementAccount, Tolerance
from golem_dask.payment.budget import Budget
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import AgreementState, ExeCommand
from golem_dask.yagna.api import YagnaApi, YagnaDaemon
from golem_dask.yagna.market import YagnaMarket
from golem_dask.yagna.payer import YagnaPayer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

#: Prices high enough that a few seconds of work cost more than a wei.
PRICES = {"price_per_second": Decimal("0.0001"), "price_per_cpu_second": Decimal("0.0002"),
          "start_price": Decimal("0.00001")}
#: A VM image reference; the test provider runs its commands on this machine instead.
IMAGE = "hash:sha3:" + hashlib.sha3_224(b"golem-dask test image").hexdigest() + ":http://127.0.0.1:1/worker.gvmi"


@pytest.fixture
def subnet() -> str:
    return new_subnet()


@pytest.fixture
def requestor(yagna_stack: Any, subnet: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    """golem-dask as the stack's requestor: its daemon, its key, this test's subnet."""
    monkeypatch.setenv("YAGNA_API_URL", yagna_stack.api_url)
    monkeypatch.setenv("YAGNA_APPKEY", yagna_stack.requestor_key)
    with dask.config.set({"golem.yagna.subnet": subnet, "golem.yagna.collection-window": 0,
                          "golem.yagna.image": IMAGE, "golem.payment.invoice-timeout": "20s",
                          "golem.market.agreement-lifetime": "10m",
                          # The test provider's workers dial the scheduler; test_yagna_vpn covers vpn.
                          "golem.yagna.connectivity": "direct"}):
        yield yagna_stack


def providers(stack: Any, subnet: str, root: Path, n: int = 1, **kwargs: Any) -> list[YagnaTestProvider]:
    return [YagnaTestProvider(stack.api_url, stack.provider_key, stack.provider_id, stack.platform, subnet,
                              name=f"yagna-test-{i}", debit_note_interval_s=1, workdir=root / f"p{i}",
                              **{**PRICES, **kwargs}) for i in range(n)]


def leftovers(stack: Any) -> dict[str, Any]:
    """What the requestor still holds on the daemon."""
    s = stack.session(stack.requestor_key)
    allocations = s.get(f"{stack.api_url}/payment-api/v1/allocations", timeout=10).json()
    demands = s.get(f"{stack.api_url}/market-api/v1/demands", timeout=10).json()
    return {"allocations": allocations, "demands": demands}


def test_a_cluster_computes_through_the_daemon_and_pays_each_agreement_on_chain(
        requestor: Any, subnet: str, tmp_path: Path) -> None:
    stack = requestor
    (provider,) = providers(stack, subnet, tmp_path)
    before = stack.token_balance(stack.provider_id)
    data = np.arange(200_000, dtype="f8")
    with provider:
        with GolemCluster(n_workers=2, market="yagna", budget="1", cpu=1, memory="1GiB") as cluster, \
                Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            x = da.from_array(data, chunks=20_000)
            assert float((x ** 2).sum().compute()) == float((data ** 2).sum())
            # Real dask worker processes, started by the exe-unit for its activities.
            pids = [p for p in provider.pids() if psutil.pid_exists(p)]
            workers = [p for p in pids if "worker" in psutil.Process(p).cmdline()]
            assert len(workers) == 2, [psutil.Process(p).cmdline() for p in pids]
        bill = cluster.bill()
        assert not provider.errors, provider.errors
        assert not any(psutil.pid_exists(p) for p in pids)
    assert [e.status for e in bill.entries] == ["paid", "paid"], bill
    invoices = {i["agreement_id"]: i for i in provider.invoices}
    w3 = stack.web3()
    for entry in bill.entries:
        assert entry.amount == invoices[entry.agreement_id]["amount"] > 0
        receipt = w3.eth.get_transaction_receipt(entry.tx_hash)  # the hash the daemon reported
        assert receipt.status == 1
    # The provider's balance rose by exactly what it invoiced (debit notes and remainders).
    assert stack.token_balance(stack.provider_id) - before == sum(to_wei(e.amount) for e in bill.entries)
    assert leftovers(stack) == {"allocations": [], "demands": []}


def test_a_cluster_on_yagna_needs_a_vm_image_and_a_daemon(requestor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with dask.config.set({"golem.yagna.image": None}), pytest.raises(ConfigError, match="image build --gvmi"):
        GolemCluster(market="yagna")
    with pytest.raises(ConfigError, match="leave runtime unset"):
        GolemCluster(market="yagna", runtime="docker")
    monkeypatch.setenv("YAGNA_APPKEY", "not-a-key")
    with pytest.raises(ConfigError, match="refused the app key"):
        GolemCluster(market="yagna")
    monkeypatch.setenv("YAGNA_API_URL", "http://127.0.0.1:9")
    with pytest.raises(ConnectionError, match="yagna service run"):
        GolemCluster(market="yagna")


def test_a_daemon_dropping_a_request_is_told_apart_from_no_daemon() -> None:
    """A daemon that reads a request and closes the connection is running: the error says
    so and points at its log, not at starting one."""
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def main() -> str:
        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        api = YagnaApi(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "key")
        await api.start()
        try:
            with pytest.raises(NetworkError) as caught:
                await api.call("POST", "/activity-api/v1/activity/a1/exec", body={"text": "[]"})
            return str(caught.value)
        finally:
            await api.close()
            server.close()

    message = asyncio.run(main())
    assert "closed the connection during POST /activity-api/v1/activity/a1/exec" in message, message
    assert "its log" in message and "yagna service run" not in message


def test_on_the_vpn_the_demand_asks_for_vms_that_can_join_one() -> None:
    from golem_dask.cluster import yagna_constraints
    from golem_dask.protocol import constraints as C

    vm = {"golem.runtime.name": "vm", "golem.inf.cpu.threads": 4}
    with dask.config.set({"golem.yagna.connectivity": "vpn"}):
        asked = C.parse(yagna_constraints("(golem.inf.cpu.threads>=2)"))
        assert C.explain(asked, {**vm, "golem.runtime.capabilities": ["inet", "vpn"]}) == []
        assert C.explain(asked, {**vm, "golem.runtime.capabilities": ["inet"]}) != []
        assert C.explain(asked, {**vm, "golem.inf.cpu.threads": 1, "golem.runtime.capabilities": ["vpn"]}) != []
        assert yagna_constraints(None) == "(golem.runtime.capabilities=vpn)"
    with dask.config.set({"golem.yagna.connectivity": "direct"}):
        assert yagna_constraints("(golem.inf.cpu.threads>=2)") == "(golem.inf.cpu.threads>=2)"
    with dask.config.set({"golem.yagna.connectivity": "vnp"}), pytest.raises(ConfigError, match="vpn or direct"):
        yagna_constraints(None)  # a misspelt setting is refused where the demand is made, not read as direct


async def _rent_and_settle(stack: Any, provider: YagnaTestProvider, subnet: str) -> tuple[AgreementAccount, int]:
    """One agreement through YagnaMarket, YagnaPayer, the negotiator and the accountant:
    the account as settled, and how much the provider's balance rose."""
    before = stack.token_balance(stack.provider_id)
    daemon = YagnaDaemon(Decimal(1), stack.platform)
    market, payer = YagnaMarket(daemon, subnet=subnet), YagnaPayer(daemon)
    budget = Budget(Decimal(1))
    accountant = Accountant(payer, budget, Tolerance())
    spec = DemandSpec.from_kwargs(cpu=1, memory="1GiB", runtime="vm", image=IMAGE, platform=stack.platform)
    negotiator = Negotiator(market, spec, payer.address, budget, negotiation_timeout_s=20, approval_timeout_s=10,
                            expected_s=Decimal(600), utilisation=Decimal(1))
    await market.start()
    await payer.start()
    await negotiator.start()
    answering = asyncio.ensure_future(accountant.answer(market))
    try:
        deal = await negotiator.acquire("w0")
        agreement = deal.agreement
        assert agreement.state == AgreementState.APPROVED and agreement.provider_id == stack.provider_id
        assert list(agreement.offer.properties[P.LINEAR_COEFFS]) == list(provider.properties[P.LINEAR_COEFFS])
        accountant.open(agreement, "w0", deal.reservation)
        activity = await market.create_activity(agreement.id)
        accountant.activity_started(agreement.id)
        busy = "import time; t = time.process_time(); [0 for _ in iter(lambda: time.process_time() - t > 1, True)]; " \
               "time.sleep(60)"
        outputs = await market.exec(activity.id, [ExeCommand("deploy"), ExeCommand("start"),
                                                  ExeCommand("run", {"entry_point": "python3", "args": ["-c", busy]})],
                                    30)
        assert outputs[-1] == "started"
        accountant.observe_cpu(agreement.id, Decimal("1.2"))  # what the scheduler would have seen
        # Debit notes arrive while it runs, are checked and accepted.
        deadline = time.monotonic() + 30
        while not any(d["status"] == "ACCEPTED" for d in provider.debit_notes):
            assert time.monotonic() < deadline, "no debit note accepted within 30 s"
            await asyncio.sleep(0.1)
        await market.destroy_activity(activity.id)
        await market.terminate_agreement(agreement.id, "done")
        settled = await accountant.settle(market, agreement.id, 20)
        if settled.status.value != "paid":  # what the daemon owes for accepted debit notes goes out anyway
            await payer.daemon.run_cycle()
        await asyncio.sleep(0)
        return settled, stack.token_balance(stack.provider_id) - before
    finally:
        await negotiator.close()
        await market.close()
        await payer.close()
        answering.cancel()


def test_the_market_and_payer_through_the_daemon(requestor: Any, subnet: str, tmp_path: Path) -> None:
    """Allocation, demand, negotiation, agreement, activity, debit notes accepted, a correct
    invoice paid on chain with the daemon's transaction, and nothing left behind."""
    stack = requestor
    (provider,) = providers(stack, subnet, tmp_path)
    with provider:
        account, rose = asyncio.run(_rent_and_settle(stack, provider, subnet))
    (invoice,) = provider.invoices
    assert account.status.value == "paid" and account.amount == invoice["amount"] > 0
    assert rose == to_wei(invoice["amount"])
    assert stack.web3().eth.get_transaction_receipt(account.tx_hash).status == 1
    assert leftovers(stack) == {"allocations": [], "demands": []}


def test_an_inflated_invoice_is_rejected_and_only_accepted_debit_notes_are_paid(
        requestor: Any, subnet: str, tmp_path: Path) -> None:
    stack = requestor
    (provider,) = providers(stack, subnet, tmp_path, invoice_markup=Decimal(10))
    before = stack.token_balance(stack.provider_id)
    with provider:
        account, _ = asyncio.run(_rent_and_settle(stack, provider, subnet))
        (invoice,) = provider.invoices
        provider.wait_for(lambda: provider.invoices[0]["status"] == "REJECTED", 10, "the invoice rejected")
    assert account.status.value == "rejected" and "exceeds what our metering allows" in (account.reason or "")
    # The daemon pays what was accepted (the last debit note), never the invoice.
    accepted = max(d["amount"] for d in provider.debit_notes if d["status"] in ("ACCEPTED", "SETTLED"))
    provider_session, requestor_session = stack.session(stack.provider_key), stack.session(stack.requestor_key)

    def paid() -> Decimal:
        payments = provider_session.get(f"{stack.api_url}/payment-api/v1/payments", timeout=10).json()
        return sum((Decimal(a["amount"]) for p in payments for a in p["activityPayments"]
                    if a["activityId"] in invoice["activity_ids"]), Decimal(0))

    deadline = time.monotonic() + 30
    while paid() < accepted and time.monotonic() < deadline:
        requestor_session.post(f"{stack.api_url}/payment-api/v1/batchCycle/{stack.platform}/now", timeout=10)
        time.sleep(0.5)
    assert paid() == accepted < invoice["amount"]
    assert stack.token_balance(stack.provider_id) - before == to_wei(accepted)
    assert leftovers(stack) == {"allocations": [], "demands": []}
