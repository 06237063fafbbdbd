"""The process runtime's clean-up of what a dead provider agent left behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psutil

from golem_dask.protocol.properties import Resources
from golem_dask.provider.runtime.process import OWNER_FILE, ProcessRuntime


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_agents_directories_and_workers_are_removed(tmp_path: Path) -> None:
    runtime = ProcessRuntime(root=str(tmp_path))
    # A dead agent's directory whose worker still runs there: both go.
    orphan_dir = tmp_path / "golem-deadbeef-x"
    orphan_dir.mkdir()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=orphan_dir)
    (orphan_dir / OWNER_FILE).write_text(f"{dead_pid()} {worker.pid}")
    # A dead agent's directory whose worker pid now belongs to another process: the
    # directory goes, the unrelated process is left alone.
    reused_dir = tmp_path / "golem-feedface-y"
    reused_dir.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (reused_dir / OWNER_FILE).write_text(f"{dead_pid()} {bystander.pid}")
    # A directory without an owner file (not ours to judge): kept.
    (tmp_path / "golem-unknown-z").mkdir()

    async def main() -> Path:
        # A working directory made the real way, by this (live) agent, its worker
        # process started: kept.
        activity = runtime.activity("a" * 32, "agreement-1", Resources(1, 2**30, 2**30))
        await activity.start()
        assert activity.workdir is not None
        ours = activity.workdir
        try:
            assert await runtime.cleanup(set()) == 2
            assert worker.wait(10) is not None
            assert not orphan_dir.exists() and not reused_dir.exists()
            assert ours.exists() and (tmp_path / "golem-unknown-z").exists()
            assert psutil.pid_exists(bystander.pid) and bystander.poll() is None
        finally:
            await activity.terminate()
        return ours

    try:
        ours = asyncio.run(main())
    finally:
        for proc in (worker, bystander):
            proc.kill()
            proc.wait()
    assert not ours.exists()


def test_start_launches_the_worker_process_and_terminate_stops_it_before_run(tmp_path: Path) -> None:
    """The worker's process starts at `start` (it loads dask until `run`); a terminate
    before `run` stops it and removes its directory."""
    runtime = ProcessRuntime(root=str(tmp_path))

    async def main() -> None:
        activity = runtime.activity("b" * 32, "agreement-2", Resources(1, 2**30, 2**30))
        await activity.start()
        assert activity.workdir is not None
        workdir = activity.workdir
        pid = int((workdir / OWNER_FILE).read_text().split()[1])
        process = psutil.Process(pid)
        assert Path(process.cwd()) == workdir and process.is_running()
        await asyncio.sleep(0.5)
        assert process.is_running()  # still waiting for its run command
        await activity.terminate()
        assert not workdir.exists()
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE

    asyncio.run(main())
