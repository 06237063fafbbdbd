"""``GolemWorker``: one rented Dask worker, from agreement to payment.

``start`` is negotiate → activity (deploy, start, run ``dask worker``) → registered with
the scheduler; a :class:`Rental` holds the market side, so the part before ``run`` can
happen while the scheduler starts.  ``close`` is stop the activity → terminate the agreement → settle the
invoice, and it releases everything it can even when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.diagnostics.plugin import SchedulerPlugin

from golem_dask import config
from golem_dask.errors import ActivityError, GolemDaskError
from golem_dask.market.base import Market, WorkerLink
from golem_dask.market.negotiation import Deal, Negotiator
from golem_dask.payment.accountant import Accountant
from golem_dask.payment.bill import EntryStatus
from golem_dask.protocol.messages import ActivityState, ExeCommand
from golem_dask.protocol.sealing import activity_aad, provider_key, seal_commands
from golem_dask.tls import CertificateAuthority

logger = logging.getLogger(__name__)


@functools.cache
def preload_source() -> str:
    """The text of :mod:`golem_dask.preload`, a worker's preload (not imported here)."""
    return importlib.resources.files("golem_dask").joinpath("preload.py").read_text()


class Registrations(SchedulerPlugin):
    """Tells waiting workers when a Dask worker with their name joins the scheduler."""

    name = "golem-registrations"

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self.addresses: dict[str, str] = {}  # worker name -> address

    def expect(self, name: str) -> asyncio.Future[str]:
        fut = self._waiting.get(name)
        if fut is None or fut.done():
            fut = self._waiting[name] = asyncio.get_running_loop().create_future()
        return fut

    def forget(self, name: str) -> None:
        fut = self._waiting.pop(name, None)
        if fut is not None and not fut.done():
            fut.cancel()
        self.addresses.pop(name, None)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        ws = scheduler.workers.get(worker)
        name = str(ws.name) if ws is not None else None
        if name is None:
            return
        self.addresses[name] = worker
        fut = self._waiting.get(name)
        if fut is not None and not fut.done():
            fut.set_result(worker)


@dataclass(frozen=True, slots=True)
class RequestorParts:
    """The requestor's components a worker uses (held by the cluster, shared)."""

    market: Market
    negotiator: Negotiator
    accountant: Accountant
    registrations: Registrations
    events: Any
    start_timeout_s: float
    close_timeout_s: float
    invoice_timeout_s: float
    on_lost: Callable[[str, str], None]
    worker_options: Sequence[str] = ()
    #: Transfers run after ``start`` and before ``run``: TLS files, input files.
    setup: Sequence[ExeCommand] = ()
    #: Transfers run when the worker is retired, before its activity is destroyed.
    collect: Sequence[ExeCommand] = ()
    #: Host the worker dials for the scheduler (``host.docker.internal`` on a bridge).
    scheduler_host: str | None = None
    #: The cluster's certificate authority: each worker gets its own certificate (None: no TLS).
    ca: CertificateAuthority | None = None
    #: Rentals prepared ahead (while the scheduler starts) for workers not started yet.
    early: dict[str, Rental] = field(default_factory=dict)


