"""The first process of a rented worker: loads dask, then waits for ``run``.

Both runtimes start this script at the exe-script's ``start`` command (the docker
runtime as the container's command, the process runtime as a child process), from a
copy in the sandbox: golem-dask itself is not installed in worker images, so it uses
only the standard library and the worker's own ``distributed``.

The script opens its order pipe, then imports ``distributed`` (most of a worker's
start-up time) while the requestor is still starting its scheduler and sending the input
files.  The ``run`` command writes one line of JSON to the pipe,
``{"args": [...], "env": {...}}``: the arguments of ``dask worker`` and extra environment.
The script then runs ``dask worker`` with those arguments in this same process, so the
process's exit code is the worker's.

Usage: ``python entry.py ORDER_PIPE``
"""

import json
import os
import signal
import sys


def read_order(fd: int) -> dict:
    """One newline-terminated JSON object from ``fd`` (blocks until it is complete)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("golem-dask: the order pipe closed before a run command arrived")
        data += chunk
    order = json.loads(data)
    if not isinstance(order, dict) or not isinstance(order.get("args"), list):
        raise SystemExit(f"golem-dask: malformed run order {data[:200]!r}")
    return order


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python entry.py ORDER_PIPE")
    # Read-write: the open does not wait for a writer, and the pipe never reports
    # end-of-file while this process waits (it holds a write end itself).
    fd = os.open(sys.argv[1], os.O_RDWR)
    # As PID 1 of a container, a signal without a handler would be ignored; until dask
    # worker installs its own, SIGTERM (docker stop, or the provider) ends the wait at once.
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    from distributed.cli.dask_worker import main as dask_worker

    order = read_order(fd)
    os.close(fd)
    env = order.get("env") or {}
    if env:
        os.environ.update({str(k): str(v) for k, v in env.items()})
        import dask

        dask.config.refresh()  # DASK_* variables sent with the run command
    dask_worker.main(args=[str(a) for a in order["args"]], prog_name="dask worker")


if __name__ == "__main__":
    main()
