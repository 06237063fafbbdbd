"""Workers in real docker containers, with files moved in and out through fsspec.

These tests use a real Docker engine and the worker image built by
``golem-dask image build``; S3 is moto's server on loopback, HTTP a local server.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from distributed import Client

from docker_support import docker_client, no_leaked_containers, our_containers  # noqa: F401
from net_support import free_port, s3_server  # noqa: F401
from golem_dask import GolemCluster
from golem_dask.provider.factory import embedded_agents
from golem_dask.errors import ActivityError, ConfigError
from golem_dask.image import VERSIONS_LABEL, default_tag
from golem_dask.market.local import LocalMarket
from golem_dask.chain.units import from_wei
from golem_dask.payment.ethereum import EthereumPayer
from golem_dask.provider.runtime.docker import LABEL, LABEL_AGENT_PID, LABEL_AGREEMENT, DockerRuntime

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("docker_config", "no_leaked_containers")]

PROVIDER = {"name": "dock", "cpu": 4, "memory": "8GiB", "storage": "10GiB", "runtime": "docker",
            "price-per-cpu-hour": "0.1", "price-per-hour": "0.02", "start-price": "0"}


@pytest.fixture
def docker_config():
    with dask.config.set({
        "golem.provider.local": [PROVIDER],
        "golem.demand.memory": "1GiB",
        "golem.payment.metering-interval": "200ms",
        "golem.provider.debit-note-interval": "1s",
        "golem.market.negotiation-timeout": "10s",
    }):
        yield


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def engine_cpu_seconds(client, agreement_id: str) -> float:
    (container,) = client.containers.list(filters={"label": f"{LABEL_AGREEMENT}={agreement_id}"})
    stats = container.stats(stream=False, one_shot=True)
    return stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9


def test_dataframe_job_with_s3_and_http_inputs_and_local_outputs(docker_client, s3_server, http_dir, tmp_path):  # noqa: F811
    import s3fs

    rng = np.random.default_rng(7)
    sales = pd.DataFrame({"store": rng.integers(0, 20, 50_000), "amount": rng.random(50_000).round(4)})
    stores = pd.DataFrame({"store": range(20), "region": [f"r{i % 4}" for i in range(20)]})
    import boto3

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **s3_server["client_kwargs"]).create_bucket(Bucket="data")
    fs = s3fs.S3FileSystem(**s3_server)
    with fs.open("data/sales.parquet", "wb") as f:
        sales.to_parquet(f)
    www, base = http_dir
    stores.to_csv(www / "stores.csv", index=False)
    out = tmp_path / "results"

    with GolemCluster(
        n_workers=2,
        runtime="docker",
        budget="2",
        inputs={"s3://data/sales.parquet": "/golem/input/sales.parquet", f"{base}/stores.csv": "/golem/input/stores.csv"},
        outputs={"/golem/output/": f"file://{out}/"},
        storage_options={"s3": s3_server},
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        with Client(cluster) as client:
            def job(worker_name: str) -> None:
                import pandas as pd

                df = pd.read_parquet("/golem/input/sales.parquet").merge(pd.read_csv("/golem/input/stores.csv"))
                t = time.time()
                while time.time() - t < 3:  # enough CPU for the metering comparison
                    df.groupby("region").amount.sum()
                df.groupby("region").amount.sum().to_frame().to_parquet(f"/golem/output/{worker_name}.parquet")

            names = {w.address: name for name, w in cluster.workers.items()}
            futures = [client.submit(job, name, workers=[addr], pure=False) for addr, name in names.items()]
            client.gather(futures)
            engine = {w.agreement_id: engine_cpu_seconds(docker_client, w.agreement_id) for w in cluster.workers.values()}

    expected = sales.merge(stores).groupby("region").amount.sum().to_frame()
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["golem-0.parquet", "golem-1.parquet"]
    for f in files:
        pd.testing.assert_frame_equal(pd.read_parquet(f), expected)
    bill = cluster.bill()
    assert {e.status for e in bill.entries} == {"paid"}
    for e in bill.entries:
        assert float(e.cpu_sec) == pytest.approx(engine[e.agreement_id], rel=0.10)
    assert not any("secret" in str(ev) or "testing" in str(ev) for ev in cluster.events)


def test_bridge_network_with_tls(docker_client):
    with dask.config.set({"golem.provider.docker-network": "bridge"}):
        with GolemCluster(n_workers=1, runtime="docker", budget="1") as cluster:
            with Client(cluster) as client:
                assert client.submit(sum, range(10)).result() == 45
                (address,) = client.scheduler_info()["workers"]
    assert cluster.scheduler_address.startswith("tls://")
    assert address.startswith("tls://") and not address.startswith("tls://127.")
    assert [e.status for e in cluster.bill().entries] == ["paid"]


def test_mismatched_image_is_refused_before_negotiation(docker_client, tmp_path):
    tag = "golem-dask-test:old-dask"
    wrong = {"python": "3.11", "dask": "2020.12.0", "distributed": "2020.12.0"}
    (tmp_path / "Dockerfile").write_text(f"FROM {default_tag()}\nLABEL {VERSIONS_LABEL}='{json.dumps(wrong)}'\n")
    subprocess.run(["docker", "build", "--network", "none", "-q", "-t", tag, str(tmp_path)], check=True,
                   capture_output=True)
    try:
        started = time.perf_counter()
        with pytest.raises(ConfigError) as info:
            GolemCluster(n_workers=1, runtime="docker", image=tag)
        assert time.perf_counter() - started < 5
        message = str(info.value)
        assert "dask 2020.12.0 in the image != " + dask.__version__ in message
        assert "distributed 2020.12.0" in message and "golem-dask image build" in message
    finally:
        docker_client.images.remove(tag, force=True)


def test_missing_input_fails_clearly_pays_nothing_leaves_nothing(docker_client, tmp_path):
    (agent,) = embedded_agents("erc20-devnet-glm", [PROVIDER], runtime="docker")
    payer = EthereumPayer.embedded(Decimal(1))
    missing = f"file://{tmp_path}/no-such-file.csv"
    with pytest.raises(ActivityError) as info:
        GolemCluster(n_workers=1, runtime="docker", market=LocalMarket([agent]), payer=payer,
                     inputs={missing: "/golem/input/data.csv"})
    assert "no-such-file.csv does not exist" in str(info.value)
    assert agent.live_agreements == []
    assert from_wei(payer.token.functions.balanceOf(agent.id).call()) == 0
    assert our_containers(docker_client) == []


def test_killed_container_is_replaced_and_billed_for_its_time(docker_client):
    data = np.arange(200_000, dtype="f8")
    with GolemCluster(n_workers=2, runtime="docker", budget="2") as cluster:
        with Client(cluster) as client:
            victim = cluster.workers["golem-0"]
            (container,) = docker_client.containers.list(
                filters={"label": f"{LABEL_AGREEMENT}={victim.agreement_id}"})
            container.kill()
            import dask.array as da

            x = da.from_array(data, chunks=5_000)
            assert float((x + 1).sum().compute()) == float((data + 1).sum())
            deadline = time.time() + 60
            while ("golem-0" in cluster.workers or len(cluster.workers) < 2) and time.time() < deadline:
                time.sleep(0.2)
            client.wait_for_workers(2, timeout=60)
    bill = cluster.bill()
    assert len(bill.entries) == 3 and {e.status for e in bill.entries} == {"paid"}
    dead = next(e for e in bill.entries if e.worker == "golem-0")
    survivor = next(e for e in bill.entries if e.worker == "golem-1")
    assert dead.duration_sec < survivor.duration_sec


def test_sigint_to_the_requestor_leaves_no_container(docker_client, tmp_path):
    script = tmp_path / "requestor.py"
    script.write_text(textwrap.dedent(f"""
        import time, dask
        from golem_dask import GolemCluster
        dask.config.set({{"golem.provider.local": [{PROVIDER!r}], "golem.demand.memory": "1GiB"}})
        with GolemCluster(n_workers=2, runtime="docker", budget="1") as cluster:
            print("ready", flush=True)
            time.sleep(120)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        assert len(our_containers(docker_client)) == 2
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert our_containers(docker_client) == []


