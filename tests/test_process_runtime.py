"""The process runtime: clean-up of what a dead provider agent left behind, and what its
workers get of the provider's environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from golem_dask.errors import ActivityError
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


# -- a stranger's worker gets none of the daemon's environment -------------------------

PROVIDER_KEY = "0x" + "ab" * 32


def test_a_strangers_worker_has_none_of_the_daemons_environment(tmp_path: Path, monkeypatch) -> None:
    """The daemon's runtime (``golem-dask provider --runtime process``) starts workers with a
    scrubbed environment: a task run on a real worker finds no wallet key, no golem-dask
    settings, nothing else of the daemon's; HOME and TMPDIR are its working directory's."""
    from distributed import Client, Scheduler

    from golem_dask.provider.factory import make_runtime

    monkeypatch.setenv("GOLEM_DASK_PROVIDER_KEY", PROVIDER_KEY)
    monkeypatch.setenv("DASK_GOLEM__PAYMENT__RPC_URL", "http://127.0.0.1:8545")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "daemon-cloud-secret")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    runtime = make_runtime("process", "daemon")
    runtime.root = str(tmp_path)  # type: ignore[attr-defined]

    async def main() -> tuple[dict[str, str], dict[str, str], Path]:
        activity = runtime.activity("c" * 32, "agreement-3", Resources(1, 2**30, 2**30))
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler:
            await activity.start()
            assert activity.workdir is not None
            workdir = activity.workdir
            try:
                pid = int((workdir / OWNER_FILE).read_text().split()[1])
                at_start = psutil.Process(pid).environ()
                await activity.run("dask", ["worker", scheduler.address, "--no-nanny", "--no-dashboard"],
                                   {"DASK_DISTRIBUTED__WORKER__DAEMON": "False"})
                async with Client(scheduler.address, asynchronous=True) as client:
                    await client.wait_for_workers(1, timeout=60)
                    in_task = await client.submit(lambda: dict(os.environ), pure=False)
            finally:
                await activity.terminate()
        return at_start, in_task, workdir

    at_start, in_task, workdir = asyncio.run(main())
    for environ in (at_start, in_task):
        assert PROVIDER_KEY not in "".join(environ.values())
        assert not [k for k in environ if k.startswith(("GOLEM_DASK_", "DASK_GOLEM__", "AWS_"))]
        assert environ["HOME"] == str(workdir) and environ["TMPDIR"] == str(workdir / "tmp")
        assert environ["OMP_NUM_THREADS"] == "1" and environ["LC_ALL"] == "C.UTF-8"
    assert set(at_start) <= {"PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                             "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"} | {k for k in at_start if k.startswith("LC_")}
    assert in_task["DASK_DISTRIBUTED__WORKER__DAEMON"] == "False"  # the requestor's own run environment


def test_the_embedded_workers_inherit_the_users_environment_minus_golem_secrets(tmp_path: Path, monkeypatch) -> None:
    """The embedded market sells this machine to its own user: workers see the user's
    environment as a LocalCluster's do, but never golem-dask's keys."""
    from golem_dask.provider.factory import embedded_agents

    monkeypatch.setenv("GOLEM_DASK_PRIVATE_KEY", PROVIDER_KEY)
    monkeypatch.setenv("GOLEM_DASK_KEYSTORE_PASSWORD", "hunter2")
    monkeypatch.setenv("MY_PROJECT_SETTING", "kept")
    (agent,) = embedded_agents("erc20-devnet-glm", [{"name": "local", "cpu": 1, "memory": "1GiB",
                                                     "runtime": "process"}])
    runtime = agent.runtime
    runtime.root = str(tmp_path)  # type: ignore[attr-defined]

    async def main() -> dict[str, str]:
        activity = runtime.activity("d" * 32, "agreement-4", Resources(1, 2**30, 2**30))
        await activity.start()
        try:
            assert activity.workdir is not None
            pid = int((activity.workdir / OWNER_FILE).read_text().split()[1])
            return psutil.Process(pid).environ()
        finally:
            await activity.terminate()

    environ = asyncio.run(main())
    assert "GOLEM_DASK_PRIVATE_KEY" not in environ and "GOLEM_DASK_KEYSTORE_PASSWORD" not in environ
    assert PROVIDER_KEY not in "".join(environ.values())
    assert environ["MY_PROJECT_SETTING"] == "kept" and environ["PATH"] == os.environ["PATH"]


def test_the_daemon_refuses_the_process_runtime_without_the_explicit_flag(capsys) -> None:
    from golem_dask.cli import main

    assert main(["provider", "--hub", "tcp://127.0.0.1:9", "--runtime", "process"]) == 2
    err = capsys.readouterr().err
    assert "--allow-unisolated-process" in err and "--runtime docker" in err


def test_the_daemon_says_what_the_process_runtime_cannot_isolate(tmp_path: Path) -> None:
    from fleet_support import provider_banner
    from net_support import free_port

    env = {**os.environ, "GOLEM_DASK_PROVIDER_KEY": PROVIDER_KEY, "DASK_GOLEM__PROVIDER__DATA_DIR": str(tmp_path)}
    text = provider_banner(["--hub", f"tcp://127.0.0.1:{free_port()}", "--runtime", "process",
                            "--allow-unisolated-process", "--allow-scheme", "ftp"], env, until="Use --runtime docker")
    assert "does not isolate" in text and "as this daemon's user" in text and "whole filesystem" in text
    assert "no memory, process-count" in text and "environment is scrubbed" in text
    assert "transfers: az, data, ftp, gs, http, https, s3; local files refused" in text
    assert PROVIDER_KEY not in text


def test_deploy_refuses_a_requestor_running_other_versions(tmp_path: Path) -> None:
    """The process runtime runs the provider's own Python: a requestor's demand naming other
    dask or distributed versions is refused at deploy, naming both."""
    from golem_dask.image import client_versions

    runtime = ProcessRuntime(root=str(tmp_path))
    here = client_versions()

    async def main() -> None:
        wanted = {**here, "dask": "2020.12.0"}
        activity = runtime.activity("e" * 32, "agreement-5", Resources(1, 2**30, 2**30), versions=wanted)
        with pytest.raises(ActivityError) as info:
            await activity.deploy()
        assert f"dask {here['dask']} in this provider's Python != 2020.12.0 for the requestor" in str(info.value)
        same = runtime.activity("f" * 32, "agreement-6", Resources(1, 2**30, 2**30), versions=here)
        assert "python" in await same.deploy()

    asyncio.run(main())


def test_the_leak_check_sees_a_rented_worker() -> None:
    """The fixture that fails tests leaving workers behind must recognise one."""
    import asyncio

    from conftest import dask_worker_children

    from golem_dask.protocol.properties import Resources
    from golem_dask.provider.runtime.process import ProcessRuntime

    async def main() -> int:
        act = ProcessRuntime().activity("leak-check-0001", "agreement", Resources(1, 2**30, 0))
        await act.deploy()
        await act.start()
        try:
            return len(dask_worker_children())
        finally:
            await act.terminate()

    assert asyncio.run(main()) == 1
    assert dask_worker_children() == []
