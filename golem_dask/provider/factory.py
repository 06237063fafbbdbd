"""From settings to provider agents: what ``golem-dask provider`` and the embedded market sell.

:func:`provider_settings` reads one entry of ``golem.provider.local`` (or the command
line's flags), :func:`make_runtime` builds its runtime, :func:`embedded_agents` makes the
embedded market's agents, and :func:`choose_runtime` decides whether this machine's
embedded providers run docker containers or plain processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError, ConfigError
from golem_dask.protocol.identity import Wallet
from golem_dask.protocol.pricing import LinearPricing
from golem_dask.protocol.properties import Resources
from golem_dask.provider.agent import ProviderAgent, ProviderSettings
from golem_dask.provider.runtime.base import Runtime
from golem_dask.provider.runtime.policy import TransferPolicy

RUNTIMES = ("process", "docker")


def provider_settings(entry: Mapping[str, Any], platform: str, what: str = "provider") -> ProviderSettings:
    """Capacity and prices from one entry (``name``, ``cpu``, ``memory``, ``storage``,
    ``price-per-cpu-hour``, ``price-per-hour``, ``start-price``); ``what`` names the entry
    in error messages.  A missing ``cpu`` sells every core, a missing ``memory`` 80 % of
    this machine's memory."""
    import psutil

    def price(key: str, default: str) -> Decimal:
        return config.to_decimal(entry.get(key, default), f"{what}.{key}") or Decimal(0)

    return ProviderSettings(
        name=str(entry.get("name") or "provider"),
        capacity=Resources(
            cpu_threads=int(entry.get("cpu") or os.cpu_count() or 1),
            memory_bytes=config.byte_size(entry.get("memory") or int(psutil.virtual_memory().total * 0.8),
                                          f"{what}.memory"),
            storage_bytes=config.byte_size(entry.get("storage") or "10GiB", f"{what}.storage"),
        ),
        pricing=LinearPricing.per_hour(cpu=price("price-per-cpu-hour", "0.1"), duration=price("price-per-hour", "0.02"),
                                       start=price("start-price", "0")),
        platform=platform,
        debit_note_interval_s=config.seconds("provider.debit-note-interval"),
    )


def make_runtime(kind: str, provider_name: str, image: str | None = None, docker_client: Any = None, *,
                 policy: TransferPolicy | None = None, network: str | None = None,
                 inherit_environment: bool = False) -> Runtime:
    """A ``process`` or ``docker`` runtime; docker uses ``docker_client`` when given.

    ``policy``: what transfers may reach (default :meth:`TransferPolicy.strict`, for
    strangers); ``network``: the containers' docker network (default
    ``golem.provider.docker-network``); ``inherit_environment``: process workers get this
    process's environment minus golem-dask's secrets instead of a scrubbed one.
    """
    policy = policy if policy is not None else TransferPolicy.strict()
    if kind == "docker":
        from golem_dask.image import default_tag
        from golem_dask.provider.runtime.docker import DockerRuntime

        return DockerRuntime(image or default_tag(), network or config.get("provider.docker-network"), provider_name,
                             client=docker_client, policy=policy)
    if kind == "process":
        from golem_dask.provider.runtime.process import ProcessRuntime

        return ProcessRuntime(policy=policy, inherit_environment=inherit_environment)
    raise ConfigError(f"runtime {kind!r}: use one of {', '.join(RUNTIMES)}")


def embedded_agents(
    platform: str,
    entries: Sequence[Mapping[str, Any]] | None = None,
    runtime: str | Runtime = "process",
    image: str | None = None,
    docker_client: Any = None,
) -> list[ProviderAgent]:
    """Provider agents for the embedded market, one per entry of ``golem.provider.local``.

    An entry's ``runtime`` is ``process``, ``docker`` or ``auto``; ``auto`` takes
    ``runtime``, which may also be a :class:`~golem_dask.provider.runtime.base.Runtime`
    object (the seam: tests and users bring their own).  Each agent gets a fresh
    identity.

    These providers sell this machine to its own user: their transfers may reach any URL
    (local files, loopback services: :meth:`TransferPolicy.trusting`) and process
    workers inherit the user's environment minus golem-dask's secrets, like a
    ``LocalCluster``'s.  Containers are hardened all the same.
    """
    entries = config.get("provider.local", entries) or []
    agents = []
    for i, entry in enumerate(entries):
        what = f"golem.provider.local[{i}]"
        settings = provider_settings({"name": f"local-{i}", **entry}, platform, what)
        kind = entry.get("runtime") or "auto"
        if kind == "auto" and isinstance(runtime, Runtime):
            chosen = runtime
        else:
            kind = runtime if kind == "auto" else kind
            if kind not in RUNTIMES:
                raise ConfigError(f"{what}.runtime={kind!r}: use 'process', 'docker' or 'auto'")
            chosen = make_runtime(str(kind), settings.name, image, docker_client, policy=TransferPolicy.trusting(),
                                  inherit_environment=True)
        agents.append(ProviderAgent(settings, chosen, Wallet.generate()))
    return agents


