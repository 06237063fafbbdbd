"""Streaming copies between fsspec URLs, and the sandbox they land in."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
import xxhash

from golem_dask.errors import ActivityError
from golem_dask.provider.runtime.base import TransferPolicy, sandbox_path, transfer_into_sandbox
from golem_dask import transfer
from golem_dask.transfer import TransferError, copy, display_url


def test_file_copy_checks_size_and_hash(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 17)
    (tmp_path / "a.bin").write_bytes(data)
    result = copy(str(tmp_path / "a.bin"), f"file://{tmp_path}/out/", chunk_bytes=2**20)
    assert (tmp_path / "out" / "a.bin").read_bytes() == data
    assert result.nbytes == len(data) and result.files == 1
    assert list(result.checksums.values()) == [xxhash.xxh3_128(data).hexdigest()]


def test_copy_without_the_kernel_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where copy_file_range is refused (other filesystems, old kernels) a buffer copies."""
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    data = os.urandom(2 * 2**20 + 5)
    (tmp_path / "a.bin").write_bytes(data)
    result = copy(str(tmp_path / "a.bin"), str(tmp_path / "b.bin"), chunk_bytes=2**19)
    assert (tmp_path / "b.bin").read_bytes() == data
    assert result.checksums == {str(tmp_path / "b.bin"): xxhash.xxh3_128(data).hexdigest()}


