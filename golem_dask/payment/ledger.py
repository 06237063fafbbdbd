"""The durable ledger: every debt before money moves, every payment through its states.

A debt (an accepted invoice) is written as ``owed`` before anything is signed.  A
payment settles one or more debts with one transaction and goes through recorded states:
``signed`` (nonce, hash and the signed bytes, so it can be re-sent exactly) → ``sent``
→ ``confirmed``, or ``failed`` with a reason (its debts are owed again).  Replacing a
stuck transaction (same nonce, higher fee) adds a hash to the same payment, so the ledger
keeps both.  After a crash, :meth:`Ledger.unfinished` lists what the payer must reconcile
against the chain before sending anything new.

SQLite in WAL mode with ``synchronous=FULL``: a state change is on disk before the
next step runs.  The ledger never holds a private key; signed transactions are public
once broadcast anyway.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from golem_dask.errors import PaymentError
from golem_dask.chain.units import from_wei
from golem_dask.protocol.messages import new_id, now_ms
from golem_dask.store import Database

OWED, PAYING, PAID = "owed", "paying", "paid"
SIGNED, SENT, CONFIRMED, FAILED = "signed", "sent", "confirmed", "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS debts (
    id TEXT PRIMARY KEY,
    invoice_id TEXT NOT NULL UNIQUE,
    agreement_id TEXT NOT NULL,
    payer TEXT NOT NULL,
    payee TEXT NOT NULL,
    amount_wei TEXT NOT NULL,
    platform TEXT NOT NULL,
    status TEXT NOT NULL,
    payment_id TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS debts_by_status ON debts (payer, status);
CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    payer TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    confirmed_hash TEXT,
    block_number INTEGER,
    reason TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_by_status ON payments (payer, status);
CREATE TABLE IF NOT EXISTS transactions (
    tx_hash TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments (id),
    raw TEXT NOT NULL,
    max_fee_wei TEXT,
    created_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Debt:
    """An accepted invoice, owed to ``payee`` until a confirmed payment settles it."""

    id: str
    invoice_id: str
    agreement_id: str
    payer: str
    payee: str
    amount_wei: int
    platform: str
    status: str
    payment_id: str | None
    created_ms: int

    @property
    def amount(self) -> Decimal:
        return from_wei(self.amount_wei)


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One transaction (and its replacements) settling some debts."""

    id: str
    payer: str
    nonce: int
    kind: str
    status: str
    tx_hashes: tuple[str, ...]
    debt_ids: tuple[str, ...]
    confirmed_hash: str | None
    block_number: int | None
    reason: str | None
    created_ms: int


