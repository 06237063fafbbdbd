"""Keeping a long-running cluster whole and thrifty: renewal, idle guard, budget caps.

* :class:`Renewals`: an agreement expires (the provider ends it), so each worker is
  replaced before that: a successor is rented and joins, then the old worker is retired
  gracefully (the scheduler moves its data to the others) and paid.  No worker, and no
  key held in memory, is lost to an expiring agreement.  When no successor can be rented
  first (every provider full, as a single machine is), the worker steps aside instead:
  retired while the others can take its data, then replaced in the room it left.
* :class:`IdleGuard`: when no task has run for ``golem.cluster.idle-timeout``, every
  worker is retired and paid; the cluster stays usable (``scale``/``adapt`` rent again).
* paying as it goes (:meth:`~golem_dask.payment.accountant.Accountant.pay_as_you_go`):
  accepted debit notes paid every ``golem.payment.pay-interval``.
* :class:`CapacityWatch`: a worker delivering under half of the threads it was sold is
  replaced, paid its delivered share, and its provider remembered.
* :func:`retire_leaving`: workers about to be closed hand their data over first (dask's
  ``SpecCluster`` asks the scheduler to retire them by name where it wants addresses, so
  by itself a scale-down recomputes what the leaving workers held).
* :func:`affordable`: how many workers the budget can still reserve agreements for;
  :func:`retire_unaffordable`: a worker whose next payment period the budget cannot hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import dask.utils
from distributed.core import Status

from golem_dask import config
from golem_dask.errors import ConfigError
from golem_dask.payment.accountant import ledger_of
from golem_dask.payment.bill import EntryStatus
from golem_dask.protocol.messages import now_ms
from golem_dask.tasks import Tasks

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
            cluster.events.emit("warning", f"retiring {', '.join(leaving)} gracefully failed ({type(e).__name__}: "
                                f"{e}); what they held is recomputed when needed")
            return
        names = {str(ws.name) for ws in scheduler.workers.values()}
        leaving = [name for name in leaving if name in names]
        if not leaving or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.2)
    if leaving:
        cluster.events.emit("warning", f"{', '.join(leaving)} kept data no other worker took within "
                            "golem.cluster.retire-timeout; it is recomputed when needed")


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
        self._tasks = Tasks()
        self._stepping_aside = asyncio.Lock()  # one at a time: the others must hold its data

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                self.check()
        finally:
            self._tasks.cancel()

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
                self._tasks.spawn(self._renew(name), f"golem-renew-{name}")

    async def _renew(self, name: str) -> None:
        c = self.cluster
        expires = c.workers[name].deal.agreement.valid_to_ms
        c.events.emit("renewal", f"agreement of {name} expires in {max(0, expires - now_ms()) / 1000:.0f}s: "
                      "renting its successor", worker=name)
        room = room_on_machine(c)  # the embedded market knows when its machine is full
        successor = None if room is not None and len(c.workers) >= room else await hand_over(c, name)
        if successor is not None:
            c.events.emit("renewal", f"{name} handed over to {successor} before its agreement expired",
                          worker=name, successor=successor)
        elif not await self._step_aside(name):
            c.events.emit("warning", f"could not rent a successor for {name}; it stops when its agreement "
                          "expires and is then replaced", worker=name)

    async def _step_aside(self, name: str) -> bool:
        """No successor could be rented beside ``name``: retire it now, while other workers
        can take its data, and rent its replacement in the room it leaves.  False when no
        other worker runs to take the data (``name`` then stays until its agreement ends)."""
        c = self.cluster
        async with self._stepping_aside:
            others = [n for n, w in c.workers.items() if n != name and w.status == Status.running]
            if not others or name not in c.worker_spec or c.status != Status.running:
                return False
            c.events.emit("renewal", f"no room to rent a successor beside {name}: it hands its data to the other "
                          "workers now and is replaced in the room it leaves", worker=name)
            spec = c.worker_spec.pop(name)
            await c._correct_state()  # retires it (its data moves to the others), pays it
            successor = await rent_one(c, spec, f"the replacement of {name}")
            if successor is not None:
                c.events.emit("renewal", f"{name} stepped aside for {successor} before its agreement expired",
                              worker=name, successor=successor)
            else:
                c.events.emit("warning", f"could not rent a replacement for {name}; the cluster runs with one "
                              "worker fewer until scale() or adapt() asks again", worker=name)
            return True


async def hand_over(cluster: Any, name: str) -> str | None:
    """Rent a successor for worker ``name``; once it runs, retire ``name`` (its data moves
    to the others) and settle its agreement.  The successor's name, or None if it could
    not be rented (``name`` then stays)."""
    c = cluster
    successor = await rent_one(c, c.new_spec, f"the successor of {name}")
    if successor is not None and c.worker_spec.pop(name, None) is not None:
        await c._correct_state()  # retires it (its data moves to the others), pays it
    return successor


async def rent_one(cluster: Any, spec: Any, what: str) -> str | None:
    """Add one worker of ``spec`` to the cluster and start it: its name once it runs, or
    None (its spec is dropped again; ``what`` names it in the log).  None at once once the
    cluster closes: a worker added after close's ``scale(0)`` would outlive the cluster."""
    c = cluster
    if c.status != Status.running:
        return None
    name = c._new_worker_name(c._i)
    c._i += 1
    c.worker_spec[name] = spec
    try:
        await c._correct_state()
    except Exception as e:  # the caller reports it
        logger.info("renting %s failed: %s", what, e)
    if name in c.workers and c.workers[name].status == Status.running:
        return name
    c.worker_spec.pop(name, None)
    return None


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


