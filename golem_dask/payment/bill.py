"""The bill: every agreement of a cluster with its usage, amount, status and payment."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

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
    #: When its worker started and stopped (seconds since the epoch; None: not (yet)).
    started: float | None = None
    stopped: float | None = None

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

    # -- as data ----------------------------------------------------------------------

    def to_frame(self) -> Any:
        """One row per agreement (pandas); amounts stay :class:`~decimal.Decimal`, so
        ``frame.paid.sum() == bill.total`` exactly."""
        import pandas as pd

        def when(t: float | None) -> Any:
            return pd.Timestamp(t, unit="s", tz="UTC") if t is not None else pd.NaT

        columns = ["worker", "provider", "agreement_id", "status", "started", "stopped", "cpu_sec", "duration_sec",
                   "observed_cpu_sec", "amount", "paid", "tx_hash", "reason"]
        rows = [(e.worker, e.provider, e.agreement_id, e.status, when(e.started), when(e.stopped), float(e.cpu_sec),
                 float(e.duration_sec), float(e.observed_cpu_sec), e.amount, e.paid, e.tx_hash, e.reason)
                for e in self.entries]
        return pd.DataFrame(rows, columns=columns)

    def to_csv(self, path: Any = None) -> str | None:
        """The rows of :meth:`to_frame` as CSV (amounts written in full); text if no ``path``."""
        return self.to_frame().to_csv(path, index=False)  # type: ignore[no-any-return]

    def to_json(self, path: Any = None) -> str | None:
        """The bill as JSON, amounts as strings (no float rounding); text if no ``path``."""
        text = json.dumps({"payer": self.payer, "platform": self.platform, "total": plain(self.total),
                           "entries": [{**{k: getattr(e, k) for k in ("worker", "provider", "agreement_id", "status",
                                                                      "started", "stopped", "tx_hash", "reason")},
                                        "usage": {k: str(v) for k, v in e.usage.items()},
                                        "amount": plain(e.amount), "paid": plain(e.paid)} for e in self.entries]},
                          indent=1)
        if path is None:
            return text
        Path(path).write_text(text)
        return None

    def plot(self) -> Any:
        """A matplotlib figure: what each provider was paid, and the spend over time (each
        agreement counted when its worker stopped).  Needs matplotlib."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("Bill.plot() needs matplotlib: pip install 'golem-dask[plot]'") from None
        frame = self.to_frame()
        figure = Figure(figsize=(10, 4), layout="constrained")
        by_provider, over_time = figure.subplots(1, 2)
        paid = frame.groupby("provider")["paid"].sum().astype(float) if len(frame) else frame["paid"]
        by_provider.bar([p[:10] + "…" for p in paid.index], paid.to_numpy())
        by_provider.set(title="paid per provider", ylabel=f"GLM ({self.platform})")
        done = frame.dropna(subset=["stopped"]).sort_values("stopped")
        over_time.step(done["stopped"], done["paid"].astype(float).cumsum(), where="post")
        over_time.set(title="spend over time", ylabel="GLM paid so far")
        over_time.tick_params(axis="x", labelrotation=30)
        return figure

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
