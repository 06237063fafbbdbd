"""Usage counters a provider bills by: wall time and CPU time of an activity."""

from __future__ import annotations

import time
from decimal import Decimal

from golem_dask.protocol import properties as P

_MS = Decimal("0.001")


def _seconds(value: float | Decimal) -> Decimal:
    return Decimal(str(value)).quantize(_MS)


class UsageMeter:
    """Counts ``golem.usage.duration_sec`` and ``golem.usage.cpu_sec`` for one activity.

    Duration runs from :meth:`start` (the ``run`` command) to :meth:`stop` on a monotonic
    clock; CPU seconds are whatever the runtime last measured (they only grow), counted
    only once the meter has started: an activity that never got to ``run`` (a failed
    transfer, a cluster closed first) bills nothing, even if its container had begun
    loading the worker's libraries.

    Examples
    --------
    >>> m = UsageMeter()
    >>> m.start(); m.record_cpu(Decimal("1.5")); m.stop()
    >>> m.usage()[P.USAGE_CPU_SEC]
    Decimal('1.500')
    >>> idle = UsageMeter(); idle.record_cpu(Decimal("0.7")); idle.usage()[P.USAGE_CPU_SEC]
    Decimal('0')
    """

    def __init__(self) -> None:
        self._started: float | None = None
        self._stopped: float | None = None
        self._cpu = Decimal(0)

    @property
    def running(self) -> bool:
        return self._started is not None and self._stopped is None

    def start(self) -> None:
        if self._started is None:
            self._started = time.monotonic()

    def stop(self) -> None:
        if self._started is not None and self._stopped is None:
            self._stopped = time.monotonic()

    def record_cpu(self, cpu_seconds: Decimal) -> None:
        if self._started is not None:
            self._cpu = max(self._cpu, _seconds(cpu_seconds))

    def duration(self) -> Decimal:
        if self._started is None:
            return Decimal(0).quantize(_MS)
        end = self._stopped if self._stopped is not None else time.monotonic()
        return _seconds(end - self._started)

    def usage(self) -> dict[str, Decimal]:
        return {P.USAGE_CPU_SEC: self._cpu, P.USAGE_DURATION_SEC: self.duration()}
