"""Test VMs on a yagna VPN: what a provider's exe-unit and VM do for the daemon's Net API.

Each VM is a Linux network namespace whose only interface is a TAP device holding the
VM's VPN address (MTU 1400, as yagna's VPN): programs started there (``VpnHost.popen``)
reach other hosts only through the VPN.  :class:`TestVpn` connects to the daemon's service
bus (:mod:`gsb_wire`) as the VMs' exe-unit does, and carries Ethernet frames:

- frames the requestor's daemon sends to a VM (``/net/<node>/vpn/<net>/raw``, which this
  registers for each node) are written to that VM's TAP;
- a frame a VM sends goes to the VM holding its destination address (through the bus, to
  that node's address), or to the requestor's VPN endpoint ``/public/vpn/<net>/raw``.  That
  is where the daemon's network layer delivers it; the offline central net's own hop back to
  the daemon would add ~44 ms to every frame here, a delay the real network does not share.

The daemon's tunnels (``/net-api/v2/vpn/net/<net>/tcp/<ip>/<port>``) then reach servers in
the VMs, and VMs reach each other, with no real VM runtime.  Needs root, iproute2 and
``/dev/net/tun``; :func:`vpn_unavailable` says why a machine cannot.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gsb_wire import GsbClient
from netns_support import kill_namespace

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000
MTU = 1400
_ARP, _IPV4 = b"\x08\x06", b"\x08\x00"


def vpn_unavailable() -> str | None:
    """Why test VMs cannot run here, or None."""
    if os.geteuid() != 0:
        return "test VMs need root (network namespaces and TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "test VMs need /dev/net/tun"
    if shutil.which("ip") is None:
        return "test VMs need iproute2 (apt-get install iproute2)"
    return None


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _destination(frame: bytes) -> str | None:
    """The IPv4 address an Ethernet frame is for: an ARP request's target, an IP packet's
    destination."""
    kind = frame[12:14]
    if kind == _ARP and len(frame) >= 42:
        return str(ipaddress.IPv4Address(frame[38:42]))
    if kind == _IPV4 and len(frame) >= 34:
        return str(ipaddress.IPv4Address(frame[30:34]))
    return None


@dataclass
class VpnHost:
    """One test VM: its namespace, address and node id; ``popen`` runs a program in it."""

    namespace: str
    ip: str
    node_id: str
    tap: str
    fd: int
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def command(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *cmd]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(self.command(cmd), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Every process in the VM is killed; the namespace and its TAP go."""
        kill_namespace(self.namespace, self.procs)
        os.close(self.fd)
        _ip("netns", "del", self.namespace, check=False)


class TestVpn:
    """The VMs of one network ``net_id`` of the daemon whose bus is ``gsb_url``."""

    __test__ = False  # not a pytest class

    _count = 0

    def __init__(self, gsb_url: str, net_id: str) -> None:
        self.net_id = net_id
        self._gsb = GsbClient(gsb_url)
        self._hosts: dict[str, VpnHost] = {}
        self._nodes: set[str] = set()
        self.frames = {"to-vms": 0, "from-vms": 0, "between-vms": 0}

    async def start(self) -> None:
        await self._gsb.connect()

    async def add_vm(self, node_id: str, ip: str) -> VpnHost:
        """A VM holding ``ip`` for node ``node_id`` (the id given to ``POST .../nodes``)."""
        node = node_id.lower()
        if node not in self._nodes:
            await self._gsb.bind(f"/net/{node}/vpn/{self.net_id}", self._to_vm)
            self._nodes.add(node)
        TestVpn._count += 1
        suffix = f"{os.getpid() % 100000}x{TestVpn._count}"
        namespace, tap = f"gdvm{suffix}", f"gdtap{suffix}"[:15]
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        host = VpnHost(namespace, ip, node, tap, fd)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", tap.encode(), _IFF_TAP | _IFF_NO_PI))
            _ip("netns", "add", namespace)
            _ip("link", "set", tap, "netns", namespace)
            for args in (["addr", "add", f"{ip}/24", "dev", tap], ["link", "set", tap, "mtu", str(MTU), "up"],
                         ["link", "set", "lo", "up"]):
                _ip("netns", "exec", namespace, "ip", *args)
        except BaseException:
            host.stop()
            raise
        self._hosts[ip] = host
        asyncio.get_running_loop().add_reader(fd, self._from_vm, host)
        return host

    def remove_vm(self, host: VpnHost) -> None:
        """The VM's processes are killed and its namespace removed."""
        if self._hosts.pop(host.ip, None) is host:
            asyncio.get_running_loop().remove_reader(host.fd)
            host.stop()

    async def _to_vm(self, caller: str, address: str, frame: bytes) -> None:
        if address.endswith("/raw"):
            target = self._hosts.get(_destination(frame) or "")
            if target is not None:
                self.frames["to-vms"] += 1
                os.write(target.fd, frame)

    def _from_vm(self, host: VpnHost) -> None:
        while True:
            try:
                frame = os.read(host.fd, 65536)
            except (BlockingIOError, OSError):
                return
            self.frames["from-vms"] += 1
            peer = self._hosts.get(_destination(frame) or "")
            if peer is not None and peer is not host:
                self.frames["between-vms"] += 1
                self._gsb.push(host.node_id, f"/net/{peer.node_id}/vpn/{self.net_id}/raw", frame)
            else:
                self._gsb.push(host.node_id, f"/public/vpn/{self.net_id}/raw", frame)

    async def close(self) -> None:
        for host in list(self._hosts.values()):
            self.remove_vm(host)
        await self._gsb.close()
