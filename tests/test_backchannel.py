"""The backchannel a worker's VM runs, on loopback: tunnels need the worker's token, their
records are put back in order, a waiting tunnel taken by the worker carries its bytes from
the first one on, a forward tunnel reaches only the worker's listed ports, and a stranger
cannot make it hold much.  Also the requestor's side without a daemon: a VM's address is
given again only once the daemon removed its node, two VPNs in one process route their
workers apart, a pool's spare tunnels close with it, a range is checked."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
import pytest
from net_support import free_port

from golem_dask.errors import ConfigError, NetworkError
from golem_dask.yagna import backchannel, vpn
from golem_dask.yagna.backchannel import (
    FORWARD,
    GO,
    WAITING,
    Backchannel,
    BadRecord,
    Records,
    hello,
    record,
)

TOKEN = b"t" * 16


def _listening(port: int) -> bool:
    """Whether something listens on ``port`` (found by failing to bind it, not by
    connecting: a connection to the scheduler port would wait for a tunnel)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def _serving(token: bytes, forward: tuple[int, ...] = ()) -> tuple[Backchannel, asyncio.Task[int]]:
    channel = Backchannel(token, "127.0.0.1", free_port(), free_port(), forward)
    task = asyncio.create_task(channel.serve())
    for _ in range(200):
        if _listening(channel.tunnel_port) and _listening(channel.scheduler_port):
            return channel, task
        await asyncio.sleep(0.01)
    raise AssertionError("the backchannel did not start")


async def _waiting_tunnel(channel: Backchannel) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
    writer.write(record(0, hello(channel.token, WAITING)))
    for _ in range(100):
        if not channel.waiting.empty():
            return reader, writer
        await asyncio.sleep(0.01)
    raise AssertionError("the tunnel was not taken as waiting")


def test_a_tunnel_without_the_token_is_closed_and_never_handed_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backchannel, "WAIT_FOR_TUNNEL_S", 0.5)

    async def run() -> None:
        channel, task = await _serving(TOKEN)
        try:
            for first in (record(0, hello(b"x" * 16, WAITING)), b"x" * 16 + WAITING):  # guessed; unframed
                reader, writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
                writer.write(first)  # another VM on the network
                assert await asyncio.wait_for(reader.read(), 15) == b""
            assert channel.waiting.empty()
            # The worker's connection finds no tunnel and is closed when its wait ends.
            local_reader, local_writer = await asyncio.open_connection("127.0.0.1", channel.scheduler_port)
            local_writer.write(b"hello")
            assert await asyncio.wait_for(local_reader.read(), 5) == b""
        finally:
            task.cancel()

    asyncio.run(run())


def test_a_waiting_tunnel_carries_the_workers_bytes_both_ways_in_order() -> None:
    async def run() -> None:
        channel, task = await _serving(TOKEN)
        try:
            tunnel_reader, tunnel_writer = await _waiting_tunnel(channel)
            local_reader, local_writer = await asyncio.open_connection("127.0.0.1", channel.scheduler_port)
            local_writer.write(b"worker hello")
            assert await asyncio.wait_for(tunnel_reader.readexactly(1 + 12), 5) == GO + b"worker hello"
            # The daemon handed the records over out of order: the worker reads them in order.
            tunnel_writer.write(record(3, b"!") + record(1, b"scheduler ") + record(2, b"hello"))
            assert await asyncio.wait_for(local_reader.readexactly(16), 5) == b"scheduler hello!"
        finally:
            task.cancel()

    asyncio.run(run())


def test_a_forward_tunnel_reaches_a_listed_port_of_the_worker_and_no_other() -> None:
    async def run() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"worker says " + await reader.readexactly(5))
            await writer.drain()
            writer.close()

        worker = await asyncio.start_server(echo, "127.0.0.1", 0)
        worker_port = worker.sockets[0].getsockname()[1]
        channel, task = await _serving(TOKEN, forward=(worker_port,))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
            writer.write(record(2, b"lo") + record(0, hello(TOKEN, FORWARD, worker_port)) + record(1, b"hel"))
            assert await asyncio.wait_for(reader.read(), 5) == b"worker says hello"
            for port in (channel.scheduler_port, free_port()):  # not listed: not reached
                reader, writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
                writer.write(record(0, hello(TOKEN, FORWARD, port)) + record(1, b"hello"))
                assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            task.cancel()
            worker.close()

    asyncio.run(run())


@pytest.mark.parametrize("stream,why", [
    (record(0, b"a") + record(0, b"b"), "repeated"),
    (record(backchannel.MAX_PENDING, b"x"), "too far ahead"),
    (b"\x00\x00\x00\x00\x7f\xff\xff\xff", "too long"),
    (record(1, b"x"), "ended inside"),
    (record(0, b"abc")[:-1], "ended inside"),
])
def test_records_that_break_the_framing_end_the_tunnel(stream: bytes, why: str) -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        records = Records(reader)
        with pytest.raises(BadRecord):
            while await records.read():
                pass

    asyncio.run(run())


class _OneMessage:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive(self) -> aiohttp.WSMessage:
        return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, self.data, None)


def test_the_bytes_that_arrive_with_the_signal_are_kept() -> None:
    """The worker's first bytes may share the websocket message of the signal."""
    assert asyncio.run(vpn._taken(_OneMessage(GO + b"\x16\x03\x01 TLS hello"))) == b"\x16\x03\x01 TLS hello"
    assert asyncio.run(vpn._taken(_OneMessage(GO))) == b""
    assert asyncio.run(vpn._taken(_OneMessage(b"\x00"))) is None


