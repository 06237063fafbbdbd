"""A provider's machine out of a requestor's reach: what transfers may name, and what they touch.

Each test plays one attack of a requestor (through its exe-script's ``transfer`` commands)
or of its worker (through what it leaves in the sandbox) against a real runtime.  The
daemon's runtime (``make_runtime``, what ``golem-dask provider`` sells to strangers) has
the strict transfer policy; the embedded market's (this machine sold to its own user) may
copy local files, but never follows what the worker made in the sandbox either.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from golem_dask.errors import ActivityError
from golem_dask.protocol.messages import new_id
from golem_dask.protocol.properties import Resources
from golem_dask.provider.factory import embedded_agents, make_runtime
from golem_dask.provider.runtime.base import Runtime, RuntimeActivity

SECRET = b"provider's private bytes: wallet key 0xfeedface\n"


def daemon_runtime() -> Runtime:
    """The runtime ``golem-dask provider --runtime process`` sells to strangers."""
    return make_runtime("process", "daemon")


def embedded_runtime() -> Runtime:
    """The embedded market's process runtime (this machine sold to its own user)."""
    entry = {"name": "local", "cpu": 2, "memory": "2GiB", "runtime": "process"}
    (agent,) = embedded_agents("erc20-devnet-glm", [entry])
    return agent.runtime


@contextlib.asynccontextmanager
async def started(runtime: Runtime, tmp_path: Path) -> AsyncIterator[tuple[RuntimeActivity, Path]]:
    """A started activity and its sandbox (``/golem``) on this machine."""
    runtime.root = str(tmp_path)  # type: ignore[attr-defined]
    activity = runtime.activity(new_id(), "agreement-under-test", Resources(1, 2**30, 2**30))
    await activity.start()
    root = getattr(activity, "workdir", None) or getattr(activity, "root")
    try:
        yield activity, Path(root)
    finally:
        await activity.terminate()


@pytest.fixture
def host_files(tmp_path: Path) -> Path:
    """Files of the provider's machine, outside any sandbox."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_bytes(SECRET)
    (host / "etc").mkdir()
    return host


@pytest.fixture
def loopback_http(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on loopback (a service of the provider's machine); yields its URL and the paths requested."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "secret.txt").write_bytes(SECRET)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(www), **kw)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def do_HEAD(self) -> None:
            requests.append(self.path)
            super().do_HEAD()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` (symlinks not followed) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


# -- 1. a stranger's transfer cannot read the provider's files or reach its networks ----


def test_a_file_source_is_refused_and_nothing_is_read(tmp_path: Path, host_files: Path) -> None:
    secret = host_files / "secret.txt"

    async def main() -> None:
        async with started(daemon_runtime(), tmp_path) as (activity, root):
            for url in (f"file://{secret}", str(secret), f"local://{secret}", "memory://anything/secret.txt",
                        f"FILE://{secret}", f"DATA:{secret}"):
                with pytest.raises(ActivityError) as info:
                    await activity.transfer(url, "/golem/input/secret.txt")
                message = str(info.value)
                assert "transfer refused" in message, url
            assert "a provider never lets remote requestors read or write its own files" in message or \
                "is not allowed by this provider" in message
            assert SECRET not in b"".join(tree(root).values())

    asyncio.run(main())


@pytest.mark.parametrize("url", [
    "simplecache::file://{secret}",
    "filecache::file://{secret}",
    "blockcache::file://{secret}",
    "zip://secret.txt::file://{zipfile}",
    "tar://secret.txt::file://{tarfile}",
    "https://93.184.215.14/a::file://{secret}",
    "dir::file://{host}",
])
def test_chained_urls_are_refused_link_by_link(tmp_path: Path, host_files: Path, url: str) -> None:
    import tarfile
    import zipfile

    archive = host_files / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("secret.txt", SECRET)
    with tarfile.open(host_files / "bundle.tar", "w") as t:
        t.add(host_files / "secret.txt", arcname="secret.txt")
    url = url.format(secret=host_files / "secret.txt", zipfile=archive, tarfile=host_files / "bundle.tar",
                     host=host_files)

    async def main() -> None:
        async with started(daemon_runtime(), tmp_path) as (activity, root):
            with pytest.raises(ActivityError, match="transfer refused"):
                await activity.transfer(url, "/golem/input/secret.txt")
            assert SECRET not in b"".join(tree(root).values())

    asyncio.run(main())


def test_options_that_reroute_fsspec_are_refused(tmp_path: Path, host_files: Path) -> None:
    """Storage options can switch a URL's protocol (fsspec pops ``protocol``) or name a target."""
    secret = host_files / "secret.txt"

    async def main() -> None:
        async with started(daemon_runtime(), tmp_path) as (activity, root):
            for options in ({"protocol": "file"}, {"target_protocol": "file"}, {"fo": str(secret)}):
                with pytest.raises(ActivityError, match="would re-route the transfer"):
                    await activity.transfer(f"https://93.184.215.14{secret}", "/golem/input/secret.txt", options)
            assert SECRET not in b"".join(tree(root).values())

    asyncio.run(main())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[0:0:0:0:0:ffff:7f00:1]", "2130706433", "0.0.0.0"])
