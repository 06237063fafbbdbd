"""Workers on a VPN of the requestor's daemon, the scheduler staying on the requestor's machine.

On the public network a provider's VM may not connect to the requestor's machine, and the
requestor reaches a VM only through its daemon: the Net API makes a virtual network, adds
each VM to it as a node, and opens TCP connections to a VM's port as websockets (the
*tunnel*).  VMs reach each other on the network directly.  Three pieces carry a Dask
cluster over that:

- :class:`VpnNetwork`: the network, its nodes, the ``net`` argument of each VM's deploy
  command, and tunnels;
- :class:`TunnelPool`: connections the requestor opens ahead of need to one VM's
  :mod:`~golem_dask.yagna.backchannel`, which hands each to a connection the worker opens
  to its scheduler (the worker dials ``127.0.0.1`` in its VM); the pool joins it to the
  scheduler on this machine;
- :class:`LocalForward` and :func:`route`: the scheduler's own connections to a worker
  (to fetch results, say) go to the worker's VPN address; this process's Dask comms are
  sent through a local port whose connections the backchannel joins to the worker's port.

Every tunnel ends at the backchannel, and what this side sends into one goes as numbered
records (:class:`Sender`): yagna 0.17.6 writes a tunnel's websocket messages into the TCP
stream out of order when several are in flight (seen here with as few as four 4 KiB
messages; a 4 MiB stream arrived with 16 KiB messages swapped), and a worker's TLS then
fails on the first swapped record.  The backchannel puts them back in order.

TLS runs end to end between scheduler and workers through all of it: the daemons and the
backchannel carry ciphertext.  Traffic between workers never touches this machine.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from golem_dask import config
from golem_dask.errors import ConfigError, NetworkError
from golem_dask.tasks import Tasks
from golem_dask.yagna.api import OK, YagnaApi, YagnaError
from golem_dask.yagna.backchannel import (
    FORWARD,
    GO,
    TOKEN_BYTES,
    WAITING,
    hello,
    record,
    source,
)

logger = logging.getLogger(__name__)

NET_API = "/net-api/v2/vpn/net"
#: The daemon closes a tunnel on a websocket message much over 64 KiB: send in pieces.
_WS_PIECE = 16 * 1024
_READ = 64 * 1024


def connectivity() -> str:
    """``golem.yagna.connectivity`` checked: ``vpn`` (workers in VMs on the cluster's VPN) or
    ``direct`` (workers dial the scheduler's address themselves).

    Raises
    ------
    ConfigError
        For anything else, naming the setting.
    """
    value = str(config.get("yagna.connectivity"))
    if value not in ("vpn", "direct"):
        raise ConfigError(f"golem.yagna.connectivity is vpn or direct, not {value!r}")
    return value


def vpn_range(value: Any) -> str:
    """``golem.yagna.vpn-range`` checked: an IPv4 network with room for the requestor and VMs.

    Raises
    ------
    ConfigError
        For anything else, naming the setting.
    """
    try:
        if ipaddress.IPv4Network(str(value)).num_addresses < 4:
            raise ValueError("no room for the requestor and two VMs")
    except ValueError as e:
        raise ConfigError(f"golem.yagna.vpn-range {value!r} is not a usable IPv4 network, like 192.168.0.0/24: "
                          f"{e}") from None
    return str(value)


class VpnNetwork:
    """One virtual network of the requestor's daemon: ``create``, add nodes, ``delete``.

    The requestor holds the network's first address; VMs get the following ones in order.
    """

    def __init__(self, api: YagnaApi, net_id: str, network: ipaddress.IPv4Network, requestor_id: str) -> None:
        self.api, self.id, self.network, self.requestor_id = api, net_id, network, requestor_id
        self._hosts = network.hosts()
        self.requestor_ip = str(next(self._hosts))  # the daemon gives the requestor the first host
        self.nodes: dict[str, str] = {}  # ip -> node id
        self._released: collections.deque[str] = collections.deque()  # given back, oldest first
        self._parked: dict[str, list[str]] = {}  # node -> addresses left while the node stays

    def __repr__(self) -> str:
        return f"VpnNetwork({self.id!r}, {str(self.network)!r}, nodes={len(self.nodes)})"

    @classmethod
    async def create(cls, api: YagnaApi, requestor_id: str, cidr: str = "192.168.0.0/24") -> VpnNetwork:
        network = ipaddress.IPv4Network(cidr)
        body = await api.call("POST", NET_API, body={"ip": str(network.network_address), "mask": str(network.netmask)},
                              ok=(*OK, 201))
        return cls(api, str(body["id"]), network, requestor_id)

    def allocate(self) -> str:
        """A free address for a VM: the next never used, then the one given back longest ago
        (a cluster renewing its workers for days outlives any range)."""
        try:
            return str(next(self._hosts))
        except StopIteration:
            if self._released:
                return self._released.popleft()
            raise NetworkError(f"the VPN {self.network} has no free address left: every one holds a worker; "
                               "a larger range (golem.yagna.vpn-range) holds more") from None

    async def add_node(self, node_id: str, ip: str) -> None:
        await self.api.call("POST", f"{NET_API}/{self.id}/nodes", body={"id": node_id.lower(), "ip": ip},
                            ok=(*OK, 201))
        self.nodes[ip] = node_id.lower()

    async def remove_node(self, ip: str) -> None:
        """Take the VM at ``ip`` off the network.  The daemon removes a node with all its
        addresses, so while the same provider holds another VM here its node stays, and
        the address waits; once the node is removed its addresses may be given again."""
        node = self.nodes.pop(ip, None)
        if node is None:
            return  # never added (or added by a call that failed): not given again
        self._parked.setdefault(node, []).append(ip)
        if node in self.nodes.values():
            return
        await self.api.call("DELETE", f"{NET_API}/{self.id}/nodes/{node}", ok=(*OK, 404))
        self._released.extend(self._parked.pop(node))

    def deploy_argument(self, ip: str) -> dict[str, Any]:
        """The ``net`` entry of the deploy command of the VM at ``ip``."""
        return {"id": self.id, "ip": str(self.network.network_address), "mask": str(self.network.netmask),
                "gateway": self.requestor_ip, "nodeIp": ip,
                "nodes": {self.requestor_ip: self.requestor_id.lower(), **self.nodes}}

    async def tunnel(self, ip: str, port: int, timeout_s: float = 15.0) -> Any:
        """A websocket carrying one TCP connection to ``ip:port`` on the network."""
        return await self.api.websocket(f"{NET_API}/{self.id}/tcp/{ip}/{port}", timeout_s)

    async def delete(self) -> None:
        await self.api.call("DELETE", f"{NET_API}/{self.id}", ok=(*OK, 404))


class Sender:
    """What this side sends into one tunnel, as the backchannel's numbered records (the
    daemon may reorder a tunnel's websocket messages; the backchannel puts them back)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._sequence = 0

    async def send(self, data: bytes) -> None:
        for at in range(0, len(data), _WS_PIECE):
            await self.ws.send_bytes(record(self._sequence, data[at:at + _WS_PIECE]))
            self._sequence += 1


async def open_tunnel(net: VpnNetwork, ip: str, port: int, hello: bytes) -> Sender:
    """A tunnel to the backchannel at ``ip:port``, its first record ``hello`` sent."""
    sender = Sender(await net.tunnel(ip, port))
    try:
        await sender.send(hello)
    except BaseException:
        await sender.ws.close()
        raise
    return sender


async def _to_websocket(reader: asyncio.StreamReader, sender: Sender) -> None:
    while data := await reader.read(_READ):
        await sender.send(data)


async def _from_websocket(ws: Any, writer: asyncio.StreamWriter) -> None:
    import aiohttp

    async for message in ws:
        if message.type != aiohttp.WSMsgType.BINARY:
            break
        writer.write(message.data)
        await writer.drain()


async def splice(sender: Sender, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Carry bytes both ways between a tunnel and a local connection until one side ends;
    then both are closed."""
    pumps = [asyncio.ensure_future(_to_websocket(reader, sender)),
             asyncio.ensure_future(_from_websocket(sender.ws, writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        writer.close()
        await sender.ws.close()


class LocalForward:
    """A port on ``127.0.0.1`` whose connections reach the worker's ``target`` port in
    its VM, through forward tunnels to the backchannel at ``ip:port``."""

    def __init__(self, net: VpnNetwork, ip: str, port: int, token: bytes, target: int) -> None:
        self.net, self.ip, self.port, self.target = net, ip, port, target
        self._hello = hello(token, FORWARD, target)
        self._server: asyncio.Server | None = None
        self._tasks = Tasks()
        self.address = ""

    def __repr__(self) -> str:  # the token stays out
        return f"LocalForward({self.address} -> {self.ip}:{self.target})"

    async def start(self) -> LocalForward:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = "127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.spawn(self._forward(reader, writer))

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sender = await open_tunnel(self.net, self.ip, self.port, self._hello)
        except (NetworkError, OSError) as e:
            logger.info("no tunnel to %s:%d: %s", self.ip, self.port, e)
            writer.close()
            return
        except BaseException:  # cancelled by close
            writer.close()
            raise
        await splice(sender, reader, writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._tasks.cancelled()


class TunnelPool:
    """``spares`` waiting tunnels kept open to the backchannel at ``ip:port``; each one
    the worker takes is joined to a new connection to ``scheduler`` (``host:port`` on
    this machine) and replaced."""

    def __init__(self, net: VpnNetwork, ip: str, port: int, scheduler: str, spares: int = 3,
                 token: bytes | None = None) -> None:
        self.net, self.ip, self.port, self.spares = net, ip, port, spares
        host, _, scheduler_port = scheduler.rpartition(":")
        self._scheduler = (host, int(scheduler_port))
        self.token = token if token is not None else os.urandom(TOKEN_BYTES)
        self._tasks = Tasks()
        self.joined = 0
        self._listening = asyncio.Event()  # a tunnel opened: the backchannel is up

    def __repr__(self) -> str:  # the token stays out
        return f"TunnelPool({self.ip}:{self.port}, spares={self.spares}, joined={self.joined})"

    def start(self) -> TunnelPool:
        for spare in range(self.spares):
            self._tasks.spawn(self._keep_one(prober=spare == 0))
        return self

    async def _keep_one(self, prober: bool) -> None:
        """Open a tunnel, wait for the worker to take it, join it; again, while it works.
        Until the backchannel listens, only the ``prober`` tries, every 0.1 s."""
        failures = 0
        while True:
            try:
                sender = await open_tunnel(self.net, self.ip, self.port, hello(self.token, WAITING))
            except (NetworkError, OSError) as e:
                failures += 1
                logger.debug("tunnel to %s:%d failed (%d): %s", self.ip, self.port, failures, e)
                await self._pause(failures, prober)
                continue
            self._listening.set()
            try:
                first = await _taken(sender.ws)
            except BaseException:  # cancelled by close: the spare goes too
                await sender.ws.close()
                raise
            if first is not None:
                failures = 0
                self._tasks.spawn(self._join(sender, first))
            else:  # the backchannel is not (or no longer) there: not a tight loop
                await sender.ws.close()
                failures += 1
                await self._pause(failures, prober)

    async def _pause(self, failures: int, prober: bool) -> None:
        """Wait before trying again: once the backchannel has listened, longer after each
        failure; before, 0.1 s for the prober and until its tunnel opens for the others
        (the worker's first connection waits for one)."""
        if self._listening.is_set():
            await asyncio.sleep(min(2.0, 0.1 * 2**failures))
        elif prober:
            await asyncio.sleep(0.1)
        else:
            await self._listening.wait()

    async def _join(self, sender: Sender, first: bytes) -> None:
        try:
            reader, writer = await asyncio.open_connection(*self._scheduler)
        except OSError as e:
            logger.warning("the scheduler at %s:%d refused a worker's connection: %s", *self._scheduler, e)
            await sender.ws.close()
            return
        except BaseException:
            await sender.ws.close()
            raise
        self.joined += 1
        writer.write(first)  # what the worker sent right after the signal, in the same message
        await splice(sender, reader, writer)

    async def close(self) -> None:
        await self._tasks.cancelled()


async def _taken(ws: Any) -> bytes | None:
    """Once the backchannel says a worker took this tunnel (its first byte), the bytes
    that came with the signal; None if the tunnel ended instead."""
    import aiohttp

    message = await ws.receive()
    if message.type == aiohttp.WSMsgType.BINARY and bytes(message.data[:1]) == GO:
        return bytes(message.data[1:])
    return None


# --- this process's Dask connections to workers' VPN addresses ----------------------

_ROUTES: dict[str, str] = {}


class _RoutedConnector:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def connect(self, address: str, deserialize: bool = True, **kwargs: Any) -> Any:
        return await self._inner.connect(_ROUTES.get(address, address), deserialize, **kwargs)


class _RoutedBackend:
    """A Dask comm backend that sends connections to routed addresses elsewhere."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_connector(self) -> Any:
        return _RoutedConnector(self._inner.get_connector())


def _install() -> None:
    from distributed.comm import registry

    for scheme in ("tcp", "tls"):
        backend = registry.backends.get(scheme)
        if backend is not None and not isinstance(backend, _RoutedBackend):
            registry.backends[scheme] = _RoutedBackend(backend)  # type: ignore[assignment]


def route(vpn_address: str, local_address: str) -> Callable[[], None]:
    """Send this process's Dask connections to ``vpn_address`` (``ip:port``) to
    ``local_address`` instead; returns the function that undoes it."""
    _install()
    if _ROUTES.setdefault(vpn_address, local_address) != local_address:
        raise NetworkError(f"{vpn_address} is routed elsewhere already: two VPNs in this process share an address")

    def undo() -> None:
        if _ROUTES.get(vpn_address) == local_address:
            del _ROUTES[vpn_address]

    return undo


class WorkerLink:
    """One worker's ways on the VPN: its VM's address, its deploy argument, its command
    under the backchannel, and (:meth:`start`) the requestor's tunnels to it.

    In the VM the worker dials its scheduler at ``127.0.0.1:SCHEDULER_PORT`` (the
    backchannel), listens on ``<its address>:<worker_port>`` (``WORKER_PORT`` or the next
    one free in this process; other workers reach it
    there; the scheduler, through the backchannel), and the backchannel takes the
    requestor's tunnels on ``TUNNEL_PORT``.
    """

    SCHEDULER_PORT, TUNNEL_PORT, WORKER_PORT = 8786, 7000, 9000
    #: Worker addresses (``ip:port``) held by links in this process: two clusters' VPNs
    #: may give the same address, and this process's Dask routes tell them apart by port.
    _held: set[str] = set()

    def __init__(self, net: VpnNetwork, node_id: str) -> None:
        self.net, self.node_id = net, node_id
        self.ip = net.allocate()
        self.worker_port = next(p for p in range(self.WORKER_PORT, 65536) if f"{self.ip}:{p}" not in self._held)
        self._held.add(f"{self.ip}:{self.worker_port}")
        self.token = os.urandom(TOKEN_BYTES)
        self._pool: TunnelPool | None = None
        self._forward: LocalForward | None = None
        self._unroute: Callable[[], None] | None = None

    def __repr__(self) -> str:  # the token stays out
        return f"WorkerLink({self.ip}, node={self.node_id})"

    async def join(self) -> dict[str, Any]:
        """Add the VM to the network; the deploy command's arguments."""
        await self.net.add_node(self.node_id, self.ip)
        return {"net": [self.net.deploy_argument(self.ip)]}

    async def start(self, entry_point: str, args: Sequence[str]) -> tuple[str, list[str]]:
        """Keep tunnels open for the worker's connections to its scheduler (``args`` are
        ``worker <scheduler> ...``, an address on this machine), send this process's
        connections to the worker through the backchannel, and give ``entry_point args`` as
        the VM runs it: under the backchannel, dialling it for the scheduler, listening on
        the VPN address."""
        worker = list(args)
        scheme, _, scheduler = worker[1].rpartition("://")
        scheme = scheme or "tcp"
        self._pool = TunnelPool(self.net, self.ip, self.TUNNEL_PORT, scheduler, token=self.token).start()
        self._forward = await LocalForward(self.net, self.ip, self.TUNNEL_PORT, self.token, self.worker_port).start()
        self._unroute = route(f"{self.ip}:{self.worker_port}", self._forward.address)
        worker[1] = f"{scheme}://127.0.0.1:{self.SCHEDULER_PORT}"
        worker += ["--listen-address", f"{scheme}://{self.ip}:{self.worker_port}"]
        return "python3", ["-c", source(), "--host", self.ip, "--tunnels", str(self.TUNNEL_PORT),
                           "--scheduler", str(self.SCHEDULER_PORT), "--forward", str(self.worker_port),
                           "--token", self.token.hex(), "--announce", self.net.requestor_ip, "--", entry_point, *worker]

    async def close(self) -> None:
        self._held.discard(f"{self.ip}:{self.worker_port}")
        if self._unroute is not None:
            self._unroute()
        for part in (self._pool, self._forward):
            if part is not None:
                await part.close()
        try:
            await self.net.remove_node(self.ip)
        except (NetworkError, YagnaError) as e:
            logger.info("removing %s from the VPN failed: %s", self.ip, e)
