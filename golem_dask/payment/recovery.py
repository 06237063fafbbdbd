"""Paying, after a crash, what a requestor owes for the agreements its ledger recorded.

A requestor that dies (SIGKILL, a lost machine) before its invoices arrive has promised
money it did not pay: every accepted debit note.  :class:`Recovery` (``golem-dask pay``)
first pays those (:func:`~golem_dask.payment.commitments.recover_debts`); connected to the
market (``golem-dask pay --hub``), it then answers the invoices providers re-send for
those agreements, checked against the terms the requestor signed (its own metering died
with it) and paying only what is not paid yet, so every agreement that ran is paid once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from golem_dask.chain.units import from_wei, to_wei
from golem_dask.errors import PaymentError
from golem_dask.payment.commitments import Commitments, recover_debts
from golem_dask.payment.ledger import PAID
from golem_dask.protocol import properties as P
from golem_dask.protocol.messages import Agreement, Invoice, Payment
from golem_dask.protocol.pricing import LinearPricing

logger = logging.getLogger(__name__)


def check_against_terms(invoice: Invoice, agreement: Agreement, relative: Decimal, allowance_s: Decimal) -> str | None:
    """Why ``invoice`` is wrong by the agreement's own terms, or None: the price of its
    usage, its payee, and usage no larger than the agreement's threads over its lifetime
    (plus the tolerance) could produce."""
    if invoice.payee_addr != agreement.provider_id or invoice.issuer_id != agreement.provider_id:
        return f"payee {invoice.payee_addr} is not the agreement's provider"
    pricing = LinearPricing.from_properties(agreement.offer.properties)
    if invoice.amount != pricing.cost(invoice.usage):
        return f"amount {invoice.amount} is not the agreed price of its usage ({pricing.cost(invoice.usage)})"
    if agreement.approved_at_ms is None:
        return "the ledger holds no approval of this agreement"
    lifetime = Decimal(max(0, agreement.valid_to_ms - agreement.approved_at_ms)) / 1000
    duration = Decimal(invoice.usage.get(P.USAGE_DURATION_SEC, 0))
    cpu = Decimal(invoice.usage.get(P.USAGE_CPU_SEC, 0))
    threads = int(agreement.demand.properties.get(P.CPU_THREADS, 1))
    if duration > lifetime * (1 + relative) + allowance_s:
        return f"duration_sec {duration} is longer than the agreement ({lifetime}s)"
    if cpu > duration * threads * (1 + relative) + allowance_s:
        return f"cpu_sec {cpu} is more than {threads} threads give in {duration}s"
    return None


@dataclass(slots=True)
class RecoveryReport:
    """What a recovery did."""

    recovered: list[str] = field(default_factory=list)  # debit notes turned into debts
    invoices_paid: list[str] = field(default_factory=list)
    invoices_rejected: dict[str, str] = field(default_factory=dict)


class Recovery:
    """Settles a requestor's recorded commitments after a crash.

    Parameters
    ----------
    payer:
        The requestor's payer (an :class:`~golem_dask.payment.ethereum.EthereumPayer`
        with the file ledger the crashed run used).
    market:
        A market reaching the providers (for their re-sent invoices), or None; start it
        after making the Recovery, which tells it the agreements to expect.
    relative, allowance_s:
        The slack allowed over the agreement's terms (``golem.payment.usage-tolerance``
        and ``duration-allowance``).
    """

    def __init__(self, payer: Any, market: Any = None, relative: Decimal = Decimal("0.25"),
                 allowance_s: Decimal = Decimal(2)) -> None:
        self.payer = payer
        self.market = market
        self.book = Commitments(payer.ledger)
        self.relative = relative
        self.allowance_s = allowance_s
        self.report = RecoveryReport()
        if market is not None:  # before the market starts: a hub delivers what it kept at once
            for agreement, _ in self.book.open_agreements(payer.address):
                market.adopt(agreement)

    async def pay_accepted(self) -> None:
        """Owe and pay what was accepted but not paid, and tell the providers."""
        self.report.recovered = await asyncio.to_thread(recover_debts, self.book, self.payer.address)
        await self.payer.settle()
        for document_id in self.report.recovered:
            debt = self.payer.ledger.debt_for_invoice(document_id)
            if debt.status == PAID and self.market is not None:
                await self._announce(debt.invoice_id, debt.agreement_id, debt.payee, from_wei(debt.amount_wei))

    async def answer_invoices(self, wait_s: float) -> None:
        """Answer the invoices providers send for open agreements during ``wait_s`` seconds,
        or until every open agreement is closed."""
        if self.market is None:
            return
        open_ids = {a.id for a, _ in self.book.open_agreements(self.payer.address)}
        if not open_ids:
            return
        events = self.market.payment_events()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while open_ids and loop.time() < deadline:
            try:
                document = await asyncio.wait_for(events.__anext__(), deadline - loop.time())
            except (asyncio.TimeoutError, StopAsyncIteration):
                break
            if isinstance(document, Invoice) and document.agreement_id in open_ids:
                if await self._answer(document):
                    open_ids.discard(document.agreement_id)

    async def _answer(self, invoice: Invoice) -> bool:
        found = self.book.agreement(invoice.agreement_id)
        if found is None:
            return False
        agreement, platform = found
        reason = check_against_terms(invoice, agreement, self.relative, self.allowance_s)
        if reason is not None:
            self.report.invoices_rejected[invoice.id] = reason
            self.book.close(agreement.id)
            with contextlib.suppress(Exception):
                await self.market.reject(invoice, reason)
            return True
        self.book.accept(invoice.id, agreement.id, "invoice", to_wei(invoice.amount))
        with contextlib.suppress(Exception):
            await self.market.accept(invoice, invoice.amount)
        due = invoice.amount - from_wei(self.payer.ledger.committed_wei(agreement.id))
        if due > 0:
            try:
                await self.payer.pay(invoice.payee_addr, due, reference=invoice.id, agreement_id=agreement.id)
            except PaymentError as e:
                logger.warning("paying invoice %s failed: %s; 'golem-dask pay' retries", invoice.id, e)
                return False
            await self._announce(invoice.id, agreement.id, invoice.payee_addr, due)
        self.book.close(agreement.id)
        self.report.invoices_paid.append(invoice.id)
        return True

    async def _announce(self, document_id: str, agreement_id: str, payee: str, amount: Decimal) -> None:
        debt = self.payer.ledger.debt_for_invoice(document_id)
        record = self.payer.ledger.payment(debt.payment_id) if debt.payment_id else None
        if record is None or record.confirmed_hash is None:
            return
        payment = Payment(self.payer.address, payee, amount, self.payer.platform, (document_id,),
                          record.confirmed_hash, agreement_ids=(agreement_id,))
        with contextlib.suppress(Exception):  # the provider checks the chain; telling it is best effort
            await self.market.notify_payment(payment)
