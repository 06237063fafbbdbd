"""A second host for tests: a Linux network namespace joined to this one by a veth pair.

The namespace has its own address (``far_ip``); this machine's end of the pair has
``host_ip``.  Programs run "on the far host" with ``ip netns exec``.  Traffic goes only to
addresses this fixture made.  Everything is removed afterwards, also when a test fails:
the processes left in the namespace are killed, then the namespace and the veth pair.

Needs root and iproute2.  On a machine without them the tests skip; with
``GOLEM_DASK_REQUIRE_NETNS=1`` (set by CI) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

REQUIRED = os.environ.get("GOLEM_DASK_REQUIRE_NETNS") == "1"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def unavailable(reason: str) -> None:
    """Skip for ``reason``; with ``GOLEM_DASK_REQUIRE_NETNS=1`` (CI), fail."""
    if REQUIRED:
        pytest.fail(f"{reason} (GOLEM_DASK_REQUIRE_NETNS=1)")
    pytest.skip(reason)


@dataclass
class FarHost:
    """One namespace: ``run``/``popen`` start programs there."""

    name: str
    host_ip: str
    far_ip: str
    veth: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.name]
        if env:
            prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
        return [*prefix, *cmd]

    def popen(self, cmd: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.command(cmd, env), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        return _namespace_pids(self.name)

    def kill_all(self) -> None:
        """The far machine dies: every process in the namespace gets SIGKILL."""
        kill_namespace(self.name, self.procs)


def _namespace_pids(name: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]


def kill_namespace(name: str, procs: Sequence[subprocess.Popen[Any]] = ()) -> None:
    """SIGKILL to every process in namespace ``name``; ``procs`` (started there) reaped."""
    for pid in _namespace_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 10
    while _namespace_pids(name) and time.monotonic() < deadline:
        time.sleep(0.05)


_counter = 0


def make_far_host() -> FarHost:
    global _counter
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    if shutil.which("ip") is None:
        unavailable("network namespaces need iproute2 (apt-get install iproute2)")
    _counter += 1
    # A /30 of its own per namespace, from 10.233.0.0/16, by pid and count: two test runs
    # on one machine do not collide.
    block = (os.getpid() * 16 + _counter) % 16384
    base = f"10.233.{block // 64}.{(block % 64) * 4}"
    octets = base.split(".")
    host_ip = ".".join([*octets[:3], str(int(octets[3]) + 1)])
    far_ip = ".".join([*octets[:3], str(int(octets[3]) + 2)])
    name = f"gdns{os.getpid() % 100000}x{_counter}"
    veth = f"gdv{os.getpid() % 100000}x{_counter}"[:15]
    peer = f"gdp{os.getpid() % 100000}x{_counter}"[:15]
    try:
        _ip("netns", "add", name)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{far_ip}/30", "dev", peer)
        _ip("netns", "exec", name, "ip", "link", "set", peer, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        remove(FarHost(name, host_ip, far_ip, veth))
        unavailable(f"could not make a network namespace: {e.stderr.strip()}")
    return FarHost(name, host_ip, far_ip, veth)


def remove(host: FarHost) -> None:
    host.kill_all()
    _ip("netns", "del", host.name, check=False)
    _ip("link", "del", host.veth, check=False)  # gone with the namespace's end, normally


@pytest.fixture
def far_host() -> Iterator[FarHost]:
    host = make_far_host()
    try:
        yield host
    finally:
        remove(host)
    assert host.name not in _ip("netns", "list", check=False).stdout
    assert host.veth not in _ip("link", "show", check=False).stdout
