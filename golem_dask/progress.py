"""Progress while a cluster comes up: offers seen and refused (with the commonest reasons),
agreements signed, workers deploying (image and inputs), starting and running.

:class:`Progress` counts what the cluster's events say; :meth:`Progress.line` is one line
of it, which the notebook widget shows and :class:`TerminalProgress` prints: rewritten in
place on a terminal, as plain lines (at each agreement and each worker ready) when the
output is not a terminal.  It stops when the cluster starts closing.  The hint the negotiation gives when nothing matches
for a while (what is refused, what to relax) is printed as a line of its own.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

from golem_dask.events import EventLog, ProgressEvent
from golem_dask.market.negotiation import category

#: A worker's stages, in order; a worker absent from the table is being negotiated for.
#: "deploying" lasts from the agreement until the provider has run the whole exe-script
#: (image, container, input transfers, ``dask worker`` launched: one exchange, whose
#: results arrive together); "starting" until the worker registers.
STAGES = ("deploying", "starting", "running")


class Progress:
    """What the events of one cluster say so far.

    Examples
    --------
    >>> log = EventLog()
    >>> progress = Progress(log, wanted=lambda: 2)
    >>> log.emit("rejected", "offer from a refused", reason="over max_price_per_cpu_hour=0.1 (asks 0.5)")
    >>> log.emit("offer", "offer from b")
    >>> log.emit("agreement", "agreement with b", worker="golem-0")
    >>> progress.line()
    '2 offers (1 refused: 1 over max_price_per_cpu_hour=0.1); 1 agreement; workers 0/2 running, 1 deploying'
    """

    def __init__(self, events: EventLog, wanted: Callable[[], int]) -> None:
        self.wanted = wanted
        self.offers = 0
        self.refused: Counter[str] = Counter()
        self.agreements = 0
        self.stage: dict[str, str] = {}
        self.hint: str | None = None
        #: Where the progress is printed, if anywhere (:func:`show_progress`).
        self.terminal: TerminalProgress | None = None
        self._lock = threading.Lock()
        self.unsubscribe = events.subscribe(self.on_event)

    def close(self) -> None:
        """Stop counting and printing; never raises (it runs as the cluster closes)."""
        self.unsubscribe()
        if self.terminal is not None:
            self.terminal.close()

    def settled(self) -> bool:
        """Every worker asked for runs."""
        with self._lock:
            running = sum(1 for s in self.stage.values() if s == "running")
            return running == len(self.stage) and running >= self.wanted() > 0

    def on_event(self, event: ProgressEvent) -> None:
        worker = event.data.get("worker")
        with self._lock:
            if event.kind == "offer":
                self.offers += 1
            elif event.kind == "rejected":
                self.offers += 1
                self.refused[category(str(event.data.get("reason", event.message)))] += 1
            elif event.kind == "agreement":
                self.agreements += 1
                if worker:
                    self.stage[worker] = "deploying"
            elif event.kind == "activity" and worker and self.stage.get(worker) == "deploying" \
                    and event.data.get("command"):
                self.stage[worker] = "starting"
            elif event.kind == "worker" and worker:
                if event.data.get("state") == "running":
                    self.stage[worker] = "running"
                elif event.data.get("state") == "released":
                    self.stage.pop(worker, None)
            elif event.kind == "hint":
                self.hint = event.message

    def line(self) -> str:
        """One line: offers (refused, commonest reasons first), agreements, workers by stage."""
        with self._lock:
            refused = sum(self.refused.values())
            reasons = ", ".join(f"{n} {label}" for label, n in self.refused.most_common(3))
            offers = f"{self.offers} offer{'s' * (self.offers != 1)}" + (f" ({refused} refused: {reasons})"
                                                                        if refused else "")
            stages = Counter(self.stage.values())
            agreements = f"{self.agreements} agreement{'s' * (self.agreements != 1)}"
        busy = "".join(f", {stages[s]} {s}" for s in STAGES[:-1] if stages[s])
        return f"{offers}; {agreements}; workers {stages['running']}/{self.wanted()} running{busy}"


class TerminalProgress:
    """Prints a :class:`Progress` to ``stream``: one line rewritten in place on a terminal,
    plain lines otherwise; the negotiation's hints on lines of their own."""

    def __init__(self, progress: Progress, events: EventLog, stream: TextIO | None = None,
                 live: bool | None = None, min_interval_s: float = 0.1) -> None:
        self.progress = progress
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.min_interval_s = min_interval_s
        self._shown = ""
        self._at = 0.0
        self._open = False  # a live line is on screen, without its newline
        self.unsubscribe = events.subscribe(self.on_event)

    def on_event(self, event: ProgressEvent) -> None:
        if event.kind == "hint":
            self._write_line(f"golem: {event.message}")
            return
        if event.kind not in ("offer", "rejected", "agreement", "activity", "worker"):
            return
        line = self.progress.line()
        if self.live:
            now = time.monotonic()
            settled = event.kind == "worker"
            if line != self._shown and (settled or now - self._at >= self.min_interval_s):
                self._at, self._shown = now, line
                self._open = not self.progress.settled()  # once all run, the line is done
                self._write(f"\r\x1b[Kgolem: {line}" + ("" if self._open else "\n"))
        elif event.kind in ("agreement", "worker") and line != self._shown:
            self._shown = line
            self._write_line(f"golem: {line}")

    def _write_line(self, text: str) -> None:
        self._write(("\n" if self._open else "") + text + "\n")
        self._open = False

    def _write(self, text: str) -> None:
        """Write and flush; a stream that fails (a closed terminal) ends the printing."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.unsubscribe()

    def close(self) -> None:
        self.unsubscribe()
        if self._open:
            self._open = False
            self._write("\n")


def show_progress(cluster: Any, setting: Any) -> Progress:
    """The progress of ``cluster``, printed to the terminal unless ``setting`` is false
    (``"auto"``: printed, except in a notebook, where the widget shows it)."""
    progress = Progress(cluster.events, lambda: len(getattr(cluster, "worker_spec", {}) or {}))
    if setting == "auto":
        setting = "ipykernel" not in sys.modules
    if setting:
        progress.terminal = TerminalProgress(progress, cluster.events)
    return progress
