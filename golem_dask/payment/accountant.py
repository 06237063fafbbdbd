"""The requestor's accountant: its own metering, checked bills, the budget, the bill.

For every agreement the accountant keeps what the requestor itself saw: when the
activity started and stopped (wall clock on the requestor's side) and how much CPU the
worker reported to the scheduler.  A provider's debit note or invoice is accepted only
if its usage fits within that metering (with a configurable tolerance) and its amount
is exactly the agreed price of its usage.  Accepted invoices are paid through the
:class:`~golem_dask.payment.base.Payer`; rejected ones are not, and the reason goes into
the bill.

The budget is an allocation: signing an agreement reserves its worst-case cost, paying
it releases what was not used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from golem_dask.errors import PaymentError
from golem_dask.payment.base import Payer
from golem_dask.chain.units import from_wei, to_wei
from golem_dask.payment.bill import Bill, BillEntry, EntryStatus, plain
from golem_dask.payment.budget import Budget
from golem_dask.payment.commitments import Commitments
from golem_dask.payment.ledger import Ledger
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Agreement, DebitNote, Invoice, Payment
from golem_dask.tasks import Tasks

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AgreementAccount:
    """What the requestor knows about one agreement's cost."""

    agreement: Agreement
    pricing: LinearPricing
    worker: str
    threads: int
    started: float | None = None
    stopped: float | None = None
    observed_cpu_sec: Decimal = Decimal(0)
    invoice: Invoice | None = None
    last_debit_note: DebitNote | None = None
    status: EntryStatus = EntryStatus.RUNNING
    reason: str | None = None
    amount: Decimal = Decimal(0)
    paid: Decimal = Decimal(0)
    tx_hash: str | None = None
    #: What the budget holds for it at signing, held again after each mid-run payment.
    reserve: Decimal = Decimal(0)
    #: Share of its threads the worker was caught delivering (None: not caught).
    delivered_share: Decimal | None = None
    invoice_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    checking: asyncio.Lock = field(default_factory=asyncio.Lock)  # one check and payment at a time

    def duration(self, now: float | None = None) -> Decimal:
        if self.started is None:
            return Decimal(0)
        end = self.stopped if self.stopped is not None else (now or time.time())
        return Decimal(str(round(end - self.started, 3)))


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far a provider's usage may exceed the requestor's own metering."""

    relative: Decimal = Decimal("0.25")
    cpu_allowance_sec: Decimal = Decimal(5)
    duration_allowance_sec: Decimal = Decimal(2)
    #: How far an amount may differ from the exact price of its usage: providers that
    #: compute in binary floating point (yagna's) differ in the last digits.
    price_rounding: Decimal = Decimal("1e-12")


def _allowed_duration(account: AgreementAccount, tolerance: Tolerance) -> Decimal:
    """The most duration a provider may claim: our metering plus the tolerance."""
    return account.duration() * (1 + tolerance.relative) + tolerance.duration_allowance_sec


def _allowed_cpu(account: AgreementAccount, tolerance: Tolerance, duration: Decimal) -> Decimal:
    """The most CPU a provider may claim over ``duration``: what its threads could do and
    what the scheduler saw, each plus the tolerance, whichever is less."""
    physical = duration * account.threads * (1 + tolerance.relative) + tolerance.cpu_allowance_sec
    observed = account.observed_cpu_sec * (1 + tolerance.relative) + tolerance.cpu_allowance_sec
    return min(physical, observed)


def check_usage(
    usage: Mapping[str, Decimal],
    amount: Decimal,
    account: AgreementAccount,
    tolerance: Tolerance,
) -> str | None:
    """Why a provider's claimed usage or amount is wrong, or ``None`` if it is right.

    Pure: reads the account, changes nothing.
    """
    try:
        cpu = Decimal(usage.get(P.USAGE_CPU_SEC, 0))
        duration = Decimal(usage.get(P.USAGE_DURATION_SEC, 0))
    except ArithmeticError:
        return "usage counters are not numbers"
    if cpu < 0 or duration < 0:
        return "negative usage"
    expected = account.pricing.cost(usage)
    if abs(amount - expected) > expected * tolerance.price_rounding + _ROUNDING_FLOOR:
        return f"amount {amount} is not the agreed price of its usage ({expected})"
    ours = account.duration()
    max_duration = _allowed_duration(account, tolerance)
    if duration > max_duration:
        return f"duration_sec {duration} exceeds our metering ({ours}s, allowed {max_duration.normalize()})"
    max_cpu = _allowed_cpu(account, tolerance, duration)
    if cpu > max_cpu:
        return (
            f"cpu_sec {cpu} exceeds our metering (scheduler saw {account.observed_cpu_sec} cpu-seconds "
            f"on {account.threads} threads over {duration}s; allowed {max_cpu.normalize()})"
        )
    return None


#: Absolute slack on an amount (a thousand wei), for prices near zero.
_ROUNDING_FLOOR = Decimal("1e-15")


def check_amount(amount: Decimal, account: AgreementAccount, tolerance: Tolerance) -> str | None:
    """Why an invoice that states no usage (the yagna daemon's) asks too much, or ``None``.

    Its amount may be at most what our own metering allows (:func:`max_due`).
    """
    most = max_due(account, tolerance)
    if amount > most + _ROUNDING_FLOOR:
        return (f"amount {amount} exceeds what our metering allows ({most.normalize()} for "
                f"{account.duration()}s and {account.observed_cpu_sec} cpu-seconds seen)")
    return None


def delivered_cap(invoice: Invoice, account: AgreementAccount, tolerance: Tolerance) -> Decimal:
    """The most an invoice may be paid for a worker caught delivering a share of its
    threads: its CPU as billed, and that share (plus the tolerance) of the time billed."""
    share = min(Decimal(1), (account.delivered_share or Decimal(1)) * (1 + tolerance.relative))
    if not invoice.usage:  # the yagna daemon's invoices state no usage
        return min(invoice.amount, max_due(account, tolerance) * share)
    usage = dict(invoice.usage)
    usage[P.USAGE_DURATION_SEC] = Decimal(usage.get(P.USAGE_DURATION_SEC, 0)) * share
    return min(invoice.amount, account.pricing.cost(usage))


async def _tell(call: Any, what: str) -> Any:
    """Deliver an answer to a provider, best effort: it may be gone, and what we decided is
    already recorded (a provider re-sends what it has no answer for)."""
    try:
        return await call
    except Exception as e:
        logger.warning("%s failed (the provider may be gone): %s", what, e)
        return None


def max_due(account: AgreementAccount, tolerance: Tolerance) -> Decimal:
    """The largest invoice :func:`check_usage` could accept for ``account`` as metered now."""
    if account.started is None:
        return Decimal(0)  # an activity that never ran owes nothing
    duration = _allowed_duration(account, tolerance)
    cpu = _allowed_cpu(account, tolerance, duration)
    return account.pricing.cost({P.USAGE_CPU_SEC: cpu, P.USAGE_DURATION_SEC: duration})


class Accountant:
    """Checks debit notes and invoices, pays accepted invoices, keeps the bill.

    Parameters
    ----------
    payer:
        Moves the money.
    budget:
        The allocation agreements are reserved against.
    tolerance:
        Slack allowed between a provider's usage and ours.
    """

    def __init__(self, payer: Payer, budget: Budget, tolerance: Tolerance, events: Any = None) -> None:
        self.payer = payer
        self.budget = budget
        self.tolerance = tolerance
        self.events = events
        self.accounts: dict[str, AgreementAccount] = {}
        self._late = Tasks()
        self.payments: list[Payment] = []
        #: Called with an agreement id when the budget cannot reserve its next payment period.
        self.on_exhausted: Callable[[str], Any] | None = None
        ledger = ledger_of(payer)
        #: Agreements signed and documents accepted, in the payer's ledger (None: a payer without one).
        self.commitments = Commitments(ledger) if ledger is not None else None

    def _emit(self, kind: str, message: str, **data: Any) -> None:
        if self.events is not None:
            self.events.emit(kind, message, **data)

    def open(self, agreement: Agreement, worker: str, reservation: str) -> AgreementAccount:
        """Start keeping an account for a newly signed agreement."""
        resources = P.Resources.from_properties(agreement.demand.properties)
        pricing = LinearPricing.from_properties(agreement.offer.properties)
        account = AgreementAccount(agreement=agreement, pricing=pricing, worker=worker, threads=resources.cpu_threads,
                                   reserve=self.budget.reserved_for(reservation))
        self.accounts[agreement.id] = account
        self.budget.rekey(reservation, agreement.id)
        if self.commitments is not None:
            self.commitments.sign(agreement, self.payer.platform)
        return account

    def activity_started(self, agreement_id: str) -> None:
        account = self.accounts[agreement_id]
        if account.started is None:
            account.started = time.time()

    def activity_stopped(self, agreement_id: str) -> None:
        account = self.accounts.get(agreement_id)
        if account is not None and account.started is not None and account.stopped is None:
            account.stopped = time.time()

    def delivered(self, agreement_id: str, share: Decimal) -> None:
        """The worker was caught delivering ``share`` of its threads: pay at most that share
        of the time it was sold (its CPU as measured)."""
        account = self.accounts.get(agreement_id)
        if account is not None:
            account.delivered_share = share

    def observe_cpu(self, agreement_id: str, cpu_sec: Decimal) -> None:
        """Add CPU seconds the scheduler saw a worker use."""
        account = self.accounts.get(agreement_id)
        if account is not None and account.stopped is None:
            account.observed_cpu_sec += cpu_sec

    async def answer(self, market: Any) -> None:
        """Answer every debit note and invoice ``market`` delivers, until its stream ends."""
        async for document in market.payment_events():
            try:
                await self.on_document(market, document)
            except Exception:
                logger.exception("could not answer %s", type(document).__name__)

    async def on_document(self, market: Any, document: DebitNote | Invoice) -> None:
        """Check one debit note or invoice from the market and answer it."""
        account = self.accounts.get(document.agreement_id)
        if account is None:
            if self.commitments is not None and self.commitments.agreement(document.agreement_id) is not None:
                # An earlier run signed it: 'golem-dask pay --hub' answers it against the ledger.
                logger.info("%s for agreement %s of an earlier run left for 'golem-dask pay'",
                            type(document).__name__, document.agreement_id)
                return
            await _tell(market.reject(document, "unknown agreement"), "rejecting a document")
            return
        if isinstance(document, DebitNote):
            reason = check_usage(document.usage, document.total_amount_due, account, self.tolerance)
            if reason is None:
                account.last_debit_note = document
                # Accepting is a promise to pay: on disk first, then the provider is told.
                self._commit(document.id, document.agreement_id, "debit-note", document.total_amount_due)
                await _tell(market.accept(document, document.total_amount_due), "accepting a debit note")
            else:
                self._emit("warning", f"rejected debit note from {account.worker}: {reason}")
                note = await _tell(market.reject(document, reason), "rejecting a debit note")
                account.reason = f"rejected debit note {document.id[:8]}: {reason}" + (f"; {note}" if note else "")
            return
        if account.invoice is not None:
            if document.id != account.invoice.id:
                await _tell(market.reject(document, f"agreement already invoiced by {account.invoice.id}"),
                            "rejecting a second invoice")
            elif account.settled.is_set():
                await answer_again(market, account, self.payments)
            return  # otherwise the same invoice re-sent while it is being answered
        account.invoice = document
        account.invoice_arrived.set()
        if account.status is EntryStatus.AWAITING_INVOICE and not account.settled.is_set():
            # settle() already gave up waiting; this late invoice is checked and paid now.
            self._late.spawn(self.settle(market, document.agreement_id, 0))

    async def pay_as_you_go(self, market: Any, interval_s: float) -> None:
        """Every ``interval_s``, pay what each running agreement's accepted debit notes say
        and is not paid yet; the payments of one round go out together (the payer batches
        them).  The invoice at the end pays only the rest.  Runs until cancelled.

        Only with a payer that keeps a ledger: accepting a debit note on the yagna daemon
        already orders the daemon to pay it.
        """
        if self.commitments is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            due = [a for a in self.accounts.values()
                   if a.status is EntryStatus.RUNNING and a.invoice is None and a.last_debit_note is not None]
            await asyncio.gather(*(self._pay_round(market, a) for a in due), return_exceptions=True)

    async def _pay_round(self, market: Any, account: AgreementAccount) -> None:
        async with account.checking:
            if account.invoice is None and not account.settled.is_set():
                await self._pay_accepted(market, account)

    async def settle(self, market: Any, agreement_id: str, timeout_s: float) -> AgreementAccount:
        """Wait for an agreement's invoice, check it, and pay it if it is right."""
        account = self.accounts[agreement_id]
        if account.settled.is_set():
            return account
        try:
            if not account.invoice_arrived.is_set():
                await asyncio.wait_for(account.invoice_arrived.wait(), timeout_s)
        except asyncio.CancelledError:  # the worker's close timed out: the invoice is paid when it comes
            account.status = EntryStatus.AWAITING_INVOICE
            raise
        except asyncio.TimeoutError:
            # Provider gone or slow: hold only what an invoice could rightly ask (metering plus
            # tolerance; on_document pays a late one), and pay the accepted debit notes now.
            held = max_due(account, self.tolerance)
            self.budget.shrink(agreement_id, held)
            account.status = EntryStatus.AWAITING_INVOICE
            async with account.checking:
                paid = await self._pay_accepted(market, account)
            account.reason = (f"no invoice within {timeout_s}s" + (f"; paid {plain(paid)} GLM of accepted debit notes"
                              if paid else "") + f"; up to {plain(held)} GLM held for a late one")
            self._emit("warning", f"{account.worker}: no invoice within {timeout_s}s; "
                       + (f"paid its accepted debit notes ({plain(paid)} GLM), " if paid else "nothing paid yet, ")
                       + f"up to {plain(held)} GLM held in case it comes")
            return account
        async with account.checking:
            if account.settled.is_set() or account.status is EntryStatus.FAILED:
                return account  # another settle() got here first
            return await self._check_and_pay(market, account)

    async def _check_and_pay(self, market: Any, account: AgreementAccount) -> AgreementAccount:
        agreement_id = account.agreement.id
        invoice = account.invoice
        assert invoice is not None
        account.stopped = account.stopped or time.time()
        if account.started is None and invoice.amount > 0:
            reason: str | None = "the worker never ran: nothing is owed for an activity that failed to start"
        elif invoice.usage:
            reason = check_usage(invoice.usage, invoice.amount, account, self.tolerance)
        else:
            reason = check_amount(invoice.amount, account, self.tolerance)
        if reason is None and invoice.payee_addr != account.agreement.provider_id:
            reason = f"payee {invoice.payee_addr} is not the agreement's provider"
        if reason is not None:
            return await self._refuse(market, account, invoice, reason)
        accepted = invoice.amount
        if account.delivered_share is not None:
            accepted = min(accepted, delivered_cap(invoice, account, self.tolerance))
            if accepted < invoice.amount:
                account.reason = (f"accepted {plain(accepted)} of {plain(invoice.amount)} GLM: it delivered "
                                  f"{account.delivered_share:.0%} of the threads it sold")
                self._emit("invoice", f"{account.worker}: {account.reason}")
        holds = budget_holds(account, self.budget)
        if accepted > holds:
            account.reason = (f"accepted {plain(holds)} of {plain(invoice.amount)} GLM: the budget of "
                              f"{plain(self.budget.total)} GLM is spent")
            self._emit("budget", f"{account.worker}: {account.reason}")
            accepted = holds
        if accepted < invoice.amount and not getattr(market, "accepts_part", True):
            return await self._refuse(market, account, invoice, f"{account.reason}; this market takes it whole or not")
        account.amount = accepted
        self._commit(invoice.id, agreement_id, "invoice", accepted)
        await _tell(market.accept(invoice, accepted), "accepting an invoice")
        due = accepted - self._committed(agreement_id)
        if due <= 0:
            account.status = EntryStatus.NOTHING_DUE if invoice.amount == 0 else EntryStatus.PAID
            self.budget.settle(agreement_id, Decimal(0))  # what was paid before is spent already
            self._close(agreement_id)
            account.settled.set()
            return account
        await self._pay(market, account, invoice, due)
        return account

    async def _refuse(self, market: Any, account: AgreementAccount, invoice: Invoice, reason: str) -> AgreementAccount:
        account.status, account.reason = EntryStatus.REJECTED, reason
        self.budget.release(account.agreement.id)
        self._emit("invoice", f"rejected invoice of {invoice.amount} GLM from {account.worker}: {reason}")
        self._close(account.agreement.id)
        await _tell(market.reject(invoice, reason), "rejecting an invoice")
        account.settled.set()
        return account

    async def _pay_accepted(self, market: Any, account: AgreementAccount) -> Decimal:
        """Pay the last accepted debit note of an agreement whose invoice did not come (a
        provider that died is paid for the time its notes showed); what this paid."""
        note = account.last_debit_note
        if note is None:
            return Decimal(0)
        due = note.total_amount_due - self._committed(note.agreement_id)
        if due <= 0:
            return Decimal(0)
        try:
            transfer = await self.payer.pay(account.agreement.provider_id, due, reference=note.id,
                                            agreement_id=note.agreement_id)
        except PaymentError as e:
            self._emit("warning", f"paying {due} GLM of accepted debit notes to {account.worker} failed: {e}")
            return Decimal(0)
        account.paid += due
        account.tx_hash = transfer.tx_hash
        self.budget.spend(note.agreement_id, due)
        if not self.budget.top_up(note.agreement_id, account.reserve) and self.on_exhausted is not None:
            self._emit("budget", f"the budget left ({self.budget.remaining} GLM) cannot reserve the next payment "
                       f"period of {account.worker} ({account.reserve} GLM): retiring it")
            self.on_exhausted(note.agreement_id)
        payment = Payment(self.payer.address, account.agreement.provider_id, due, self.payer.platform, (note.id,),
                          transfer.tx_hash, agreement_ids=(note.agreement_id,))
        self.payments.append(payment)
        self._emit("payment", f"paid {due} GLM to {account.agreement.provider_id} for {account.worker}'s accepted "
                   f"debit notes in {transfer.tx_hash}", amount=due, tx_hash=transfer.tx_hash)
        await _tell(market.notify_payment(payment), f"announcing payment {transfer.tx_hash}")
        return due

    def _commit(self, document_id: str, agreement_id: str, kind: str, amount: Decimal) -> None:
        if self.commitments is not None:
            self.commitments.accept(document_id, agreement_id, kind, to_wei(amount))

    def _committed(self, agreement_id: str) -> Decimal:
        """Already owed or paid for an agreement (by an earlier run, from accepted debit notes);
        without a ledger (the yagna daemon keeps it), what this run paid for it."""
        if self.commitments is None:
            return self.accounts[agreement_id].paid if agreement_id in self.accounts else Decimal(0)
        return from_wei(self.commitments.ledger.committed_wei(agreement_id))

    def _close(self, agreement_id: str) -> None:
        if self.commitments is not None:
            self.commitments.close(agreement_id)

    async def _pay(self, market: Any, account: AgreementAccount, invoice: Invoice, due: Decimal) -> None:
        try:
            transfer = await self.payer.pay(invoice.payee_addr, due, reference=invoice.id,
                                            agreement_id=invoice.agreement_id)
        except PaymentError as e:
            account.status = EntryStatus.FAILED
            account.reason = str(e)
            self._emit("warning", f"payment of {due} GLM to {invoice.payee_addr} failed: {e}")
            return
        account.status = EntryStatus.PAID
        account.paid += due
        account.tx_hash = transfer.tx_hash
        self.budget.settle(account.agreement.id, due)
        self._close(account.agreement.id)
        payment = Payment(
            payer_addr=self.payer.address,
            payee_addr=invoice.payee_addr,
            amount=due,
            payment_platform=self.payer.platform,
            invoice_ids=(invoice.id,),
            tx_hash=transfer.tx_hash,
            agreement_ids=(invoice.agreement_id,),
        )
        self.payments.append(payment)
        account.settled.set()
        self._emit("payment", f"paid {due} GLM to {invoice.payee_addr} for {account.worker} in {transfer.tx_hash}",
                   amount=due, tx_hash=transfer.tx_hash)
        # The money moved; telling the provider is best effort (it checks the chain anyway).
        await _tell(market.notify_payment(payment), f"announcing payment {transfer.tx_hash}")

    def bill(self) -> Bill:
        return bill_of(self.accounts.values(), self.payer)


async def answer_again(market: Any, account: AgreementAccount, payments: list[Payment]) -> None:
    """A provider re-sent an invoice already answered: it missed the answer, tell it again."""
    invoice = account.invoice
    assert invoice is not None
    if account.status is EntryStatus.REJECTED:
        await _tell(market.reject(invoice, account.reason or "rejected"), "rejecting an invoice again")
        return
    for payment in payments:
        if invoice.id in payment.invoice_ids:
            await _tell(market.notify_payment(payment), f"announcing payment {payment.tx_hash} again")


def budget_holds(account: AgreementAccount, budget: Budget) -> Decimal:
    """The most an agreement can be paid in all without passing the budget (a worker retired
    because the budget ran out may have run on while it handed its data over)."""
    return account.paid + budget.reserved_for(account.agreement.id) + max(Decimal(0), budget.remaining)


def ledger_of(payer: Payer) -> Ledger | None:
    """The payer's durable ledger, if it keeps one: paying accepted debit notes as the work
    goes needs it (it records each promise before the provider hears it)."""
    ledger = getattr(payer, "ledger", None)
    return ledger if isinstance(ledger, Ledger) else None


def bill_of(accounts: Iterable[AgreementAccount], payer: Payer) -> Bill:
    """The bill: one entry per agreement, with what was asked, accepted and paid."""
    entries = []
    for account in accounts:
        invoice, note = account.invoice, account.last_debit_note
        usage = dict(invoice.usage) if invoice else (dict(note.usage) if note else {})
        entries.append(BillEntry(
            worker=account.worker,
            provider=account.agreement.provider_id,
            agreement_id=account.agreement.id,
            usage=usage,
            observed_cpu_sec=account.observed_cpu_sec,
            observed_duration_sec=account.duration(),
            amount=account.amount or (invoice.amount if invoice else account.paid),
            status=account.status.value,
            tx_hash=account.tx_hash,
            reason=account.reason,
            paid=account.paid,
            started=account.started,
            stopped=account.stopped,
        ))
    return Bill(tuple(entries), payer.platform, payer.address)
