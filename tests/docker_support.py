"""Helpers for tests that need a Docker engine and the worker image.

On a machine without an engine these tests skip; with ``GOLEM_DASK_REQUIRE_DOCKER=1``
(set by CI) a missing engine or image fails them instead.
"""

from __future__ import annotations

import os

import psutil
import pytest

from golem_dask.image import default_tag
from golem_dask.provider.runtime.docker import LABEL, LABEL_AGENT_PID

REQUIRED = os.environ.get("GOLEM_DASK_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (GOLEM_DASK_REQUIRE_DOCKER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker
    except ImportError:
        _unavailable("the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException as e:
        _unavailable(f"no Docker engine answers: {e}")
    try:
        client.images.get(default_tag())
    except docker.errors.ImageNotFound:
        _unavailable(f"worker image {default_tag()} missing: run 'golem-dask image build'")
    yield client
    client.close()


def _another_session(container) -> bool:
    """Whether a live process outside this test session runs ``container`` (a user's cluster or a
    benchmark on the same engine): not this session's to judge or remove."""
    pid = int(container.labels.get(LABEL_AGENT_PID) or 0)
    try:
        chain = [psutil.Process(pid), *psutil.Process(pid).parents()] if pid else []
    except psutil.Error:
        return False
    return bool(chain) and all(p.pid != os.getpid() for p in chain)


def our_containers(client) -> list:
    """Containers of golem-dask this session made (or whose agent is gone)."""
    return [c for c in client.containers.list(all=True, filters={"label": f"{LABEL}=1"}) if not _another_session(c)]


@pytest.fixture
def no_leaked_containers(docker_client):
    assert our_containers(docker_client) == [], "containers left by an earlier test"
    yield docker_client
    left = our_containers(docker_client)
    for c in left:
        c.remove(force=True)
    assert left == [], f"containers left behind: {[c.name for c in left]}"
