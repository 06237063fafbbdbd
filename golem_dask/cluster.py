"""``GolemCluster``: a Dask cluster whose workers are rented on a Golem-protocol market.

The keyword arguments become a demand; each worker is a :class:`~golem_dask.worker.GolemWorker`
holding one agreement; scaling down or closing pays the providers; ``bill()`` says what
was paid to whom, with transaction hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import base64
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from distributed.core import Status
from distributed.security import Security
from distributed.deploy.spec import SpecCluster

from golem_dask import config
from golem_dask.errors import BudgetExceededError, ConfigError
from golem_dask.events import EventLog
from golem_dask.market.base import Market
from golem_dask.market.demand import DemandSpec
from golem_dask.market.negotiation import Negotiator
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.payment.accountant import Accountant, Bill, Budget, Tolerance
from golem_dask.payment.base import Payer
from golem_dask.protocol.messages import ExeCommand
from golem_dask.protocol.properties import Resources
from golem_dask.worker import GolemWorker, Registrations, Rental, RequestorParts

logger = logging.getLogger(__name__)


def local_providers(
    platform: str,
    entries: Sequence[dict[str, Any]] | None = None,
    runtime: str = "process",
    image: str | None = None,
    docker_client: Any = None,
) -> list[Any]:
    """Provider agents for the embedded market, from ``golem.provider.local``.

    Each entry may set ``name``, ``cpu``, ``memory``, ``storage``, ``runtime``
    (``process``, ``docker``, or ``auto`` for the given ``runtime``),
    ``price-per-cpu-hour``, ``price-per-hour`` and ``start-price``.  Docker providers
    use ``docker_client`` when given (an engine connection already open).
    """
    import psutil

    from golem_dask.protocol.identity import Wallet
    from golem_dask.provider.agent import ProviderAgent, ProviderSettings
    from golem_dask.provider.runtime.process import ProcessRuntime

    entries = config.get("provider.local", entries) or []
    interval = config.seconds("provider.debit-note-interval")
    agents = []
    for i, entry in enumerate(entries):
        name = entry.get("name") or f"local-{i}"
        what = f"golem.provider.local[{i}]"
        cpu = entry.get("cpu") or os.cpu_count() or 1
        memory = entry.get("memory") or int(psutil.virtual_memory().total * 0.8)
        runtime_name = entry.get("runtime") or "auto"
        if runtime_name == "auto":
            runtime_name = runtime
        if runtime_name not in ("process", "docker"):
            raise ConfigError(f"{what}.runtime={runtime_name!r}: use 'process', 'docker' or 'auto'")
        pricing = LinearPricing.per_hour(
            cpu=config.to_decimal(entry.get("price-per-cpu-hour", "0.1"), f"{what}.price-per-cpu-hour") or Decimal(0),
            duration=config.to_decimal(entry.get("price-per-hour", "0.02"), f"{what}.price-per-hour") or Decimal(0),
            start=config.to_decimal(entry.get("start-price", "0"), f"{what}.start-price") or Decimal(0),
        )
        settings = ProviderSettings(
            name=name,
            capacity=Resources(
                cpu_threads=int(cpu),
                memory_bytes=config.byte_size(memory, f"{what}.memory"),
                storage_bytes=config.byte_size(entry.get("storage") or "10GiB", f"{what}.storage"),
            ),
            pricing=pricing,
            platform=platform,
            debit_note_interval_s=interval,
        )
        if runtime_name == "docker":
            from golem_dask.image import default_tag
            from golem_dask.provider.runtime.docker import DockerRuntime

            engine_runtime: Any = DockerRuntime(image or default_tag(), config.get("provider.docker-network"), name,
                                                client=docker_client)
        else:
            engine_runtime = ProcessRuntime()
        agents.append(ProviderAgent(settings, engine_runtime, Wallet.generate().address))
    return agents


TLS_FILES = {"ca": "/golem/tls/ca.pem", "cert": "/golem/tls/cert.pem", "key": "/golem/tls/key.pem"}
TLS_ARGS = ("--tls-ca-file", TLS_FILES["ca"], "--tls-cert", TLS_FILES["cert"], "--tls-key", TLS_FILES["key"])


#: How long the cluster's start waits for the first rentals' exe-scripts to be sent
#: before it builds the scheduler.
HEAD_START_S = 0.05


def temporary_security() -> Security:
    """A fresh self-signed certificate for scheduler, workers and client, in memory.

    Like ``Security.temporary()`` but with an EC P-256 key: an RSA-2048 key takes tens
    of milliseconds to make, on every cluster start.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "golem-dask")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("golem-dask")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return Security(
        require_encryption=True,
        tls_ca_file=cert_pem,
        tls_scheduler_cert=cert_pem, tls_scheduler_key=key_pem,
        tls_worker_cert=cert_pem, tls_worker_key=key_pem,
        tls_client_cert=cert_pem, tls_client_key=key_pem,
    )