class _FakeApi:
    """The daemon's Net API as far as nodes go: the calls made, and a failure to order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = False

    async def call(self, method: str, path: str, **kwargs: object) -> object:
        if self.fail:
            raise NetworkError("the daemon did not answer")
        self.calls.append((method, path.rpartition("/")[2]))
        return {}


def test_a_vm_address_is_given_again_only_once_the_daemon_removed_its_node() -> None:
    async def run() -> None:
        api = _FakeApi()
        net = vpn.VpnNetwork(api, "net", ipaddress.IPv4Network("10.0.0.0/29"), "0xrequestor")  # hosts .1-.6
        assert net.requestor_ip == "10.0.0.1"
        a, b, c = net.allocate(), net.allocate(), net.allocate()
        assert (a, b, c) == ("10.0.0.2", "10.0.0.3", "10.0.0.4")
        await net.add_node("0xP", a)
        await net.add_node("0xP", b)  # the same provider's second VM: the same node
        api.fail = True
        with pytest.raises(NetworkError):
            await net.add_node("0xQ", c)  # the daemon may hold it or not: c is never given again
        api.fail = False
        await net.remove_node(c)
        await net.remove_node(a)  # the node stays for b: a still maps to it on the daemon
        assert ("DELETE", "0xp") not in api.calls
        assert [net.allocate(), net.allocate()] == ["10.0.0.5", "10.0.0.6"]
        with pytest.raises(NetworkError, match="no free address"):
            net.allocate()
        await net.remove_node(b)  # the node goes, with both its addresses
        assert api.calls[-1] == ("DELETE", "0xp")
        assert [net.allocate(), net.allocate()] == [a, b]
        with pytest.raises(NetworkError):
            net.allocate()

    asyncio.run(run())


def test_two_vpns_in_one_process_give_their_workers_distinct_routed_addresses() -> None:
    async def run() -> None:
        nets = [vpn.VpnNetwork(_FakeApi(), f"net{i}", ipaddress.IPv4Network("192.168.0.0/24"), "0xr")
                for i in range(2)]
        links = [vpn.WorkerLink(net, "0xp") for net in nets]
        assert links[0].ip == links[1].ip == "192.168.0.2"
        assert links[0].worker_port != links[1].worker_port
        undo = vpn.route("192.168.0.2:1", "127.0.0.1:2")
        try:
            with pytest.raises(NetworkError, match="routed elsewhere"):
                vpn.route("192.168.0.2:1", "127.0.0.1:3")
        finally:
            undo()
        for link in links:
            await link.close()
        assert vpn.WorkerLink(nets[0], "0xp").worker_port == vpn.WorkerLink.WORKER_PORT  # released

    asyncio.run(run())


class _SpareWs:
    """A tunnel the worker never takes."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def receive(self) -> aiohttp.WSMessage:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self.closed = True


def test_a_closed_tunnel_pool_closes_its_spare_tunnels() -> None:
    async def run() -> None:
        opened: list[_SpareWs] = []

        class Net:
            async def tunnel(self, ip: str, port: int) -> _SpareWs:
                opened.append(_SpareWs())
                return opened[-1]

        pool = vpn.TunnelPool(Net(), "10.0.0.2", 7000, "127.0.0.1:1", spares=3, token=TOKEN)  # type: ignore[arg-type]
        pool.start()
        for _ in range(100):
            if len(opened) == 3 and all(ws.sent for ws in opened):
                break
            await asyncio.sleep(0.01)
        assert [ws.sent[0] for ws in opened] == [record(0, hello(TOKEN, WAITING))] * 3
        await pool.close()
        assert all(ws.closed for ws in opened)

    asyncio.run(run())


def test_records_before_the_hello_are_bounded_and_a_missing_record_ends_the_tunnel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        channel, task = await _serving(TOKEN)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
            for seq in range(1, 6):  # 320 KiB waiting for a hello that never comes: closed at once
                writer.write(record(seq, b"x" * backchannel.MAX_RECORD))
            # Within 2 s, before the 10 s wait for a hello or the 60 s stall could close it.
            assert await asyncio.wait_for(reader.read(), 2) == b""
        finally:
            task.cancel()
        monkeypatch.setattr(backchannel, "STALL_S", 0.3)
        stream = asyncio.StreamReader()
        stream.feed_data(record(1, b"late"))  # record 0 never comes, and the tunnel stays open
        with pytest.raises(BadRecord, match="never came"):
            await asyncio.wait_for(Records(stream).read(), 5)

    asyncio.run(run())


def test_a_vpn_range_that_is_not_a_network_is_refused_with_the_setting_to_fix() -> None:
    assert vpn.vpn_range("10.1.0.0/16") == "10.1.0.0/16"
    for bad in ("192.168.0.1/24", "10.0.0.0/31", "nonsense", None):
        with pytest.raises(ConfigError, match="golem.yagna.vpn-range"):
            vpn.vpn_range(bad)


def test_once_listening_the_backchannel_announces_its_vm_to_the_requestor(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty datagram from the VM's address to the requestor's: the daemon learns the VM
    on the way rather than on its first connection (which waited ~3 s on the test VPN)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as requestor:
        requestor.bind(("127.0.0.1", 0))
        requestor.settimeout(5)
        monkeypatch.setattr(backchannel, "DISCARD_PORT", requestor.getsockname()[1])

        async def run() -> tuple[bytes, tuple[str, int]]:
            channel = Backchannel(TOKEN, "127.0.0.1", free_port(), free_port())
            task = asyncio.create_task(channel.serve(announce="127.0.0.1"))
            try:
                return await asyncio.get_running_loop().run_in_executor(None, requestor.recvfrom, 100)
            finally:
                task.cancel()

        data, sender = asyncio.run(run())
    assert data == b"" and sender[0] == "127.0.0.1"
