"""The VM side of the requestor's tunnels to a worker: the worker's way back to its
scheduler, and the scheduler's way in to the worker.

On the public network a provider's VM cannot open a connection to the requestor, and the
requestor can open TCP connections to a VM only through its daemon's tunnel
(:mod:`golem_dask.yagna.vpn`).  So the requestor opens connections *to* the VM, and this
program, started in the VM as the worker's parent, takes them on ``--tunnels``.  Each one
is one of two kinds, said in its first record (below), with the worker's token (16 bytes,
``--token`` in hex; other VMs on the network reach that port too, and a tunnel without
the token is closed):

- *waiting*: it waits for a connection the worker opens to its scheduler on
  ``127.0.0.1:--scheduler``; once taken it is told so with one byte (``\\x01``), and the
  two are joined until either side closes;
- *forward*: it is joined to a new connection to the worker's own port on the VM's
  address (a ``--forward`` port), for the scheduler's connections to the worker.

**Records.**  The requestor's daemon (yagna 0.17) may hand the websocket messages of one
tunnel to the VM's TCP stream out of order when several are in flight, each one whole.
So what the requestor sends is cut into records, ``[sequence: u32][length: u32][bytes]``,
numbered from 0 (the first holds the token and the kind), and this program puts them back
in order.  What the VM sends back arrives in order and is not framed.

Once listening it sends the requestor's address one empty datagram (``--announce``), so
the requestor's daemon knows the VM before its first connection here.

The worker's TLS runs end to end with the scheduler through it; this program sees only
ciphertext.  It uses the standard library alone (the worker image need not hold
golem-dask) and is sent to the VM as its source text: see :func:`source`.  Given a command
after ``--`` (the worker's), it runs it once it listens, and exits with it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import struct
import sys
from collections.abc import Awaitable, Callable

TOKEN_BYTES = 16
GO = b"\x01"
WAITING, FORWARD = b"W", b"F"
DISCARD_PORT = 9  # where the VM's announcement goes
#: How long a worker's connection waits for a tunnel before it is closed.
WAIT_FOR_TUNNEL_S = 30.0
#: The largest record (the requestor sends 16 KiB), and what may wait for an earlier one
#: (in a tunnel, then before its hello is in) before the tunnel is closed.
MAX_RECORD = 64 * 1024
MAX_PENDING = 1024
MAX_EARLY_BYTES, MAX_EARLY_BYTES_BEFORE_HELLO = 16 << 20, 256 * 1024
#: How long records may wait for a missing earlier one before the tunnel is closed.
STALL_S = 60.0
_HEADER = struct.Struct(">II")
_CHUNK = 65536


class BadRecord(Exception):
    """A tunnel's records break the framing: closed."""


def record(sequence: int, data: bytes) -> bytes:
    """One record as the requestor sends it."""
    return _HEADER.pack(sequence & 0xFFFFFFFF, len(data)) + data


class Records:
    """The records of one tunnel, read from ``reader`` and given back in order; at most
    ``max_early`` bytes wait for an earlier record."""

    def __init__(self, reader: asyncio.StreamReader, max_early: int = MAX_EARLY_BYTES) -> None:
        self._reader = reader
        self.max_early = max_early
        self._next = 0
        self._early: dict[int, bytes] = {}
        self._early_bytes = 0

    async def read(self) -> bytes:
        """The next record's bytes in sequence; ``b""`` once the tunnel ends.

        Raises
        ------
        BadRecord
            A record too long, repeated or too far ahead, too much waiting for a missing
            one (or for longer than ``STALL_S``), or a tunnel ending inside one.
        """
        while self._next not in self._early:
            try:
                header = await asyncio.wait_for(self._reader.readexactly(_HEADER.size),
                                                STALL_S if self._early else None)
            except asyncio.IncompleteReadError as e:
                if e.partial or self._early:
                    raise BadRecord("the tunnel ended inside a record") from None
                return b""
            except asyncio.TimeoutError:
                raise BadRecord(f"record {self._next} never came") from None
            sequence, length = _HEADER.unpack(header)
            ahead = (sequence - self._next) & 0xFFFFFFFF
            if length > MAX_RECORD or ahead >= MAX_PENDING or sequence in self._early \
                    or self._early_bytes + length > self.max_early:
                raise BadRecord(f"record {sequence} ({length} bytes) does not fit after {self._next}")
            try:
                self._early[sequence] = await self._reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise BadRecord("the tunnel ended inside a record") from None
            self._early_bytes += length
        data = self._early.pop(self._next)
        self._early_bytes -= len(data)
        self._next = (self._next + 1) & 0xFFFFFFFF
        return data

    def at_eof(self) -> bool:
        return self._reader.at_eof() and not self._early


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


async def _copy(read: Callable[[], Awaitable[bytes]], writer: asyncio.StreamWriter, abort: bool) -> None:
    """Write what ``read`` gives to ``writer`` until it ends, then end ``writer``'s side;
    on an error, close ``writer`` at once if ``abort`` (the bytes after that point are
    not the stream's), else end its side as after the last byte."""
    try:
        while data := await read():
            writer.write(data)
            await writer.drain()
    except (OSError, BadRecord):  # a connection reset or refused, or broken framing
        if abort:
            writer.close()
    finally:
        _close(writer)


Tunnel = tuple[Records, asyncio.StreamWriter]


