"""A provider's invoices until they are paid, on disk, and the payments it credited.

The daemon keeps every invoice it sent here (SQLite, under ``golem.provider.data-dir``),
re-sends the unpaid ones until they are paid or rejected, and credits a payment only
after checking it on chain, against its own invoices, and only up to what the
transaction really moved to this provider: one transaction cannot be announced to pay
several invoices beyond its amount, nor be announced twice.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from golem_dask.chain.units import from_wei, to_wei
from golem_dask.errors import PaymentError
from golem_dask.protocol.messages import Invoice, Payment, now_ms
from golem_dask.protocol.wire import decode, encode
from golem_dask.store import Database

UNPAID, PAID, REJECTED = "unpaid", "paid", "rejected"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS invoices (
    id TEXT PRIMARY KEY,
    agreement_id TEXT NOT NULL UNIQUE,
    requestor TEXT NOT NULL,
    amount_wei TEXT NOT NULL,
    body BLOB NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created_ms INTEGER NOT NULL,
    sent_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS transactions (
    tx_hash TEXT PRIMARY KEY,
    payer TEXT NOT NULL,
    moved_wei TEXT NOT NULL,
    credited_wei TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS credits (
    tx_hash TEXT NOT NULL,
    agreement_id TEXT NOT NULL,
    amount_wei TEXT NOT NULL,
    PRIMARY KEY (tx_hash, agreement_id)
);
"""


@dataclass(frozen=True, slots=True)
class Credit:
    """What one checked payment announcement counted for."""

    tx_hash: str
    credited: Decimal
    agreements: tuple[str, ...]
    paid_invoices: tuple[str, ...]


