"""The hub's mailbox for peers that are away: pushes kept on disk until they return.

A provider that sends a debit note or an invoice while its requestor is disconnected
(crashed, restarting, between networks) must not lose it.  :class:`OfflineStore` keeps
such pushes in SQLite (``<golem.hub.data-dir>/hub.sqlite``) as the sender's own signed
frames, so the hub cannot alter them, for at most ``golem.hub.offline-retention`` and
within bounds per peer and in total; the hub hands them over, oldest first, when the
recipient says hello again, and forgets each one when the recipient acknowledges it.

The database is opened on first use: a hub that never stores anything writes no file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

from golem_dask.errors import MarketError
from golem_dask.store import open_database
from golem_dask.protocol.identity import checksum_address

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pushes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    stored_ms INTEGER NOT NULL,
    frame BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS pushes_by_recipient ON pushes (recipient, id);
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_address(text: str) -> bool:
    # Peers say hello as checksummed addresses: a push to any other spelling would wait forever.
    try:
        return checksum_address(text) == text
    except ValueError:
        return False


class OfflineStore:
    """Signed pushes for offline peers, bounded by age, per peer and in total.

    Parameters
    ----------
    path:
        The SQLite file (its folder is made on first write), or ``":memory:"``.
    retention_s:
        A push older than this is dropped unread.
    max_messages, max_bytes:
        The most pushes and frame bytes kept for one recipient, and from one sender.
    max_total_bytes:
        The most frame bytes kept for everyone together.
    max_frame_bytes:
        The largest push kept.

    Examples
    --------
    >>> store = OfflineStore(":memory:", retention_s=3600, max_messages=2, max_bytes=1024,
    ...                      max_total_bytes=4096, max_frame_bytes=512)
    >>> R, P = "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB", "0x" + "12" * 20
    >>> store.add(R, P, b"frame-1"), store.add(R, P, b"frame-2")
    (None, None)
    >>> store.add(R, P, b"frame-3")
    'the hub already keeps 2 messages for 0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB (golem.hub.offline-max-messages)'
    >>> store.add("0xnobody", P, b"frame")
    "'0xnobody' is not a checksummed address"
    >>> [frame for _, frame in store.pending(R)]
    [b'frame-1', b'frame-2']
    >>> store.ack(R, [i for i, _ in store.pending(R)])
    2
    >>> store.pending(R)
    []
    """

    def __init__(self, path: str | Path, *, retention_s: float, max_messages: int, max_bytes: int,
                 max_total_bytes: int, max_frame_bytes: int) -> None:
        self.path = str(path)
        self.retention_ms = int(retention_s * 1000)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.max_frame_bytes = max_frame_bytes
        self._db: sqlite3.Connection | None = None
        # Counts and sizes per recipient and per sender, kept in step with the table so
        # that a refusal costs no query.
        self._count_to: Counter[str] = Counter()
        self._bytes_to: Counter[str] = Counter()
        self._count_from: Counter[str] = Counter()
        self._bytes_from: Counter[str] = Counter()
        self._total_bytes = 0
        if self.path != ":memory:" and os.path.exists(self.path):
            self._open()  # pushes kept by an earlier run of the hub

    def __repr__(self) -> str:
        return f"<OfflineStore {self.path}: {sum(self._count_to.values())} pushes, {self._total_bytes} bytes>"

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        # Opened by whoever builds the hub, used on its event loop: one user at a time.
        # Committed pushes survive the hub process dying (not the machine losing power)
        # without an fsync per push that a flooding sender could make the hub wait on.
        db = open_database(self.path, _SCHEMA, "the hub's offline store", MarketError, synchronous="NORMAL",
                           hint="check golem.hub.data-dir (golem-dask hub --data-dir)")
        self._db = db
        self._recount()
        return db

    def _recount(self) -> None:
        assert self._db is not None
        for counter in (self._count_to, self._bytes_to, self._count_from, self._bytes_from):
            counter.clear()
        for recipient, sender, count, size in self._db.execute(
                "SELECT recipient, sender, COUNT(*), SUM(LENGTH(frame)) FROM pushes GROUP BY recipient, sender"):
            self._count_to[recipient] += count
            self._bytes_to[recipient] += size
            self._count_from[sender] += count
            self._bytes_from[sender] += size
        self._total_bytes = sum(self._bytes_to.values())

    def close(self) -> None:
        """Close the database.  Safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def waiting_for(self, recipient: str) -> int:
        """How many pushes are kept for ``recipient`` (no query)."""
        return self._count_to.get(recipient, 0)

    def add(self, recipient: str, sender: str, frame: bytes, now_ms: int | None = None) -> str | None:
        """Keep ``frame`` for ``recipient``; ``None`` if kept, else why not."""
        size = len(frame)
        if not _is_address(recipient):
            return f"{recipient!r:.60} is not a checksummed address"
        if size > self.max_frame_bytes:
            return f"the message has {size} bytes, more than the {self.max_frame_bytes} the hub keeps"
        if self._count_to[recipient] >= self.max_messages:
            return f"the hub already keeps {self._count_to[recipient]} messages for {recipient} " \
                   "(golem.hub.offline-max-messages)"
        if self._bytes_to[recipient] + size > self.max_bytes:
            return f"the hub already keeps {self._bytes_to[recipient]} bytes for {recipient} " \
                   "(golem.hub.offline-max-bytes)"
        if self._count_from[sender] >= self.max_messages or self._bytes_from[sender] + size > self.max_bytes:
            return f"the hub already keeps {self._count_from[sender]} messages ({self._bytes_from[sender]} bytes) " \
                   f"from {sender} for peers that are away (golem.hub.offline-max-messages/-bytes)"
        if self._total_bytes + size > self.max_total_bytes:
            return "the hub's offline store is full (golem.hub.offline-max-total-bytes)"
        stamp = _now_ms() if now_ms is None else now_ms
        try:
            self._open().execute("INSERT INTO pushes (recipient, sender, stored_ms, frame) VALUES (?, ?, ?, ?)",
                                 (recipient, sender, stamp, frame))
        except sqlite3.Error as e:
            logger.error("offline store %s: cannot keep a push for %s: %s", self.path, recipient, e)
            return "the hub cannot keep messages for peers that are away right now"
        self._count_to[recipient] += 1
        self._bytes_to[recipient] += size
        self._count_from[sender] += 1
        self._bytes_from[sender] += size
        self._total_bytes += size
        return None

    def pending(self, recipient: str, now_ms: int | None = None) -> list[tuple[int, bytes]]:
        """``(id, frame)`` of every push kept for ``recipient`` within retention, oldest first."""
        if not self._count_to.get(recipient):
            return []
        cutoff = (_now_ms() if now_ms is None else now_ms) - self.retention_ms
        try:
            rows = self._open().execute("SELECT id, frame FROM pushes WHERE recipient = ? AND stored_ms >= ? "
                                        "ORDER BY id", (recipient, cutoff)).fetchall()
        except (sqlite3.Error, MarketError) as e:
            logger.error("offline store %s: cannot read what is kept for %s: %s", self.path, recipient, e)
            return []
        return [(int(i), bytes(f)) for i, f in rows]

    def ack(self, recipient: str, ids: list[int]) -> int:
        """Forget the pushes ``ids`` of ``recipient`` (it has them); how many were forgotten."""
        if not ids or not self._count_to.get(recipient) or self._db is None:
            return 0
        forgotten = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            where = f"recipient = ? AND id IN ({','.join('?' * len(chunk))})"
            forgotten += self._delete(where, (recipient, *chunk))
        return forgotten

    def purge(self, now_ms: int | None = None) -> int:
        """Drop pushes older than the retention; how many were dropped."""
        if self._db is None:
            return 0
        cutoff = (_now_ms() if now_ms is None else now_ms) - self.retention_ms
        dropped = self._delete("stored_ms < ?", (cutoff,))
        if dropped:
            logger.info("offline store: dropped %d pushes older than the retention", dropped)
        return dropped

    def _delete(self, where: str, args: tuple[object, ...]) -> int:
        # SELECT then DELETE in one transaction (DELETE ... RETURNING needs SQLite 3.35).
        assert self._db is not None
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute(f"SELECT recipient, sender, LENGTH(frame) FROM pushes WHERE {where}",
                                  args).fetchall()
                db.execute(f"DELETE FROM pushes WHERE {where}", args)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            logger.error("offline store %s: cannot forget pushes: %s", self.path, e)
            return 0
        for recipient, sender, size in rows:
            self._forgot(recipient, sender, int(size))
        return len(rows)

    def _forgot(self, recipient: str, sender: str, size: int) -> None:
        for counter, key, amount in ((self._count_to, recipient, 1), (self._bytes_to, recipient, size),
                                     (self._count_from, sender, 1), (self._bytes_from, sender, size)):
            counter[key] -= amount
            if counter[key] <= 0:
                del counter[key]
        self._total_bytes -= size
