"""The one progress channel users see: offers, agreements, workers, money.

Diagnostics go to ``logging``; what a user renting compute wants to watch (offers seen,
agreements signed, workers ready, amounts paid) goes through an :class:`EventLog`, which
the cluster's ``events`` attribute, its repr and the CLI all read.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

logger = logging.getLogger("golem_dask.progress")


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Something a user may want to know happened.

    ``kind`` is one of ``offer``, ``rejected``, ``agreement``, ``worker``, ``budget``,
    ``invoice``, ``payment``, ``warning``.
    """

    kind: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


class EventLog:
    """Keeps recent progress events and forwards each to subscribers.

    Examples
    --------
    >>> log = EventLog()
    >>> seen = []
    >>> _ = log.subscribe(seen.append)
    >>> log.emit("worker", "worker golem-0 ready")
    >>> str(seen[0])
    '[worker] worker golem-0 ready'
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        self._events: deque[ProgressEvent] = deque(maxlen=maxlen)
        self._subscribers: list[Callable[[ProgressEvent], None]] = []

    def emit(self, kind: str, message: str, **data: Any) -> None:
        event = ProgressEvent(kind, message, MappingProxyType(data))
        self._events.append(event)
        level = logging.WARNING if kind == "warning" else logging.INFO
        logger.log(level, "%s", event)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break the cluster
                logger.exception("progress subscriber %r failed", callback)

    def subscribe(self, callback: Callable[[ProgressEvent], None]) -> Callable[[], None]:
        """Call ``callback`` for every new event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)

    def log_text(self, other: Iterable[tuple[datetime.datetime, str]] = ()) -> str:
        """The events as timestamped lines, merged with ``other`` lines (dask's own
        cluster-manager log): what ``cluster.get_logs()["Cluster"]`` shows."""
        lines = [(datetime.datetime.fromtimestamp(e.time), str(e)) for e in self]
        return "\n".join(f"{at:%Y-%m-%d %H:%M:%S} {line}" for at, line in sorted([*lines, *other],
                                                                                  key=lambda pair: pair[0]))

    def of_kind(self, kind: str) -> list[ProgressEvent]:
        return [e for e in self._events if e.kind == kind]


class _ClosedCommsWithoutTraceback(logging.Filter):
    """Keeps distributed's "Batched Comm Closed" line and drops its traceback: a closed
    stream is how every worker leaves at scale-down or close, and a traceback in the
    user's terminal reads like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Batched Comm Closed"):
            record.exc_info = record.exc_text = None
        return True


def _patch_release_mismatch() -> str:
    """A pattern of distributed's version warning when the one difference is the patch
    release of Python (docker workers run Debian's 3.X.y; pickles do not change within a
    minor release, and the image check refuses other dask and distributed versions)."""
    import re
    import sys

    same = re.escape(f"{sys.version_info.major}.{sys.version_info.minor}.") + r"\d+\S*"
    rule = r"\+[-+]+\+\s+"
    return (rf"Mismatched versions found\s+{rule}\| Package[^\n]*\n{rule}"
            rf"\| python\s+\| {same}\s+\| {same}\s+\| {same}\s+\|\s+\+[-+]+\+\s*$")


def quiet_expected_noise() -> None:
    """Keep what every cluster of ours meets, and is harmless, from reading like a failure:
    :class:`_ClosedCommsWithoutTraceback` on ``distributed.batched`` (once), and no version
    warning from distributed when only Python's patch release differs."""
    target = logging.getLogger("distributed.batched")
    if not any(isinstance(f, _ClosedCommsWithoutTraceback) for f in target.filters):
        target.addFilter(_ClosedCommsWithoutTraceback())
    import warnings

    from distributed.versions import VersionMismatchWarning

    warnings.filterwarnings("ignore", _patch_release_mismatch(), VersionMismatchWarning)

