"""What the requestor promised, kept in the ledger's file: every agreement it signed, and
every debit note and invoice it accepted.

Accepting a debit note is a promise to pay it.  The accountant writes each agreement when
it is signed and each accepted document before it tells the provider; a requestor that
dies before its invoices arrive leaves here what ``golem-dask pay`` owes
(:func:`recover_debts`), and the terms against which a provider's re-sent invoice is
checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from golem_dask.payment.ledger import PAID, Ledger
from golem_dask.protocol.messages import Agreement, now_ms
from golem_dask.protocol.wire import decode, encode

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agreements (
    id TEXT PRIMARY KEY,
    payer TEXT NOT NULL,
    payee TEXT NOT NULL,
    platform TEXT NOT NULL,
    terms BLOB NOT NULL,
    signed_ms INTEGER NOT NULL,
    closed_ms INTEGER
);
CREATE INDEX IF NOT EXISTS agreements_open ON agreements (payer, closed_ms);
CREATE TABLE IF NOT EXISTS accepted (
    document_id TEXT PRIMARY KEY,
    agreement_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount_wei TEXT NOT NULL,
    accepted_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS accepted_by_agreement ON accepted (agreement_id);
"""


@dataclass(frozen=True, slots=True)
class Accepted:
    """One accepted debit note or invoice."""

    document_id: str
    agreement_id: str
    kind: str
    amount_wei: int


class Commitments:
    """Agreements signed and documents accepted, in ``ledger``'s file.

    Examples
    --------
    >>> book = Commitments(Ledger(":memory:"))
    >>> book.accept("note-1", "agr-1", "debit-note", 5)
    >>> book.accept("note-2", "agr-1", "debit-note", 9)
    >>> book.accepted_wei("agr-1")
    9
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        with ledger.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def sign(self, agreement: Agreement, platform: str) -> None:
        """Record an agreement as signed (once; its terms as the requestor signed them)."""
        with self.ledger.transaction() as db:
            db.execute("INSERT OR IGNORE INTO agreements VALUES (?,?,?,?,?,?,?)",
                       (agreement.id, agreement.requestor_id, agreement.provider_id, platform, encode(agreement),
                        now_ms(), None))

    def accept(self, document_id: str, agreement_id: str, kind: str, amount_wei: int) -> None:
        """Record a debit note or invoice as accepted: a promise to pay ``amount_wei`` in all."""
        with self.ledger.transaction() as db:
            db.execute("INSERT OR IGNORE INTO accepted VALUES (?,?,?,?,?)",
                       (document_id, agreement_id, kind, str(int(amount_wei)), now_ms()))

    def close(self, agreement_id: str) -> None:
        """Nothing more is owed for this agreement (its invoice paid, rejected or zero)."""
        with self.ledger.transaction() as db:
            db.execute("UPDATE agreements SET closed_ms = ? WHERE id = ? AND closed_ms IS NULL",
                       (now_ms(), agreement_id))

    def agreement(self, agreement_id: str) -> tuple[Agreement, str] | None:
        """A recorded agreement and its payment platform, or None."""
        rows = self.ledger.query("SELECT terms, platform FROM agreements WHERE id = ?", (agreement_id,))
        return (decode(bytes(rows[0][0])), str(rows[0][1])) if rows else None

    def open_agreements(self, payer: str) -> list[tuple[Agreement, str]]:
        """Agreements of ``payer`` not yet closed, oldest first, with their platforms."""
        rows = self.ledger.query("SELECT terms, platform FROM agreements WHERE payer = ? AND closed_ms IS NULL "
                                 "ORDER BY signed_ms, id", (payer,))
        return [(decode(bytes(terms)), str(platform)) for terms, platform in rows]

    def accepted(self, agreement_id: str) -> list[Accepted]:
        rows = self.ledger.query("SELECT document_id, agreement_id, kind, amount_wei FROM accepted "
                                 "WHERE agreement_id = ? ORDER BY accepted_ms, document_id", (agreement_id,))
        return [Accepted(r[0], r[1], r[2], int(r[3])) for r in rows]

    def accepted_wei(self, agreement_id: str) -> int:
        """The most accepted for an agreement: debit notes count up, an invoice is the total."""
        return max((a.amount_wei for a in self.accepted(agreement_id)), default=0)


def close_settled(book: Commitments, payer: str) -> list[str]:
    """Close the open agreements whose accepted invoice is paid in full; their ids."""
    closed = []
    for agreement, _ in book.open_agreements(payer):
        invoices = [a for a in book.accepted(agreement.id) if a.kind == "invoice"]
        debts = [d for d in book.ledger.debts() if d.agreement_id == agreement.id]
        if invoices and debts and all(d.status == PAID for d in debts) \
                and sum(d.amount_wei for d in debts) >= invoices[-1].amount_wei:
            book.close(agreement.id)
            closed.append(agreement.id)
    return closed


def recover_debts(book: Commitments, payer: str) -> list[str]:
    """After a crash: owe, for every open agreement, what was accepted and is not yet owed
    or paid.  Returns the ids of the documents that became debts."""
    added = []
    for agreement, platform in book.open_agreements(payer):
        accepted = book.accepted(agreement.id)
        missing = book.accepted_wei(agreement.id) - book.ledger.committed_wei(agreement.id)
        if missing <= 0 or not accepted:
            continue
        latest = max(accepted, key=lambda a: a.amount_wei)
        book.ledger.add_debt(latest.document_id, agreement.id, payer, agreement.provider_id, missing, platform)
        logger.info("owing %d wei to %s for agreement %s: accepted before the requestor stopped",
                    missing, agreement.provider_id, agreement.id)
        added.append(latest.document_id)
    return added