def test_loopback_services_are_refused_and_never_asked(tmp_path: Path, loopback_http, host: str) -> None:
    base, requests = loopback_http
    port = base.rsplit(":", 1)[1]

    async def main() -> None:
        async with started(daemon_runtime(), tmp_path) as (activity, root):
            with pytest.raises(ActivityError) as info:
                await activity.transfer(f"http://{host}:{port}/secret.txt", "/golem/input/secret.txt")
            message = str(info.value)
            assert "transfer refused" in message and "address" in message
            assert "--allow-private-addresses" in message
            # The same service as an S3 endpoint, top-level or in client_kwargs.
            s3 = {"key": "k", "secret": "s"}
            for options in ({**s3, "endpoint_url": base}, {**s3, "client_kwargs": {"endpoint_url": base}}):
                with pytest.raises(ActivityError, match="loopback address"):
                    await activity.transfer("s3://bucket/secret.txt", "/golem/input/secret.txt", options)
            assert SECRET not in b"".join(tree(root).values())

    asyncio.run(main())
    assert requests == []


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2:0:0:0:0:0:254]/latest/meta-data/",
    "http://10.0.0.1/internal",
    "http://224.0.0.1/x",
])
def test_cloud_metadata_and_private_networks_are_refused(tmp_path: Path, url: str) -> None:
    """Refused before any connection: the address is checked, not fetched."""
    async def main() -> None:
        async with started(daemon_runtime(), tmp_path) as (activity, _):
            with pytest.raises(ActivityError) as info:
                await activity.transfer(url, "/golem/input/creds.json")
            message = str(info.value)
            assert "transfer refused" in message and url.split("/")[2] in message
            assert "address" in message and "--allow-private-addresses" in message

    asyncio.run(main())


def test_the_connection_itself_is_checked_after_redirects_and_dns(loopback_http) -> None:
    """What closes redirects and DNS rebinding: the socket factory the strict policy gives
    aiohttp checks the address each connection is really made to."""
    import fsspec

    from golem_dask.provider.runtime.policy import TransferPolicy, checked_options

    base, requests = loopback_http
    options = checked_options("http", {})
    # A public address passes the first check (nothing is fetched here) and gets the checked client.
    assert TransferPolicy.strict().prepare("https://93.184.215.14/x", {})["get_client"] is options["get_client"]
    fs = fsspec.filesystem("http", skip_instance_cache=True, **options)
    with pytest.raises(Exception) as info:
        fs.cat_file(f"{base}/secret.txt")
    assert "refused by the provider's transfer policy" in repr(info.value) or \
        "refused by the provider's transfer policy" in str(info.value.__cause__)
    assert requests == []


def test_s3_connections_are_checked_too() -> None:
    """S3 (aiobotocore) connections go through the same socket check: an endpoint that
    passed the first check but connects to loopback is refused, and S3 never sees a request."""
    import fsspec
    from moto.server import ThreadedMotoServer

    from golem_dask.provider.runtime.policy import checked_options
    from net_support import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        options = {"key": "testing", "secret": "testing", "config_kwargs": {"retries": {"max_attempts": 1}},
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **checked_options("s3", options))
        with pytest.raises(Exception) as info:  # botocore's EndpointConnectionError
            fs.cat_file("bucket/secret.txt")
        causes = []
        error: BaseException | None = info.value
        while error is not None:
            causes.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("127.0.0.1 is a loopback address, refused by the provider's transfer policy" in c for c in causes)
    finally:
        server.stop()


