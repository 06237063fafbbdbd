"""The accountant's checks of debit notes and invoices against its own metering."""

from __future__ import annotations

from decimal import Decimal

from golem_dask.protocol.pricing import LinearPricing
from golem_dask.payment.accountant import AgreementAccount, Tolerance, check_usage
from golem_dask.payment.bill import Bill, BillEntry, EntryStatus
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Agreement, Issuer, Proposal

ADDR = "0x" + "ef" * 20
PRICING = LinearPricing.per_hour(Decimal("0.36"), Decimal("0.036"))


def account(duration: float = 100.0, observed_cpu: str = "50", threads: int = 2) -> AgreementAccount:
    prop = Proposal(Issuer.PROVIDER, PRICING.to_properties(), "(&)", "o", "d", ADDR)
    agreement = Agreement("a1", prop, prop, ADDR, ADDR, 0)
    acc = AgreementAccount(agreement, PRICING, "golem-0", threads, started=1000.0, stopped=1000.0 + duration)
    acc.observed_cpu_sec = Decimal(observed_cpu)
    return acc


def usage(cpu: str, duration: str) -> dict[str, Decimal]:
    return {P.USAGE_CPU_SEC: Decimal(cpu), P.USAGE_DURATION_SEC: Decimal(duration)}


def test_honest_invoice_passes() -> None:
    u = usage("55", "99.5")
    assert check_usage(u, PRICING.cost(u), account(), Tolerance()) is None


def test_amount_must_be_the_agreed_price() -> None:
    u = usage("55", "99.5")
    reason = check_usage(u, PRICING.cost(u) * 2, account(), Tolerance())
    assert reason is not None and "not the agreed price" in reason


def test_inflated_cpu_is_rejected() -> None:
    u = usage("150", "99.5")  # the scheduler saw 50 cpu-seconds
    reason = check_usage(u, PRICING.cost(u), account(), Tolerance())
    assert reason is not None and "cpu_sec 150 exceeds our metering" in reason


def test_cpu_above_threads_times_duration_is_rejected() -> None:
    u = usage("300", "99.5")
    reason = check_usage(u, PRICING.cost(u), account(observed_cpu="400"), Tolerance())
    assert reason is not None and "on 2 threads" in reason


def test_inflated_duration_is_rejected() -> None:
    u = usage("10", "200")
    reason = check_usage(u, PRICING.cost(u), account(), Tolerance())
    assert reason is not None and "duration_sec 200" in reason


def test_negative_usage_is_rejected() -> None:
    u = usage("-1", "10")
    assert check_usage(u, Decimal(0), account(), Tolerance()) == "negative usage"


def test_bill_totals_only_what_was_paid() -> None:
    def entry(status: EntryStatus, amount: str) -> BillEntry:
        paid = Decimal(amount) if status is EntryStatus.PAID else Decimal(0)
        return BillEntry("w", ADDR, "a", usage("1", "2"), Decimal(1), Decimal(2), Decimal(amount), status.value, None,
                         None, paid)

    bill = Bill((entry(EntryStatus.PAID, "0.5"), entry(EntryStatus.REJECTED, "9"), entry(EntryStatus.PAID, "0.25")),
                "erc20-devnet-glm", ADDR)
    assert bill.total == Decimal("0.75")
    text = str(bill)
    assert "rejected" in text and "total paid: 0.75 GLM" in text


