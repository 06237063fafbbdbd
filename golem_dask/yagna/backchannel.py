"""The VM side of a worker's way back to the scheduler on the requestor's machine.

On the public network a provider's VM cannot open a connection to the requestor, and the
requestor can open TCP connections to a VM only through its daemon's tunnel
(:mod:`golem_dask.yagna.vpn`).  So the requestor opens connections *to* the VM ahead of
need, and this program, started in the VM before ``dask worker``, hands each of them to a
connection the worker opens to its scheduler:

- it listens on the VPN address, port ``--tunnels``, for the requestor's connections; each
  must begin with the worker's token (16 bytes, ``--token`` in hex), or it is closed:
  other VMs on the network reach that port too;
- it listens on ``127.0.0.1``, port ``--scheduler``, where the worker dials its scheduler;
  each connection there takes one waiting tunnel, which is told so with one byte (``\\x01``),
  and the two are joined until either side closes.

The worker's TLS runs end to end with the scheduler through it; this program sees only
ciphertext.  It uses the standard library alone (the worker image need not hold
golem-dask) and is sent to the VM as its source text: see :func:`source`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import sys

TOKEN_BYTES = 16
GO = b"\x01"
#: How long a worker's connection waits for a tunnel before it is closed.
WAIT_FOR_TUNNEL_S = 30.0
_CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:  # a connection reset or refused
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()


async def join(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways between two connections until both directions end."""
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        a[1].close()
        b[1].close()


class Backchannel:
    """Tunnels waiting at ``tunnel_port``, handed to connections at ``scheduler_port``."""

    def __init__(self, token: bytes, host: str, tunnel_port: int, scheduler_port: int) -> None:
        self.token = token
        self.host, self.tunnel_port, self.scheduler_port = host, tunnel_port, scheduler_port
        self.waiting: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def serve(self) -> None:
        tunnels = await asyncio.start_server(self._tunnel, self.host, self.tunnel_port)
        local = await asyncio.start_server(self._local, "127.0.0.1", self.scheduler_port)
        print(f"backchannel ready: tunnels on {self.host}:{self.tunnel_port}, "
              f"scheduler on 127.0.0.1:{self.scheduler_port}", flush=True)
        async with tunnels, local:
            await asyncio.gather(tunnels.serve_forever(), local.serve_forever())

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), 10)
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            writer.close()
            return
        if not hmac.compare_digest(token, self.token):
            writer.close()
            return
        self.waiting.put_nowait((reader, writer))

    async def _local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_FOR_TUNNEL_S
        while True:
            try:
                tunnel = await asyncio.wait_for(self.waiting.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                writer.close()
                return
            if tunnel[1].is_closing() or tunnel[0].at_eof():
                continue  # the requestor gave up on this one
            try:
                tunnel[1].write(GO)
                await tunnel[1].drain()
            except OSError:
                continue
            await join((reader, writer), tunnel)
            return


def source() -> str:
    """This program's text, to run in a VM with ``python3 -c``."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a worker's way back to its scheduler through tunnels")
    parser.add_argument("--host", required=True, help="the VM's VPN address")
    parser.add_argument("--tunnels", type=int, required=True, help="port for the requestor's tunnels")
    parser.add_argument("--scheduler", type=int, required=True, help="local port the worker dials")
    parser.add_argument("--token", required=True, help="what each tunnel begins with, in hex")
    args = parser.parse_args(argv)
    try:
        token = bytes.fromhex(args.token)
    except ValueError:
        token = b""
    if len(token) != TOKEN_BYTES:
        sys.exit(f"--token must be {TOKEN_BYTES} bytes in hex")
    asyncio.run(Backchannel(token, args.host, args.tunnels, args.scheduler).serve())


if __name__ == "__main__":
    main()