def _data_url(text: str) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(text.encode()).decode()


def tls_commands(security: Security) -> list[ExeCommand]:
    """Ship the worker's temporary certificate and key into the sandbox (never the image)."""
    files = {k: getattr(security, attr) for k, attr in (("ca", "tls_ca_file"), ("cert", "tls_worker_cert"), ("key", "tls_worker_key"))}
    return [ExeCommand("transfer", {"from": _data_url(str(files[k])), "to": path}) for k, path in TLS_FILES.items()]


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


class GolemCluster(SpecCluster):
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
        Require providers with this runtime (``"process"`` or ``"docker"``).
    market:
        ``None``/``"local"`` for the embedded market, or a :class:`~golem_dask.market.base.Market`.
    payer:
        A :class:`~golem_dask.payment.base.Payer`; by default a fresh wallet on the
        embedded Ethereum devnet, funded with ``budget``.
    scheduler_options:
        Passed to the :class:`distributed.Scheduler`.

    Examples
    --------
    >>> from golem_dask import GolemCluster
    >>> from distributed import Client
    >>> with GolemCluster(n_workers=2, budget="1") as cluster, Client(cluster) as client:  # doctest: +SKIP
    ...     print(client.submit(sum, [1, 2, 3]).result())
    ...     print(cluster.bill())
    6
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
        runtime: str | None = None,
        image: str | None = None,
        inputs: Mapping[str, str] | None = None,
        outputs: Mapping[str, str] | None = None,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        tls: bool | None = None,
        market: Market | str | None = None,
        payer: Payer | None = None,
        scheduler_options: dict[str, Any] | None = None,
        worker_options: Sequence[str] = (),
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
        silence_logs: int | bool = logging.WARNING,
    ) -> None:
        # Everything that can be wrong with the arguments fails here, before any
        # process, market or chain is started.
        self.events = EventLog()
        self._docker_client: Any = None  # handed from the runtime check to the embedded providers
        embedded = not isinstance(market, Market) and config.get("market.backend", market) in (None, "local")
        runtime = config.get("demand.runtime", runtime)
        if runtime not in (None, "process", "docker"):
            raise ConfigError(f"runtime={runtime!r}: use 'process', 'docker' or None")
        auto = embedded and any((e.get("runtime") or "auto") == "auto" for e in config.get("provider.local") or [])
        if runtime == "docker" or (auto and runtime is None):
            image = config.get("demand.image", image)
            runtime = self._pick_runtime(runtime, image, embedded)
        self.runtime = runtime
        self.spec = DemandSpec.from_kwargs(
            cpu=cpu,
            memory=memory,
            storage=storage,
            runtime=runtime,
            image=image if runtime == "docker" else None,
            constraints=constraints,
            max_price_per_cpu_hour=max_price_per_cpu_hour,
            max_price_per_hour=max_price_per_hour,
            max_start_price=max_start_price,
        )
        total = config.decimal("payment.budget", budget, "budget")
        assert total is not None
        if payer is None:
            from golem_dask.payment.factory import default_payer

            payer = default_payer(total, self.spec.platform)
        self.payer = payer
        self.market = self._make_market(market)
        use_tls = config.get("cluster.tls", tls)
        use_tls = runtime == "docker" if use_tls is None else bool(use_tls)
        bridge = runtime == "docker" and embedded and config.get("provider.docker-network") != "host"
        security = temporary_security() if use_tls else None
        setup, collect = transfer_commands(inputs or {}, outputs or {}, storage_options or {})
        if security is not None:
            setup = tls_commands(security) + setup
            worker_options = (*TLS_ARGS, *worker_options)
        self.budget = Budget(total)
        self.accountant = Accountant(
            payer,
            self.budget,
            Tolerance(
                relative=Decimal(str(config.get("payment.usage-tolerance"))),
                cpu_allowance_sec=Decimal(str(config.seconds("payment.cpu-allowance"))),
                duration_allowance_sec=Decimal(str(config.seconds("payment.duration-allowance"))),
            ),
            self.events,
        )
        self.negotiator = Negotiator(
            self.market,
            self.spec,
            payer.address,
            self.budget,
            negotiation_timeout_s=config.seconds("market.negotiation-timeout"),
            approval_timeout_s=config.seconds("market.approval-timeout"),
            expected_s=Decimal(str(config.seconds("market.expected-duration"))),
            utilisation=Decimal(str(config.get("market.expected-utilisation"))),
            events=self.events,
        )
        self.registrations = Registrations()
        self._parts = RequestorParts(
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
            scheduler_host="host.docker.internal" if bridge else None,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._golem_started = False
        self._golem_closed = False
        scheduler = {
            "cls": "distributed.Scheduler",
            "options": {
                # On a docker bridge the workers dial the host's gateway address.
                "host": "0.0.0.0" if bridge else "127.0.0.1",
                "port": 0,
                "dashboard_address": ":0",
                "protocol": "tls" if security is not None else "tcp",
                "security": security,
                **(scheduler_options or {}),
            },
        }
        worker = {"cls": GolemWorker, "options": {"parts": self._parts}}
        n = n_workers if n_workers is not None else 0
        super().__init__(
            workers={self._new_worker_name(i): worker for i in range(n)},
            scheduler=scheduler,
            worker=worker,
            asynchronous=asynchronous,
            loop=loop,
            name=name,
            silence_logs=silence_logs,
            security=security,
        )
        self._i = n

    # -- construction helpers ---------------------------------------------------------

    def _make_market(self, market: Market | str | None) -> Market:
        if isinstance(market, Market):
            return market
        backend = config.get("market.backend", market)
        if backend in (None, "local"):
            from golem_dask.market.local import LocalMarket

            return LocalMarket(local_providers(self.spec.platform, runtime=self.runtime or "process",
                                              image=self.spec.image, docker_client=self._docker_client))
        if isinstance(backend, str) and backend.startswith("tcp://"):
            from golem_dask.market.hub import HubMarket

            wallet = getattr(self.payer, "wallet", None)
            if wallet is None:
                raise ConfigError("a hub market needs a payer with a wallet to sign messages (EthereumPayer)")
            return HubMarket(backend, wallet)
        raise ConfigError(
            f"market={backend!r} is not available; use market='local' (the embedded market), "
            "'tcp://HOST:PORT' (a golem-dask hub) or pass a Market object"
        )

    def _pick_runtime(self, runtime: str | None, image: str | None, embedded: bool) -> str:
        """Docker if asked for or, by default, if an engine answers and has the image."""
        from golem_dask.errors import ActivityError
        from golem_dask.image import check_image, default_tag
        from golem_dask.provider.runtime.docker import engine

        image = image or default_tag()
        try:
            client = engine(5.0 if runtime == "docker" and embedded else 2.0)
        except (ActivityError, ConfigError):  # no engine, or no docker SDK installed
            if runtime == "docker" and embedded:
                raise
            if runtime is None:
                self.events.emit("runtime", "process runtime: no Docker engine answers")
                return "process"
            return "docker"  # remote providers deploy the image; nothing to check here
        keep = False
        try:
            import docker

            try:
                found = client.images.get(image)
            except docker.errors.ImageNotFound:
                if runtime == "docker":
                    raise ConfigError(f"image {image!r} is not on this machine; build it with "
                                      "'golem-dask image build'") from None
                self.events.emit("runtime", f"process runtime: Docker answers but image {image} is missing "
                                 "(build it with 'golem-dask image build')")
                return "process"
            # Versions are checked before negotiating: a mismatch would only show as
            # workers the scheduler refuses.
            check_image(found)
            # The embedded providers reuse this connection (each new one costs ~15 ms).
            keep = embedded
            self._docker_client = client if keep else None
        finally:
            if not keep:
                client.close()
        self.events.emit("runtime", f"docker runtime with image {image}")
        return "docker"

    def _new_worker_name(self, worker_number: int) -> str:
        return f"golem-{worker_number}"

    # -- lifecycle --------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        if not self._golem_started:
            self._golem_started = True
            try:
                await self.market.start()
                # The payer is not started here: it connects (and the embedded devnet is
                # created and funded) on the first payment, which keeps chain set-up out
                # of the time to ready workers.
                await self.negotiator.start()
                self._spawn(self._answer_documents(), "golem-accountant")
                # The first workers' agreements are negotiated, and their activities
                # started, while the scheduler starts.
                early = [Rental(self._parts, name).prepare_soon() for name in self.worker_spec]
                self._parts.early.update((r.name, r) for r in early)
                if early:
                    # Building the scheduler holds the event loop for ~15 ms: let the
                    # rentals send their exe-scripts first (the embedded market signs in
                    # milliseconds; a remote one gets at most HEAD_START_S).
                    waiters = [asyncio.ensure_future(r.under_way()) for r in early]
                    await asyncio.wait(waiters, timeout=HEAD_START_S)
                    for waiter in waiters:
                        waiter.cancel()
            except BaseException:
                await self._golem_close()
                raise
        await super()._start()
        if self.scheduler is not None and "golem-registrations" not in self.scheduler.plugins:
            self.scheduler.add_plugin(self.registrations)
            self._spawn(self._meter(), "golem-metering")

    async def _answer_documents(self) -> None:
        async for document in self.market.payment_events():
            try:
                await self.accountant.on_document(self.market, document)
            except Exception:
                logger.exception("could not answer %s", type(document).__name__)

    async def _meter(self) -> None:
        """Integrate the CPU the scheduler sees each worker use: our own metering."""
        interval = config.seconds("payment.metering-interval")
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            elapsed = Decimal(str(round(now - last, 3)))
            last = now
            scheduler = self.scheduler
            if scheduler is None:
                continue
            for ws in list(scheduler.workers.values()):
                worker = self.workers.get(ws.name)
                agreement_id = getattr(worker, "agreement_id", None)
                if agreement_id is None:
                    continue
                percent = Decimal(str(ws.metrics.get("cpu", 0) or 0))
                self.accountant.observe_cpu(agreement_id, percent / 100 * elapsed)

    async def _correct_state_internal(self) -> None:
        # SpecCluster fails the whole cluster when one worker fails to start.  A worker
        # the budget cannot pay for is not a failure: drop it and keep the others.
        try:
            await super()._correct_state_internal()
        except Exception as error:
            unaffordable = [n for n, w in self.workers.items()
                            if isinstance(getattr(w, "error", None), BudgetExceededError)]
            others = [w.error for w in self.workers.values()
                      if getattr(w, "error", None) is not None and not isinstance(w.error, BudgetExceededError)]
            if others or not unaffordable:
                raise others[0] if others else error
            for n in unaffordable:
                del self.workers[n]
                self.worker_spec.pop(n, None)
            message = (f"budget of {self.budget.total} GLM allows {len(self.workers)} workers now; "
                       f"not starting {len(unaffordable)} more ({error})")
            self.events.emit("budget", message)
            logger.warning("%s", message)

    def _worker_lost(self, name: str, reason: str) -> None:
        """A running worker's activity died: pay what it ran, start a replacement."""
        if name not in self.worker_spec or self.status != Status.running:
            return  # retired on purpose (scale-down, close): nothing was lost
        worker = self.workers.pop(name, None)
        if worker is None:
            return
        lines = [line for line in reason.splitlines() if line.strip()] or ["unknown reason"]
        last = f" (last log line: {lines[-1].strip()})" if len(lines) > 1 else ""
        self.events.emit("warning", f"worker {name} lost: {lines[0]}{last}; replacing it", reason=reason)
        self._futures.add(asyncio.ensure_future(worker.close()))
        if name in self.worker_spec:
            spec = self.worker_spec.pop(name)
            self.worker_spec[self._new_worker_name(self._i)] = spec
            self._i += 1
            self._correct_state()

    def close(self, timeout: float | None = None) -> Any:
        if timeout is None:
            timeout = config.seconds("cluster.close-timeout")
        return super().close(timeout=timeout)

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            await self._golem_close()

    async def _golem_close(self) -> None:
        if self._golem_closed:
            return
        self._golem_closed = True
        await self._drop_early_rentals()
        with contextlib.suppress(Exception):
            await self.negotiator.close()
        with contextlib.suppress(Exception):
            await self.market.close()
        # Documents the market delivered before closing are still answered.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.payer.close()
        bill = self.accountant.bill()
        if bill.entries:
            self.events.emit("payment", f"cluster closed; paid {bill.total} GLM in total", total=bill.total)
        if bill.owed:
            owed = ", ".join(f"{e.amount} GLM to {e.provider}" for e in bill.entries
                             if e.status in ("payment failed", "awaiting invoice"))
            where = getattr(getattr(self.payer, "ledger", None), "path", None)
            self.events.emit("warning", f"still owed: {owed}; the debts are kept in the ledger"
                             + (f" ({where})" if where else "") + "; run 'golem-dask pay' to settle them",
                             owed=bill.owed)

    async def _drop_early_rentals(self) -> None:
        """End rentals prepared for workers that never started (the cluster closed first)."""
        early = list(self._parts.early.values())
        self._parts.early.clear()
        await asyncio.gather(*(r.release("cluster closed before the worker started") for r in early),
                             return_exceptions=True)

    # -- money ------------------------------------------------------------------------

    def bill(self) -> Bill:
        """Every agreement with its usage, amount, status and transaction hash.

        Examples
        --------
        >>> print(cluster.bill())  # doctest: +SKIP
        """
        return self.accountant.bill()

    def __repr__(self) -> str:
        return (f"GolemCluster({self.name!r}, {self.scheduler_address!r}, workers={len(self.workers)}, "
                f"spent={self.budget.spent} of {self.budget.total} GLM)")
