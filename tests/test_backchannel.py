"""The backchannel a worker's VM runs, on loopback: tunnels need the worker's token, and a
tunnel taken by the worker carries its bytes from the first one on."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from golem_dask.yagna import backchannel, vpn
from golem_dask.yagna.backchannel import GO, Backchannel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on ``port`` (found by failing to bind it, not by
    connecting: a connection to the scheduler port would wait for a tunnel)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def _serving(token: bytes) -> tuple[Backchannel, asyncio.Task[None]]:
    channel = Backchannel(token, "127.0.0.1", _free_port(), _free_port())
    task = asyncio.create_task(channel.serve())
    for _ in range(200):
        if _listening(channel.tunnel_port) and _listening(channel.scheduler_port):
            return channel, task
        await asyncio.sleep(0.01)
    raise AssertionError("the backchannel did not start")


def test_a_tunnel_without_the_token_is_closed_and_never_handed_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backchannel, "WAIT_FOR_TUNNEL_S", 0.5)

    async def run() -> None:
        channel, task = await _serving(b"k" * 16)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
            writer.write(b"x" * 16)  # another VM on the network, guessing
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert channel.waiting.empty()
            # The worker's connection finds no tunnel and is closed when its wait ends.
            local_reader, local_writer = await asyncio.open_connection("127.0.0.1", channel.scheduler_port)
            local_writer.write(b"hello")
            assert await asyncio.wait_for(local_reader.read(), 5) == b""
        finally:
            task.cancel()

    asyncio.run(run())


def test_a_tunnel_with_the_token_carries_the_workers_bytes_both_ways() -> None:
    async def run() -> None:
        token = b"t" * 16
        channel, task = await _serving(token)
        try:
            tunnel_reader, tunnel_writer = await asyncio.open_connection("127.0.0.1", channel.tunnel_port)
            tunnel_writer.write(token)
            for _ in range(100):
                if not channel.waiting.empty():
                    break
                await asyncio.sleep(0.01)
            local_reader, local_writer = await asyncio.open_connection("127.0.0.1", channel.scheduler_port)
            local_writer.write(b"worker hello")
            assert await asyncio.wait_for(tunnel_reader.readexactly(1 + 12), 5) == GO + b"worker hello"
            tunnel_writer.write(b"scheduler hello")
            assert await asyncio.wait_for(local_reader.readexactly(15), 5) == b"scheduler hello"
        finally:
            task.cancel()

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
