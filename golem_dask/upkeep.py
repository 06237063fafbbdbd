"""Keeping a long-running cluster whole and thrifty: renewal, idle guard, budget caps.

* :class:`Renewals`: an agreement expires (the provider ends it), so each worker is
  replaced before that: a successor is rented and joins, then the old worker is retired
  gracefully (the scheduler moves its data to the others) and paid.  No worker, and no
  key held in memory, is lost to an expiring agreement.
* :class:`IdleGuard`: when no task has run for ``golem.cluster.idle-timeout``, every
  worker is retired and paid; the cluster stays usable (``scale``/``adapt`` rent again).
* paying as it goes (:meth:`~golem_dask.payment.accountant.Accountant.pay_as_you_go`):
  accepted debit notes paid every ``golem.payment.pay-interval``.
* :func:`retire_leaving`: workers about to be closed hand their data over first (dask's
  ``SpecCluster`` asks the scheduler to retire them by name where it wants addresses, so
  by itself a scale-down recomputes what the leaving workers held).
* :func:`affordable`: how many workers the budget can still reserve agreements for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

from distributed.core import Status

from golem_dask import config
from golem_dask.protocol.messages import now_ms

logger = logging.getLogger(__name__)


async def retire_leaving(cluster: Any) -> None:
    """Let the workers that are leaving the cluster's spec hand their data to the others."""
    leaving = [name for name in set(cluster.workers) - set(cluster.worker_spec)
               if getattr(cluster.workers[name], "status", None) == Status.running]
    scheduler = getattr(cluster, "scheduler", None)
    if not leaving or scheduler is None or scheduler.status != Status.running:
        return
    # The scheduler refuses while no other worker can take the data yet (a successor that
    # registered a moment ago): try again for a few seconds.
    deadline = asyncio.get_running_loop().time() + config.seconds("cluster.retire-timeout")
    while True:
        try:
            await cluster.scheduler_comm.retire_workers(names=leaving, close_workers=False, remove=True)
        except Exception as e:  # the close goes on; at worst their keys are recomputed
            logger.warning("retiring %s gracefully failed: %s", leaving, e)
            return
        names = {str(ws.name) for ws in scheduler.workers.values()}
        leaving = [name for name in leaving if name in names]
        if not leaving or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.2)
    if leaving:
        logger.warning("%s kept data no other worker could take; it is recomputed when needed", leaving)


def renewal_margin(lifetime_s: float) -> float:
    """How long before an agreement expires its worker's successor is rented:
    ``golem.cluster.renew-margin``, at most half the agreement's lifetime."""
    return min(config.seconds("cluster.renew-margin"), lifetime_s / 2)