def test_allowed_schemes_and_addresses_are_the_providers_choice(tmp_path: Path, loopback_http) -> None:
    from golem_dask.provider.runtime.policy import TransferPolicy

    base, requests = loopback_http
    policy = TransferPolicy.strict(allow_private_addresses=True)

    async def main() -> None:
        async with started(make_runtime("process", "daemon", policy=policy), tmp_path) as (activity, root):
            line = await activity.transfer(f"{base}/secret.txt", "/golem/input/secret.txt")
            assert (root / "input" / "secret.txt").read_bytes() == SECRET and "1 files" in line
            with pytest.raises(ActivityError, match="never lets remote requestors"):
                await activity.transfer(f"file://{tmp_path}/www/secret.txt", "/golem/input/again.txt")

    asyncio.run(main())
    assert set(requests) == {"/secret.txt"}
    from golem_dask.errors import ConfigError

    with pytest.raises(ConfigError, match="never allows them"):
        TransferPolicy.strict(["file"])


# -- 2. a stranger's transfer cannot write anywhere but the sandbox --------------------


def test_a_file_destination_is_refused_and_nothing_is_written(tmp_path: Path, host_files: Path) -> None:
    async def main() -> None:
        async with started(daemon_runtime(), tmp_path) as (activity, root):
            (root / "output").mkdir(exist_ok=True)
            (root / "output" / "result.csv").write_text("a,b\n")
            for url in (f"file://{host_files}/etc/cron.d-evil", f"{host_files}/etc/cron.d-evil",
                        f"simplecache::file://{host_files}/etc/cron.d-evil", "data:,overwrite"):
                with pytest.raises(ActivityError, match="transfer refused"):
                    await activity.transfer("/golem/output/result.csv", url)
            assert list((host_files / "etc").iterdir()) == []

    asyncio.run(main())


# -- 2b. links the worker made in the sandbox are never followed ------------------------


def test_symlinked_outputs_are_not_followed(tmp_path: Path, host_files: Path) -> None:
    """The worker links /golem/output/x to a host file and /golem/output/d to a host
    directory: the provider uploads neither (a file output is refused, a directory output
    skips them and says so)."""
    out = tmp_path / "collected"

    async def main() -> None:
        async with started(embedded_runtime(), tmp_path) as (activity, root):
            output = root / "output"
            output.mkdir(exist_ok=True)
            (output / "real.csv").write_text("1,2\n")
            (output / "sub").mkdir()
            (output / "sub" / "real2.csv").write_text("3,4\n")
            os.symlink(host_files / "secret.txt", output / "leak.txt")
            os.symlink(host_files, output / "host")
            os.symlink(host_files / "secret.txt", output / "sub" / "leak2.txt")
            os.mkfifo(output / "fifo")  # opening it must not hang the provider
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer("/golem/output/leak.txt", f"file://{out}/single.txt")
            with pytest.raises(ActivityError):
                await activity.transfer("/golem/output/host/secret.txt", f"file://{out}/through-dir.txt")
            line = await asyncio.wait_for(activity.transfer("/golem/output/", f"file://{out}/"), 30)
            assert "2 files" in line and "skipped 4 symlinks or special files" in line
            assert "leak.txt" in line and "host" in line

    asyncio.run(main())
    assert tree(out) == {"real.csv": b"1,2\n", "sub/real2.csv": b"3,4\n"}
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_a_symlink_in_the_sandbox_is_not_written_through(tmp_path: Path, host_files: Path) -> None:
    """The worker swaps /golem/input for a link to a host directory, or links a file name
    to a host file: the next transfer writes neither."""
    source = tmp_path / "data.csv"
    source.write_bytes(b"requestor's data\n")
    target = host_files / "etc" / "passwd"
    target.write_bytes(b"root:x:0:0\n")

    async def main() -> None:
        async with started(embedded_runtime(), tmp_path) as (activity, root):
            (root / "input").mkdir(exist_ok=True)
            os.symlink(host_files / "etc", root / "input" / "conf")
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer(f"file://{source}", "/golem/input/conf/passwd")
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer(f"file://{source}", "/golem/input/conf/")
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer("data:,x", "/golem/input/conf/new.txt")
            # A link as the file's own name is replaced by the new file, not written through.
            os.symlink(target, root / "input" / "passwd")
            await activity.transfer(f"file://{source}", "/golem/input/passwd")
            assert not (root / "input" / "passwd").is_symlink()
            assert (root / "input" / "passwd").read_bytes() == b"requestor's data\n"
            # The whole input directory swapped for a link.
            (root / "input" / "passwd").unlink()
            os.unlink(root / "input" / "conf")
            (root / "input").rmdir()
            os.symlink(host_files / "etc", root / "input")
            with pytest.raises(ActivityError, match="symlink"):
                await activity.transfer(f"file://{source}", "/golem/input/data.csv")

    asyncio.run(main())
    assert target.read_bytes() == b"root:x:0:0\n"
    assert sorted(p.name for p in (host_files / "etc").iterdir()) == ["passwd"]


