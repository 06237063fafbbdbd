"""The order in which golem-dask accepts a yagna agreement's documents, against a recorded
daemon: the daemon pays a debit note and an invoice accepted for one payment cycle both in
full, so an invoice waits until the accepted debit notes are paid; and a document the daemon
fails to serve once is asked for again."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import dask

from golem_dask.protocol.messages import DebitNote, Invoice
from golem_dask.yagna.documents import Documents


class RecordedDaemon:
    """The part of YagnaDaemon that Documents uses; debit notes settle after two cycles."""

    def __init__(self) -> None:
        self.api = self
        self.calls: list[str] = []
        self.cycles = 0
        self.cycle_unsupported = False

    async def allocation(self) -> str:
        return "allocation-1"

    async def run_cycle(self) -> None:
        self.cycles += 1
        self.calls.append("cycle")

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append(f"{method} {path}")
        if method == "GET" and path.startswith("/payment-api/v1/debitNotes/"):
            return {"status": "SETTLED" if self.cycles >= 2 else "ACCEPTED"}
        return None


def note(agreement: str, amount: str) -> DebitNote:
    return DebitNote(agreement_id=agreement, activity_id="act", usage={}, total_amount_due=Decimal(amount),
                     issuer_id="0xp", recipient_id="0xr")


def invoice(agreement: str, amount: str) -> Invoice:
    return Invoice(agreement_id=agreement, activity_ids=("act",), usage={}, amount=Decimal(amount), issuer_id="0xp",
                   recipient_id="0xr", payee_addr="0xp", payer_addr="0xr", payment_platform="erc20-hoodi-tglm")


def documents(daemon: RecordedDaemon) -> Documents:
    return Documents(daemon, lambda agreement_id: [], lambda agreement_id, reason: None)  # type: ignore[arg-type]


def test_an_invoice_is_accepted_only_after_the_accepted_debit_notes_are_paid() -> None:
    daemon = RecordedDaemon()
    docs = documents(daemon)
    first, bill = note("agr", "1"), invoice("agr", "3")
    with dask.config.set({"golem.yagna.payment-poll-interval": "1ms"}):
        asyncio.run(docs.accept(first, Decimal(1)))
        asyncio.run(docs.accept(bill, Decimal(3)))
    accept_note = f"POST /payment-api/v1/debitNotes/{first.id}/accept"
    accept_invoice = f"POST /payment-api/v1/invoices/{bill.id}/accept"
    assert daemon.calls.index(accept_note) < daemon.calls.index("cycle")
    polls = [i for i, c in enumerate(daemon.calls) if c == f"GET /payment-api/v1/debitNotes/{first.id}"]
    assert len(polls) == 2 and polls[-1] < daemon.calls.index(accept_invoice) == len(daemon.calls) - 1


def test_a_debit_note_arriving_with_or_after_its_invoice_is_left_to_the_invoice() -> None:
    daemon = RecordedDaemon()
    docs = documents(daemon)
    docs._invoiced.add("agr")  # what the event pump records when the invoice arrives
    late = note("agr", "2")
    asyncio.run(docs.accept(late, Decimal(2)))
    assert daemon.calls == []


def test_an_invoice_acceptance_outlives_a_cancelled_caller_and_close_waits_for_it() -> None:
    daemon = RecordedDaemon()
    docs = documents(daemon)
    first, bill = note("agr", "1"), invoice("agr", "3")

    async def main() -> None:
        await docs.accept(first, Decimal(1))
        caller = asyncio.ensure_future(docs.accept(bill, Decimal(3)))
        await asyncio.sleep(0.005)  # inside the wait for the debit note's payment
        caller.cancel()  # a worker's close at its timeout
        await asyncio.gather(caller, return_exceptions=True)
        assert f"POST /payment-api/v1/invoices/{bill.id}/accept" not in daemon.calls
        await docs.close()

    with dask.config.set({"golem.yagna.payment-poll-interval": "20ms"}):
        asyncio.run(main())
    assert daemon.calls[-1] == f"POST /payment-api/v1/invoices/{bill.id}/accept"


class FlakyDaemon(RecordedDaemon):
    """An invoice event whose document the daemon cannot serve at the first asking."""

    def __init__(self) -> None:
        super().__init__()
        from datetime import UTC, datetime

        self.since = datetime(2025, 12, 31, tzinfo=UTC)
        self.failures = 1

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        from golem_dask.errors import NetworkError

        self.calls.append(f"{method} {path}")
        if path == "/payment-api/v1/invoiceEvents":
            if kwargs["params"]["afterTimestamp"] >= "2026-01-01T00:00:01Z":
                await asyncio.sleep(3600)  # nothing newer: the long poll waits
            return [{"eventType": "InvoiceReceivedEvent", "invoiceId": "inv-1", "eventDate": "2026-01-01T00:00:01Z"}]
        if path == "/payment-api/v1/invoices/inv-1":
            if self.failures:
                self.failures -= 1
                raise NetworkError("connection reset by the daemon")
            return {"invoiceId": "inv-1", "agreementId": "agr", "amount": "3", "issuerId": "0x" + "11" * 20,
                    "recipientId": "0x" + "22" * 20, "payeeAddr": "0x" + "11" * 20, "payerAddr": "0x" + "22" * 20,
                    "paymentPlatform": "erc20-hoodi-tglm", "timestamp": "2026-01-01T00:00:01Z"}
        if path == "/payment-api/v1/debitNoteEvents":
            await asyncio.sleep(3600)
        return None


def test_a_document_the_daemon_fails_to_serve_once_is_asked_for_again() -> None:
    daemon = FlakyDaemon()
    docs = documents(daemon)

    async def main() -> Any:
        docs.start()
        try:
            return await asyncio.wait_for(anext(docs.events()), 10)
        finally:
            await docs.close()

    received = asyncio.run(main())
    assert isinstance(received, Invoice) and received.id == "inv-1" and received.amount == Decimal(3)
    assert daemon.calls.count("GET /payment-api/v1/invoices/inv-1") == 2