class Renewals:
    """Replaces every worker of ``cluster`` before its agreement expires."""

    def __init__(self, cluster: Any, interval_s: float = 0.5) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self._renewing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.check()
        finally:
            for task in self._tasks:
                task.cancel()

    def check(self) -> None:
        c = self.cluster
        if c.status != Status.running:
            return
        margin_ms = renewal_margin(float(c.spec.lifetime_s)) * 1000
        for name, worker in list(c.workers.items()):
            deal = getattr(worker, "deal", None)
            if (deal is None or name in self._renewing or name not in c.worker_spec
                    or worker.status != Status.running):
                continue
            if now_ms() >= deal.agreement.valid_to_ms - margin_ms:
                self._renewing.add(name)
                task = asyncio.get_running_loop().create_task(self._renew(name), name=f"golem-renew-{name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _renew(self, name: str) -> None:
        c = self.cluster
        expires = c.workers[name].deal.agreement.valid_to_ms
        c.events.emit("renewal", f"agreement of {name} expires in {max(0, expires - now_ms()) / 1000:.0f}s: "
                      "renting its successor", worker=name)
        successor = c._new_worker_name(c._i)
        c._i += 1
        c.worker_spec[successor] = c.new_spec
        try:
            await c._correct_state()
        except Exception as e:  # reported below
            logger.info("renting the successor of %s failed: %s", name, e)
        ready = successor in c.workers and c.workers[successor].status == Status.running
        if not ready:
            c.worker_spec.pop(successor, None)
            c.events.emit("warning", f"could not rent a successor for {name}; it stops when its agreement "
                          "expires and is then replaced", worker=name)
            return
        if c.worker_spec.pop(name, None) is not None:
            await c._correct_state()  # retires it (its data moves to the others), pays it
        c.events.emit("renewal", f"{name} handed over to {successor} before its agreement expired",
                      worker=name, successor=successor)


class IdleGuard:
    """Retires every worker of ``cluster`` when no task has run for ``timeout_s``."""

    def __init__(self, cluster: Any, timeout_s: float) -> None:
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.last_busy = time.monotonic()

    def busy(self) -> bool:
        scheduler = self.cluster.scheduler
        if scheduler is None:
            return True
        return bool(any(ws.processing for ws in scheduler.workers.values())
                    or getattr(scheduler, "queued", None) or getattr(scheduler, "unrunnable", None))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, max(0.1, self.timeout_s / 10)))
            self.check()

    def check(self) -> None:
        now = time.monotonic()
        if self.busy() or self.cluster.status != Status.running:
            self.last_busy = now
            return
        if now - self.last_busy >= self.timeout_s and self.cluster.worker_spec:
            n = len(self.cluster.worker_spec)
            self.cluster.events.emit("idle", f"no task ran for {self.timeout_s:g}s (golem.cluster.idle-timeout): "
                                     f"retiring {n} workers, which are paid; scale() or adapt() rents again")
            with contextlib.suppress(Exception):
                adaptive = getattr(self.cluster, "_adaptive", None)
                if adaptive is not None:
                    adaptive.stop()
            self.cluster.scale(0)
            self.last_busy = now


def upkeep_tasks(cluster: Any) -> list[tuple[str, Coroutine[Any, Any, None]]]:
    """The background work of a running cluster: renewals, the idle guard, paying as it goes."""
    tasks: list[tuple[str, Coroutine[Any, Any, None]]] = [("golem-renewals", Renewals(cluster).run())]
    if cluster.idle_timeout_s:
        tasks.append(("golem-idle-guard", IdleGuard(cluster, cluster.idle_timeout_s).run()))
    interval = config.get("payment.pay-interval")
    if interval:
        tasks.append(("golem-pay-as-you-go", cluster.accountant.pay_as_you_go(
            cluster.market, config.seconds("payment.pay-interval"))))
    return tasks


def affordable(cluster: Any, n: int) -> int:
    """``n``, or fewer: the workers there are plus those whose worst case the budget left
    can still reserve (at the cheapest offer the negotiator knows)."""
    current = len(cluster.workers)
    if n <= current:
        return n
    costs = [c.worst_case for c in cluster.negotiator.candidates.values()]
    if not costs:
        return n  # nothing known yet: the negotiation itself refuses what is unaffordable
    cheapest = min(costs)
    more = math.floor(cluster.budget.remaining / cheapest) if cheapest > 0 else n - current
    return min(n, current + max(0, int(more)))


def drop_unaffordable(cluster: Any, error: BaseException) -> None:
    """After a failed start: forget the workers the budget could not pay for (and say so),
    or re-raise when something else failed."""
    from golem_dask.errors import BudgetExceededError

    unaffordable = [n for n, w in cluster.workers.items()
                    if isinstance(getattr(w, "error", None), BudgetExceededError)]
    others = [w.error for w in cluster.workers.values()
              if getattr(w, "error", None) is not None and not isinstance(w.error, BudgetExceededError)]
    if others or not unaffordable:
        raise others[0] if others else error
    for n in unaffordable:
        del cluster.workers[n]
        cluster.worker_spec.pop(n, None)
    message = (f"budget of {cluster.budget.total} GLM allows {len(cluster.workers)} workers now; "
               f"not starting {len(unaffordable)} more ({error})")
    cluster.events.emit("budget", message)
    logger.warning("%s", message)