def test_corrupted_destination_is_caught_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads back what landed: a byte flipped on the way fails the copy."""
    real = os.copy_file_range

    def flip(src: int, dst: int, count: int, *rest: object) -> int:
        n = real(src, dst, count, *rest)
        if n:
            os.pwrite(dst, b"\xff", os.lseek(dst, 0, os.SEEK_CUR) - 1)
        return n

    monkeypatch.setattr(os, "copy_file_range", flip)
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100_000)
    with pytest.raises(TransferError, match="checksum differs"):
        copy(str(tmp_path / "a.bin"), str(tmp_path / "b.bin"))
    assert not (tmp_path / "b.bin").exists()


def test_stream_copy_through_another_filesystem(tmp_path: Path) -> None:
    """A remote end (here fsspec's memory filesystem) goes through the two-thread path."""
    data = os.urandom(5 * 2**20 + 3)
    with fsspec.open("memory://bucket/in.bin", "wb") as f:
        f.write(data)
    try:
        down = copy("memory://bucket/in.bin", str(tmp_path / "in.bin"), chunk_bytes=2**20)
        assert (tmp_path / "in.bin").read_bytes() == data
        up = copy(str(tmp_path / "in.bin"), "memory://bucket/out/", chunk_bytes=2**20)
        assert fsspec.filesystem("memory").cat_file("/bucket/out/in.bin") == data
        assert list(down.checksums.values()) == list(up.checksums.values()) == [xxhash.xxh3_128(data).hexdigest()]
    finally:
        fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_a_failing_writer_stops_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.bin").write_bytes(os.urandom(4 * 2**20))
    fs = fsspec.filesystem("memory")
    real_open = fs.open

    class Full:
        def __init__(self, f: object) -> None:
            self.f, self.writes = f, 0

        def __enter__(self) -> "Full":
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def write(self, block: bytes) -> int:
            self.writes += 1
            if self.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(block)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(type(fs), "open", lambda self, path, mode="rb", **kw: Full(real_open(path, mode, **kw)))
    with pytest.raises(TransferError, match="No space left"):
        copy(str(tmp_path / "a.bin"), "memory://full/a.bin", chunk_bytes=2**20)
    monkeypatch.undo()
    assert not fs.exists("/full/a.bin")


def test_a_local_destination_shows_the_old_file_until_the_new_one_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy over an existing local file writes beside it and renames once checked: a
    reader mid-copy sees the old bytes, a copy that fails leaves them as they were, and the
    new file keeps the old one's permissions."""
    old, new = b"old results\n" * 1000, os.urandom(3 * 2**20)
    (tmp_path / "out.bin").write_bytes(old)
    (tmp_path / "out.bin").chmod(0o750)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/src/out.bin", new)
    seen: list[bytes] = []
    real_read = fs.open("/src/out.bin", "rb").__class__.read

    def read_then_fail(self: object, length: int = -1) -> bytes:
        seen.append((tmp_path / "out.bin").read_bytes())
        if len(seen) == 2:
            raise OSError(errno.ECONNRESET, "connection reset")
        return real_read(self, length)  # type: ignore[no-any-return]

    try:
        monkeypatch.setattr(fs.open("/src/out.bin", "rb").__class__, "read", read_then_fail)
        with pytest.raises(TransferError, match="connection reset"):
            copy("memory://src/out.bin", str(tmp_path / "out.bin"), chunk_bytes=2**20)
        monkeypatch.undo()
        assert seen == [old, old]
        assert (tmp_path / "out.bin").read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no staging file left
        copy("memory://src/out.bin", str(tmp_path / "out.bin"), chunk_bytes=2**20)
        assert (tmp_path / "out.bin").read_bytes() == new
        assert (tmp_path / "out.bin").stat().st_mode & 0o7777 == 0o750, "the new file keeps the old one's mode"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    finally:
        fs.rm("/src", recursive=True)


def test_directory_copy_keeps_the_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("yy")
    result = copy(str(src), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "x.txt").read_text() == "x"
    assert (tmp_path / "dst" / "sub" / "y.txt").read_text() == "yy"
    assert result.files == 2 and result.nbytes == 3


def test_missing_source_names_the_url_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(TransferError) as info:
        copy(f"file://{tmp_path}/nope.csv", str(tmp_path / "x"))
    assert "nope.csv does not exist" in str(info.value)
    assert display_url("s3://AKIA:hunter2@bucket/k") == "s3://***@bucket/k"


def test_inline_data_url(tmp_path: Path) -> None:
    result = copy("data:text/plain;base64,aGVsbG8=", str(tmp_path / "tls" / "ca.pem"))
    assert (tmp_path / "tls" / "ca.pem").read_text() == "hello" and result.nbytes == 5


@pytest.mark.parametrize("path", ["/etc/passwd", "/golem/../etc/passwd", "/golemx/a", "relative/path"])
def test_sandbox_refuses_paths_outside_it(tmp_path: Path, path: str) -> None:
    with pytest.raises(ActivityError, match="outside the activity's sandbox"):
        sandbox_path(tmp_path, path)


def test_transfer_into_and_out_of_the_sandbox(tmp_path: Path) -> None:
    """The embedded market's providers (this machine's own user) may copy local files."""
    trusting = TransferPolicy.trusting()
    root = tmp_path / "sandbox"
    root.mkdir()
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")
    line = asyncio.run(transfer_into_sandbox(root, f"file://{tmp_path}/in.csv", "/golem/input/in.csv",
                                             policy=trusting))
    assert (root / "input" / "in.csv").read_text() == "a,b\n1,2\n" and "8 bytes" in line
    (root / "output").mkdir()
    (root / "output" / "r.txt").write_text("done")
    asyncio.run(transfer_into_sandbox(root, "/golem/output/", f"file://{tmp_path}/results/", policy=trusting))
    assert (tmp_path / "results" / "r.txt").read_text() == "done"
    with pytest.raises(ActivityError, match="exactly one side"):
        asyncio.run(transfer_into_sandbox(root, "/golem/a", "/golem/b"))


def test_slow_transfers_leave_the_threads_payments_use_free(tmp_path: Path) -> None:
    """Copies run in threads of their own: as many stalled downloads as asyncio's shared
    pool has threads still leave ``asyncio.to_thread`` (the ledger, receivables) working."""
    release = threading.Event()

    class Stalled(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            release.wait(30)
            body = b"late\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shared = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default pool
    root = tmp_path / "sandbox"
    root.mkdir()

    async def main() -> int:
        url = f"http://127.0.0.1:{server.server_address[1]}/f.txt"
        copies = [asyncio.ensure_future(transfer_into_sandbox(root, url, f"/golem/f{i}.txt",
                                                              policy=TransferPolicy.trusting()))
                  for i in range(shared)]
        await asyncio.sleep(0.5)
        try:
            return await asyncio.wait_for(asyncio.to_thread(lambda: 42), 10)
        finally:
            release.set()
            await asyncio.gather(*copies)

    try:
        assert asyncio.run(main()) == 42
        assert [(root / f"f{i}.txt").read_text() for i in range(shared)] == ["late\n"] * shared
    finally:
        release.set()
        server.shutdown()


# -- remote ends through the filesystem's own bulk transfer (moto's S3 server) ------------------

from net_support import s3_server  # noqa: E402, F401


def _bucket(options: dict, name: str) -> None:
    import boto3

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **options["client_kwargs"]).create_bucket(Bucket=name)


def test_s3_uploads_in_several_parts_and_downloads_over_an_older_file_carry_the_right_bytes(
        s3_server: dict, tmp_path: Path) -> None:  # noqa: F811
    _bucket(s3_server, "parts")
    data = os.urandom(11 * 2**20 + 123)  # three 5 MiB parts: the smallest S3 takes, whatever chunk_bytes says
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    want = xxhash.xxh3_128(data).hexdigest()
    up = copy(str(src), "s3://parts/up.bin", destination_options=s3_server, chunk_bytes=2**20)
    assert up.nbytes == len(data) and list(up.checksums.values()) == [want]
    s3 = fsspec.filesystem("s3", **s3_server)
    assert s3.cat_file("parts/up.bin") == data
    landed = tmp_path / "landed.bin"
    landed.write_bytes(b"an older, longer file of that name" * 100_000)
    down = copy("s3://parts/up.bin", str(landed), source_options=s3_server)
    assert down.nbytes == len(data) and list(down.checksums.values()) == [want]
    assert landed.read_bytes() == data


def test_bulk_transfer_arguments_are_only_those_the_filesystem_takes() -> None:
    def s3_like(rpath, lpath, chunksize=None, max_concurrency=None): ...  # noqa: ANN001, ANN202
    def concurrency_only(rpath, lpath, max_concurrency=None): ...  # noqa: ANN001, ANN202
    def plain(rpath, lpath, **kwargs): ...  # noqa: ANN001, ANN202, ANN003

    assert transfer._bounded(s3_like, 2**20, 3) == {"max_concurrency": 3, "chunksize": 5 * 2**20}
    assert transfer._bounded(s3_like, 8 * 2**20, 3, size=200 * 2**30)["chunksize"] == -(-200 * 2**30 // 10_000)
    assert transfer._bounded(concurrency_only, 2**20, 1) == {"max_concurrency": 1}
    assert transfer._bounded(plain, 2**20, 1) == {}