def test_provider_start_removes_containers_of_dead_agents(docker_client, tmp_path):
    sandbox = tmp_path / "golem-deadbeef-sandbox"
    (sandbox / "input").mkdir(parents=True)
    (sandbox / "input" / "data.csv").write_text("a,b\n1,2\n")
    leftover = docker_client.containers.run(
        default_tag(), ["sleep", "300"], detach=True, network_mode="none",
        labels={LABEL: "1", LABEL_AGREEMENT: "gone", LABEL_AGENT_PID: "999999999"},
        volumes={str(sandbox): {"bind": "/golem", "mode": "rw"}},
    )
    runtime = DockerRuntime(default_tag(), provider_name="dock")
    import asyncio

    removed = asyncio.run(runtime.cleanup(set()))
    assert removed == 1
    assert leftover.id not in [c.id for c in our_containers(docker_client)]
    assert not sandbox.exists() and tmp_path.exists()


def test_embedded_default_picks_docker_when_the_engine_answers(docker_client):
    auto = {**PROVIDER, "runtime": "auto"}
    with dask.config.set({"golem.provider.local": [auto]}):
        with GolemCluster(n_workers=1, budget="1") as cluster:
            assert cluster.runtime == "docker"
            assert cluster.scheduler_address.startswith("tls://")
            assert len(our_containers(docker_client)) == 1
        assert any("docker runtime with image" in str(e) for e in cluster.events.of_kind("runtime"))
        # Without the image it says so and falls back to processes.
        with dask.config.set({"golem.demand.image": "golem-dask-test:absent"}):
            with GolemCluster(n_workers=1, budget="1") as cluster:
                assert cluster.runtime == "process"
                assert our_containers(docker_client) == []
        (event,) = cluster.events.of_kind("runtime")
        assert "image golem-dask-test:absent is missing" in str(event) and "golem-dask image build" in str(event)