class Rental:
    """One agreement and its activity, from negotiation to settlement.

    :meth:`prepare` needs no scheduler (agreement, activity, ``deploy``, ``start``, the
    setup transfers), so the cluster prepares its first workers' rentals while its
    scheduler starts; :meth:`run` then starts ``dask worker``; :meth:`release` stops,
    terminates and settles, whatever state the rental reached.
    """

    def __init__(self, parts: RequestorParts, name: str) -> None:
        self.parts = parts
        self.name = name
        self.deal: Deal | None = None
        self.activity_id: str | None = None
        self.ready = False  # the worker joined the scheduler: losing it is news
        self.failed = asyncio.Event()
        self.failure = ""
        self._preparing: asyncio.Task[None] | None = None
        self._script_sent = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._released = False
        self.link: WorkerLink | None = None  # the market's way between worker and scheduler

    def __repr__(self) -> str:
        agreement = self.deal.agreement.id[:8] if self.deal else "-"
        return f"<Rental {self.name!r} agreement={agreement} activity={(self.activity_id or '-')[:8]}>"

    def prepare_soon(self) -> Rental:
        """Start :meth:`prepare` in the background (see :meth:`prepared`)."""
        self._preparing = asyncio.create_task(self.prepare(), name=f"golem-prepare-{self.name}")
        return self

    async def under_way(self) -> None:
        """Return once the background preparation has sent its exe-script, or has ended."""
        assert self._preparing is not None, "prepare_soon() first"
        sent = asyncio.ensure_future(self._script_sent.wait())
        try:
            await asyncio.wait({sent, self._preparing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sent.cancel()

    async def prepared(self) -> None:
        """Wait for the background :meth:`prepare` (see :meth:`prepare_soon`)."""
        assert self._preparing is not None, "prepare_soon() first"
        await self._preparing

    async def prepare(self) -> None:
        p = self.parts
        deal = self.deal = await p.negotiator.acquire(self.name)
        p.accountant.open(deal.agreement, self.name, deal.reservation)
        activity = await p.market.create_activity(deal.agreement.id)
        if p.market.bills_whole_activity:
            p.accountant.activity_started(deal.agreement.id)
        self.activity_id = activity.id
        self._watch = asyncio.create_task(self._follow(activity.id), name=f"golem-watch-{self.name}")
        self._script_sent.set()
        tls = p.ca.worker_commands(self.name) if p.ca is not None else []
        self.link = await p.market.worker_link(deal.agreement)
        deploy = await self.link.join() if self.link is not None else {}
        await self._exec([ExeCommand("deploy", deploy), ExeCommand("start"), *tls, *p.setup])

    async def run(self, args: Sequence[str]) -> None:
        """Start ``dask worker`` with ``args`` in the prepared activity."""
        assert self.deal is not None and self.activity_id is not None
        env = {"GOLEM_AGREEMENT_ID": self.deal.agreement.id, "GOLEM_ACTIVITY_ID": self.activity_id}
        entry_point, argv = "dask", list(args)
        if self.link is not None:
            entry_point, argv = await self.link.start(entry_point, argv)
        await self._exec([ExeCommand("run", {"entry_point": entry_point, "args": argv, "env": env})])
        # Only a worker that got to run is owed anything.
        self.parts.accountant.activity_started(self.deal.agreement.id)

    def _sealed(self, script: Sequence[ExeCommand]) -> list[ExeCommand]:
        """``script`` with every transfer's arguments sealed to the provider: URLs may carry
        tokens, options credentials, and the TLS transfers a private key."""
        assert self.deal is not None and self.activity_id is not None
        agreement = self.deal.agreement
        if not self.parts.market.seals_secrets or not any(c.command == "transfer" for c in script):
            return list(script)
        key = provider_key(agreement)
        aad = activity_aad(agreement.id, self.activity_id)
        return seal_commands(list(script), key, aad)

    async def _collect(self) -> list[str]:
        assert self.activity_id is not None
        return await self.parts.market.exec(self.activity_id, self._sealed(self.parts.collect),
                                            self.parts.close_timeout_s)

    async def _exec(self, script: Sequence[ExeCommand]) -> None:
        p = self.parts
        assert self.activity_id is not None
        sealed = self._sealed(script)
        for command, line in zip(script, await p.market.exec(self.activity_id, sealed, p.start_timeout_s)):
            p.events.emit("activity", f"{self.name}: {command.command}: {line}", worker=self.name,
                          command=command.command)

    async def _follow(self, activity_id: str) -> None:
        async for activity in self.parts.market.activity_events(activity_id):
            self.parts.events.emit("activity", f"{self.name}: activity {activity.state.value}", worker=self.name,
                                   state=activity.state.value)
            if activity.state in (ActivityState.FAILED, ActivityState.TERMINATED) and not self._released:
                self.failure = activity.reason or activity.state.value
                self.failed.set()
                if self.ready:
                    self.parts.on_lost(self.name, self.failure)
                return

    async def release(self, reason: str) -> None:
        """Collect outputs (if the worker ran), stop, terminate and settle.

        Each step runs even if an earlier one failed; a rental still being prepared is
        cancelled first.
        """
        if self._released:
            return
        self._released = True
        preparing = self._preparing
        if preparing is not None:
            preparing.cancel()
            await asyncio.wait([preparing])
            if not preparing.cancelled() and preparing.exception() is not None:
                logger.info("preparing %s failed: %s", self.name, preparing.exception())
        p = self.parts
        agreement_id = self.deal.agreement.id if self.deal else None
        if self.activity_id is not None and self.ready and p.collect:
            # Outputs leave the sandbox before the sandbox goes.
            outputs = await _attempt(self._collect(),
                                     f"collecting outputs of {self.name}")
            if outputs is None:
                p.events.emit("warning", f"outputs of {self.name} could not be collected; see the log")
            else:
                for line in outputs:
                    p.events.emit("transfer", f"{self.name}: {line}", worker=self.name)
        if self.activity_id is not None:
            await _attempt(p.market.destroy_activity(self.activity_id), f"stopping {self.name}")
        if self.link is not None:
            await _attempt(self.link.close(), f"unlinking {self.name}")
        if agreement_id is not None:
            p.accountant.activity_stopped(agreement_id)
            await _attempt(p.market.terminate_agreement(agreement_id, reason), f"terminating {agreement_id}")
            account = await _attempt(p.accountant.settle(p.market, agreement_id, p.invoice_timeout_s),
                                     f"settling {agreement_id}")
            if account is not None:
                p.events.emit("worker", f"worker {self.name} released: {account.status.value}, "
                              f"{account.amount} GLM", worker=self.name, state="released")
        if self._watch is not None:
            self._watch.cancel()
        p.registrations.forget(self.name)


class GolemWorker(ProcessInterface):
    """A Dask worker rented from a provider for the length of one agreement.

    Parameters
    ----------
    scheduler:
        The scheduler address the worker joins.
    name:
        The Dask worker name; the bill and the provider's activity tie it to its agreement.
    parts:
        The cluster's market, negotiator and accountant.
    """

    def __init__(self, scheduler: str, name: str, parts: RequestorParts) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler = scheduler
        self.name = str(name)
        self.parts = parts
        self.rental: Rental | None = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        agreement = self.deal.agreement.id[:8] if self.deal else "-"
        return f"<GolemWorker {self.name!r} agreement={agreement} status={self.status.name}>"

    @property
    def deal(self) -> Deal | None:
        return self.rental.deal if self.rental else None

    @property
    def agreement_id(self) -> str | None:
        return self.deal.agreement.id if self.deal else None

    @property
    def activity_id(self) -> str | None:
        return self.rental.activity_id if self.rental else None

    @property
    def scheduler_for_worker(self) -> str:
        """The scheduler address as the worker must dial it."""
        host = self.parts.scheduler_host
        if not host:
            return self.scheduler
        scheme, _, rest = self.scheduler.rpartition("://")
        port = rest.rsplit(":", 1)[1]
        return f"{scheme}://{host}:{port}"

    def command(self) -> list[str]:
        """The ``dask worker`` arguments sent to the provider (it adds threads and memory)."""
        return [
            "worker",
            self.scheduler_for_worker,
            "--name",
            self.name,
            "--no-nanny",
            "--no-dashboard",
            # Without a requestor the worker is useless: exit rather than linger.
            "--death-timeout",
            str(int(config.seconds("worker.death-timeout"))),
            # A task naming a package the worker lacks fails as a task, not as the worker;
            # a rented worker refuses to open a client at once, with the reason.
            "--preload",
            preload_source(),
            *self.parts.worker_options,
        ]

    async def start(self) -> None:
        p = self.parts
        # As a task even when not prepared ahead: a close() meanwhile cancels it cleanly.
        rental = self.rental = p.early.pop(self.name, None) or Rental(p, self.name).prepare_soon()
        try:
            await rental.prepared()
            registered = p.registrations.expect(self.name)
            await rental.run(self.command())
            failed: asyncio.Future[Any] = asyncio.ensure_future(rental.failed.wait())
            waiting: set[asyncio.Future[Any]] = {registered, failed}
            try:
                done, _ = await asyncio.wait(waiting, timeout=p.start_timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                failed.cancel()
            hint = f"; {p.market.unreachable_hint}" if p.market.unreachable_hint else ""
            if rental.failed.is_set():
                # dask's worker gives up on a scheduler it cannot reach with "Timed out starting worker".
                unreached = "Timed out starting worker" in rental.failure
                raise ActivityError(f"worker {self.name} died before joining the scheduler"
                                    + (f" at {self.scheduler_for_worker}, which it could not reach{hint}"
                                       if unreached else "") + f": {rental.failure}")
            if registered not in done:
                raise ActivityError(f"worker {self.name} did not join the scheduler at {self.scheduler_for_worker} "
                                    f"within {p.start_timeout_s:g}s (golem.worker.start-timeout){hint}")
            self.address = registered.result()
            rental.ready = True
            assert self.deal is not None
            p.events.emit("worker", f"worker {self.name} ready at {self.address} "
                          f"(agreement {self.deal.agreement.id[:8]} with {self.deal.candidate.name})",
                          worker=self.name, state="running")
        except BaseException as e:
            self.error = e
            self.status = Status.failed
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rental.release(f"worker failed to start: {e}"), p.close_timeout_s)
            raise
        await super().start()

    async def close(self) -> None:
        if self.status == Status.closed:
            return
        try:
            if self.rental is not None:
                await asyncio.wait_for(self.rental.release("worker retired"), self.parts.close_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("closing worker %s took longer than %ss (golem.worker.close-timeout)",
                           self.name, self.parts.close_timeout_s)
        finally:
            await super().close()


async def drop_early_rentals(parts: RequestorParts) -> None:
    """End rentals prepared for workers that never started (the cluster closed first)."""
    early = list(parts.early.values())
    parts.early.clear()
    await asyncio.gather(*(r.release("cluster closed before the worker started") for r in early),
                         return_exceptions=True)


async def meter_cpu(scheduler: Callable[[], Any], accountant: Accountant, interval_s: float) -> None:
    """Integrate the CPU the scheduler sees each worker use: the requestor's own metering.

    ``scheduler()`` gives the running scheduler (or None).  A worker is found by its name in
    the accountant's running agreements, so it is metered from the moment it registers
    (SpecCluster lists its workers only once the whole batch being started is up, which
    under ``adapt`` can be long after they run tasks).  Runs until cancelled.
    """
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(interval_s)
        now = loop.time()
        elapsed = Decimal(str(round(now - last, 3)))
        last = now
        current = scheduler()
        if current is None:
            continue
        running = {a.worker: a.agreement.id for a in list(accountant.accounts.values())
                   if a.status is EntryStatus.RUNNING}
        for ws in list(current.workers.values()):
            agreement_id = running.get(str(ws.name))
            if agreement_id is not None:
                percent = Decimal(str(ws.metrics.get("cpu", 0) or 0))
                accountant.observe_cpu(agreement_id, percent / 100 * elapsed)


async def _attempt(coro: Any, what: str) -> Any:
    try:
        return await coro
    except (GolemDaskError, OSError) as e:
        logger.warning("%s failed: %s", what, e)
        return None