def test_a_worker_swapping_a_file_for_a_link_mid_transfer_never_leaks(tmp_path: Path, host_files: Path) -> None:
    """Race: while outputs are collected (and inputs written) the worker keeps swapping a
    path between a real file (directory) and a link to the host's; no transfer follows it."""
    out = tmp_path / "collected"
    out.mkdir()
    source = tmp_path / "data.csv"
    source.write_bytes(b"requestor's data\n")

    async def main() -> None:
        async with started(embedded_runtime(), tmp_path) as (activity, root):
            output, inputs = root / "output", root / "input"
            output.mkdir(exist_ok=True)
            inputs.mkdir(exist_ok=True)
            stop = threading.Event()

            def swap() -> None:
                """output/x: a real file, then a link to the host's secret; input/d: a real
                directory, then a link to the host's etc.  Each state lasts about a millisecond."""
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        (output / ".tmp").write_bytes(b"ok")
                        os.replace(output / ".tmp", output / "x")
                    with contextlib.suppress(OSError):
                        if not os.path.islink(inputs / "d"):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(inputs / "d" / "data.csv")
                            os.rmdir(inputs / "d")
                        os.mkdir(inputs / "d")
                    time.sleep(0.001)
                    with contextlib.suppress(OSError):
                        os.symlink(host_files / "secret.txt", output / ".lnk")
                        os.replace(output / ".lnk", output / "x")
                    with contextlib.suppress(OSError):
                        os.rmdir(inputs / "d")
                        os.symlink(host_files / "etc", inputs / "d")
                    time.sleep(0.001)

            swapper = threading.Thread(target=swap, daemon=True)
            swapper.start()
            try:
                for i in range(150):
                    with contextlib.suppress(ActivityError):
                        await activity.transfer("/golem/output/x", f"file://{out}/x{i}")
                    with contextlib.suppress(ActivityError):
                        await activity.transfer(f"file://{source}", "/golem/input/d/data.csv")
            finally:
                stop.set()
                swapper.join()

    asyncio.run(main())
    collected = tree(out)
    assert collected, "no transfer got through at all: the race was not exercised"
    assert all(data == b"ok" for data in collected.values())
    assert list((host_files / "etc").iterdir()) == []


def test_a_failed_copy_into_the_sandbox_leaves_no_partial_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.copy_file_range

    def flip(src: int, dst: int, count: int, *rest: object) -> int:
        n = real(src, dst, count, *rest)  # type: ignore[arg-type]
        if n:
            os.pwrite(dst, b"\xff", os.lseek(dst, 0, os.SEEK_CUR) - 1)
        return n

    source = tmp_path / "a.bin"
    source.write_bytes(b"\x00" * 100_000)

    async def main() -> None:
        async with started(embedded_runtime(), tmp_path) as (activity, root):
            monkeypatch.setattr(os, "copy_file_range", flip)
            with pytest.raises(ActivityError, match="checksum differs"):
                await activity.transfer(f"file://{source}", "/golem/input/a.bin")
            monkeypatch.undo()
            assert not (root / "input" / "a.bin").exists()
            with pytest.raises(ActivityError, match="reserved for the provider"):
                await activity.transfer(f"file://{source}", "/golem/.golem/order")
            with pytest.raises(ActivityError, match="outside the activity's sandbox"):
                await activity.transfer(f"file://{source}", "/golem/input/../../escape.bin")
            assert not (tmp_path / "escape.bin").exists()

    asyncio.run(main())


