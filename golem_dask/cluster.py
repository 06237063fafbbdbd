"""``GolemCluster``: a Dask cluster whose workers are rented on a Golem-protocol market.

The keyword arguments become a demand; each worker is a :class:`~golem_dask.worker.GolemWorker`
holding one agreement; scaling down or closing pays the providers; ``bill()`` says what
was paid to whom, with transaction hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import dask
from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from distributed.utils import Log

from golem_dask import config, dashboard
from golem_dask.errors import ConfigError
from golem_dask.display import ClusterDisplay
from golem_dask.events import EventLog, quiet_expected_noise
from golem_dask.market.base import Market
from golem_dask.market.demand import DemandSpec
from golem_dask.market.negotiation import Negotiator
from golem_dask.market.reputation import Reputation
from golem_dask.payment.accountant import Accountant, Tolerance
from golem_dask.payment.base import Payer
from golem_dask.payment.bill import Bill
from golem_dask.payment.budget import Budget
from golem_dask.protocol.messages import ExeCommand
from golem_dask.provider.factory import RuntimePlan, embedded_agents, plan_runtime
from golem_dask.provider.runtime.base import Runtime
from golem_dask.progress import show_progress
from golem_dask.scheduler import GolemScheduler
from golem_dask.tasks import Tasks
from golem_dask.tls import TLS_ARGS, CertificateAuthority
from golem_dask.upkeep import (affordable, begin_closing, drop_unaffordable, payable_terms, replace_lost,
                               retire_leaving, retire_unaffordable, upkeep_tasks, within_capacity)
from golem_dask.worker import GolemWorker, Registrations, Rental, RequestorParts, drop_early_rentals, meter_cpu

logger = logging.getLogger(__name__)


def backend_of(market: Market | str | None) -> str | Market:
    """``"local"``, ``"tcp://..."``, another backend name, or the Market object itself."""
    if isinstance(market, Market):
        return market
    return config.get("market.backend", market) or "local"


def make_market(backend: str, payer: Payer, agents: Any) -> Market:
    """The market named ``backend``; ``agents()`` makes the embedded market's providers."""
    if backend == "local":
        from golem_dask.market.local import LocalMarket

        return LocalMarket(agents())
    if backend == "yagna":
        from golem_dask.yagna.market import YagnaMarket
        from golem_dask.yagna.payer import YagnaPayer

        if not isinstance(payer, YagnaPayer):
            raise ConfigError("on market='yagna' the daemon pays the providers: pass no payer, or a YagnaPayer")
        return YagnaMarket(payer.daemon)
    if backend.startswith("tcp://"):
        from golem_dask.market.hub_market import HubMarket

        wallet = getattr(payer, "wallet", None)
        if wallet is None:
            raise ConfigError("a hub market needs a payer with a wallet to sign messages (EthereumPayer)")
        return HubMarket(backend, wallet)
    raise ConfigError(
        f"market={backend!r} is not available; use market='local' (the embedded market), "
        "'tcp://HOST:PORT' (a golem-dask hub), 'yagna' (the public Golem network through a yagna "
        "daemon) or pass a Market object"
    )


def default_payer_for(backend: str | Market, total: Decimal, platform: str) -> Payer:
    """The payer a cluster uses when given none: the yagna daemon's on its market, else a
    fresh wallet on the embedded devnet (or the chain ``golem.payment.*`` names)."""
    if backend == "yagna":
        from golem_dask.yagna.api import YagnaDaemon
        from golem_dask.yagna.payer import YagnaPayer

        return YagnaPayer(YagnaDaemon(total, platform))
    from golem_dask.payment.factory import default_payer

    return default_payer(total, platform)