class Receivables:
    """Invoices, transactions and credits of one provider.

    Parameters
    ----------
    path:
        The SQLite file (its folder is created), or ``":memory:"``.

    Examples
    --------
    >>> from golem_dask.protocol.messages import Payment
    >>> book = Receivables(":memory:")
    >>> book.add(Invoice("agr", (), {}, Decimal("0.5"), "0xP", "0xR", "0xP", "0xR", "devnet"))
    >>> pay = Payment("0xR", "0xP", Decimal("0.5"), "devnet", (), "0xtx", agreement_ids=("agr",))
    >>> book.credit(pay, moved_wei=to_wei(Decimal("0.5"))).paid_invoices != ()
    True
    >>> book.credit(pay, moved_wei=to_wei(Decimal("0.5"))).credited  # the same transaction again
    Decimal('0')
    """

    def __init__(self, path: str | Path) -> None:
        self._store = Database(path, _SCHEMA, "the provider's receivables", PaymentError)
        self.path = self._store.path
        self._transaction = self._store.transaction
        self._rows = self._store.query

    def __repr__(self) -> str:
        return f"<Receivables {self.path}>"

    def close(self) -> None:
        self._store.close()

    def add(self, invoice: Invoice) -> None:
        """Keep an invoice just sent (once)."""
        now = now_ms()
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO invoices VALUES (?,?,?,?,?,?,?,?,?)",
                       (invoice.id, invoice.agreement_id, invoice.recipient_id, str(to_wei(invoice.amount)),
                        encode(invoice), UNPAID, None, now, now))
        self._settle_status(invoice.agreement_id)

    def due_for_resend(self, older_than_ms: int, newer_than_ms: int) -> list[Invoice]:
        """Unpaid invoices last sent before ``older_than_ms`` and made after ``newer_than_ms``."""
        rows = self._rows("SELECT body FROM invoices WHERE status = ? AND sent_ms < ? AND created_ms > ? "
                          "ORDER BY created_ms", (UNPAID, older_than_ms, newer_than_ms))
        return [decode(bytes(body)) for (body,) in rows]  # type: ignore[call-overload]

    def mark_sent(self, invoice_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE invoices SET sent_ms = ? WHERE id = ?", (now_ms(), invoice_id))

    def accepted(self, invoice_id: str, amount: Decimal, requestor: str) -> bool:
        """``requestor`` accepted an invoice of ours to it for ``amount``.  Less than it asked
        (a share of a short delivery, or what its budget held) is what is now due: once that
        is paid the invoice is settled and no longer re-sent; the body keeps what was asked.
        True if the amount due changed (never for another requestor's invoice)."""
        wei = to_wei(amount)
        with self._transaction() as db:
            row = db.execute("SELECT amount_wei, status, requestor, agreement_id FROM invoices WHERE id = ?",
                             (invoice_id,)).fetchone()
            if row is None or row[1] != UNPAID or wei >= int(row[0]) or str(row[2]).lower() != requestor.lower():
                return False
            db.execute("UPDATE invoices SET amount_wei = ?, reason = ? WHERE id = ?",
                       (str(wei), f"accepted {amount} of {from_wei(int(row[0]))}", invoice_id))
        self._settle_status(str(row[3]))
        return True

    def reject(self, invoice_id: str, reason: str, requestor: str) -> bool:
        """``requestor`` rejected an invoice of ours to it: stop re-sending it.  False if
        unknown, or another requestor's."""
        with self._transaction() as db:
            changed = db.execute("UPDATE invoices SET status = ?, reason = ? WHERE id = ? AND status = ? "
                                 "AND lower(requestor) = lower(?)",
                                 (REJECTED, reason, invoice_id, UNPAID, requestor)).rowcount
        return bool(changed)

    def requestor_of(self, invoice_id: str) -> str | None:
        rows = self._rows("SELECT requestor FROM invoices WHERE id = ?", (invoice_id,))
        return str(rows[0][0]) if rows else None

    def requestor_of_agreement(self, agreement_id: str) -> str | None:
        rows = self._rows("SELECT requestor FROM invoices WHERE agreement_id = ?", (agreement_id,))
        return str(rows[0][0]) if rows else None

    def status(self, invoice_id: str) -> str | None:
        rows = self._rows("SELECT status FROM invoices WHERE id = ?", (invoice_id,))
        return str(rows[0][0]) if rows else None

    def paid(self, agreement_id: str) -> Decimal:
        """What checked payments credited to an agreement."""
        rows = self._rows("SELECT amount_wei FROM credits WHERE agreement_id = ?", (agreement_id,))
        return from_wei(sum(int(str(a)) for (a,) in rows))

    def credit(self, payment: Payment, moved_wei: int) -> Credit:
        """Credit a payment the chain shows moved ``moved_wei`` from its payer to us in its
        transaction: to the agreements it names (directly or through our invoices), each at
        most what it still owes (unbilled agreements: what the payment claims), and the
        transaction at most what it moved, over every announcement of it."""
        if moved_wei <= 0:  # nothing of it is ours to count: its hash stays free for its real payer
            return Credit(payment.tx_hash, Decimal(0), (), ())
        agreements = list(payment.agreement_ids)
        if not agreements and payment.invoice_ids:
            marks = ",".join("?" * len(payment.invoice_ids))
            agreements = [str(r[0]) for r in self._rows(f"SELECT agreement_id FROM invoices WHERE id IN ({marks})",
                                                        tuple(payment.invoice_ids))]
        with self._transaction() as db:
            row = db.execute("SELECT payer, moved_wei, credited_wei FROM transactions WHERE tx_hash = ?",
                             (payment.tx_hash,)).fetchone()
            if row is None:
                db.execute("INSERT INTO transactions VALUES (?,?,?,?)",
                           (payment.tx_hash, payment.payer_addr, str(moved_wei), "0"))
                credited_before = 0
            elif row[0] != payment.payer_addr:
                raise PaymentError(f"transaction {payment.tx_hash} was announced before by {row[0]}")
            else:
                credited_before = int(row[2])
            left = min(moved_wei - credited_before, to_wei(payment.amount))
            given: dict[str, int] = {}
            for agreement_id in agreements:
                if left <= 0:
                    break
                owed = self._owed_wei(db, agreement_id, to_wei(payment.amount))
                share = min(left, owed)
                if share <= 0 or db.execute("SELECT 1 FROM credits WHERE tx_hash = ? AND agreement_id = ?",
                                            (payment.tx_hash, agreement_id)).fetchone():
                    continue
                db.execute("INSERT INTO credits VALUES (?,?,?)", (payment.tx_hash, agreement_id, str(share)))
                given[agreement_id] = share
                left -= share
            db.execute("UPDATE transactions SET credited_wei = ? WHERE tx_hash = ?",
                       (str(credited_before + sum(given.values())), payment.tx_hash))
        paid = tuple(i for a in given if (i := self._settle_status(a)))
        return Credit(payment.tx_hash, from_wei(sum(given.values())), tuple(given), paid)

    def _owed_wei(self, db: sqlite3.Connection, agreement_id: str, claimed_wei: int) -> int:
        credited = sum(int(r[0]) for r in db.execute("SELECT amount_wei FROM credits WHERE agreement_id = ?",
                                                     (agreement_id,)).fetchall())
        row = db.execute("SELECT amount_wei FROM invoices WHERE agreement_id = ?", (agreement_id,)).fetchone()
        # Before its invoice (a requestor paying accepted debit notes), an agreement may
        # be credited what the payment claims; the invoice later says what is still due.
        return (int(row[0]) if row else credited + claimed_wei) - credited

    def _settle_status(self, agreement_id: str) -> str | None:
        """Mark the agreement's invoice paid once credits cover it; its id if so."""
        with self._transaction() as db:
            row = db.execute("SELECT id, amount_wei, status FROM invoices WHERE agreement_id = ?",
                             (agreement_id,)).fetchone()
            if row is None or row[2] != UNPAID:
                return None
            credited = sum(int(r[0]) for r in db.execute("SELECT amount_wei FROM credits WHERE agreement_id = ?",
                                                         (agreement_id,)).fetchall())
            if credited < int(row[1]):
                return None
            db.execute("UPDATE invoices SET status = ? WHERE id = ?", (PAID, row[0]))
            return str(row[0])
