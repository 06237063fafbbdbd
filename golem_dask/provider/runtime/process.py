"""The ``process`` runtime: ``dask worker`` as a child process of the provider agent.

``start`` starts the child (``worker_entry.py``), which loads dask until ``run`` sends
it the worker's arguments.

No engine is needed, so this is the embedded default where Docker is absent.  There is
no sandbox beyond a working directory: sell it only to requestors you trust (on one
machine, yourself).  The agreed threads and memory are enforced by the command line the
provider builds, whatever the requestor asked for.

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
from golem_dask.provider.runtime.base import (
    Runtime,
    RuntimeActivity,
    make_control_dir,
    transfer_into_sandbox,
    worker_environ,
)

logger = logging.getLogger(__name__)

OWNER_FILE = ".golem-owner"  # "<agent pid> <worker pid>" in each working directory

class ProcessActivity(RuntimeActivity):
    """One ``dask worker`` child process in a working directory of its own."""

    def __init__(self, activity_id: str, agreement_id: str, resources, root: str | None) -> None:
        super().__init__(activity_id, agreement_id, resources)
        self._root = root
        self.workdir: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ps: psutil.Process | None = None
        self._cpu = Decimal(0)
        self._log_path: Path | None = None

    async def deploy(self) -> str:
        return f"python {sys.version.split()[0]} at {sys.executable}"

    async def start(self) -> str:
        """Working directory, then the worker's process: it loads dask while files come in."""
        workdir = self.workdir = Path(tempfile.mkdtemp(prefix=f"golem-{self.activity_id[:8]}-", dir=self._root))
        (workdir / OWNER_FILE).write_text(f"{os.getpid()} 0")
        script, self._pipe = make_control_dir(workdir)
        self._log_path = workdir / "worker.log"
        with open(self._log_path, "wb") as log:
            # A session of its own: a Ctrl-C meant for the requestor's terminal must not
            # kill workers behind the agent's back; the agent stops them itself.
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, str(script), str(self._pipe),
                cwd=workdir,
                env={**os.environ, **worker_environ(self.resources.cpu_threads)},
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
        return await transfer_into_sandbox(self.workdir, source, destination, options)

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

    async def terminate(self) -> None:
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
    """

    name = "process"

    def __init__(self, root: str | None = None) -> None:
        self.root = root

    def properties(self) -> dict[str, object]:
        return {"golem.runtime.version": sys.version.split()[0]}

    def activity(self, activity_id: str, agreement_id: str, resources, image: str | None = None) -> ProcessActivity:
        return ProcessActivity(activity_id, agreement_id, resources, self.root)

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