# -- the activity lifecycle on the engine, without a cluster ----------------------------


def _activity(runtime: DockerRuntime, image: str | None = None, **kwargs):
    from golem_dask.protocol.properties import Resources
    from golem_dask.protocol.messages import new_id

    resources = Resources(cpu_threads=1, memory_bytes=2**30, storage_bytes=2**30)
    return runtime.activity(new_id(), "agreement-under-test", resources, image, **kwargs)


def _build(tmp_path: Path, tag: str, dockerfile: str) -> str:
    (tmp_path / "Dockerfile").write_text(dockerfile)
    subprocess.run(["docker", "build", "--network", "none", "-q", "-t", tag, str(tmp_path)], check=True,
                   capture_output=True)
    return tag


def test_start_runs_the_container_with_the_agreed_limits_before_run(docker_client):
    """`start` creates the container (limits, agreement label); it waits for `run`, and a
    terminate before `run` removes it and bills nothing."""
    import asyncio

    runtime = DockerRuntime(default_tag(), provider_name="dock", client=docker_client)
    activity = _activity(runtime)

    async def main() -> None:
        await activity.deploy()
        line = await activity.start()
        (container,) = our_containers(docker_client)
        assert container.short_id in line
        assert container.status == "running"
        assert container.labels[LABEL_AGREEMENT] == "agreement-under-test"
        host = container.attrs["HostConfig"]
        assert host["NanoCpus"] == 10**9 and host["Memory"] == 2**30
        with pytest.raises(ActivityError, match="reserved for the provider"):
            await activity.transfer("memory://anything", "/golem/.golem/entry.py")
        await asyncio.sleep(1.0)  # the entry script loads dask meanwhile
        await activity.terminate()

    asyncio.run(main())
    assert our_containers(docker_client) == []


