"""Streaming file copies between any two fsspec URLs, checked after each file.

A copy reads and writes in fixed-size chunks (memory stays flat whatever the file
size), hashes what it wrote, and compares the size at the destination with the source's
before it reports success.  Errors from fsspec backends are raised as
:class:`~golem_dask.errors.TransferError` naming the URL.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from golem_dask.errors import ActivityError

CHUNK_BYTES = 8 * 2**20


class TransferError(ActivityError):
    """A file could not be copied or did not arrive whole."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a copy moved: total bytes, files, and the SHA-256 of each file."""

    nbytes: int
    files: int
    sha256: Mapping[str, str]


def display_url(url: str) -> str:
    """A URL fit for logs and errors: inline data, credentials and query strings left out.

    Examples
    --------
    >>> display_url("s3://key:secret@bucket/data.csv?token=x")
    's3://***@bucket/data.csv'
    >>> display_url("data:application/octet-stream;base64,AAAA")
    'data:(41 characters)'
    """
    if url.startswith("data:"):
        return f"data:({len(url)} characters)"
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}".split("?", 1)[0]


def _open_fs(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    except (ImportError, ValueError) as e:
        hint = " (pip install s3fs)" if url.startswith("s3://") and isinstance(e, ImportError) else ""
        raise TransferError(f"cannot open {display_url(url)}: {type(e).__name__}{hint}") from e
    return fs, path


def _copy_data_url(url: str, dst_fs: Any, dst: str) -> tuple[int, str]:
    """Inline ``data:`` content (small files such as certificates) written out."""
    fs = fsspec.filesystem("data")
    payload = fs.cat_file(url)
    parent = posixpath.dirname(dst)
    if parent:
        dst_fs.makedirs(parent, exist_ok=True)
    with dst_fs.open(dst, "wb") as fout:
        fout.write(payload)
    return len(payload), hashlib.sha256(payload).hexdigest()


def _copy_file(src_fs: Any, src: str, dst_fs: Any, dst: str, chunk: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    nbytes = 0
    parent = posixpath.dirname(dst)
    if parent:
        dst_fs.makedirs(parent, exist_ok=True)
    with src_fs.open(src, "rb", block_size=chunk) as fin, dst_fs.open(dst, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
            nbytes += len(block)
    expected = src_fs.size(src)
    written = dst_fs.size(dst)
    if expected is not None and nbytes != expected:
        raise TransferError(f"{src}: read {nbytes} bytes but the source has {expected}")
    if written != nbytes:
        raise TransferError(f"{dst}: wrote {nbytes} bytes but the destination has {written}")
    return nbytes, digest.hexdigest()


def copy(
    source: str,
    destination: str,
    *,
    source_options: Mapping[str, Any] | None = None,
    destination_options: Mapping[str, Any] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> TransferResult:
    """Copy a file or a directory tree from ``source`` to ``destination``.

    A destination ending in ``/`` is a directory: the source keeps its name inside it.
    Credentials go in ``source_options`` / ``destination_options`` (fsspec
    ``storage_options``); they are never logged.

    Examples
    --------
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "a.txt"), "w").write("hello")
    >>> copy(os.path.join(d, "a.txt"), os.path.join(d, "out") + "/").nbytes
    5
    """
    dst_fs, dst = _open_fs(destination, destination_options)
    hashes: dict[str, str] = {}
    total = 0
    if source.startswith("data:"):
        try:
            n, h = _copy_data_url(source, dst_fs, dst)
        except (OSError, ValueError) as e:
            raise TransferError(f"writing inline data to {display_url(destination)} failed: {type(e).__name__}") from e
        return TransferResult(nbytes=n, files=1, sha256={dst: h})
    src_fs, src = _open_fs(source, source_options)
    try:
        if not src_fs.exists(src):
            raise TransferError(f"{display_url(source)} does not exist")
        if src_fs.isdir(src):
            base = src.rstrip("/")
            for path in sorted(src_fs.find(base)):
                rel = posixpath.relpath(path, base)
                target = posixpath.join(dst.rstrip("/"), rel)
                n, h = _copy_file(src_fs, path, dst_fs, target, chunk_bytes)
                total += n
                hashes[target] = h
        else:
            target = posixpath.join(dst, posixpath.basename(src)) if destination.endswith("/") else dst
            n, h = _copy_file(src_fs, src, dst_fs, target, chunk_bytes)
            total += n
            hashes[target] = h
    except TransferError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        # fsspec backends raise a zoo of errors (FileNotFoundError, ClientError,
        # aiohttp errors wrapped in OSError); the URL is what the user needs.
        raise TransferError(
            f"copying {display_url(source)} -> {display_url(destination)} failed: {type(e).__name__}: {e}"
        ) from e
    return TransferResult(nbytes=total, files=len(hashes), sha256=hashes)
