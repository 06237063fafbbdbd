"""SQLite files for records that must outlive a crash: the requestor's ledger, a provider's
receivables, a hub's pushes for peers that are away.

One way to open them (WAL, synchronous writes, the folder made) and one atomic write
(``BEGIN IMMEDIATE`` ... ``COMMIT``) under a lock, so the three stores do not each carry
their own copy.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from golem_dask.errors import GolemDaskError


def open_database(path: str, schema: str, what: str, error: type[GolemDaskError], synchronous: str = "FULL",
                  hint: str = "") -> sqlite3.Connection:
    """Open (or make) ``path`` with ``schema``; ``":memory:"`` lives as long as the process.

    ``synchronous="FULL"`` has a committed write on disk before the next step runs;
    ``"NORMAL"`` survives the process dying, not the machine losing power.

    Raises
    ------
    GolemDaskError
        ``error``, naming ``what`` and the file (and ``hint``), if it cannot be opened.
    """
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
    except (sqlite3.Error, OSError) as e:
        raise error(f"cannot open {what} {path}: {e}" + (f"; {hint}" if hint else "")) from e
    return db


class Database:
    """A durable SQLite file used from several threads, one statement or transaction at a time.

    Examples
    --------
    >>> db = Database(":memory:", "CREATE TABLE t (x INTEGER);", "a test store")
    >>> with db.transaction() as c:
    ...     _ = c.execute("INSERT INTO t VALUES (1)")
    >>> db.query("SELECT x FROM t")
    [(1,)]
    """

    def __init__(self, path: str | Path, schema: str, what: str, error: type[GolemDaskError] = GolemDaskError,
                 synchronous: str = "FULL") -> None:
        self.path = str(path)
        self._db = open_database(self.path, schema, what, error, synchronous)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable write: ``with db.transaction() as c: c.execute(...)``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read."""
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())
