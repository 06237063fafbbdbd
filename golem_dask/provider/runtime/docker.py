"""The ``docker`` runtime: each activity is a container running ``dask worker``.

Exe-script commands map onto the engine: ``deploy`` checks the image is present,
``start`` makes the activity's sandbox (a host directory mounted at ``/golem``),
``transfer`` streams files between fsspec URLs and the sandbox, ``run`` creates and starts
the container with the agreed limits (``nano_cpus``, ``mem_limit``) and labels naming the
agreement, and ``terminate`` stops and removes it, always.

CPU time comes from the engine's accounting of the container.  Containers carry labels,
so a provider that starts up removes those left behind by a provider process that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError, ConfigError
from golem_dask.protocol.properties import Resources
from golem_dask.provider.runtime.base import (
    SANDBOX,
    Runtime,
    RuntimeActivity,
    transfer_into_sandbox,
    worker_command,
    worker_environ,
)

logger = logging.getLogger(__name__)

LABEL = "golem-dask"  # every container we make carries golem-dask=1
LABEL_AGREEMENT = "golem-dask.agreement"
LABEL_ACTIVITY = "golem-dask.activity"
LABEL_PROVIDER = "golem-dask.provider"
LABEL_AGENT_PID = "golem-dask.agent-pid"
LABEL_VERSIONS = "golem-dask.versions"


def _docker() -> Any:
    try:
        import docker
    except ImportError as e:
        raise ConfigError("the docker runtime needs the docker SDK: pip install 'golem-dask[docker]'") from e
    return docker


def engine(timeout_s: float = 5.0) -> Any:
    """A connected docker client, or ActivityError saying how to start the engine."""
    docker = _docker()
    try:
        client = docker.from_env(timeout=int(max(1, timeout_s)))
        client.ping()
    except docker.errors.DockerException as e:
        raise ActivityError(
            f"no Docker engine answers ({e}); start dockerd, or use runtime='process'"
        ) from e
    return client


class DockerActivity(RuntimeActivity):
    """One activity: a sandbox directory and, once running, a container."""

    def __init__(
        self, runtime: DockerRuntime, activity_id: str, agreement_id: str, resources: Resources, image: str
    ) -> None:
        super().__init__(activity_id, agreement_id, resources)
        self.runtime = runtime
        self.image = image
        self.root: Path | None = None
        self.container: Any = None
        self._cpu = Decimal(0)
        self._logs = ""

    async def deploy(self) -> str:
        image = await asyncio.to_thread(self.runtime.image_info, self.image)
        return f"image {self.image} ({image.short_id})"

    async def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix=f"golem-{self.activity_id[:8]}-", dir=self.runtime.root))
        for sub in ("input", "output", "tls"):
            (self.root / sub).mkdir()
        return f"sandbox {self.root} mounted at {SANDBOX}"

    async def transfer(self, source: str, destination: str, options: Mapping[str, Any] | None = None) -> str:
        if self.root is None:
            raise ActivityError("transfer before start: the exe-script must start the activity first")
        return await transfer_into_sandbox(self.root, source, destination, options)

    async def run(self, entry_point: str, args: Sequence[str], env: Mapping[str, str]) -> str:
        if entry_point != "dask":
            raise ActivityError(f"the docker runtime only runs 'dask', not {entry_point!r}")
        if self.root is None:
            raise ActivityError("run before start: the exe-script must start the activity first")
        r = self.resources
        command = worker_command(args, r.cpu_threads, r.memory_bytes, ["python"])
        self.container = await asyncio.to_thread(self._create, command, {**env, **worker_environ(r.cpu_threads)})
        return f"container {self.container.short_id}"

    def _create(self, command: list[str], environment: dict[str, str]) -> Any:
        rt = self.runtime
        kwargs: dict[str, Any] = dict(
            image=self.image,
            command=command,
            detach=True,
            name=f"golem-{self.activity_id[:12]}",
            labels={
                LABEL: "1",
                LABEL_AGREEMENT: self.agreement_id,
                LABEL_ACTIVITY: self.activity_id,
                LABEL_PROVIDER: rt.provider_name,
                LABEL_AGENT_PID: str(os.getpid()),
            },
            nano_cpus=int(self.resources.cpu_threads * 1e9),
            mem_limit=int(self.resources.memory_bytes),
            volumes={str(self.root): {"bind": SANDBOX, "mode": "rw"}},
            environment=environment,
            working_dir=SANDBOX,
        )
        if rt.network == "host":
            kwargs["network_mode"] = "host"
        else:
            kwargs["network"] = rt.network
            kwargs["extra_hosts"] = {"host.docker.internal": "host-gateway"}
        try:
            return rt.client.containers.run(**kwargs)
        except _docker().errors.DockerException as e:
            raise ActivityError(f"docker could not start {self.image}: {e}") from e

    def _sample(self) -> Decimal:
        if self.container is None:
            return self._cpu
        try:
            stats = self.container.stats(stream=False, one_shot=True)
            total_ns = stats["cpu_stats"]["cpu_usage"]["total_usage"]
        except Exception:  # gone or stopping (the SDK raises requests' errors too): keep the last reading
            return self._cpu
        self._cpu = max(self._cpu, Decimal(total_ns) / Decimal(10**9))
        return self._cpu

    async def cpu_seconds(self) -> Decimal:
        return await asyncio.to_thread(self._sample)

    async def wait(self) -> int:
        if self.container is None:
            raise ActivityError("nothing runs in this activity")
        try:
            result = await asyncio.to_thread(self.container.wait)
        except _docker().errors.DockerException:
            return -1
        return int(result.get("StatusCode", -1))

    def _stop(self) -> None:
        container = self.container
        if container is not None:
            errors = _docker().errors
            # Sample just before stopping: after that the engine forgets the usage.
            self._sample()
            self.container = None
            with contextlib.suppress(errors.DockerException):
                container.stop(timeout=int(config.seconds("provider.stop-grace")))
            with contextlib.suppress(errors.DockerException):
                self._logs = container.logs(tail=200).decode(errors="replace")
            with contextlib.suppress(errors.NotFound):
                container.remove(force=True)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    async def terminate(self) -> None:
        await asyncio.to_thread(self._stop)

    def logs(self) -> str:
        if self.container is not None:
            with contextlib.suppress(Exception):
                return str(self.container.logs(tail=200).decode(errors="replace"))
        return self._logs


class DockerRuntime(Runtime):
    """Runs each activity as a container of ``image``.

    Parameters
    ----------
    image:
        The image run when a demand names none (see ``golem-dask image build``).
    network:
        ``"host"`` (fastest) or the name of a docker network such as ``"bridge"``; on a
        bridge the worker reaches the host's scheduler as ``host.docker.internal``.
    provider_name:
        Goes into container labels, to find leftovers after a crash.
    client:
        An engine connection to use (the runtime closes it in :meth:`close`).
    """

    name = "docker"

    def __init__(self, image: str, network: str = "host", provider_name: str = "local", root: str | None = None,
                 client: Any = None) -> None:
        self.image = image
        self.network = network
        self.provider_name = provider_name
        self.root = root
        self._client: Any = client  # a connected docker client, or None to connect on first use

    def __repr__(self) -> str:
        return f"<DockerRuntime image={self.image!r} network={self.network!r}>"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = engine()
        return self._client

    async def close(self) -> None:
        """Let go of the engine connection (activities are terminated before this)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.close)

    def image_info(self, image: str | None = None) -> Any:
        """The engine's record of ``image`` (default: this runtime's), or ActivityError."""
        image = image or self.image
        errors = _docker().errors
        try:
            return self.client.images.get(image)
        except errors.ImageNotFound as e:
            raise ActivityError(
                f"image {image!r} is not on this machine; build it with 'golem-dask image build'"
            ) from e
        except errors.DockerException as e:
            raise ActivityError(f"docker could not inspect {image!r}: {e}") from e

    def properties(self) -> dict[str, Any]:
        return {"golem.runtime.docker.network": self.network}

    def activity(
        self, activity_id: str, agreement_id: str, resources: Resources, image: str | None = None
    ) -> DockerActivity:
        return DockerActivity(self, activity_id, agreement_id, resources, image or self.image)

    def _cleanup(self, live_agreement_ids: set[str]) -> int:
        import psutil

        removed = 0
        errors = _docker().errors
        for container in self.client.containers.list(all=True, filters={"label": f"{LABEL}=1"}):
            labels = container.labels or {}
            pid = int(labels.get(LABEL_AGENT_PID, "0") or 0)
            ours = pid == os.getpid() and labels.get(LABEL_PROVIDER) == self.provider_name
            orphan = not (pid and psutil.pid_exists(pid))
            if orphan or (ours and labels.get(LABEL_AGREEMENT) not in live_agreement_ids):
                with contextlib.suppress(errors.DockerException):
                    container.remove(force=True)
                    removed += 1
                    logger.info("removed leftover container %s of agreement %s", container.short_id,
                                labels.get(LABEL_AGREEMENT))
        return removed

    async def cleanup(self, live_agreement_ids: set[str]) -> int:
        return await asyncio.to_thread(self._cleanup, live_agreement_ids)