@dataclass
class _Delivery:
    """What one worker delivered while saturated, and its last window of samples."""

    provider: str
    name: str
    threads: int
    samples: deque[tuple[bool, Decimal, frozenset[str]]]  # saturated, share of threads used, task kinds
    bought_cpu_sec: Decimal = Decimal(0)
    delivered_cpu_sec: Decimal = Decimal(0)
    flagged: bool = False


class CapacityWatch:
    """Compares what each worker delivers with the threads its provider sold.

    Sampled from the scheduler: a worker is *saturated* when it runs at least as many
    tasks as it has threads, and then it should keep those threads busy.  One that stays
    saturated for the whole window (``golem.cluster.capacity-window``) while using under
    half of its threads, when another worker in the same window shows the work is
    CPU-bound (at least 80% of its threads, running tasks of the same kind), is caught: it is handed over to a successor
    from another provider, paid only its delivered share, and remembered (the reputation
    store ranks that provider's offers by what it delivers).  Without a CPU-bound peer
    nothing is concluded: slow I/O looks the same.
    """

    def __init__(self, cluster: Any, interval_s: float, window_s: float) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self.size = max(2, round(window_s / interval_s))
        self.window_s = window_s
        self.seen: dict[str, _Delivery] = {}
        self._tasks = Tasks()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                now = loop.time()
                self.check(Decimal(str(round(now - last, 3))))
                last = now
        finally:
            for name in list(self.seen):
                self._remember(name)

    def check(self, elapsed: Decimal) -> None:
        c = self.cluster
        scheduler = c.scheduler
        if scheduler is None:
            return
        states = {str(ws.name): ws for ws in scheduler.workers.values()}
        for name, worker in list(c.workers.items()):
            ws, deal = states.get(name), getattr(worker, "deal", None)
            if ws is None or deal is None:
                continue
            threads = max(1, int(ws.nthreads or 1))
            seen = self.seen.setdefault(name, _Delivery(deal.agreement.provider_id, deal.candidate.name, threads,
                                                        deque(maxlen=self.size)))
            used = Decimal(str(ws.metrics.get("cpu", 0) or 0)) / 100  # cores busy
            saturated = len(ws.processing) >= threads
            kinds = frozenset(str(ts.prefix.name) for ts in ws.processing)
            seen.samples.append((saturated, min(Decimal(1), used / threads), kinds))
            if saturated:
                seen.bought_cpu_sec += threads * elapsed
                seen.delivered_cpu_sec += min(Decimal(threads), used) * elapsed
        full = {n: sum((f for _, f, _ in d.samples), Decimal(0)) / len(d.samples) for n, d in self.seen.items()
                if len(d.samples) == self.size and all(s for s, _, _ in d.samples) and n in c.workers}
        ran: dict[str, frozenset[str]] = {n: frozenset().union(*(k for _, _, k in self.seen[n].samples))
                                          for n in full}
        for name, share in full.items():
            # Caught only beside a worker running the same kind of task at full speed.
            if share < Decimal("0.5") and not self.seen[name].flagged and any(
                    other >= Decimal("0.8") and ran[peer] & ran[name] for peer, other in full.items()):
                self._caught(name, share)
        for name in [n for n in self.seen if n not in c.workers]:
            self._remember(name)

    def _caught(self, name: str, share: Decimal) -> None:
        c, seen = self.cluster, self.seen[name]
        seen.flagged = True
        worker = c.workers[name]
        c.events.emit("warning", f"{name} delivered {share:.0%} of the {seen.threads} threads {seen.name} sold "
                      f"over {self.window_s:g}s: replacing it, paying only what it delivered, and avoiding "
                      f"{seen.name}", worker=name, provider=seen.provider, delivered=share)
        c.accountant.delivered(worker.deal.agreement.id, share)
        c.negotiator.excluded.add(seen.provider)
        if c.negotiator.reputation is not None:
            c.negotiator.reputation.flag(seen.provider, seen.name)
        self._tasks.spawn(hand_over(c, name), f"golem-replace-{name}")

    def _remember(self, name: str) -> None:
        seen = self.seen.pop(name)
        reputation = self.cluster.negotiator.reputation
        if reputation is not None and seen.bought_cpu_sec > 0:
            reputation.delivered(seen.provider, seen.name, bought_cpu_sec=seen.bought_cpu_sec,
                                 delivered_cpu_sec=seen.delivered_cpu_sec)


