"""What the requestor remembers of each provider across clusters: delivered capacity,
failures, refusals.

A provider sells threads; the requestor measures what it delivers while its worker is
saturated (at least as many tasks running as threads): CPU seconds delivered against
thread-seconds bought.  A price is worth only what it delivers, so offers are ranked by
their expected cost divided by the provider's delivered ratio; a provider caught
delivering under half of what it sold is avoided while others are offered.

Kept in SQLite next to the ledger (``<golem.payment.data-dir>/reputation.sqlite``) when
the requestor pays on a real chain; a process-wide in-memory store serves the embedded
default, whose providers are new every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

from golem_dask import config
from golem_dask.errors import MarketError
from golem_dask.protocol.messages import now_ms
from golem_dask.store import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS providers (
    address TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    agreements INTEGER NOT NULL DEFAULT 0,
    bought_cpu_sec TEXT NOT NULL DEFAULT '0',
    delivered_cpu_sec TEXT NOT NULL DEFAULT '0',
    failures INTEGER NOT NULL DEFAULT 0,
    refusals INTEGER NOT NULL DEFAULT 0,
    flagged INTEGER NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL
);
"""

#: Delivered ratios below this one count as this (a provider delivering nothing is not free).
FLOOR = Decimal("0.05")
#: Thread-seconds of saturated work before a delivered ratio counts.
MIN_BOUGHT_SEC = Decimal(10)


@dataclass(frozen=True, slots=True)
class Record:
    """One provider as the requestor saw it."""

    address: str
    name: str
    agreements: int
    bought_cpu_sec: Decimal
    delivered_cpu_sec: Decimal
    failures: int
    refusals: int
    flagged: int

    @property
    def delivered(self) -> Decimal | None:
        """CPU delivered per thread-second bought while saturated; None before enough work
        (unless the provider was caught delivering too little: that measurement counts)."""
        if self.bought_cpu_sec <= 0 or (self.bought_cpu_sec < MIN_BOUGHT_SEC and not self.flagged):
            return None
        return min(Decimal(1), self.delivered_cpu_sec / self.bought_cpu_sec)


class Reputation:
    """The reputation store.

    Examples
    --------
    >>> r = Reputation(":memory:")
    >>> r.delivered("0xA", "lab-1", bought_cpu_sec=Decimal(60), delivered_cpu_sec=Decimal(15))
    >>> r.record("0xA").delivered, r.factor("0xA")
    (Decimal('0.25'), Decimal('4'))
    >>> r.factor("0xB")  # unknown: taken at its word
    Decimal('1')
    """

    _shared: ClassVar[dict[str, Reputation]] = {}

    def __init__(self, path: str) -> None:
        self.db = Database(path, _SCHEMA, "the reputation store", MarketError, synchronous="NORMAL")

    @classmethod
    def for_ledger(cls, ledger_path: str | None) -> Reputation:
        """Next to a ledger file, or the process's in-memory store (one per path)."""
        path = cls.path_for(ledger_path)
        if path not in cls._shared:
            cls._shared[path] = cls(path)
        return cls._shared[path]

    @staticmethod
    def path_for(ledger_path: str | None) -> str:
        """The store's file next to a ledger file (``":memory:"`` for none, or one in memory)."""
        if not ledger_path or ledger_path == ":memory:":
            return ":memory:"
        return os.path.join(os.path.dirname(ledger_path), "reputation.sqlite")

    @classmethod
    def of_payer(cls, payer: object) -> Reputation:
        """The store next to ``payer``'s ledger, if it keeps one in a file."""
        return cls.for_ledger(getattr(getattr(payer, "ledger", None), "path", None))

    @classmethod
    def default(cls) -> Reputation:
        """The store in ``golem.payment.data-dir``."""
        return cls.for_ledger(config.ledger_path())

    @classmethod
    def default_path(cls) -> str:
        """The file of :meth:`default` (without opening it)."""
        return cls.path_for(config.ledger_path())

    def _bump(self, address: str, name: str, sql: str, args: tuple[object, ...] = ()) -> None:
        with self.db.transaction() as db:
            db.execute("INSERT OR IGNORE INTO providers (address, name, updated_ms) VALUES (?,?,?)",
                       (address, name, now_ms()))
            db.execute(f"UPDATE providers SET {sql}, name = ?, updated_ms = ? WHERE address = ?",
                       (*args, name, now_ms(), address))

    def agreement(self, address: str, name: str) -> None:
        self._bump(address, name, "agreements = agreements + 1")

    def failure(self, address: str, name: str) -> None:
        self._bump(address, name, "failures = failures + 1")

    def refusal(self, address: str, name: str) -> None:
        self._bump(address, name, "refusals = refusals + 1")

    def flag(self, address: str, name: str) -> None:
        self._bump(address, name, "flagged = flagged + 1")

    def delivered(self, address: str, name: str, *, bought_cpu_sec: Decimal, delivered_cpu_sec: Decimal) -> None:
        """Add saturated thread-seconds bought and the CPU seconds delivered meanwhile."""
        record = self.record(address)
        bought = (record.bought_cpu_sec if record else Decimal(0)) + bought_cpu_sec
        given = (record.delivered_cpu_sec if record else Decimal(0)) + delivered_cpu_sec
        self._bump(address, name, "bought_cpu_sec = ?, delivered_cpu_sec = ?", (str(bought), str(given)))

    def record(self, address: str) -> Record | None:
        rows = self.db.query("SELECT address, name, agreements, bought_cpu_sec, delivered_cpu_sec, failures, "
                             "refusals, flagged FROM providers WHERE address = ?", (address,))
        return _record(rows[0]) if rows else None

    def records(self) -> list[Record]:
        rows = self.db.query("SELECT address, name, agreements, bought_cpu_sec, delivered_cpu_sec, failures, "
                             "refusals, flagged FROM providers ORDER BY name, address")
        return [_record(r) for r in rows]

    def factor(self, address: str) -> Decimal:
        """How much dearer a provider's offers rank than their price: 1 / its delivered ratio."""
        record = self.record(address)
        delivered = record.delivered if record else None
        if delivered is None:
            return Decimal(1)
        return (Decimal(1) / max(FLOOR, delivered)).normalize()


def _record(row: tuple[object, ...]) -> Record:
    return Record(str(row[0]), str(row[1]), int(str(row[2])), Decimal(str(row[3])), Decimal(str(row[4])),
                  int(str(row[5])), int(str(row[6])), int(str(row[7])))

