"""The bill: every agreement of a cluster with its usage, amount, status and payment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from enum import Enum

from golem_dask.protocol import properties as P


class EntryStatus(str, Enum):
    RUNNING = "running"
    AWAITING_INVOICE = "awaiting invoice"
    PAID = "paid"
    REJECTED = "rejected"
    FAILED = "payment failed"
    NOTHING_DUE = "nothing due"


@dataclass(frozen=True, slots=True)
class BillEntry:
    """One agreement's line in the bill."""

    worker: str
    provider: str
    agreement_id: str
    usage: Mapping[str, Decimal]
    observed_cpu_sec: Decimal
    observed_duration_sec: Decimal
    amount: Decimal
    status: str
    tx_hash: str | None
    reason: str | None
    #: What was paid for the agreement (all of its invoice, or its accepted debit notes).
    paid: Decimal = Decimal(0)

    @property
    def cpu_sec(self) -> Decimal:
        return Decimal(self.usage.get(P.USAGE_CPU_SEC, 0))

    @property
    def duration_sec(self) -> Decimal:
        return Decimal(self.usage.get(P.USAGE_DURATION_SEC, 0))


def plain(amount: Decimal) -> str:
    """An amount without trailing zeros or exponent: 0.0001 rather than 1.000E-4."""
    return format(amount.normalize(), "f")


@dataclass(frozen=True, slots=True)
class Bill:
    """Every agreement of a cluster with its usage, amount and payment.

    ``str(bill)`` is a table; ``bill.total`` is what was paid.
    """

    entries: tuple[BillEntry, ...]
    platform: str
    payer: str

    @property
    def total(self) -> Decimal:
        """What was paid, in all."""
        return sum((e.paid for e in self.entries), Decimal(0))

    @property
    def owed(self) -> Decimal:
        """Accepted but not (yet) paid."""
        return sum(
            (e.amount for e in self.entries if e.status in {EntryStatus.FAILED.value, EntryStatus.AWAITING_INVOICE.value}),
            Decimal(0),
        )

    def closing_notes(self, ledger: Any = None) -> list[tuple[str, str, dict[str, Any]]]:
        """What a closing cluster tells its user: (event kind, message, data) for what was
        paid and for what is still owed (kept in ``ledger``, settled by ``golem-dask pay``)."""
        notes: list[tuple[str, str, dict[str, Any]]] = []
        if self.entries:
            notes.append(("payment", f"cluster closed; paid {self.total} GLM in total", {"total": self.total}))
        if self.owed:
            owed = ", ".join(f"{e.amount} GLM to {e.provider}" for e in self.entries
                             if e.status in {EntryStatus.FAILED.value, EntryStatus.AWAITING_INVOICE.value})
            where = getattr(ledger, "path", None)
            notes.append(("warning", f"still owed: {owed}; the debts are kept in the ledger"
                          + (f" ({where})" if where else "") + "; run 'golem-dask pay' to settle them",
                          {"owed": self.owed}))
        return notes

    def __str__(self) -> str:
        header = ("worker", "provider", "agreement", "cpu_sec", "duration_sec", "amount GLM", "status", "transaction")
        rows = [
            (
                e.worker,
                e.provider[:10] + "…",
                e.agreement_id[:8],
                str(e.cpu_sec),
                str(e.duration_sec),
                plain(e.amount),
                e.status + (f" ({e.reason})" if e.reason else ""),
                e.tx_hash or "-",
            )
            for e in self.entries
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [f"Bill for {self.payer} on {self.platform}", fmt.format(*header)]
        lines += [fmt.format(*r) for r in rows]
        lines.append(f"total paid: {plain(self.total)} GLM" + (f"; still owed: {plain(self.owed)} GLM" if self.owed else ""))
        return "\n".join(lines)
