"""A minimal client of yagna's service bus (GSB) wire protocol, for tests that play a
provider's exe-unit where the GSB REST API cannot: raw one-way messages (VPN frames).

The protocol: each packet is a 4-byte big-endian length and a protobuf ``Packet`` whose
oneof holds ``Hello`` (1), ``RegisterRequest`` (2) / ``RegisterReply`` (3),
``CallRequest`` (6) / ``CallReply`` (7) and ``Ping`` (14) / ``Pong`` (15).  The router
greets first; a client greets back with a unique instance id, registers addresses, and
answers each call that expects a reply.  Only what the VPN test needs is here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

HELLO, REGISTER, REGISTERED, CALL, REPLY, PING, PONG = 1, 2, 3, 6, 7, 14, 15


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | str | int | bool) -> bytes:
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value)) if value else b""
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode(kind: int, *fields: tuple[int, bytes | str | int | bool]) -> bytes:
    """One length-prefixed ``Packet`` holding message ``kind`` with ``fields``."""
    body = _field(kind, b"".join(_field(n, v) for n, v in fields)) if fields else _varint(kind << 3 | 2) + b"\x00"
    return len(body).to_bytes(4, "big") + body


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = data[at]
        at += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, at


def decode_fields(data: bytes) -> dict[int, Any]:
    """A protobuf message's fields by number (the last of repeated ones)."""
    fields: dict[int, Any] = {}
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], at = _read_varint(data, at)
        elif wire == 2:
            size, at = _read_varint(data, at)
            fields[number], at = data[at:at + size], at + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return fields


Handler = Callable[[str, str, bytes], Awaitable[None]]


class GsbClient:
    """One connection to the router at ``tcp://host:port``: :meth:`bind` an address
    prefix to a handler ``(caller, address, data)``; :meth:`push` a one-way call."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("tcp://").rsplit(":", 1)
        self._host, self._port = host, int(port)
        self._handlers: dict[str, Handler] = {}
        self._registered: dict[str, asyncio.Future[int]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._calls = 0

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_connection(self._host, self._port)
        self._writer.write(encode(HELLO, (1, "golem-dask-test"), (2, "0.1"), (3, os.urandom(16))))
        self._reader_task = asyncio.create_task(self._read(reader))

    async def bind(self, prefix: str, handler: Handler) -> None:
        assert self._writer is not None
        self._handlers[prefix] = handler
        done = self._registered[prefix] = asyncio.get_running_loop().create_future()
        self._writer.write(encode(REGISTER, (1, prefix)))
        code = await asyncio.wait_for(done, 10)
        if code != 0:
            raise RuntimeError(f"the bus refused {prefix}: code {code}")

    def push(self, caller: str, address: str, data: bytes) -> None:
        assert self._writer is not None
        self._calls += 1
        self._writer.write(encode(CALL, (1, caller), (2, address), (3, f"t{self._calls}"), (4, data), (5, True)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            packet = decode_fields(await reader.readexactly(size))
            kind, body = next(iter(packet.items()))
            fields = decode_fields(body) if isinstance(body, bytes) else {}
            if kind == REGISTERED:
                pending = [p for p in self._registered if not self._registered[p].done()]
                if pending:
                    self._registered[pending[0]].set_result(fields.get(1, 0))
            elif kind == PING:
                assert self._writer is not None
                self._writer.write(encode(PONG))
            elif kind == CALL:
                await self._on_call(fields)

    async def _on_call(self, fields: dict[int, Any]) -> None:
        caller, address = fields.get(1, b"").decode(), fields.get(2, b"").decode()
        request_id, data, no_reply = fields.get(3, b""), fields.get(4, b""), fields.get(5, 0)
        handler = next((h for p, h in self._handlers.items() if address.startswith(p)), None)
        code = 0
        if handler is not None:
            try:
                await handler(caller, address, data)
            except Exception:
                code = 500
        if not no_reply and self._writer is not None:
            self._writer.write(encode(REPLY, (1, request_id), (2, code), (3, 0), (4, b"")))

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
