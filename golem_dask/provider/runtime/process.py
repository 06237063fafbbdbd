"""The ``process`` runtime: ``dask worker`` as a child process of the provider agent.

``start`` starts the child (``worker_entry.py``), which loads dask until ``run`` sends
it the worker's arguments.

No engine is needed, so this is the embedded default where Docker is absent.  There is
no sandbox beyond a working directory: the worker runs as the provider's user, sees its
files and its network, and has no memory or process-count limit but dask's own.  Sell it
only to requestors you trust (on one machine, yourself); ``golem-dask provider`` refuses
it without ``--allow-unisolated-process`` and says what it cannot isolate.  The agreed
threads and memory are enforced by the command line the provider builds, whatever the
requestor asked for.

The worker's environment is not the provider's: for strangers it is scrubbed to what a
dask worker needs (:func:`scrubbed_environ`), so the daemon's wallet key
(``GOLEM_DASK_PROVIDER_KEY``) and anything else in its environment stay out of reach.
The embedded market's workers inherit their user's environment like a ``LocalCluster``'s
do (``PYTHONPATH``, ``DASK_*``, the cloud credentials their tasks read), minus
golem-dask's own secrets (:func:`inherited_environ`).

Each working directory holds an owner file (the agent's pid, then the worker's); a
provider that starts up removes the directories, and stops the workers, of agents that
died without cleaning up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil

from golem_dask import config
from golem_dask.errors import ActivityError
from golem_dask.protocol.properties import Resources
from golem_dask.provider.runtime.base import (
    Runtime,
    RuntimeActivity,
    TransferPolicy,
    make_control_dir,
    requested_versions,
    transfer_into_sandbox,
    worker_environ,
)

logger = logging.getLogger(__name__)

OWNER_FILE = ".golem-owner"  # "<agent pid> <worker pid>" in each working directory
#: What a scrubbed worker environment keeps of the provider's, besides LC_* variables.
KEPT_VARIABLES = ("PATH", "LANG", "LANGUAGE")


def scrubbed_environ(workdir: Path, threads: int) -> dict[str, str]:
    """A stranger's worker's environment: nothing of the provider's but PATH and the locale.

    ``HOME`` and ``TMPDIR`` are in the working directory; the thread pools are sized to the
    agreed threads (:func:`~golem_dask.provider.runtime.base.worker_environ`).
    """
    environ = {k: v for k, v in os.environ.items() if k in KEPT_VARIABLES or k.startswith("LC_")}
    environ.setdefault("PATH", os.defpath)
    environ.update(HOME=str(workdir), TMPDIR=str(workdir / "tmp"))
    return {**environ, **worker_environ(threads)}


def is_secret_variable(name: str) -> bool:
    """golem-dask's own settings and keys: never in a worker's environment.

    Examples
    --------
    >>> [is_secret_variable(n) for n in ("GOLEM_DASK_PROVIDER_KEY", "DASK_GOLEM__PAYMENT__RPC_URL", "PATH")]
    [True, True, False]
    """
    named = {config.get("payment.key-env"), config.get("payment.keystore-password-env")}
    return name.startswith(("GOLEM_DASK_", "DASK_GOLEM__")) or name in named


def inherited_environ(threads: int) -> dict[str, str]:
    """The embedded market's worker environment: its user's, minus :func:`is_secret_variable` ones."""
    return {**{k: v for k, v in os.environ.items() if not is_secret_variable(k)}, **worker_environ(threads)}


class ProcessActivity(RuntimeActivity):
    """One ``dask worker`` child process in a working directory of its own."""

    def __init__(self, runtime: ProcessRuntime, activity_id: str, agreement_id: str, resources: Resources,
                 versions: Mapping[str, str] | None = None) -> None:
        super().__init__(activity_id, agreement_id, resources)
        self.runtime = runtime
        self._root = runtime.root
        self._versions = versions
        self.workdir: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self._cpu = Decimal(0)
        self._log_path: Path | None = None

    async def deploy(self) -> str:
        wanted = requested_versions(self._versions or {})
        if wanted:
            from golem_dask.image import client_versions, mismatches

            wrong = mismatches(client_versions(), wanted, where="for the requestor", what="this provider's Python")
            if wrong:
                raise ActivityError(f"the process runtime runs this provider's own Python, which does not match the "
                                    f"requestor: {'; '.join(wrong)}")
        return f"python {sys.version.split()[0]} at {sys.executable}"

    async def start(self) -> str:
        """Working directory, then the worker's process: it loads dask while files come in."""
        workdir = self.workdir = Path(tempfile.mkdtemp(prefix=f"golem-{self.activity_id[:8]}-", dir=self._root))
        (workdir / OWNER_FILE).write_text(f"{os.getpid()} 0")
        script, self._pipe = make_control_dir(workdir)
        self._log_path = workdir / "worker.log"
        threads = self.resources.cpu_threads
        if self.runtime.inherit_environment:
            env = inherited_environ(threads)
        else:
            (workdir / "tmp").mkdir()
            env = scrubbed_environ(workdir, threads)
        with open(self._log_path, "wb") as log:
            # A session of its own: a Ctrl-C meant for the requestor's terminal must not
            # kill workers behind the agent's back; the agent stops them itself.
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, str(script), str(self._pipe),
                cwd=workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        self._ps = psutil.Process(self._process.pid)
        (workdir / OWNER_FILE).write_text(f"{os.getpid()} {self._process.pid}")
        return f"working directory {workdir}, pid {self._process.pid}"

    async def run(self, entry_point: str, args: Sequence[str], env: Mapping[str, str]) -> str:
        process = self._process
        await self._order_run("process", entry_point, args, env, process is not None,
                              lambda: process is None or process.returncode is not None,
                              lambda: "the worker's process exited before the run command:\n"
                              + "\n".join(self.logs().splitlines()[-20:]), self.workdir)
        assert process is not None
        return f"dask worker in pid {process.pid}"

    async def transfer(self, source: str, destination: str, options: Mapping[str, Any] | None = None) -> str:
        if self.workdir is None:
            raise ActivityError("transfer before start: the exe-script must start the activity first")
        return await transfer_into_sandbox(self.workdir, source, destination, options, policy=self.runtime.policy)

    def _sample_cpu(self) -> Decimal:
        if self._ps is not None:
            with contextlib.suppress(psutil.Error):
                t = self._ps.cpu_times()
                total = t.user + t.system + t.children_user + t.children_system
                self._cpu = max(self._cpu, Decimal(str(round(total, 3))))
        return self._cpu

    async def cpu_seconds(self) -> Decimal:
        return self._sample_cpu()

    async def wait(self) -> int:
        if self._process is None or not self._ran:
            raise ActivityError("nothing runs in this activity")
        return await self._process.wait()

    async def terminate(self, keep_sandbox: bool = False) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            # Sample while it shuts down: once reaped, its CPU time is gone.
            loop = asyncio.get_running_loop()
            grace = config.seconds("provider.stop-grace")
            deadline = loop.time() + grace
            while proc.returncode is None and loop.time() < deadline:
                self._sample_cpu()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.05)
            if proc.returncode is None:
                logger.warning("activity %s did not stop in %ss (golem.provider.stop-grace); killing it",
                               self.activity_id, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self.workdir is not None:
            self._last_logs = self.logs()
            if not keep_sandbox:
                await self.discard()

    async def discard(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def logs(self) -> str:
        if self._log_path is not None and self._log_path.exists():
            return self._log_path.read_text(errors="replace")
        return getattr(self, "_last_logs", "")


class ProcessRuntime(Runtime):
    """Runs each activity as a ``dask worker`` child process.

    Parameters
    ----------
    root:
        Where activities' working directories go (default: the system temp dir).
    policy:
        What transfers may reach (default: :meth:`TransferPolicy.strict`, for strangers).
    inherit_environment:
        Workers get this process's environment minus golem-dask's secrets (the embedded
        market, selling to its own user) instead of a scrubbed one (default).

    Examples
    --------
    >>> ProcessRuntime(policy=TransferPolicy.trusting(), inherit_environment=True)
    <ProcessRuntime transfers: any URL, local files included; environment inherited>
    """

    name = "process"

    def __init__(self, root: str | None = None, policy: TransferPolicy | None = None,
                 inherit_environment: bool = False) -> None:
        self.root = root
        self.policy = policy if policy is not None else TransferPolicy.strict()
        self.inherit_environment = inherit_environment

    def __repr__(self) -> str:
        env = "inherited" if self.inherit_environment else "scrubbed"
        return f"<ProcessRuntime {self.policy.describe()}; environment {env}>"

    def properties(self) -> dict[str, object]:
        return {"golem.runtime.version": sys.version.split()[0]}

    def activity(self, activity_id: str, agreement_id: str, resources: Resources, image: str | None = None,
                 versions: Mapping[str, str] | None = None) -> ProcessActivity:
        return ProcessActivity(self, activity_id, agreement_id, resources, versions)

    def _cleanup(self) -> int:
        removed = 0
        root = Path(self.root or tempfile.gettempdir())
        for owner in root.glob(f"golem-*/{OWNER_FILE}"):
            try:
                agent_pid, worker_pid = (int(x) for x in owner.read_text().split())
            except (OSError, ValueError):
                continue
            if psutil.pid_exists(agent_pid):
                continue  # its agent is alive and cleans up after itself
            workdir = owner.parent
            with contextlib.suppress(psutil.Error, OSError):
                worker = psutil.Process(worker_pid)
                if worker_pid and Path(worker.cwd()) == workdir:  # the pid was not reused
                    worker.kill()
                    worker.wait(5)
                    logger.info("stopped worker %d left by dead agent %d", worker_pid, agent_pid)
            shutil.rmtree(workdir, ignore_errors=True)
            removed += 1
        return removed

    async def cleanup(self, live_agreement_ids: set[str]) -> int:
        """Remove working directories (and stop workers) of agents that died."""
        return await asyncio.to_thread(self._cleanup)
