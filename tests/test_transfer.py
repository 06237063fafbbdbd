"""Streaming copies between fsspec URLs, and the sandbox they land in."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from golem_dask.errors import ActivityError
from golem_dask.provider.runtime.base import sandbox_path, transfer_into_sandbox
from golem_dask.transfer import TransferError, copy, display_url


def test_file_copy_checks_size_and_hash(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 17)
    (tmp_path / "a.bin").write_bytes(data)
    result = copy(str(tmp_path / "a.bin"), f"file://{tmp_path}/out/", chunk_bytes=2**20)
    assert (tmp_path / "out" / "a.bin").read_bytes() == data
    assert result.nbytes == len(data) and result.files == 1
    assert list(result.sha256.values()) == [hashlib.sha256(data).hexdigest()]


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
    root = tmp_path / "sandbox"
    root.mkdir()
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")
    line = asyncio.run(transfer_into_sandbox(root, f"file://{tmp_path}/in.csv", "/golem/input/in.csv"))
    assert (root / "input" / "in.csv").read_text() == "a,b\n1,2\n" and "8 bytes" in line
    (root / "output").mkdir()
    (root / "output" / "r.txt").write_text("done")
    asyncio.run(transfer_into_sandbox(root, "/golem/output/", f"file://{tmp_path}/results/"))
    assert (tmp_path / "results" / "r.txt").read_text() == "done"
    with pytest.raises(ActivityError, match="exactly one side"):
        asyncio.run(transfer_into_sandbox(root, "/golem/a", "/golem/b"))