class Ledger:
    """Debts and payments on disk.

    Parameters
    ----------
    path:
        The SQLite file (its folder is created), or ``":memory:"`` for a ledger that
        lives as long as the process (the embedded devnet's chain does too).

    Examples
    --------
    >>> ledger = Ledger(":memory:")
    >>> d = ledger.add_debt("inv-1", "agr-1", "0xPayer", "0xPayee", 10**18, "erc20-devnet-glm")
    >>> [x.status for x in ledger.owed("0xPayer")]
    ['owed']
    """

    def __init__(self, path: str | Path) -> None:
        self._store = Database(path, _SCHEMA, "the payment ledger", PaymentError)
        self.path = self._store.path
        self.transaction = self._store.transaction
        self.query = self._store.query

    def __repr__(self) -> str:
        return f"<Ledger {self.path}>"

    def close(self) -> None:
        self._store.close()

    # -- debts ------------------------------------------------------------------------

    def add_debt(
        self, invoice_id: str, agreement_id: str, payer: str, payee: str, amount_wei: int, platform: str
    ) -> Debt:
        """Record an accepted invoice as owed (once: the same invoice twice is one debt)."""
        now = now_ms()
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO debts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (new_id(), invoice_id, agreement_id, payer, payee, str(int(amount_wei)), platform, OWED, None,
                 now, now),
            )
        return self.debt_for_invoice(invoice_id)

    def _debts(self, where: str, args: Sequence[Any]) -> list[Debt]:
        rows = self.query(
            "SELECT id, invoice_id, agreement_id, payer, payee, amount_wei, platform, status, payment_id, "
            f"created_ms FROM debts WHERE {where} ORDER BY created_ms, id", args)
        return [Debt(r[0], r[1], r[2], r[3], r[4], int(r[5]), r[6], r[7], r[8], int(r[9])) for r in rows]

    def debt_for_invoice(self, invoice_id: str) -> Debt:
        (debt,) = self._debts("invoice_id = ?", (invoice_id,))
        return debt

    def debt(self, debt_id: str) -> Debt:
        (debt,) = self._debts("id = ?", (debt_id,))
        return debt

    def owed(self, payer: str) -> list[Debt]:
        return self._debts("payer = ? AND status = ?", (payer, OWED))

    def committed_wei(self, agreement_id: str) -> int:
        """What is owed, being paid or paid for an agreement, all its debts together."""
        rows = self.query("SELECT amount_wei FROM debts WHERE agreement_id = ?", (agreement_id,))
        return sum(int(amount) for (amount,) in rows)

    def debts(self) -> list[Debt]:
        return self._debts("1 = 1", ())

    # -- payments -----------------------------------------------------------------------

    def record_signed(
        self, payer: str, nonce: int, kind: str, debt_ids: Iterable[str], tx_hash: str, raw: bytes,
        max_fee_wei: int | None = None,
    ) -> str:
        """A transaction is signed: store it and tie its debts to it, atomically."""
        payment_id = new_id()
        now = now_ms()
        ids = list(debt_ids)
        with self.transaction() as db:
            for debt_id in ids:
                changed = db.execute(
                    "UPDATE debts SET status = ?, payment_id = ?, updated_ms = ? WHERE id = ? AND status = ?",
                    (PAYING, payment_id, now, debt_id, OWED)).rowcount
                if changed != 1:
                    raise PaymentError(f"debt {debt_id} is not owed any more; refusing to pay it twice")
            db.execute("INSERT INTO payments VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (payment_id, payer, nonce, kind, SIGNED, None, None, None, now, now))
            db.execute("INSERT INTO transactions VALUES (?,?,?,?,?)",
                       (tx_hash, payment_id, raw.hex(), None if max_fee_wei is None else str(max_fee_wei), now))
        return payment_id

    def add_replacement(self, payment_id: str, tx_hash: str, raw: bytes, max_fee_wei: int | None) -> None:
        """A replacement (same nonce, higher fee) of a payment's transaction."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO transactions VALUES (?,?,?,?,?)",
                       (tx_hash, payment_id, raw.hex(), None if max_fee_wei is None else str(max_fee_wei), now_ms()))

    def _set_status(self, payment_id: str, status: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE payments SET status = ?, updated_ms = ?{', ' + sets if sets else ''} WHERE id = ?",
                       (status, now_ms(), *fields.values(), payment_id))
            if status == CONFIRMED:
                db.execute("UPDATE debts SET status = ?, updated_ms = ? WHERE payment_id = ?",
                           (PAID, now_ms(), payment_id))
            elif status == FAILED:
                # Its debts are owed again: a later payment (new nonce) settles them.
                db.execute("UPDATE debts SET status = ?, payment_id = NULL, updated_ms = ? WHERE payment_id = ?",
                           (OWED, now_ms(), payment_id))

    def mark_sent(self, payment_id: str) -> None:
        self._set_status(payment_id, SENT)

    def mark_confirmed(self, payment_id: str, tx_hash: str, block_number: int) -> None:
        self._set_status(payment_id, CONFIRMED, confirmed_hash=tx_hash, block_number=block_number)

    def mark_failed(self, payment_id: str, reason: str) -> None:
        self._set_status(payment_id, FAILED, reason=reason)

    def _payments(self, where: str, args: Sequence[Any]) -> list[PaymentRecord]:
        rows = self.query(
            "SELECT id, payer, nonce, kind, status, confirmed_hash, block_number, reason, created_ms "
            f"FROM payments WHERE {where} ORDER BY nonce, created_ms", args)
        out = []
        for pid, payer, nonce, kind, status, confirmed, block, reason, created in rows:
            hashes = tuple(h for (h,) in self.query(
                "SELECT tx_hash FROM transactions WHERE payment_id = ? ORDER BY created_ms, rowid", (pid,)))
            debts = tuple(d for (d,) in self.query("SELECT id FROM debts WHERE payment_id = ?", (pid,)))
            out.append(PaymentRecord(pid, payer, nonce, kind, status, hashes, debts, confirmed, block, reason,
                                     created))
        return out

    def payment(self, payment_id: str) -> PaymentRecord:
        (p,) = self._payments("id = ?", (payment_id,))
        return p

    def unfinished(self, payer: str) -> list[PaymentRecord]:
        """Payments signed or sent but not known to be confirmed or failed."""
        return self._payments("payer = ? AND status IN (?, ?)", (payer, SIGNED, SENT))

    def payments(self) -> list[PaymentRecord]:
        return self._payments("1 = 1", ())

    def raw_transaction(self, tx_hash: str) -> bytes:
        ((raw,),) = self.query("SELECT raw FROM transactions WHERE tx_hash = ?", (tx_hash,))
        return bytes.fromhex(raw)

    def max_nonce(self, payer: str) -> int | None:
        ((value,),) = self.query("SELECT MAX(nonce) FROM payments WHERE payer = ? AND status != ?",
                                  (payer, FAILED))
        return None if value is None else int(value)

    # -- reports ----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Debts and payments as plain data (for ``golem-dask ledger --json``)."""
        debts = [{**asdict(d), "amount": str(d.amount)} for d in self.debts()]
        payments = [asdict(p) for p in self.payments()]
        return {"ledger": self.path, "debts": debts, "payments": payments}

    def table(self) -> str:
        """Debts with their payments, as a readable table."""
        by_payment = {p.id: p for p in self.payments()}
        header = ("invoice", "payee", "amount GLM", "status", "nonce", "transaction")
        rows = []
        for d in self.debts():
            p = by_payment.get(d.payment_id or "")
            rows.append((d.invoice_id[:12], d.payee, format(d.amount, "f"), d.status,
                         str(p.nonce) if p else "-",
                         (p.confirmed_hash or (p.tx_hashes[-1] if p.tx_hashes else "-")) if p else "-"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        owed = sum((d.amount for d in self.debts() if d.status != PAID), Decimal(0))
        lines = [fmt.format(*header), *(fmt.format(*r) for r in rows),
                 f"{len(rows)} debts; still owed: {format(owed, 'f')} GLM"]
        return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