def upkeep_tasks(cluster: Any) -> list[tuple[str, Coroutine[Any, Any, None]]]:
    """The background work of a running cluster: renewals, the idle guard, paying as it goes."""
    tasks: list[tuple[str, Coroutine[Any, Any, None]]] = [
        ("golem-renewals", Renewals(cluster).run()),
        ("golem-capacity", CapacityWatch(cluster, config.seconds("payment.metering-interval"),
                                         config.seconds("cluster.capacity-window")).run()),
    ]
    if cluster.idle_timeout_s:
        tasks.append(("golem-idle-guard", IdleGuard(cluster, cluster.idle_timeout_s).run()))
    interval = config.get("payment.pay-interval")
    if interval:
        tasks.append(("golem-pay-as-you-go", cluster.accountant.pay_as_you_go(
            cluster.market, config.seconds("payment.pay-interval"))))
    return tasks


def replace_lost(cluster: Any, name: str, reason: str) -> None:
    """A running worker's activity died: pay what it ran, remember the provider's failure,
    start a replacement (unless it was retired on purpose)."""
    c = cluster
    if name not in c.worker_spec or c.status != Status.running:
        return  # retired on purpose (scale-down, close): nothing was lost
    worker = c.workers.pop(name, None)
    if worker is None:
        return
    deal = getattr(worker, "deal", None)
    if deal is not None and c.negotiator.reputation is not None:
        c.negotiator.reputation.failure(deal.agreement.provider_id, deal.candidate.name)
    lines = [line for line in reason.splitlines() if line.strip()] or ["unknown reason"]
    last = f" (last log line: {lines[-1].strip()})" if len(lines) > 1 else ""
    c.events.emit("warning", f"worker {name} lost: {lines[0]}{last}; replacing it", reason=reason)
    c._futures.add(asyncio.ensure_future(worker.close()))
    spec = c.worker_spec.pop(name)
    c.worker_spec[c._new_worker_name(c._i)] = spec
    c._i += 1
    c._correct_state()


def retire_unaffordable(cluster: Any, agreement_id: str) -> None:
    """The budget cannot reserve the next payment period of the worker on ``agreement_id``:
    retire it (its data moves to the others) and pay it, rather than run it unfunded."""
    name = next((n for n, w in cluster.workers.items() if getattr(w, "agreement_id", None) == agreement_id), None)
    if name is not None and cluster.worker_spec.pop(name, None) is not None:
        cluster._correct_state()