@dataclass(frozen=True, slots=True)
class RuntimeChoice:
    """Which runtime the embedded providers use, why (for the user), and an open engine
    connection for them to reuse (each new one costs ~15 ms)."""

    name: str
    reason: str
    docker_client: Any = None
    #: What the worker image lacks of this environment, for the user to hear before renting.
    warning: str = ""


def choose_runtime(requested: str | None, image: str | None) -> RuntimeChoice:
    """Docker if asked for or, by default, if an engine answers and has a matching image.

    The image's versions are checked here, before any negotiation: a mismatch would
    otherwise only show as workers the scheduler refuses.

    Raises
    ------
    ActivityError, ConfigError
        ``requested="docker"`` and no engine answers, the image is missing, or it runs
        other versions than this client.
    """
    from golem_dask.image import check_image, default_tag
    from golem_dask.provider.runtime.docker import engine

    image = image or default_tag()
    timeout = config.seconds("provider.docker-connect-timeout" if requested == "docker"
                             else "cluster.docker-probe-timeout")
    try:
        client = engine(timeout)
    except (ActivityError, ConfigError):  # no engine, or no docker SDK installed
        if requested == "docker":
            raise
        return RuntimeChoice("process", "process runtime: no Docker engine answers")
    try:
        import docker

        try:
            found = client.images.get(image)
        except docker.errors.ImageNotFound:
            if requested == "docker":
                raise ConfigError(f"image {image!r} is not on this machine; build it with "
                                  "'golem-dask image build'") from None
            client.close()
            return RuntimeChoice("process", f"process runtime: Docker answers but image {image} is missing "
                                 "(build it with 'golem-dask image build')")
        differences = check_image(found)
    except BaseException:
        client.close()
        raise
    warning = ""
    if differences:
        shown = ", ".join(differences[:8]) + (f" and {len(differences) - 8} more" if len(differences) > 8 else "")
        warning = (f"worker image {image} differs from this environment in {len(differences)} packages: {shown}; "
                   "tasks that import them fail on docker workers: rebuild it with 'golem-dask image build'")
    return RuntimeChoice("docker", f"docker runtime with image {image}", client, warning)


@dataclass(frozen=True, slots=True)
class RuntimePlan:
    """What a cluster asks of providers and what its embedded providers run.

    ``name`` goes into the demand (``None``: any runtime); ``embedded`` is the runtime
    the embedded market's ``auto`` providers use (a name or a Runtime object); ``image``
    is the worker image the demand names; ``reason`` tells the user what was chosen.
    """

    name: str | None
    embedded: str | Runtime
    image: str | None = None
    docker_client: Any = None
    reason: str = ""
    warning: str = ""


def plan_runtime(runtime: str | Runtime | None, image: str | None, *, embedded: bool,
                 entries: Sequence[Mapping[str, Any]] | None = None) -> RuntimePlan:
    """Resolve a cluster's ``runtime=`` and ``image=`` (``entries``: ``golem.provider.local``).

    Providers on this machine (the embedded market) are checked before negotiating:
    ``runtime="docker"`` needs an engine and a matching image, and no ``runtime`` means
    docker when both are there.  For a remote market nothing is probed here: providers
    deploy the image, and the requestor needs neither docker nor the image.
    """
    if isinstance(runtime, Runtime):
        if not embedded:
            raise ConfigError("a Runtime object runs the embedded market's workers; with another market, "
                              "say runtime='docker' or 'process' and let providers run them")
        return RuntimePlan(runtime.name, runtime, image if runtime.name == "docker" else None)
    if runtime not in (None, *RUNTIMES):
        raise ConfigError(f"runtime={runtime!r}: use 'process', 'docker', None or a Runtime object")
    entries = config.get("provider.local", entries) or []
    auto = embedded and any((e.get("runtime") or "auto") == "auto" for e in entries)
    client, reason, warning = None, "", ""
    if embedded and (runtime == "docker" or (auto and runtime is None)):
        choice = choose_runtime(runtime, image)
        runtime, client, reason, warning = choice.name, choice.docker_client, choice.reason, choice.warning
    if runtime == "docker":
        from golem_dask.image import default_tag

        return RuntimePlan("docker", "docker", image or default_tag(), client, reason, warning)
    return RuntimePlan(runtime, runtime or "process", None, None, reason)