class RecordingMarket:
    """Stands in for the market's answers only; the payment below is real, on the devnet."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, str]] = []

    async def accept(self, document: object, amount: Decimal) -> None:
        self.answers.append(("accept", str(amount)))

    async def reject(self, document: object, reason: str) -> None:
        self.answers.append(("reject", reason))

    async def notify_payment(self, payment: object) -> None:
        self.answers.append(("payment", str(payment.tx_hash)))  # type: ignore[attr-defined]


def test_a_late_invoice_is_paid_once_even_after_a_cancelled_wait_and_the_wait_frees_the_budget() -> None:
    import asyncio
    import time

    from eth_account import Account

    from golem_dask.payment.accountant import Accountant, max_due
    from golem_dask.payment.budget import Budget
    from golem_dask.payment.ethereum import EthereumPayer
    from golem_dask.protocol.messages import Invoice

    payee = Account.create().address

    async def main() -> None:
        payer = EthereumPayer.embedded(Decimal(2))
        budget = Budget(Decimal(2))
        budget.reserve("a1", Decimal(1))
        accountant = Accountant(payer, budget, Tolerance())
        acc = account(duration=10.0, observed_cpu="5", threads=1)
        acc.started, acc.stopped = time.time() - 10, time.time()
        acc.agreement = Agreement("a1", acc.agreement.demand, acc.agreement.offer, payer.address, payee, 0)
        accountant.accounts["a1"] = acc
        market = RecordingMarket()

        # A close that gives up waiting (its own timeout cancels the settle) leaves the
        # invoice to be paid when it comes, as the settle's own timeout does.
        waiting = asyncio.ensure_future(accountant.settle(market, "a1", 60))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert acc.status is EntryStatus.AWAITING_INVOICE
        # No invoice in time: nothing paid, and only what an invoice could rightly ask stays held.
        await accountant.settle(market, "a1", 0.05)
        assert acc.status is EntryStatus.AWAITING_INVOICE and acc.amount == 0
        held = max_due(acc, Tolerance())
        assert Decimal(0) < held < Decimal(1) and budget.reserved_for("a1") == held
        assert budget.remaining == Decimal(2) - held

        u = usage("5", "10")
        invoice = Invoice("a1", ("act",), u, PRICING.cost(u), payee, payer.address, payee, payer.address, "devnet")
        await accountant.on_document(market, invoice)
        await asyncio.gather(*accountant._late)
        assert acc.status is EntryStatus.PAID and acc.amount == PRICING.cost(u), acc.reason
        # A second settle (say, at close) and the invoice re-sent pay nothing more: the
        # provider is told again of the payment it may have missed; another invoice for
        # the same agreement is rejected.
        await accountant.settle(market, "a1", 0.05)
        await accountant.on_document(market, invoice)
        assert market.answers[-1] == ("payment", acc.tx_hash)
        other = Invoice("a1", ("act",), u, PRICING.cost(u), payee, payer.address, payee, payer.address, "devnet")
        await accountant.on_document(market, other)
        assert await payer.balance(payee) == PRICING.cost(u)
        assert market.answers[-1][0] == "reject" and budget.reserved_for("a1") == 0
        assert budget.spent == PRICING.cost(u)
        await payer.close()

    asyncio.run(main())


def test_cpu_is_metered_by_running_agreement_for_any_worker_the_scheduler_knows() -> None:
    """Under adapt, SpecCluster lists a batch's workers only once the whole batch is up;
    a worker that runs tasks before then is still metered (by its running agreement)."""
    import asyncio
    from types import SimpleNamespace

    from golem_dask.worker import meter_cpu

    def account(worker: str, status: EntryStatus) -> SimpleNamespace:
        return SimpleNamespace(worker=worker, agreement=SimpleNamespace(id=f"agr-{worker}"), status=status)

    observed: dict[str, Decimal] = {}
    accountant = SimpleNamespace(
        accounts={"a": account("golem-7", EntryStatus.RUNNING), "b": account("golem-8", EntryStatus.PAID)},
        observe_cpu=lambda agreement_id, cpu: observed.__setitem__(agreement_id,
                                                                  observed.get(agreement_id, Decimal(0)) + cpu))
    scheduler = SimpleNamespace(workers={
        "tcp://a": SimpleNamespace(name="golem-7", metrics={"cpu": 150.0}),
        "tcp://b": SimpleNamespace(name="golem-8", metrics={"cpu": 100.0}),  # paid: no longer metered
        "tcp://c": SimpleNamespace(name="someone-else", metrics={"cpu": 100.0}),
    })

    async def run() -> None:
        task = asyncio.ensure_future(meter_cpu(lambda: scheduler, accountant, 0.05))  # type: ignore[arg-type]
        await asyncio.sleep(0.32)
        task.cancel()

    import time

    started = time.monotonic()
    asyncio.run(run())
    ran = Decimal(str(round(time.monotonic() - started, 3))) + Decimal("0.002")
    assert set(observed) == {"agr-golem-7"}
    assert Decimal(0) < observed["agr-golem-7"] <= Decimal("1.5") * ran  # 1.5 CPUs, at most while it ran


def test_a_payer_without_a_ledger_does_not_promise_payments_as_it_goes() -> None:
    """Providers end agreements whose accepted debit notes go unpaid: a payer that cannot
    pay them mid-run (no ledger) must not put the terms in the demand."""
    from types import SimpleNamespace

    import dask

    from golem_dask.events import EventLog
    from golem_dask.market.demand import DemandSpec
    from golem_dask.protocol import properties as P
    from golem_dask.upkeep import payable_terms

    with dask.config.set({"golem.payment.pay-interval": "10m"}):
        spec = DemandSpec.from_kwargs(cpu=1, memory="1GiB")
    assert spec.payment_interval_s == 600
    events = EventLog()
    from golem_dask.payment.ledger import Ledger

    kept = payable_terms(spec, SimpleNamespace(ledger=Ledger(":memory:")), events)
    on_yagna = payable_terms(spec, SimpleNamespace(daemon=object()), events)  # the daemon pays accepted debit notes
    assert kept is spec and on_yagna is spec and not events.of_kind("warning")
    stripped = payable_terms(spec, SimpleNamespace(ledger=object()), events)  # not a ledger: as the Accountant sees it
    assert stripped.payment_interval_s is None and P.PAYMENT_TIMEOUT not in stripped.build("0xabc", 0).properties
    assert stripped.reserve_s == spec.lifetime_s  # the budget then reserves the whole lifetime
    assert "keeps no ledger" in str(events.of_kind("warning")[0])


def test_an_invoice_owed_in_part_is_rejected_on_a_market_that_takes_it_whole_or_not() -> None:
    """The budget covers only part of an invoice: a market that accepts a part is told that
    part and it is paid; the yagna daemon refuses a part (400), so there it is rejected,
    with the reason, rather than left neither accepted nor paid."""
    import asyncio
    import time

    from eth_account import Account

    from golem_dask.payment.accountant import Accountant
    from golem_dask.payment.budget import Budget
    from golem_dask.payment.ethereum import EthereumPayer
    from golem_dask.protocol.messages import Invoice

    class WholeOnly(RecordingMarket):
        accepts_part = False

    def settle(market: RecordingMarket) -> tuple[AgreementAccount, Decimal]:
        async def main() -> tuple[AgreementAccount, Decimal]:
            payee = Account.create().address
            payer = EthereumPayer.embedded(Decimal(2))
            budget = Budget(Decimal("0.0004"))
            budget.reserve("a1", Decimal("0.0004"))
            accountant = Accountant(payer, budget, Tolerance())
            acc = account(duration=10.0, observed_cpu="5", threads=1)
            acc.started, acc.stopped = time.time() - 10, time.time()
            acc.agreement = Agreement("a1", acc.agreement.demand, acc.agreement.offer, payer.address, payee, 0)
            accountant.accounts["a1"] = acc
            u = usage("5", "10")
            invoice = Invoice("a1", ("act",), u, PRICING.cost(u), payee, payer.address, payee, payer.address, "devnet")
            await accountant.on_document(market, invoice)
            await accountant.settle(market, "a1", 1)
            paid = await payer.balance(payee)
            await payer.close()
            return acc, paid

        return asyncio.run(main())

    assert PRICING.cost(usage("5", "10")) > Decimal("0.0004")
    partial = RecordingMarket()
    acc, paid = settle(partial)
    assert partial.answers[0] == ("accept", "0.0004") and paid == Decimal("0.0004") and acc.status is EntryStatus.PAID
    whole = WholeOnly()
    acc, paid = settle(whole)
    assert [a[0] for a in whole.answers] == ["reject"] and paid == 0 and acc.status is EntryStatus.REJECTED
    assert "budget" in whole.answers[0][1] and "whole or not" in whole.answers[0][1]


def test_without_a_ledger_a_late_invoice_pays_only_what_its_accepted_debit_notes_did_not() -> None:
    """As on the yagna daemon (the payer keeps no ledger): a debit note paid when the invoice
    was late counts against the invoice that comes after; the bill and the budget show the
    invoice's amount once, not the note's on top."""
    import asyncio
    import time

    from golem_dask.payment.accountant import Accountant
    from golem_dask.payment.base import Transfer
    from golem_dask.payment.budget import Budget
    from golem_dask.protocol.messages import DebitNote, Invoice

    class DaemonPayer:  # pays what it is asked; keeps no ledger
        address, platform = "0x" + "22" * 20, "erc20-hoodi-tglm"

        def __init__(self) -> None:
            self.paid: list[Decimal] = []

        async def pay(self, payee: str, amount: Decimal, *, reference: str, agreement_id: str | None = None) -> Transfer:
            self.paid.append(amount)
            return Transfer(payee, int(amount * 10**18), "0x" + "ab" * 32, 0)

    async def main() -> tuple[AgreementAccount, DaemonPayer, Budget]:
        payer = DaemonPayer()
        budget = Budget(Decimal(1))
        budget.reserve("a1", Decimal("0.5"))
        accountant = Accountant(payer, budget, Tolerance())  # type: ignore[arg-type]
        acc = account(duration=10.0, observed_cpu="5", threads=1)
        acc.started, acc.stopped = time.time() - 10, time.time()
        accountant.accounts["a1"] = acc
        market = RecordingMarket()
        half = usage("2", "5")
        await accountant.on_document(market, DebitNote("a1", "act", half, PRICING.cost(half), ADDR, payer.address))
        await accountant.settle(market, "a1", 0.05)  # late: the accepted note is paid
        u = usage("5", "10")
        invoice = Invoice("a1", ("act",), u, PRICING.cost(u), ADDR, payer.address, ADDR, payer.address, "p")
        await accountant.on_document(market, invoice)
        await asyncio.gather(*accountant._late)
        return acc, payer, budget

    acc, payer, budget = asyncio.run(main())
    note, whole = PRICING.cost(usage("2", "5")), PRICING.cost(usage("5", "10"))
    assert payer.paid == [note, whole - note]
    assert acc.status is EntryStatus.PAID and acc.paid == whole and budget.spent == whole