def yagna_plan(runtime: Any, image: str | None) -> RuntimePlan:
    """What a cluster on the yagna daemon's market asks for: a VM running ``image``.

    Raises
    ------
    ConfigError
        For another runtime, or without a VM image reference.
    """
    if runtime not in (None, "vm"):
        raise ConfigError(f"runtime={runtime!r}: providers on the Golem network run VMs; leave runtime unset")
    image = config.get("yagna.image", image)
    if not image or not str(image).startswith("hash:"):
        raise ConfigError(f"image={image!r}: market='yagna' needs a VM image reference 'hash:sha3:<hash>:<url>'; "
                          "build one with: golem-dask image build --gvmi")
    return RuntimePlan("vm", "vm", str(image))


def yagna_constraints(constraints: str | None) -> str | None:
    """The demand's own constraints on the yagna market: with ``golem.yagna.connectivity:
    vpn``, providers whose VMs can join a VPN only (``golem.runtime.capabilities``)."""
    from golem_dask.yagna.vpn import connectivity

    own = config.get("demand.constraints", constraints)
    if connectivity() != "vpn":
        return own
    vpn = "(golem.runtime.capabilities=vpn)"
    return f"(&{own}{vpn})" if own else vpn


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def transfer_commands(
    inputs: Mapping[str, str], outputs: Mapping[str, str], storage_options: Mapping[str, Mapping[str, Any]]
) -> tuple[list[ExeCommand], list[ExeCommand]]:
    """Exe-script transfers for ``inputs`` (URL -> /golem path) and ``outputs`` (path -> URL).

    ``storage_options`` maps a protocol (``"s3"``) to fsspec options for its URLs.
    """

    def command(source: str, destination: str, url: str) -> ExeCommand:
        for path in (source, destination):
            if path.startswith("/") and not path.startswith("/golem/"):
                raise ConfigError(f"{path!r}: container paths must be under /golem/, e.g. /golem/input/data.csv")
        args: dict[str, Any] = {"from": source, "to": destination}
        options = storage_options.get(_protocol(url))
        if options:
            args["options"] = dict(options)
        return ExeCommand("transfer", args)

    setup = [command(url, path, url) for url, path in inputs.items()]
    collect = [command(path, url, url) for path, url in outputs.items()]
    return setup, collect


def scheduler_hosts(market: Market, embedded_docker: bool) -> tuple[str, str | None]:
    """Where the scheduler listens, and the host workers dial (None: its own address).

    ``golem.cluster.scheduler-host`` if set; on the embedded market's docker bridge all
    interfaces, dialled as ``host.docker.internal``; otherwise the interface that
    reaches the market's providers (for a hub, the one routing to it), or loopback.
    """
    configured = config.get("cluster.scheduler-host")
    if configured:
        return str(configured), None
    if embedded_docker and config.get("provider.docker-network") != "host":
        return "0.0.0.0", "host.docker.internal"
    return market.scheduler_host() or "127.0.0.1", None


def tolerance_from_config() -> Tolerance:
    """How far a provider's usage may exceed our metering (``golem.payment.*``)."""
    return Tolerance(
        relative=Decimal(str(config.get("payment.usage-tolerance"))),
        cpu_allowance_sec=Decimal(str(config.seconds("payment.cpu-allowance"))),
        duration_allowance_sec=Decimal(str(config.seconds("payment.duration-allowance"))),
    )


