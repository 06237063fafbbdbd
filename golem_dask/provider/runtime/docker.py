"""The ``docker`` runtime: each activity is a container running ``dask worker``.

Exe-script commands map onto the engine: ``deploy`` checks the image is present,
``start`` makes the activity's sandbox (a host directory mounted at ``/golem``) and
creates and starts the container with the agreed limits (``nano_cpus``, ``mem_limit``)
and labels naming the agreement, ``transfer`` streams files between fsspec URLs and the
sandbox, ``run`` starts ``dask worker`` in the container, and ``terminate`` stops and
removes it, always.

Between ``start`` and ``run`` the container's entry script (``worker_entry.py``)
imports ``distributed``, so most of a worker's start-up overlaps the requestor's own
(scheduler, input files); ``run`` hands it the worker's arguments through a pipe in the
sandbox.

Every container is hardened, whoever rents it: it runs as a non-root user
(``golem.provider.docker-user``, 65534:65534 by default; a provider that is not root runs
it as its own user), with every capability dropped, ``no-new-privileges``, a pids limit
(``golem.provider.pids-limit``) and the agreed memory as a hard limit without swap.  The
sandbox directory belongs to the provider (the worker cannot rename ``/golem/.golem``);
``input``, ``output`` and ``tls`` belong to the worker's user.

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
import threading
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError, ConfigError
from golem_dask.protocol.properties import Resources
from golem_dask.provider.runtime.base import (
    CONTROL_DIR,
    SANDBOX,
    Runtime,
    RuntimeActivity,
    TransferPolicy,
    make_control_dir,
    requested_versions,
    transfer_into_sandbox,
    worker_environ,
)

logger = logging.getLogger(__name__)

LABEL = "golem-dask"  # every container we make carries golem-dask=1
LABEL_AGREEMENT = "golem-dask.agreement"
LABEL_ACTIVITY = "golem-dask.activity"
LABEL_PROVIDER = "golem-dask.provider"
LABEL_AGENT_PID = "golem-dask.agent-pid"
LABEL_VERSIONS = "golem-dask.versions"
#: Subdirectories of the sandbox that belong to the worker's user.
WORKER_DIRS = ("input", "output", "tls")


def container_user(spec: str | None = None) -> tuple[int, int]:
    """The uid and gid containers run as: ``golem.provider.docker-user`` (``"uid:gid"``).

    A provider that is not root cannot give the sandbox to another user, so its
    containers run as its own (non-root) uid and gid instead.

    Examples
    --------
    >>> import os
    >>> container_user("1000:1000") == ((1000, 1000) if os.geteuid() == 0 else (os.geteuid(), os.getegid()))
    True
    """
    spec = str(config.get("provider.docker-user", spec))
    try:
        uid, gid = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ConfigError(f"golem.provider.docker-user={spec!r}: use numeric 'uid:gid', e.g. '65534:65534'") from None
    if uid == 0 or gid == 0:
        raise ConfigError(f"golem.provider.docker-user={spec!r}: containers never run as root; use e.g. '65534:65534'")
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    return uid, gid


def _docker() -> Any:
    try:
        import docker
    except ImportError as e:
        raise ConfigError("the docker runtime needs the docker SDK: pip install 'golem-dask[docker]'") from e
    return docker


def engine(timeout_s: float | None = None) -> Any:
    """A connected docker client, or ActivityError saying how to start the engine.

    Each request waits at most ``timeout_s`` (default ``golem.provider.docker-connect-timeout``).
    """
    docker = _docker()
    timeout_s = config.seconds("provider.docker-connect-timeout", timeout_s)
    try:
        # Without a pinned API version the client asks the engine for its own: that
        # request is the check that the engine answers.
        client = docker.from_env(timeout=int(max(1, timeout_s)))
    except docker.errors.DockerException as e:
        raise ActivityError(
            f"no Docker engine answers ({e}); start dockerd, or use runtime='process'"
        ) from e
    return client


class DockerActivity(RuntimeActivity):
    """One activity: a sandbox directory and, from ``start``, a container."""

    def __init__(
        self, runtime: DockerRuntime, activity_id: str, agreement_id: str, resources: Resources, image: str,
        versions: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(activity_id, agreement_id, resources)
        self.runtime = runtime
        self.image = image
        self.versions = versions
        self.root: Path | None = None
        self.container: Any = None
        self._cpu = Decimal(0)
        self._logs = ""
        # Held while the container is made and while it is stopped: a terminate that
        # arrives mid-creation (a cancelled start) waits for the container, then removes it.
        self._engine_lock = threading.Lock()
        self._terminated = False
        self._image_id: str | None = None  # what deploy checked: the container runs this, by id

    async def deploy(self) -> str:
        image = await self.runtime.check_image(self.image)
        if self.image not in (config.get("provider.allowed-images") or ()):
            self._check_sold(image, await self.runtime.check_image())
        if self.versions is not None:
            self._check_versions(image)
        self._image_id = image.id
        return f"image {self.image} ({image.short_id})"

    def _check_sold(self, image: Any, own: Any) -> None:
        """Refuse an image this provider does not sell: a stranger's demand may name any
        image on the machine, but only the runtime's own worker image ``own`` (the same
        image, by id: one built from it carries its labels too) and those listed in
        ``golem.provider.allowed-images`` run."""
        if image.id != own.id:
            raise ActivityError(
                f"image {self.image} is not an image this provider sells (its worker image is "
                f"{self.runtime.image}; others run only if listed in golem.provider.allowed-images)")

    def _check_versions(self, image: Any) -> None:
        """Refuse an image whose ``golem-dask.versions`` label is not what the requestor runs."""
        from golem_dask.image import image_versions, mismatches

        wanted = requested_versions(self.versions or {})
        if not wanted:  # nothing named that an image could match or miss
            return
        try:
            wrong = mismatches(image_versions(image), wanted, where="for the requestor")
        except ConfigError as e:
            wrong = [str(e)]
        if wrong:
            shown = ", ".join(f"{k} {v}" for k, v in wanted.items())
            raise ActivityError(
                f"image {self.image} does not match the requestor's versions ({shown}): {'; '.join(wrong)}. "
                f"The provider can build a matching image with 'golem-dask image build' in an environment "
                f"with those versions"
            )

    async def start(self) -> str:
        """Sandbox, then the container: it imports dask while the files come in."""
        root = self.root = Path(tempfile.mkdtemp(prefix=f"golem-{self.activity_id[:8]}-", dir=self.runtime.root))
        owner = self.runtime.sandbox_owner
        if owner is not None:
            os.chmod(root, 0o711)  # the worker's user passes through to its own directories, lists nothing
        for sub in WORKER_DIRS:
            (root / sub).mkdir(mode=0o700)
            if owner is not None:
                os.chown(root / sub, *owner)
        self._pipe = make_control_dir(root, owner)[1]
        container = await asyncio.to_thread(self._create)
        return f"container {container.short_id} with sandbox {root} mounted at {SANDBOX}"

    async def transfer(self, source: str, destination: str, options: Mapping[str, Any] | None = None) -> str:
        if self.root is None:
            raise ActivityError("transfer before start: the exe-script must start the activity first")
        return await transfer_into_sandbox(self.root, source, destination, options, policy=self.runtime.policy,
                                           owner=self.runtime.sandbox_owner)

    async def run(self, entry_point: str, args: Sequence[str], env: Mapping[str, str]) -> str:
        await self._order_run("docker", entry_point, args, env, self.container is not None, self._exited,
                              self._not_taken)
        return f"dask worker in container {self.container.short_id}"

    def _create(self) -> Any:
        rt = self.runtime
        api = rt.client.api
        host_config: dict[str, Any] = dict(
            nano_cpus=int(self.resources.cpu_threads * 1e9),
            mem_limit=int(self.resources.memory_bytes),
            memswap_limit=int(self.resources.memory_bytes),  # the same: no swap beyond the agreed memory
            binds={str(self.root): {"bind": SANDBOX, "mode": "rw"}},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=rt.pids_limit,
        )
        if rt.network == "host":
            host_config["network_mode"] = "host"
        else:
            host_config["network_mode"] = rt.network
            host_config["extra_hosts"] = {"host.docker.internal": "host-gateway"}
        with self._engine_lock:
            if self._terminated:
                raise ActivityError("the activity was terminated while it started")
            if self._image_id is None:
                raise ActivityError("start before deploy: the image must pass its checks first")
            try:
                created = api.create_container(
                    self._image_id,
                    ["python", f"{SANDBOX}/{CONTROL_DIR}/entry.py", f"{SANDBOX}/{CONTROL_DIR}/order"],
                    name=f"golem-{self.activity_id[:12]}",
                    user=f"{rt.user[0]}:{rt.user[1]}",
                    labels={
                        LABEL: "1",
                        LABEL_AGREEMENT: self.agreement_id,
                        LABEL_ACTIVITY: self.activity_id,
                        LABEL_PROVIDER: rt.provider_name,
                        LABEL_AGENT_PID: str(os.getpid()),
                    },
                    # Thread pools are sized when numpy is imported, before the run command.
                    environment=worker_environ(self.resources.cpu_threads),
                    working_dir=SANDBOX,
                    host_config=api.create_host_config(**host_config),
                )
                # Recorded before it starts: a failed start still leaves a container
                # that terminate knows about and removes.
                self.container = rt.client.containers.prepare_model({"Id": created["Id"]})
                api.start(created["Id"])
            except _docker().errors.DockerException as e:
                raise ActivityError(f"docker could not start {self.image}: {e}") from e
            return self.container

    def _not_taken(self) -> str:
        tail = "\n".join(self.logs().splitlines()[-20:])
        return f"the container of {self.image} did not take the run command (does the image have python and dask?)\n{tail}"

    def _exited(self) -> bool:
        try:
            self.container.reload()
        except _docker().errors.DockerException:
            return True
        return bool(self.container.status in ("exited", "dead"))

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
        if self.container is None or not self._ran:
            raise ActivityError("nothing runs in this activity")
        try:
            result = await asyncio.to_thread(self.container.wait)
        except _docker().errors.DockerException:
            return -1
        return int(result.get("StatusCode", -1))

    def _stop(self, keep_sandbox: bool = False) -> None:
        with self._engine_lock:
            self._terminated = True
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
        if self.root is not None and not keep_sandbox:
            self._discard()

    def _discard(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    async def terminate(self, keep_sandbox: bool = False) -> None:
        await asyncio.to_thread(self._stop, keep_sandbox)

    async def discard(self) -> None:
        await asyncio.to_thread(self._discard)

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
    root:
        Where sandboxes go (default: the system temp dir).
    client:
        An engine connection to use (the runtime closes it in :meth:`close`).
    policy:
        What transfers may reach (default: :meth:`TransferPolicy.strict`, for strangers).
    user:
        ``"uid:gid"`` containers run as (default ``golem.provider.docker-user``; never root).
    pids_limit:
        Processes and threads per container (default ``golem.provider.pids-limit``).
    """

    name = "docker"

    def __init__(self, image: str, network: str = "host", provider_name: str = "local", root: str | None = None,
                 client: Any = None, *, policy: TransferPolicy | None = None, user: str | None = None,
                 pids_limit: int | None = None) -> None:
        self.image = image
        self.network = network
        self.provider_name = provider_name
        self.root = root
        self.policy = policy if policy is not None else TransferPolicy.strict()
        self.user = container_user(user)
        #: Who gets the worker's directories and the files transfers make: the container's
        #: user, or None where the provider is that user already (it is not root).
        self.sandbox_owner = self.user if os.geteuid() == 0 else None
        self.pids_limit = int(config.get("provider.pids-limit", pids_limit))
        if self.pids_limit < 1:
            raise ConfigError(f"golem.provider.pids-limit={self.pids_limit}: a container needs at least one process")
        self._client: Any = client  # a connected docker client, or None to connect on first use
        self._images: dict[str, tuple[float, Any]] = {}  # image -> (when checked, record)

    def __repr__(self) -> str:
        return f"<DockerRuntime image={self.image!r} network={self.network!r} user={self.user[0]}:{self.user[1]}>"

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

    def _checked(self, image: str) -> Any:
        found = self._images.get(image)
        if found is not None and time.monotonic() - found[0] < config.seconds("provider.image-check-ttl"):
            return found[1]
        return None

    def image_info(self, image: str | None = None) -> Any:
        """The engine's record of ``image`` (default: this runtime's), or ActivityError.

        A record found within ``golem.provider.image-check-ttl`` is reused.
        """
        image = image or self.image
        record = self._checked(image)
        if record is not None:
            return record
        errors = _docker().errors
        try:
            record = self.client.images.get(image)
        except errors.ImageNotFound as e:
            raise ActivityError(
                f"image {image!r} is not on this machine; build it with 'golem-dask image build'"
            ) from e
        except errors.DockerException as e:
            raise ActivityError(f"docker could not inspect {image!r}: {e}") from e
        self._images[image] = (time.monotonic(), record)
        return record

    async def check_image(self, image: str | None = None) -> Any:
        """:meth:`image_info`, without a thread when an earlier answer is still fresh."""
        record = self._checked(image or self.image)
        return record if record is not None else await asyncio.to_thread(self.image_info, image)

    async def warm_up(self) -> None:
        await self.check_image()

    def properties(self) -> dict[str, Any]:
        return {"golem.runtime.docker.network": self.network}

    def activity(
        self, activity_id: str, agreement_id: str, resources: Resources, image: str | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> DockerActivity:
        return DockerActivity(self, activity_id, agreement_id, resources, image or self.image, versions)

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
                    # Its sandbox (input files, certificates) goes too.
                    for mount in container.attrs.get("Mounts") or ():
                        source = Path(mount.get("Source") or "")
                        if mount.get("Destination") == SANDBOX and source.name.startswith("golem-"):
                            shutil.rmtree(source, ignore_errors=True)
        return removed

    async def cleanup(self, live_agreement_ids: set[str]) -> int:
        return await asyncio.to_thread(self._cleanup, live_agreement_ids)