async def join(tunnel: Tunnel, local: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways between a tunnel and a local connection until both directions end."""
    try:
        await asyncio.gather(_copy(tunnel[0].read, local[1], abort=True),
                             _copy(lambda: local[0].read(_CHUNK), tunnel[1], abort=False))
    finally:
        tunnel[1].close()
        local[1].close()


class Backchannel:
    """Tunnels taken at ``tunnel_port``: waiting ones handed to connections at
    ``scheduler_port``, forward ones joined to ``host:<port>`` for a port in ``forward``."""

    def __init__(self, token: bytes, host: str, tunnel_port: int, scheduler_port: int,
                 forward: tuple[int, ...] = ()) -> None:
        self.token = token
        self.host, self.tunnel_port, self.scheduler_port = host, tunnel_port, scheduler_port
        self.forward = forward
        self.waiting: asyncio.Queue[Tunnel] = asyncio.Queue()
        self._open: set[asyncio.StreamWriter] = set()  # every connection, closed at the end

    async def serve(self, command: list[str] | None = None, announce: str | None = None) -> int:
        """Serve until ``command`` (started once listening) exits, with its exit status;
        without one, forever.  ``announce``: the requestor's address on the VPN, sent one
        empty datagram once listening (see :func:`main`)."""
        tunnels = await asyncio.start_server(self._tunnel, self.host, self.tunnel_port)
        local = await asyncio.start_server(self._local, "127.0.0.1", self.scheduler_port)
        if announce:
            _announce(self.host, announce)
        print(f"backchannel ready: tunnels on {self.host}:{self.tunnel_port}, "
              f"scheduler on 127.0.0.1:{self.scheduler_port}", flush=True)
        try:
            if not command:
                await asyncio.gather(tunnels.serve_forever(), local.serve_forever())
                return 0
            process = await asyncio.create_subprocess_exec(*command)
            return await process.wait()
        finally:
            # Not waiting for the connections (Python 3.12's wait_closed would): spare
            # tunnels stay open until closed here.
            tunnels.close()
            local.close()
            for writer in list(self._open):
                writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            if await self._take(Records(reader, MAX_EARLY_BYTES_BEFORE_HELLO), writer):
                return  # waiting: the connection that takes it forgets it
        except asyncio.CancelledError:  # the program ends: quietly (asyncio logs a cancelled handler)
            writer.close()
        self._open.discard(writer)

    async def _take(self, records: Records, writer: asyncio.StreamWriter) -> bool:
        """Authenticate a tunnel and serve it as its kind says; whether it now waits."""
        try:
            hello = await asyncio.wait_for(records.read(), 10)
        except (BadRecord, asyncio.TimeoutError, OSError):
            hello = b""
        records.max_early = MAX_EARLY_BYTES
        kind, port = hello[TOKEN_BYTES:TOKEN_BYTES + 1], hello[TOKEN_BYTES + 1:]
        target = struct.unpack(">H", port)[0] if len(port) == 2 else None
        if not hmac.compare_digest(hello[:TOKEN_BYTES], self.token) or len(hello) < TOKEN_BYTES + 1:
            writer.close()
        elif kind == WAITING and not port:
            self.waiting.put_nowait((records, writer))
            return True
        elif kind == FORWARD and target in self.forward:
            try:
                local = await asyncio.open_connection(self.host, target)
            except OSError:
                writer.close()
                return False
            self._open.add(local[1])
            try:
                await join((records, writer), local)
            finally:
                self._open.discard(local[1])
        else:
            writer.close()
        return False

    async def _local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await self._hand_over(reader, writer)
        except asyncio.CancelledError:  # the program ends: quietly
            writer.close()
        finally:
            self._open.discard(writer)

    async def _hand_over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_FOR_TUNNEL_S
        while True:
            try:
                tunnel = await asyncio.wait_for(self.waiting.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                writer.close()
                return
            if tunnel[1].is_closing() or tunnel[0].at_eof():
                tunnel[1].close()  # the requestor gave up on this one
                self._open.discard(tunnel[1])
                continue
            try:
                tunnel[1].write(GO)
                await tunnel[1].drain()
                await join(tunnel, (reader, writer))
            except OSError:
                continue
            finally:
                tunnel[1].close()
                self._open.discard(tunnel[1])
            return


def _announce(host: str, requestor: str) -> None:
    """One empty datagram from ``host`` to ``requestor`` (the discard port): sending it,
    this VM asks the network who holds that address, and the requestor's daemon learns
    this VM's own on the way.  Without it the daemon's first connection here waited about
    3 s (its first packets went nowhere while it asked)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            s.sendto(b"", (requestor, DISCARD_PORT))
    except OSError:
        pass


def hello(token: bytes, kind: bytes, port: int | None = None) -> bytes:
    """The first record's bytes: the token, the tunnel's kind, a forward tunnel's port."""
    return token + kind + (struct.pack(">H", port) if port is not None else b"")


def source() -> str:
    """This program's text, to run in a VM with ``python3 -c``."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description="a worker's tunnels to and from its scheduler")
    parser.add_argument("--host", required=True, help="the VM's VPN address")
    parser.add_argument("--tunnels", type=int, required=True, help="port for the requestor's tunnels")
    parser.add_argument("--scheduler", type=int, required=True, help="local port the worker dials")
    parser.add_argument("--forward", type=int, action="append", default=[],
                        help="a port of the worker's that forward tunnels may reach (repeatable)")
    parser.add_argument("--token", required=True, help="what each tunnel's first record begins with, in hex")
    parser.add_argument("--announce", help="the requestor's VPN address, told of this VM once listening")
    args = parser.parse_args(argv)
    try:
        token = bytes.fromhex(args.token)
    except ValueError:
        token = b""
    if len(token) != TOKEN_BYTES:
        sys.exit(f"--token must be {TOKEN_BYTES} bytes in hex")
    channel = Backchannel(token, args.host, args.tunnels, args.scheduler, tuple(args.forward))
    sys.exit(asyncio.run(channel.serve(command, args.announce)))


if __name__ == "__main__":
    main()
