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
    # A working directory made the real way, by this (live) agent: kept.
    activity = runtime.activity("a" * 32, "agreement-1", Resources(1, 2**30, 2**30))
    asyncio.run(activity.start())
    assert activity.workdir is not None
    ours = activity.workdir
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
    try:
        assert asyncio.run(runtime.cleanup(set())) == 2
        assert worker.wait(10) is not None
        assert not orphan_dir.exists() and not reused_dir.exists()
        assert ours.exists() and (tmp_path / "golem-unknown-z").exists()
        assert psutil.pid_exists(bystander.pid) and bystander.poll() is None
    finally:
        for proc in (worker, bystander):
            proc.kill()
            proc.wait()
        asyncio.run(activity.terminate())
    assert not ours.exists()