class GolemCluster(ClusterDisplay, SpecCluster):
    """A Dask cluster of workers rented on a Golem-protocol market.

    Parameters
    ----------
    n_workers:
        Workers to rent at start.
    cpu, memory, storage:
        What each worker needs (threads, bytes or ``"4GiB"``); defaults from ``golem.demand``.
    budget:
        The most this cluster may spend, in GLM.  No agreement is signed whose worst-case
        cost the rest of the budget cannot cover.
    max_price_per_cpu_hour, max_price_per_hour, max_start_price:
        Price caps; offers above them are refused with the reason recorded.
    constraints:
        Extra constraints on offers in Golem's filter language, e.g.
        ``"(golem.node.id.name=lab-*)"``.  Parsed at once: a syntax error raises here.
    runtime:
        Require providers with this runtime (``"process"`` or ``"docker"``), or a
        :class:`~golem_dask.provider.runtime.base.Runtime` object for the embedded
        market's providers to run workers with.
    image:
        The worker image docker providers run (default: the one matching this client).
    inputs, outputs, storage_options:
        Files copied into each worker's sandbox before it starts (URL -> ``/golem/...``)
        and out of it when it is retired (``/golem/...`` -> URL), through fsspec, with
        fsspec options per protocol.
    tls:
        Encrypt scheduler-worker traffic (default: for docker workers).
    market:
        ``None``/``"local"`` for the embedded market, ``"tcp://HOST:PORT"`` for a hub,
        ``"yagna"`` for the Golem network through the user's yagna daemon (``image``
        is then a VM image reference), or a :class:`~golem_dask.market.base.Market`.
    payer:
        A :class:`~golem_dask.payment.base.Payer`; by default a fresh wallet on the
        embedded Ethereum devnet, funded with ``budget``.
    scheduler_options:
        Passed to the :class:`distributed.Scheduler`.
    idle_timeout:
        Retire (and pay) every worker when no task ran this long (``"20m"``, the
        default from ``golem.cluster.idle-timeout``; ``False`` never).

    Examples
    --------
    >>> from golem_dask import GolemCluster
    >>> from distributed import Client
    >>> with GolemCluster(n_workers=2, budget="1") as cluster, Client(cluster) as client:
    ...     print(client.submit(sum, [1, 2, 3]).result())
    6
    >>> print(cluster.bill())  # doctest: +ELLIPSIS
    Bill for 0x... on erc20-devnet-glm
    worker ...
    golem-0 ...  paid ...
    golem-1 ...  paid ...
    total paid: ... GLM
    """

    def __init__(
        self,
        n_workers: int | None = None,
        *,
        cpu: int | None = None,
        memory: str | int | None = None,
        storage: str | int | None = None,
        budget: Any = None,
        max_price_per_cpu_hour: Any = None,
        max_price_per_hour: Any = None,
        max_start_price: Any = None,
        constraints: str | None = None,
        runtime: str | Runtime | None = None,
        image: str | None = None,
        inputs: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        tls: bool | None = None,
        market: Market | str | None = None,
        payer: Payer | None = None,
        scheduler_options: dict[str, Any] | None = None,
        worker_options: Sequence[str] = (),
        idle_timeout: Any = None,
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
        silence_logs: int | bool = logging.WARNING,
    ) -> None:
        # Everything that can be wrong with the arguments fails here, before any
        # process, market or chain is started.
        self.events = EventLog()
        self.progress = show_progress(self, config.get("cluster.progress"))
        quiet_expected_noise()
        backend = backend_of(market)
        if backend == "yagna":
            plan, constraints = yagna_plan(runtime, image), yagna_constraints(constraints)
        else:
            plan = plan_runtime(config.get("demand.runtime", runtime), config.get("demand.image", image),
                                embedded=backend == "local")
        if plan.reason:
            self.events.emit("runtime", plan.reason)
        if plan.warning:
            self.events.emit("warning", plan.warning)
        self.runtime = plan.name
        self.spec = DemandSpec.from_kwargs(
            cpu=cpu, memory=memory, storage=storage, runtime=plan.name, image=plan.image, constraints=constraints,
            max_price_per_cpu_hour=max_price_per_cpu_hour, max_price_per_hour=max_price_per_hour,
            max_start_price=max_start_price,
            platform=config.get("yagna.payment-platform") if backend == "yagna" else None,
        )
        total = config.decimal("payment.budget", budget, "budget")
        assert total is not None
        self.payer = payer = default_payer_for(backend, total, self.spec.platform) if payer is None else payer
        self.market = backend if isinstance(backend, Market) else make_market(
            backend, payer, lambda: embedded_agents(self.spec.platform, runtime=plan.embedded, image=plan.image,
                                                    docker_client=plan.docker_client))
        if (wallet := getattr(payer, "wallet", None)) is not None:  # it signs the agreements' terms
            self.market.bind_wallet(wallet)
        self.budget, self.spec = Budget(total), payable_terms(self.spec, payer, self.events)
        self.accountant = Accountant(payer, self.budget, tolerance_from_config(), self.events)
        self.accountant.on_exhausted = functools.partial(retire_unaffordable, self)
        self.negotiator = Negotiator.from_config(self.market, self.spec, payer.address, self.budget, self.events,
                                                 Reputation.of_payer(payer))
        # TLS for every worker that is not a plain process of this machine's own provider.
        use_tls = config.get("cluster.tls", tls)
        use_tls = not (backend == "local" and self.runtime != "docker") if use_tls is None else use_tls
        self.ca = CertificateAuthority() if use_tls else None
        security = self.ca.security() if self.ca is not None else None
        listen, dial = scheduler_hosts(self.market, backend == "local" and self.runtime == "docker")
        self.registrations = Registrations()
        self._parts = self._requestor_parts(inputs, outputs, storage_options, worker_options, dial)
        self._tasks = Tasks()
        self._golem_started = False
        self._golem_closed = False
        self._capped = False
        idle = config.get("cluster.idle-timeout", idle_timeout)
        self.idle_timeout_s = config.seconds("cluster.idle-timeout", idle) if idle else None
        # The dashboard stays on this machine: providers have no business there.
        scheduler = {"cls": GolemScheduler, "options": {
            "host": listen, "port": 0, "dashboard_address": "127.0.0.1:0", "security": security,
            "protocol": "tls" if security is not None else "tcp", **(scheduler_options or {})}}
        worker = {"cls": GolemWorker, "options": {"parts": self._parts}}
        n = within_capacity(self, n_workers or 0, strict=True)
        super().__init__(workers={self._new_worker_name(i): worker for i in range(n)}, scheduler=scheduler,
                         worker=worker, asynchronous=asynchronous, loop=loop, name=name,
                         silence_logs=silence_logs, security=security)
        self._i = n

    # -- construction helpers ---------------------------------------------------------

    def _requestor_parts(self, inputs: Mapping[str, str] | None, outputs: Mapping[str, str] | None,
                         storage_options: Mapping[str, Mapping[str, Any]] | None, worker_options: Sequence[str],
                         scheduler_host: str | None) -> RequestorParts:
        setup, collect = transfer_commands(inputs or {}, outputs or {}, storage_options or {})
        if self.ca is not None:
            worker_options = (*TLS_ARGS, *worker_options)
        return RequestorParts(
            market=self.market,
            negotiator=self.negotiator,
            accountant=self.accountant,
            registrations=self.registrations,
            events=self.events,
            start_timeout_s=config.seconds("worker.start-timeout"),
            close_timeout_s=config.seconds("worker.close-timeout"),
            invoice_timeout_s=config.seconds("payment.invoice-timeout"),
            on_lost=self._worker_lost,
            worker_options=tuple(worker_options),
            setup=tuple(setup),
            collect=tuple(collect),
            scheduler_host=scheduler_host,
            ca=self.ca,
        )

    def _new_worker_name(self, worker_number: int) -> str:
        return f"golem-{worker_number}"

    # -- lifecycle --------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.spawn(coro, name)

    async def _start(self) -> None:
        if not self._golem_started:
            self._golem_started = True
            try:
                await self.market.start()
                # The payer is not started here: it connects (and the embedded devnet is
                # created and funded) once the workers are up, which keeps chain set-up
                # out of the time to ready workers and out of the time to close.
                await self.negotiator.start()
                self._spawn(self.accountant.answer(self.market), "golem-accountant")
                # The first workers' agreements are negotiated, and their activities
                # started, while the scheduler starts.
                early = [Rental(self._parts, name).prepare_soon() for name in self.worker_spec]
                self._parts.early.update((r.name, r) for r in early)
                if early:
                    # Building the scheduler holds the event loop for ~15 ms: let the
                    # rentals send their exe-scripts first (the embedded market signs in
                    # milliseconds; a remote one gets at most golem.cluster.head-start).
                    waiters = [asyncio.ensure_future(r.under_way()) for r in early]
                    await asyncio.wait(waiters, timeout=config.seconds("cluster.head-start"))
                    for waiter in waiters:
                        waiter.cancel()
            except BaseException:
                await self._golem_close()
                raise
        await super()._start()
        if self.scheduler is not None and "golem-registrations" not in self.scheduler.plugins:
            self.scheduler.add_plugin(self.registrations)
            dashboard.attach(self.scheduler, self)
            self._spawn(meter_cpu(lambda: self.scheduler, self.accountant, config.seconds("payment.metering-interval")),
                        "golem-metering")
            self._spawn(self._start_payer(), "golem-payer-start")
            for name, coro in upkeep_tasks(self):
                self._spawn(coro, name)

    async def _start_payer(self) -> None:
        try:
            await self.payer.start()
        except Exception as e:  # the first payment tries again and reports it
            logger.info("the payer could not start yet: %s", e)

    async def _correct_state_internal(self) -> None:
        # Leaving workers hand their data over first; a worker the budget cannot pay for
        # is not a failure of the cluster (SpecCluster fails it whole): it is dropped.
        await retire_leaving(self)
        try:
            await super()._correct_state_internal()
        except Exception as error:
            drop_unaffordable(self, error)

    def scale(self, n: int = 0, memory: Any = None, cores: Any = None) -> Any:
        """Rent or retire workers to ``n`` (or to ``cores``/``memory``), as many as the budget allows."""
        if memory is not None:
            n = max(n, math.ceil(dask.utils.parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            n = max(n, math.ceil(cores / self._threads_per_worker()))
        capped = affordable(self, n)
        if capped < n and not self._capped:
            self.events.emit("budget", f"asked for {n} workers; the budget left ({self.budget.remaining} GLM) "
                             f"can reserve agreements for {capped}")
        self._capped = capped < n
        return super().scale(within_capacity(self, capped, strict=False))

    def _threads_per_worker(self) -> int:
        return self.spec.resources.cpu_threads

    def _memory_per_worker(self) -> int:
        return self.spec.resources.memory_bytes

    def _worker_lost(self, name: str, reason: str) -> None:
        """A running worker's activity died: pay what it ran, start a replacement."""
        replace_lost(self, name, reason)

    def close(self, timeout: float | None = None) -> Any:
        if timeout is None:
            timeout = config.seconds("cluster.close-timeout")
        return super().close(timeout=timeout)

    async def _close(self) -> None:
        begin_closing(self)
        try:
            await super()._close()
        finally:
            await self._golem_close()

    async def _golem_close(self) -> None:
        if self._golem_closed:
            return
        self._golem_closed = True
        self.progress.close()
        await drop_early_rentals(self._parts)
        with contextlib.suppress(Exception):
            await self.negotiator.close()
        with contextlib.suppress(Exception):
            await self.market.close()
        # Documents the market delivered before closing are still answered.
        await self._tasks.cancelled()
        with contextlib.suppress(Exception):
            await self.payer.close()
        for kind, message, data in self.accountant.bill().closing_notes(getattr(self.payer, "ledger", None)):
            self.events.emit(kind, message, **data)

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: bool = True) -> Any:
        logs = await super()._get_logs(cluster, scheduler, workers)
        if cluster:  # the events (offers, agreements, workers, money) beside dask's own lines
            logs["Cluster"] = Log(self.events.log_text(self._cluster_manager_logs))
        return logs

    # -- money ------------------------------------------------------------------------

    def bill(self) -> Bill:
        """Every agreement with its usage, amount, status and transaction hash (see the
        class's example)."""
        return self.accountant.bill()

    def __repr__(self) -> str:
        return (f"GolemCluster({self.name!r}, {self.scheduler_address!r}, workers={len(self.workers)}, "
                f"spent={self.budget.spent} of {self.budget.total} GLM)")
