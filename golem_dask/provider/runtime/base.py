"""The ``Runtime`` seam: how a provider runs an activity.

A :class:`Runtime` belongs to a provider agent and makes one :class:`RuntimeActivity`
per activity.  The activity follows Golem's exe-script: ``deploy`` (get the image or
environment ready), ``start`` (create the sandbox and start the worker's process, which
loads dask), ``run`` (the long-running ``dask worker``), ``transfer`` (files in or out)
and ``terminate`` (always, also after a failure).  Backends: ``process`` (a child process, no engine needed) and ``docker``.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import json
import os
import posixpath
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from golem_dask import config
from golem_dask.errors import ActivityError
from golem_dask.protocol.properties import Resources
from golem_dask.provider.runtime.policy import TransferPolicy
from golem_dask.provider.runtime.sandbox import CONTROL_DIR, SANDBOX, Owner, copy_into, copy_out_of, open_dir
from golem_dask.transfer import display_url, in_transfer_thread

__all__ = ["CONTROL_DIR", "SANDBOX", "Runtime", "RuntimeActivity", "TransferPolicy", "transfer_into_sandbox"]

#: Options the provider sets itself from the agreement; a requestor's values are dropped.
_ENFORCED = {"--nthreads", "--memory-limit", "--name-prefix"}


def sandbox_path(root: Path, path: str) -> Path:
    """The host path of ``/golem/...`` in an activity whose sandbox is ``root``.

    Anything outside ``/golem`` (or escaping it with ``..``) is refused: a requestor
    must not write elsewhere on the provider's machine.
    """
    clean = posixpath.normpath(path)
    if clean != SANDBOX and not clean.startswith(SANDBOX + "/"):
        raise ActivityError(f"{path!r} is outside the activity's sandbox {SANDBOX}/")
    rel = clean[len(SANDBOX):].lstrip("/")
    return root / rel if rel else root


def is_sandbox(path: str) -> bool:
    return path == SANDBOX or path.startswith(SANDBOX + "/")


async def transfer_into_sandbox(
    root: Path, source: str, destination: str, options: Mapping[str, Any] | None = None, *,
    policy: TransferPolicy | None = None, owner: Owner | None = None,
) -> str:
    """Copy between a URL and the sandbox ``root``, either way; ``options`` go to the URL's side.

    The URL must pass ``policy`` (default: :meth:`TransferPolicy.strict`, for strangers);
    the sandbox side never follows links the worker made (see
    :mod:`golem_dask.provider.runtime.sandbox`).  Files and directories made in the
    sandbox are given to ``owner`` (uid, gid), the worker's user.  Returns a line for the
    activity's log, naming what a directory output skipped.
    """
    policy = policy if policy is not None else TransferPolicy.strict()
    skipped: list[str] = []
    if is_sandbox(destination) and not is_sandbox(source):
        result = await in_transfer_thread(copy_into, root, source, destination, options, policy, owner)
    elif is_sandbox(source) and not is_sandbox(destination):
        result, skipped = await in_transfer_thread(copy_out_of, root, source, destination, options, policy)
    else:
        raise ActivityError(f"a transfer needs exactly one side in {SANDBOX}/: {display_url(source)} -> "
                            f"{display_url(destination)}")
    line = f"{result.nbytes} bytes in {result.files} files: {display_url(source)} -> {display_url(destination)}"
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        line += f"; skipped {len(skipped)} symlinks or special files (never followed): {shown}"
    return line


def worker_environ(threads: int) -> dict[str, str]:
    """Environment a worker of ``threads`` threads starts with.

    A nanny would set ``distributed.nanny.pre-spawn-environ``; these workers run without
    one, so the provider sets it, with BLAS/OpenMP pools sized to the *agreed* threads
    rather than every core of the machine.
    """
    import dask

    environ = {k: str(v) for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}).items()}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environ[name] = str(threads)
    return environ


def requested_versions(versions: Mapping[str, str]) -> dict[str, str]:
    """The Python, dask and distributed versions a requestor asked for, cut short for messages.

    Examples
    --------
    >>> requested_versions({"python": "3.11", "dask": "2026.8.0", "x": "y"})
    {'python': '3.11', 'dask': '2026.8.0'}
    """
    return {k: str(versions[k])[:40] for k in ("python", "dask", "distributed") if k in versions}


def worker_arguments(
    args: Sequence[str], threads: int, memory_bytes: int, root: Path | None = None
) -> list[str]:
    """The arguments of ``dask worker`` for the agreed resources, from a ``run`` command's.

    ``args`` start with ``worker``; the provider's own ``--nthreads`` and
    ``--memory-limit`` replace the requestor's.  With ``root``, ``/golem/...`` arguments
    (TLS files) are rewritten to the sandbox on the host.

    Examples
    --------
    >>> worker_arguments(["worker", "tcp://a:1", "--nthreads", "64"], 2, 2**30)
    ['tcp://a:1', '--nthreads', '2', '--memory-limit', '1073741824']
    """
    if not args or args[0] != "worker":
        raise ActivityError(f"providers only run 'dask worker', not {list(args)[:2]}")
    kept: list[str] = []
    skip = False
    for arg in args[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _ENFORCED:
            skip = "=" not in arg
            continue
        kept.append(str(sandbox_path(root, arg)) if root is not None and is_sandbox(arg) else arg)
    return [*kept, "--nthreads", str(threads), "--memory-limit", str(memory_bytes)]


def make_control_dir(root: Path, owner: Owner | None = None) -> tuple[Path, Path]:
    """The worker's entry script and an empty order pipe, in ``root/.golem``.

    Returns the paths of both on this machine.  ``worker_entry.py`` is copied, not
    imported: it runs with the worker's Python (an image's, without golem-dask).  The
    directory and the script stay the provider's (the worker reads them); the pipe is
    given to ``owner`` (uid, gid), the worker's user, which opens it.
    """
    control = root / CONTROL_DIR
    control.mkdir(mode=0o755)
    script, pipe = control / "entry.py", control / "order"
    shutil.copyfile(Path(__file__).with_name("worker_entry.py"), script)
    os.chmod(script, 0o644)
    os.mkfifo(pipe, 0o600)
    if owner is not None:
        os.chown(pipe, *owner)
    return script, pipe


def run_order(args: Sequence[str], env: Mapping[str, str], threads: int, memory_bytes: int,
              root: Path | None = None) -> bytes:
    """The line a ``run`` command sends to the entry script.

    ``dask worker``'s arguments for the agreed resources, and the requestor's extra
    environment minus the thread-pool settings the provider fixed when it started the
    worker's process (see :func:`worker_environ`).

    Examples
    --------
    >>> run_order(["worker", "tcp://a:1"], {"OMP_NUM_THREADS": "64", "X": "1"}, 2, 2**30)
    b'{"args": ["tcp://a:1", "--nthreads", "2", "--memory-limit", "1073741824"], "env": {"X": "1"}}\\n'
    """
    fixed = worker_environ(threads)
    order = {
        "args": worker_arguments(args, threads, memory_bytes, root),
        "env": {str(k): str(v) for k, v in env.items() if k not in fixed},
    }
    return (json.dumps(order) + "\n").encode()


def send_order(pipe: Path, payload: bytes, exited: Callable[[], bool], failure: Callable[[], str]) -> None:
    """Write ``payload`` into the entry script's order pipe (blocking; run it in a thread).

    The pipe has no reader until the entry script opens it, a few tens of milliseconds
    after its process starts; ``exited`` is asked every 0.1 s meanwhile, and if the
    process is gone (or ``golem.provider.order-timeout`` passes) ActivityError carries ``failure()``.
    """
    deadline = time.monotonic() + config.seconds("provider.order-timeout")
    next_check = time.monotonic() + 0.1
    # Opened from the sandbox root, never through a symlink: the sandbox is the worker's too.
    control = open_dir(pipe.parent.parent, [pipe.parent.name], f"{SANDBOX}/{CONTROL_DIR}")
    try:
        while True:
            try:
                # Non-blocking: fails with ENXIO while nobody has the pipe open for reading.
                fd = os.open(pipe.name, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=control)
                break
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise ActivityError(f"cannot send the run command to the worker's process: {e}") from e
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.1
                if exited() or now >= deadline:
                    raise ActivityError(failure())
            time.sleep(0.002)
    finally:
        os.close(control)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ActivityError(f"{SANDBOX}/{CONTROL_DIR}/{pipe.name} is no longer the order pipe")
        os.set_blocking(fd, True)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class RuntimeActivity(abc.ABC):
    """One activity's sandbox on the provider."""

    def __init__(self, activity_id: str, agreement_id: str, resources: Resources) -> None:
        self.activity_id = activity_id
        self.agreement_id = agreement_id
        self.resources = resources
        self._pipe: Path | None = None  # the entry script's order pipe, made by start
        self._ran = False

    async def _order_run(self, runtime: str, entry_point: str, args: Sequence[str], env: Mapping[str, str],
                         started: bool, exited: Callable[[], bool], failure: Callable[[], str],
                         root: Path | None = None) -> None:
        """``run`` for a worker started by ``start``: check the command, then hand its
        arguments to the entry script (see :func:`run_order`, :func:`send_order`)."""
        if entry_point != "dask":
            raise ActivityError(f"the {runtime} runtime only runs 'dask', not {entry_point!r}")
        if self._pipe is None or not started:
            raise ActivityError("run before start: the exe-script must start the activity first")
        if self._ran:
            raise ActivityError("this activity already runs dask worker; create a new activity for another")
        order = run_order(args, env, self.resources.cpu_threads, self.resources.memory_bytes, root)
        await asyncio.to_thread(send_order, self._pipe, order, exited, failure)
        self._ran = True

    @abc.abstractmethod
    async def deploy(self) -> str:
        """Make the image or environment ready; returns a line for the activity log."""

    @abc.abstractmethod
    async def start(self) -> str:
        """Create the sandbox with the agreed limits (``run`` may follow in a later exe-script)."""

    @abc.abstractmethod
    async def run(self, entry_point: str, args: Sequence[str], env: Mapping[str, str]) -> str:
        """Start the long-running command; returns once it runs."""

    @abc.abstractmethod
    async def transfer(self, source: str, destination: str, options: Mapping[str, Any] | None = None) -> str:
        """Copy a file or directory between a URL and the sandbox (``/golem/...``).

        ``options`` are fsspec ``storage_options`` for the URL's side (credentials):
        never log them.
        """

    @abc.abstractmethod
    async def cpu_seconds(self) -> Decimal:
        """CPU time the activity used so far, as measured by the OS or the engine."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait until the command run by ``run`` exits; returns its exit code."""

    @abc.abstractmethod
    async def terminate(self, keep_sandbox: bool = False) -> None:
        """Stop everything and free the sandbox (unless ``keep_sandbox``: its files stay for
        the requestor to collect, until :meth:`discard`).  Safe to call twice."""

    async def discard(self) -> None:  # noqa: B027 - nothing kept by default
        """Remove a sandbox :meth:`terminate` kept.  Safe to call twice."""

    def logs(self) -> str:
        """What the command printed so far (for error messages)."""
        return ""


class Runtime(abc.ABC):
    """A provider's way of running activities."""

    #: Value of ``golem.runtime.name`` in the provider's offers.
    name: str

    def properties(self) -> dict[str, Any]:
        """Extra offer properties describing this runtime."""
        return {}

    @abc.abstractmethod
    def activity(
        self, activity_id: str, agreement_id: str, resources: Resources, image: str | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> RuntimeActivity:
        """A new, not yet deployed activity sandbox.

        ``image``: what the demand asked for; ``versions``: the Python, dask and
        distributed versions the requestor runs (``golem.srv.comp.dask.versions``), which
        the worker must match (``deploy`` refuses otherwise); None: not checked.
        """

    async def cleanup(self, live_agreement_ids: set[str]) -> int:
        """Remove sandboxes left by agreements that are no longer live; returns how many."""
        return 0

    async def warm_up(self) -> None:  # noqa: B027 - optional hook
        """Get ready for the first activity; runs when the agent joins a market, beside cleanup."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the runtime holds beyond its activities; called when the agent closes."""