def test_terminate_during_a_cancelled_start_leaves_no_container(docker_client):
    import asyncio

    runtime = DockerRuntime(default_tag(), provider_name="dock", client=docker_client)

    async def main(delay: float) -> None:
        activity = _activity(runtime)
        await activity.deploy()
        start = asyncio.create_task(activity.start())
        await asyncio.sleep(delay)  # the engine call runs in a thread, past cancellation
        start.cancel()
        await activity.terminate()
        assert our_containers(docker_client) == [], f"a container outlived terminate (delay {delay})"

    for delay in (0.0, 0.005, 0.02, 0.06):
        asyncio.run(main(delay))


def test_image_that_cannot_run_the_entry_script_fails_clearly(docker_client, tmp_path):
    """No python on PATH: `start` fails and the created container goes.  No dask: the
    worker fails to start with the container's own last words; it did run, for a moment,
    and is paid for that moment only."""
    import asyncio

    no_python = _build(tmp_path, "golem-dask-test:no-python", f"FROM {default_tag()}\nENV PATH=/nowhere\n")
    no_dask = _build(tmp_path, "golem-dask-test:no-dask",
                     f"FROM {default_tag()}\nRUN rm -rf /opt/venv/lib/python3.11/site-packages/distributed\n")
    runtime = DockerRuntime(default_tag(), provider_name="dock", client=docker_client)
    try:
        async def main() -> None:
            broken = _activity(runtime, no_python)
            with dask.config.set({"golem.provider.allowed-images": [no_python]}):
                await broken.deploy()
            with pytest.raises(ActivityError, match="docker could not start golem-dask-test:no-python"):
                await broken.start()
            await broken.terminate()

        asyncio.run(main())
        assert our_containers(docker_client) == []

        (agent,) = embedded_agents("erc20-devnet-glm", [PROVIDER], runtime="docker")
        payer = EthereumPayer.embedded(Decimal(1))
        with pytest.raises(ActivityError) as info, dask.config.set({"golem.provider.allowed-images": [no_dask]}):
            GolemCluster(n_workers=1, runtime="docker", image=no_dask, market=LocalMarket([agent]), payer=payer)
        message = str(info.value)
        assert "died before joining the scheduler" in message and "exited with code 1" in message
        assert "No module named 'distributed'" in message
        assert agent.live_agreements == []
        # 10 s of one CPU at these prices would be 0.000333 GLM.
        assert 0 < from_wei(payer.token.functions.balanceOf(agent.id).call()) < Decimal("0.0003")
    finally:
        for tag in (no_python, no_dask):
            docker_client.images.remove(tag, force=True)
    assert our_containers(docker_client) == []


# -- hardening: what a stranger's worker may do in its container ------------------------


def _inspect_hardening(container) -> None:
    container.reload()
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert config["User"] == "65534:65534"
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PidsLimit"] == 1024
    assert host["Memory"] > 0 and host["MemorySwap"] == host["Memory"]
    assert not host.get("Privileged")
    status = container.exec_run(["cat", "/proc/1/status"]).output.decode()
    assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
    assert container.exec_run(["id", "-u"]).output.decode().strip() == "65534"
    # Its own directories are writable; the provider's control directory is not, nor can it be moved.
    assert container.exec_run(["sh", "-c", "echo x > /golem/output/probe"]).exit_code == 0
    assert container.exec_run(["sh", "-c", "echo x > /golem/.golem/order2"]).exit_code != 0
    assert container.exec_run(["mv", "/golem/.golem", "/golem/moved"]).exit_code != 0


def test_every_container_is_hardened_and_its_worker_still_computes(docker_client):
    """Non-root user, no capabilities, no-new-privileges, a pids limit, memory without
    swap, on the bridge network that `golem-dask provider` uses by default; a dask
    computation still runs on it."""
    with dask.config.set({"golem.provider.docker-network": "bridge"}):
        with GolemCluster(n_workers=1, runtime="docker", budget="1") as cluster:
            (container,) = our_containers(docker_client)
            _inspect_hardening(container)
            assert container.attrs["HostConfig"]["NetworkMode"] == "bridge"
            with Client(cluster) as client:
                x = np.arange(100_000, dtype="f8")
                import dask.array as da

                assert float(da.from_array(x, chunks=10_000).sum().compute()) == float(x.sum())
    assert [e.status for e in cluster.bill().entries] == ["paid"]