def affordable(cluster: Any, n: int) -> int:
    """``n``, or fewer: the workers asked for already plus those whose worst case the budget
    left can still reserve (at the cheapest offer the negotiator knows or its workers took).

    Workers being started count as asked for; those that hold no reservation yet will take
    theirs from what is left (a worker that reserved while not yet listed among the
    cluster's workers was counted twice, and a scale right after another one shrank it)."""
    wanted = set(cluster.worker_spec)
    current = len(wanted)
    if n <= current:
        return n
    costs = [c.worst_case for c in cluster.negotiator.candidates.values()]
    # Offers already taken (a hub's providers sell their slice whole) still price the next worker.
    costs += [w.deal.candidate.worst_case for w in list(cluster.workers.values()) if getattr(w, "deal", None)]
    if not costs:
        return n  # nothing known yet: the negotiation itself refuses what is unaffordable
    cheapest = min(costs)
    if cheapest <= 0:
        return n
    reserved = set(cluster.negotiator.signing) | {a.worker for a in list(cluster.accountant.accounts.values())
                                                  if a.status is EntryStatus.RUNNING}
    left = cluster.budget.remaining - cheapest * len(wanted - reserved)
    return min(n, current + max(0, math.floor(left / cheapest)))


def payable_terms(spec: Any, payer: Any, events: Any) -> Any:
    """``spec``, or without its mid-run payment terms when nothing would keep them: a payer
    that keeps no ledger cannot pay accepted debit notes as it goes (a yagna daemon's payer
    needs none: the daemon pays them itself), and providers end agreements whose payments
    are late."""
    if not spec.payment_interval_s or getattr(payer, "daemon", None) is not None or ledger_of(payer) is not None:
        return spec
    events.emit("warning", f"{type(payer).__name__} keeps no ledger, so it pays at the end only: "
                "golem.payment.pay-interval is left out of the demand")
    return replace(spec, payment_interval_s=None)


def begin_closing(cluster: Any) -> None:
    """As a cluster starts closing: the progress display ends (what follows is the bill),
    and the payer gathers the final invoices, which arrive over a moment as the workers
    leave, into one transaction: for up to ``golem.payment.close-batch-window``, and no
    longer once every leaving worker's is owed."""
    cluster.progress.close()
    linger = getattr(cluster.payer, "linger", None)
    if linger is not None:
        leaving = sum(1 for w in cluster.workers.values() if getattr(w, "deal", None) is not None)
        linger(config.seconds("payment.close-batch-window"), leaving)


def room_on_machine(cluster: Any) -> int | None:
    """How many of the cluster's workers its embedded providers hold at once (None: the
    market does not know, as a hub or the yagna daemon does not)."""
    room_for = getattr(cluster.market, "room_for", None)
    return room_for(cluster.spec.resources) if room_for is not None else None


def within_capacity(cluster: Any, n: int, *, strict: bool) -> int:
    """``n``, or as many workers as this machine's embedded providers hold.  At the start
    (``strict``) asking for more fails at once; a later ``scale`` is capped, said once per
    cluster (``adapt`` asks again and again)."""
    room = room_on_machine(cluster)
    if room is None or n <= room:
        return n
    resources = cluster.spec.resources
    message = (f"this machine's embedded provider has room for {room} workers of {resources.cpu_threads} cpu, "
               f"{dask.utils.format_bytes(resources.memory_bytes)} memory and "
               f"{dask.utils.format_bytes(resources.storage_bytes)} storage; asked for {n}")
    if strict:
        raise ConfigError(f"{message}: ask for fewer workers, or less cpu, memory or storage each, or sell more of this "
                          "machine (golem.provider.local), or rent other machines (market='tcp://HUB:PORT' or "
                          "market='yagna')")
    if not getattr(cluster, "_over_capacity", False):
        cluster.events.emit("capacity", f"{message}; scaling to {room}")
    cluster._over_capacity = True
    return room


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
