"""Debit notes and invoices through the yagna daemon: received, accepted, rejected.

Accepting a document on the daemon is also the order to pay it: the daemon pays an
accepted debit note in its next payment cycle and an accepted invoice's remainder after
that, from the cluster's allocation.  A debit note the daemon cannot reject (0.17
answers 501) ends its agreement instead, so the provider stops working for nothing.

The daemon does not net a debit note against an invoice paid in the same cycle: both
are paid in full (seen with yagna 0.17.6).  So an invoice is accepted only once the
agreement's accepted debit notes are settled, and a debit note that arrives with or
after its agreement's invoice is left to the invoice, which covers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.errors import MarketError, NetworkError, ProtocolError
from golem_dask.market.base import PaymentDocument
from golem_dask.protocol.messages import DebitNote, Invoice
from golem_dask.tasks import Tasks
from golem_dask.yagna import convert
from golem_dask.yagna.api import YagnaDaemon, YagnaError, amount_text, iso

logger = logging.getLogger(__name__)

#: (event kind, path of the documents, event naming a received one, id field)
_KINDS = (
    ("debitNoteEvents", "debitNotes", "DebitNoteReceivedEvent", "debitNoteId"),
    ("invoiceEvents", "invoices", "InvoiceReceivedEvent", "invoiceId"),
)


class Documents:
    """The payment half of :class:`~golem_dask.yagna.market.YagnaMarket`.

    ``usage_vector(agreement_id)`` names a debit note's counters (its agreement's
    ``golem.com.usage.vector``); ``terminate(agreement_id, reason)`` ends an agreement.
    """

    def __init__(self, daemon: YagnaDaemon, usage_vector: Callable[[str], list[str]],
                 terminate: Callable[[str, str], Any]) -> None:
        self.daemon = daemon
        self.api = daemon.api
        self._usage_vector = usage_vector
        self._terminate = terminate
        self._queue: asyncio.Queue[PaymentDocument | None] = asyncio.Queue()
        self._seen: set[str] = set()
        #: Accepted debit notes not yet paid, per agreement.
        self._unsettled: dict[str, set[str]] = {}
        #: Agreements whose invoice has arrived.
        self._invoiced: set[str] = set()
        #: Invoice acceptances under way (they outlive a cancelled caller).
        self._accepting = Tasks()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(*kind), name=f"golem-yagna-{kind[0]}") for kind in _KINDS]

    async def close(self) -> None:
        # invoices being accepted: an unaccepted one is never paid
        await self._accepting.wait(2 * config.seconds("payment.payment-timeout"))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[PaymentDocument]:
        while True:
            document = await self._queue.get()
            if document is None:
                self._queue.put_nowait(None)  # for any other listener
                return
            yield document

    async def _pump(self, events: str, path: str, received: str, id_field: str) -> None:
        after = iso(self.daemon.since)
        poll = config.seconds("yagna.poll-timeout")
        while True:
            try:
                found = await self.api.call("GET", f"/payment-api/v1/{events}",
                                            params={"afterTimestamp": after, "timeout": poll, "maxEvents": 100},
                                            timeout_s=poll + 10)
            except (NetworkError, YagnaError) as e:
                logger.info("waiting for %s: %s", events, e)
                await asyncio.sleep(1)
                continue
            for event in found if isinstance(found, list) else []:
                if event.get("eventType") != received or event.get(id_field) in self._seen:
                    after = str(event.get("eventDate") or after)
                    continue
                document_id = str(event[id_field])
                try:
                    body = await self.api.call("GET", f"/payment-api/v1/{path}/{document_id}")
                    document = self._document(path, body)
                except (MarketError, ProtocolError, KeyError) as e:
                    if isinstance(e, NetworkError) or (isinstance(e, YagnaError) and e.status >= 500):
                        # Not past this event: the next poll asks for the document again.
                        logger.info("reading %s %s from the daemon: %s; trying again", path, document_id, e)
                        await asyncio.sleep(1)
                        break
                    after = str(event.get("eventDate") or after)
                    logger.warning("dropping %s %s from the daemon: %s", path, document_id, e)
                    continue
                after = str(event.get("eventDate") or after)
                self._seen.add(document_id)
                if isinstance(document, Invoice):
                    self._invoiced.add(document.agreement_id)
                logger.debug("received %s %s for agreement %s", path, document_id, document.agreement_id)
                self._queue.put_nowait(document)

    def _document(self, path: str, body: Mapping[str, Any]) -> PaymentDocument:
        if path == "debitNotes":
            return convert.debit_note(body, self._usage_vector(str(body["agreementId"])))
        return convert.invoice(body)

    async def accept(self, document: PaymentDocument, amount: Decimal) -> None:
        """Accept ``document`` for ``amount``.  An invoice's acceptance (after its agreement's
        debit notes are paid) runs on even if the caller is cancelled, as a worker's close
        is at its timeout, and :meth:`close` waits for it: an invoice left unaccepted is
        never paid."""
        agreement = document.agreement_id
        if isinstance(document, DebitNote):
            if agreement in self._invoiced:
                logger.debug("debit note %s: its agreement's invoice covers it", document.id)
                return
            await self._accept("debitNotes", document.id, amount)
            self._unsettled.setdefault(agreement, set()).add(document.id)
            return
        await asyncio.shield(self._accepting.spawn(self._accept_invoice(document, amount)))

    async def _accept_invoice(self, invoice: PaymentDocument, amount: Decimal) -> None:
        await self._settle(self._unsettled.pop(invoice.agreement_id, set()))
        await self._accept("invoices", invoice.id, amount)

    async def _accept(self, path: str, document_id: str, amount: Decimal) -> None:
        allocation = await self.daemon.allocation()
        await self.api.call("POST", f"/payment-api/v1/{path}/{document_id}/accept",
                            body={"totalAmountAccepted": amount_text(amount), "allocationId": allocation})
        logger.debug("accepted %s %s: %s", path, document_id, amount)

    async def _settle(self, notes: set[str]) -> None:
        """Wait, running the payment cycle, until the daemon has paid the accepted debit
        notes ``notes`` (bounded by ``golem.payment.payment-timeout``)."""
        if notes and self.daemon.cycle_unsupported:
            logger.warning("this yagna daemon cannot run its payment cycle on request: debit notes %s, accepted "
                           "and not yet paid, may be paid again with the invoice", ", ".join(sorted(notes)))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.seconds("payment.payment-timeout")
        while notes and loop.time() < deadline:
            await self.daemon.run_cycle()
            for note in sorted(notes):
                try:
                    found = await self.api.call("GET", f"/payment-api/v1/debitNotes/{note}")
                except MarketError as e:
                    logger.info("asking the daemon for debit note %s: %s", note, e)
                    continue
                if str(found.get("status", "")).upper() in ("SETTLED", "REJECTED", "CANCELLED", "FAILED"):
                    notes.discard(note)
            if notes:
                await asyncio.sleep(config.seconds("yagna.payment-poll-interval"))
        if notes:
            logger.warning("debit notes %s are still unpaid; the invoice may pay them again", ", ".join(sorted(notes)))

    async def reject(self, document: PaymentDocument, reason: str) -> str | None:
        path = "debitNotes" if isinstance(document, DebitNote) else "invoices"
        code = "INCORRECT_AMOUNT" if isinstance(document, Invoice) or "amount" in reason else "UNSOLICITED_SERVICE"
        try:
            await self.api.call("POST", f"/payment-api/v1/{path}/{document.id}/reject",
                                body={"rejectionReason": code, "totalAmountAccepted": "0", "message": reason})
            return None
        except YagnaError as e:
            if e.status != 501:
                raise
        # The daemon cannot reject it: stop the work it would bill instead.
        note = f"the daemon cannot reject debit notes; agreement terminated instead ({reason})"
        logger.warning("debit note %s: %s", document.id, note)
        await self._terminate(document.agreement_id, f"debit note {document.id} rejected: {reason}")
        return note