def bare_deal(activity: object, sent: list[object] | None = None):  # type: ignore[no-untyped-def]
    """A provider's Deal for ``activity`` (a stand-in runtime activity), its messages kept in ``sent``."""
    from golem_dask.protocol.messages import Agreement, Issuer, Proposal
    from golem_dask.provider.deal import Deal

    async def send(message: object) -> None:
        if sent is not None:
            sent.append(message)

    offer = Proposal(Issuer.PROVIDER, {}, "(&)", "o", "d", "0x" + "11" * 20)
    agreement = Agreement("agr", offer, offer, "0x" + "22" * 20, "0x" + "11" * 20, 0)
    deal = Deal(agreement, Resources(1, 2**30, 2**30), send, 60, lambda data, aad: data)
    deal.activity = activity  # type: ignore[assignment]
    return deal


def test_a_failed_commands_reason_carries_no_signed_url() -> None:
    """The reason of a failed command travels to the requestor through the hub in clear: a
    signed URL in the error (an HTTP client's message names the whole URL) is cut to its
    path there."""
    from decimal import Decimal

    from golem_dask.protocol.messages import ExeCommand

    sent: list[object] = []

    class Failing:
        activity_id = "act-1"

        async def deploy(self) -> str:
            raise OSError("403, message='Forbidden', url='https://bucket.example/k?X-Amz-Signature=SIGNED-SECRET'")

        async def cpu_seconds(self) -> Decimal:
            return Decimal(0)

        async def terminate(self, keep_sandbox: bool = False) -> None:
            return None

    deal = bare_deal(Failing(), sent)
    with pytest.raises(ActivityError) as info:
        asyncio.run(deal.exec([ExeCommand("deploy")]))
    told = " ".join([str(info.value)] + [str(getattr(m, "reason", "")) for m in sent])
    assert "https://bucket.example/k" in told and "SIGNED-SECRET" not in told, told


@pytest.mark.parametrize("token, why", [
    ({"type": "service_account", "client_email": "a@b", "private_key": "k",
      "token_uri": "http://169.254.169.254/computeMetadata/v1/token"}, "'token_uri' must be a Google address"),
    ({"type": "service_account", "token_uri": "https://oauth2.googleapis.com.evil.example/token"},
     "'token_uri' must be a Google address"),
    ({"type": "external_account", "credential_source": {"file": "/etc/provider-secret"}}, "other kinds read files"),
])
def test_gs_credentials_cannot_send_the_provider_to_an_address_or_file_of_the_requestors_choice(token, why) -> None:
    from golem_dask.provider.runtime.policy import TransferPolicy

    policy = TransferPolicy(schemes=frozenset({"gs"}))
    with pytest.raises(ActivityError, match=why):
        policy.prepare("gs://bucket/data.csv", {"token": token})
    good = {"type": "service_account", "client_email": "a@b", "private_key": "k",
            "token_uri": "https://oauth2.googleapis.com/token"}
    assert policy.prepare("gs://bucket/data.csv", {"token": good})["token"] == good


def test_an_activity_runs_one_exe_script_at_a_time() -> None:
    """A requestor that sends many exe-scripts at once (each a slow transfer, say) gets them
    run one after another: it cannot hold every thread the provider's daemon has."""
    from decimal import Decimal

    from golem_dask.protocol.messages import ExeCommand

    running, most = 0, 0

    class Slow:
        activity_id = "act-1"

        async def deploy(self) -> str:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.02)
            running -= 1
            return "deployed"

        async def cpu_seconds(self) -> Decimal:
            return Decimal(0)

    deal = bare_deal(Slow())

    async def main() -> list[list[str]]:
        return await asyncio.gather(*(deal.exec([ExeCommand("deploy")]) for _ in range(5)))

    assert asyncio.run(main()) == [["deployed"]] * 5
    assert most == 1