def test_links_a_worker_makes_in_its_container_are_never_followed(docker_client, tmp_path):
    """The worker, in its container, links /golem/output/leak to a host file and
    /golem/input/conf to a host directory (paths it cannot see, but the provider would
    follow on the host): outputs skip or refuse the links, inputs refuse to write through."""
    import asyncio

    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "secret.txt").write_bytes(b"provider's private bytes\n")
    out = tmp_path / "collected"
    source = tmp_path / "data.csv"
    source.write_text("a,b\n1,2\n")
    (agent,) = embedded_agents("erc20-devnet-glm", [PROVIDER], runtime="docker")

    async def main() -> None:
        activity = _activity(agent.runtime)
        await activity.deploy()
        await activity.start()
        try:
            (container,) = our_containers(docker_client)
            made = container.exec_run(["sh", "-c", f"echo result > /golem/output/result.txt && "
                                       f"ln -s {host}/secret.txt /golem/output/leak && "
                                       f"ln -s {host} /golem/output/hostdir && ln -s {host}/etc /golem/input/conf"])
            assert made.exit_code == 0, made.output
            line = await activity.transfer("/golem/output/", f"file://{out}/")
            assert "1 files" in line and "skipped 2 symlinks" in line
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer("/golem/output/leak", f"file://{out}/leak")
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer(f"file://{source}", "/golem/input/conf/passwd")
        finally:
            await activity.terminate()

    asyncio.run(main())
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]
    assert (out / "result.txt").read_text() == "result\n"
    assert list((host / "etc").iterdir()) == []


def test_the_daemon_sells_hardened_containers_on_the_bridge_by_default(tmp_path):
    from fleet_support import provider_banner

    env = {**__import__("os").environ, "GOLEM_DASK_PROVIDER_KEY": "0x" + "cd" * 32,
           "DASK_GOLEM__PROVIDER__DATA_DIR": str(tmp_path)}
    text = provider_banner(["--hub", f"tcp://127.0.0.1:{free_port()}"], env, until="docker network")
    assert "runtime docker; transfers: az, data, gs, http, https, s3; local files refused; private, loopback " \
           "and link-local addresses refused" in text
    assert "non-root user with every capability dropped" in text and "docker network 'bridge'" in text


def test_deploy_refuses_an_image_the_provider_does_not_sell(docker_client, tmp_path):
    """A demand may name any image on the provider's machine: only the provider's worker
    image and those it allows run; an image built from the worker image (it inherits its
    labels) is another image; and nothing starts that deploy has not checked."""
    import asyncio

    from golem_dask.image import BASE_TAG, build_base

    build_base(log=lambda _: None)  # on the machine, unlabelled
    derived = _build(tmp_path, "golem-dask-test:derived", f"FROM {default_tag()}\nENV SECRET=on-this-machine-only\n")
    runtime = DockerRuntime(default_tag(), provider_name="dock", client=docker_client)

    async def main() -> None:
        for image in (BASE_TAG, derived):
            with pytest.raises(ActivityError, match=f"image {image} is not an image this provider sells"):
                await _activity(runtime, image).deploy()
            skipping = _activity(runtime, image)  # an exe-script that starts without deploying
            with pytest.raises(ActivityError, match="start before deploy"):
                await skipping.start()
            await skipping.terminate()
        assert default_tag() in await _activity(runtime, default_tag()).deploy()
        with dask.config.set({"golem.provider.allowed-images": [BASE_TAG]}):
            assert BASE_TAG in await _activity(runtime, BASE_TAG).deploy()

    try:
        asyncio.run(main())
    finally:
        docker_client.images.remove(derived, force=True)
    assert our_containers(docker_client) == []


def test_deploy_refuses_an_image_of_other_versions_than_the_requestors(docker_client):
    """The requestor's demand names its Python, dask and distributed; the image's label must match."""
    import asyncio

    from golem_dask.image import client_versions

    runtime = DockerRuntime(default_tag(), provider_name="dock", client=docker_client)
    old = {"python": "3.11", "dask": "2020.12.0", "distributed": "2020.12.1"}

    async def main() -> None:
        with pytest.raises(ActivityError) as info:
            await _activity(runtime, versions=old).deploy()
        message = str(info.value)
        here = client_versions()
        assert f"dask {here['dask']} in the image != 2020.12.0 for the requestor" in message
        assert f"distributed {here['distributed']} in the image != 2020.12.1" in message
        assert "golem-dask image build" in message
        assert "image" in await _activity(runtime, versions=client_versions()).deploy()

    asyncio.run(main())
    assert our_containers(docker_client) == []


def test_dask_native_reads_over_http_and_s3_compute_on_docker_workers(docker_client, s3_server, http_dir):  # noqa: F811
    """The worker image holds this environment (fsspec's HTTP and S3 backends with it), so
    dask's own readers work on docker workers as on the client."""
    import boto3
    import dask.dataframe as dd
    import s3fs

    rng = np.random.default_rng(3)
    sales = pd.DataFrame({"store": rng.integers(0, 20, 20_000), "amount": rng.random(20_000).round(4)})
    www, base = http_dir
    sales.to_csv(www / "sales.csv", index=False)
    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **s3_server["client_kwargs"]).create_bucket(Bucket="lake")
    with s3fs.S3FileSystem(**s3_server).open("lake/sales.parquet", "wb") as f:
        sales.to_parquet(f)
    expected = sales.groupby("store").amount.sum()
    with GolemCluster(n_workers=1, runtime="docker", budget="1") as cluster, Client(cluster):
        assert not cluster.events.of_kind("warning"), [str(e) for e in cluster.events.of_kind("warning")]
        by_http = dd.read_csv(f"{base}/sales.csv").groupby("store").amount.sum().compute()
        by_s3 = dd.read_parquet("s3://lake/sales.parquet", storage_options=s3_server).groupby("store").amount.sum()
        pd.testing.assert_series_equal(by_http.sort_index(), expected, check_exact=False)
        pd.testing.assert_series_equal(by_s3.compute().sort_index(), expected, check_exact=False)
        assert len(cluster.bill().entries) == 1  # no worker was lost on the way


def test_a_package_missing_from_the_image_is_a_task_error_that_costs_one_worker(docker_client, tmp_path,
                                                                                monkeypatch):  # noqa: F811
    (tmp_path / "only_here.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here  # a module the client has and the image does not

    with GolemCluster(n_workers=1, runtime="docker", budget="1") as cluster, Client(cluster) as client:
        with pytest.raises(ModuleNotFoundError, match="No module named 'only_here': the worker's environment lacks"):
            client.submit(only_here.twice, 21).result(timeout=60)
        assert client.submit(sum, [1, 2]).result() == 3  # the worker lives on
        assert len(cluster.bill().entries) == 1 and not cluster.events.of_kind("warning")
    assert cluster.bill().entries[0].status == "paid"


def test_a_task_opening_a_client_on_a_docker_worker_is_refused_with_a_reason_it_can_read(docker_client):  # noqa: F811
    """The worker image holds no golem-dask: the scheduler's refusal must be an error the
    worker can unpickle, and the task fails with it (the worker lives on)."""

    def open_a_client() -> str:
        from distributed import get_client

        return str(get_client(timeout=10))

    with GolemCluster(n_workers=1, runtime="docker", budget="1") as cluster, Client(cluster) as client:
        with pytest.raises(PermissionError, match="workers rented from strangers may not act as clients"):
            client.submit(open_a_client, pure=False).result(timeout=60)
        assert client.submit(sum, [1, 2]).result() == 3
        assert len(cluster.bill().entries) == 1
