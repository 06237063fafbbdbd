"""Streaming file copies between any two fsspec URLs, checked after each file.

A copy moves fixed-size chunks (memory stays flat whatever the file size): between
local paths in the kernel with ``copy_file_range``, from an async remote filesystem (S3,
HTTP, GCS) to a local path through its own streamed download, from a local path to one
that uploads in concurrent parts (S3) through its own upload with a few parts in flight,
otherwise through two overlapping threads.  It then compares sizes at both ends and the checksum of the source's bytes
with the destination's (read back where the destination is local).  Errors from fsspec
backends are raised as :class:`~golem_dask.errors.TransferError` naming the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import errno
import functools
import logging
import os
import posixpath
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

from golem_dask.errors import ActivityError

logger = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK_BYTES = 8 * 2**20
#: The checksum of every file moved.  It guards against truncated or corrupted copies,
#: not against a party forging content (the provider holds the sandbox either way), so a
#: fast non-cryptographic hash fits: xxh3 runs at ~10 GB/s, SHA-256 at ~1.4 GB/s here.
CHECKSUM = "xxh3-128"
_QUEUE_DEPTH = 2
_CHECK_PIECE = 2**20
#: Copies run in threads of their own: slow ones never hold the threads that
#: ``asyncio.to_thread`` shares with payments and bookkeeping.
TRANSFER_THREADS = 8
_threads: ThreadPoolExecutor | None = None
_threads_lock = threading.Lock()


class TransferError(ActivityError):
    """A file could not be copied or did not arrive whole."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    """What a copy moved: total bytes, files, and the :data:`CHECKSUM` of each file."""

    nbytes: int
    files: int
    checksums: Mapping[str, str]


async def in_transfer_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in one of the copies' own :data:`TRANSFER_THREADS` (as
    ``asyncio.to_thread`` would, context variables included)."""
    global _threads
    with _threads_lock:
        if _threads is None:
            _threads = ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="golem-transfer")
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_threads, functools.partial(context.run, fn, *args))


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


_URL_IN_TEXT = re.compile(r"data:[^\s'\"]+|[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


def scrub_urls(text: str) -> str:
    """``text`` (an error's, say) with every URL in it as :func:`display_url` shows it:
    a signed URL's query string or credentials never leave in an error message.

    Examples
    --------
    >>> scrub_urls("400 for 'https://b.s3.amazonaws.com/k?X-Amz-Signature=abc' (https://u:p@h/x)")
    "400 for 'https://b.s3.amazonaws.com/k' (https://***@h/x)"
    """
    return _URL_IN_TEXT.sub(lambda m: display_url(m.group(0)), text)


def open_fs(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``url``; TransferError if it cannot be opened."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    except (ImportError, ValueError) as e:
        hint = " (pip install s3fs)" if url.startswith("s3://") and isinstance(e, ImportError) else ""
        raise TransferError(f"cannot open {display_url(url)}: {type(e).__name__}{hint}") from e
    return fs, path


def _checksum() -> Any:
    return xxhash.xxh3_128()


def copy_data_url(url: str, dst_fs: Any, dst: str) -> tuple[int, str]:
    """Inline ``data:`` content (small files such as certificates) written out.

    Returns the bytes written and their :data:`CHECKSUM`.
    """
    fs = fsspec.filesystem("data")
    payload = fs.cat_file(url)
    parent = posixpath.dirname(dst)
    if parent:
        dst_fs.makedirs(parent, exist_ok=True)
    with dst_fs.open(dst, "wb") as fout:
        fout.write(payload)
    digest = _checksum()
    digest.update(payload)
    return len(payload), digest.hexdigest()


def _is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def _read_exactly(f: Any, buf: memoryview) -> int:
    """Fill ``buf`` from ``f``; fewer bytes only at end of file."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _hash_behind(src: str, dst: str, copied: queue.SimpleQueue[int | None], chunk: int) -> tuple[str, str]:
    """Hash each range of ``src`` and ``dst`` as soon as the copy reports it landed.

    Runs on its own thread beside the kernel copy, so the check costs little wall time:
    the digests compare the bytes the destination really holds with the source's.
    """
    hs, hd = _checksum(), _checksum()
    # Small reads keep each piece in the CPU cache between the read and the hash.
    piece = min(chunk, _CHECK_PIECE)
    a_buf, b_buf = memoryview(bytearray(piece)), memoryview(bytearray(piece))
    with open(src, "rb", buffering=0) as a, open(dst, "rb", buffering=0) as b:
        while (n := copied.get()) is not None:
            while n > 0:
                want = min(n, piece)
                got_a = _read_exactly(a, a_buf[:want])
                got_b = _read_exactly(b, b_buf[:want])
                hs.update(a_buf[:got_a])
                hd.update(b_buf[:got_b])
                if got_a != want or got_b != want:
                    hd.update(b"short read")  # the digests can no longer agree
                    return hs.hexdigest(), hd.hexdigest()
                n -= want
    return hs.hexdigest(), hd.hexdigest()


def _open_local_for_writing(path: str, buffering: int = -1) -> Any:
    """``open(path, "wb", buffering)``, without truncating a file that is empty already.

    The sandbox creates each destination itself (by descriptor, never through a link)
    and hands over ``/proc/self/fd/N``; truncating that empty file would cost a flush on
    ext4 when it is closed (``auto_da_alloc``: a file truncated to zero and rewritten is
    written back at close), a third of a local copy's time.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return open(fd, "wb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EBADF}


def _copy_local(src: str, dst: str, chunk: int) -> tuple[int, str, str]:
    """Copy between two local paths in the kernel, checked by a hashing thread alongside.

    ``copy_file_range`` moves the bytes without passing them through Python (as ``cp``
    does); where the kernel or filesystem refuses it, a reused buffer does the copy.
    """
    copied: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    total = 0
    with open(src, "rb", buffering=0) as fin, _open_local_for_writing(dst, 0) as fout:
        with ThreadPoolExecutor(1, thread_name_prefix="golem-transfer-check") as pool:
            check = pool.submit(_hash_behind, src, dst, copied, chunk)
            try:
                kernel = hasattr(os, "copy_file_range")
                buf = None
                while True:
                    if kernel:
                        try:
                            n = os.copy_file_range(fin.fileno(), fout.fileno(), chunk)
                        except OSError as e:
                            if e.errno not in _NO_KERNEL_COPY:
                                raise
                            kernel = False
                            continue
                    else:
                        buf = buf or memoryview(bytearray(chunk))
                        n = _read_exactly(fin, buf)
                        fout.write(buf[:n])
                    if not n:
                        break
                    total += n
                    copied.put(n)
            finally:
                copied.put(None)
            source_digest, destination_digest = check.result()
    return total, source_digest, destination_digest


def _hash_file(path: str, chunk: int) -> str:
    digest = _checksum()
    buf = memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as f:
        while n := _read_exactly(f, buf):
            digest.update(buf[:n])
    return digest.hexdigest()


def _copy_stream(src_fs: Any, src: str, dst_fs: Any, dst: str, chunk: int) -> tuple[int, str]:
    """Copy through Python for remote ends: reading and writing overlap on two threads.

    At most ``_QUEUE_DEPTH + 2`` chunks are held at once, whatever the file size.
    """
    blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_DEPTH)
    failure: list[BaseException] = []

    def write() -> None:
        with (_open_local_for_writing(dst) if _is_local(dst_fs) else dst_fs.open(dst, "wb")) as fout:
            while (block := blocks.get()) is not None:
                if not failure:
                    try:
                        fout.write(block)
                    except BaseException as e:  # handed to the reading thread
                        failure.append(e)
            if failure:
                raise failure[0]

    digest = _checksum()
    nbytes = 0
    with ThreadPoolExecutor(1, thread_name_prefix="golem-transfer-write") as pool:
        writer = pool.submit(write)
        try:
            with src_fs.open(src, "rb", block_size=chunk) as fin:
                while not failure and (block := fin.read(chunk)):
                    digest.update(block)
                    blocks.put(block)
                    nbytes += len(block)
        finally:
            blocks.put(None)
        writer.result()
    return nbytes, digest.hexdigest()


#: Parts of a file in flight at once when a filesystem uploads in concurrent parts (s3fs):
#: with parts of one chunk, the memory a copy holds stays near this many chunks.
_PARTS_IN_FLIGHT = 3


#: S3's smallest part but the last, and its most parts in one upload.
_MIN_PART, _MAX_PARTS = 5 * 2**20, 10_000


def _bounded(method: Any, chunk: int, parts: int, size: int | None = None) -> dict[str, int]:
    """Keyword arguments that keep a filesystem's own bulk transfer to ``parts`` parts of
    about ``chunk`` bytes in flight, where it moves files in concurrent parts (s3fs: its
    defaults, 10 parts of 50 MiB, held ~230 MiB for a 200 MB download); only those its
    ``method`` names.  Parts are never under S3's 5 MiB, nor so small that a ``size``-byte
    file needs more than 10,000 of them."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return {}
    if "max_concurrency" not in parameters:
        return {}
    found = {"max_concurrency": parts}
    if "chunksize" in parameters:
        found["chunksize"] = max(chunk, _MIN_PART, -(-(size or 0) // _MAX_PARTS))
    return found


def _hash_growing(path: str, chunk: int, done: threading.Event) -> tuple[int, str]:
    """Hash ``path`` while another thread writes it from the start: read what has landed,
    wait a little when caught up, and read the rest once ``done`` is set.  Returns the
    bytes hashed and their checksum."""
    digest = _checksum()
    buf = memoryview(bytearray(chunk))
    hashed = 0
    while not os.path.exists(path):
        if done.is_set():
            break
        done.wait(0.001)
    with open(path, "rb", buffering=0) as f:
        while True:
            finished = done.is_set()  # before reading: the last bytes are then read below
            n = f.readinto(buf)
            if n:
                digest.update(buf[:n])
                hashed += n
            elif finished:
                return hashed, digest.hexdigest()
            else:
                done.wait(0.001)


def _get_remote(src_fs: Any, src: str, dst: str, chunk: int) -> tuple[int, str]:
    """A remote file to a local path through the filesystem's own download (S3, HTTP, GCS:
    one streamed request rather than a ranged read per chunk), hashing the bytes that landed
    as they land; the caller checks the size against the source's."""
    with contextlib.suppress(FileNotFoundError):
        os.truncate(dst, 0)  # the hashing thread must not read older bytes (dst may be /proc/self/fd/N)
    done = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="golem-transfer-hash") as pool:
        following = pool.submit(_hash_growing, dst, chunk, done)
        try:
            # One streamed request: against moto 4-5x faster than s3fs's concurrent ranges,
            # in constant memory.
            src_fs.get_file(src, dst, **_bounded(getattr(src_fs, "_get_file", None), chunk, 1))
        finally:
            done.set()
        hashed, digest = following.result()
    landed = os.path.getsize(dst)
    if hashed != landed:  # the file was replaced (written elsewhere, then renamed): hash what is there
        digest = _hash_file(dst, chunk)
    return landed, digest


def _put_remote(src: str, dst_fs: Any, dst: str, chunk: int) -> tuple[int, str]:
    """A local file to a filesystem that uploads in concurrent parts (s3fs), through its
    own upload, the source hashed meanwhile; the caller checks the size that landed.

    Raises TransferError if the source changed while it was sent (a worker still writing
    an output): the checksum would not be of the bytes sent."""
    before = os.stat(src)
    with ThreadPoolExecutor(1, thread_name_prefix="golem-transfer-hash") as pool:
        digest = pool.submit(_hash_file, src, chunk)
        dst_fs.put_file(src, dst, **_bounded(dst_fs._put_file, chunk, _PARTS_IN_FLIGHT, before.st_size))
        hashed = digest.result()
    after = os.stat(src)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise TransferError(f"{src} changed while it was copied; copy it again once it is complete")
    return before.st_size, hashed


def _staged(dst: str) -> str:
    """A hidden name beside ``dst`` that a local copy is written under before it takes
    ``dst``'s place: until then a reader sees the old file (or none), never part of the new."""
    parent, name = posixpath.split(dst)
    return posixpath.join(parent, f".{name}.{os.urandom(4).hex()}.golem-part")


def _keep_mode(old: str, new: str) -> None:
    """``new``, about to replace ``old``, gets its permissions as if written in place: an
    executable script stays executable, and set-id bits are dropped as a write drops them."""
    try:
        mode = os.stat(old).st_mode
    except FileNotFoundError:
        return
    os.chmod(new, mode & 0o777)


def copy_file(src_fs: Any, src: str, dst_fs: Any, dst: str, chunk: int = CHUNK_BYTES, *,
              remove_partial: bool = True, size: int | None = None) -> tuple[int, str]:
    """Copy one file between two open filesystems, checked by size (``size`` if the caller
    asked the source already) and :data:`CHECKSUM`.

    Returns the bytes copied and the source's checksum.  A local destination path is
    written under a hidden name and renamed over ``dst`` once checked, so a failed copy
    leaves any older file there as it was (remote stores publish an object whole anyway).
    A destination that did not arrive whole is removed unless ``remove_partial`` is false
    (the caller then removes it itself, e.g. a file it opened by descriptor in a sandbox,
    ``/proc/self/fd/N``, which is written in place).
    """
    parent = posixpath.dirname(dst)
    if parent:
        dst_fs.makedirs(parent, exist_ok=True)
    if _is_local(dst_fs) and not dst.startswith("/proc/self/fd/"):
        staged = _staged(dst)
        try:
            copied = _copy_checked(src_fs, src, dst_fs, staged, chunk, size, shown=dst)
            _keep_mode(dst, staged)
            os.replace(staged, dst)
        except BaseException:
            _remove_partial(dst_fs, staged)
            raise
        return copied
    try:
        return _copy_checked(src_fs, src, dst_fs, dst, chunk, size)
    except BaseException:
        if remove_partial:
            _remove_partial(dst_fs, dst)
        raise


def _copy_checked(src_fs: Any, src: str, dst_fs: Any, dst: str, chunk: int, size: int | None, *,
                  shown: str | None = None) -> tuple[int, str]:
    """One file copied by the fastest path the two ends allow, then checked; errors name
    the destination as ``shown`` (the file the caller asked for, not a staging name)."""
    if _is_local(src_fs) and _is_local(dst_fs):
        nbytes, digest, landed = _copy_local(src, dst, chunk)
    elif _is_local(dst_fs) and getattr(src_fs, "async_impl", False):
        nbytes, digest = _get_remote(src_fs, src, dst, chunk)
        landed = digest
    elif _is_local(src_fs) and _bounded(getattr(dst_fs, "_put_file", None), chunk, _PARTS_IN_FLIGHT):
        nbytes, digest = _put_remote(src, dst_fs, dst, chunk)
        landed = digest
    else:
        nbytes, digest = _copy_stream(src_fs, src, dst_fs, dst, chunk)
        # A local destination is read back; a remote one is checked by its size.
        landed = _hash_file(dst, chunk) if _is_local(dst_fs) else digest
    expected = size if size is not None else src_fs.size(src)
    written = dst_fs.size(dst)
    if expected is not None and nbytes != expected:
        raise TransferError(f"{src}: read {nbytes} bytes but the source has {expected}")
    if written != nbytes:
        raise TransferError(f"{shown or dst}: wrote {nbytes} bytes but the destination has {written}")
    if landed != digest:
        raise TransferError(f"{shown or dst}: the destination's {CHECKSUM} checksum differs from the source's")
    return nbytes, digest


def _remove_partial(fs: Any, path: str) -> None:
    """A file that did not arrive whole is removed, so nothing mistakes it for the real one."""
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except Exception as e:  # the copy's own error is the one to report
        logger.warning("could not remove the partial copy %s: %s", display_url(path), type(e).__name__)


@contextlib.contextmanager
def transfer_errors(source: str, destination: str) -> Iterator[None]:
    """Translate fsspec backends' errors into TransferError naming both URLs (without credentials).

    fsspec backends raise a zoo of errors (FileNotFoundError, ClientError, aiohttp errors
    wrapped in OSError); the URL is what the user needs.
    """
    try:
        yield
    except TransferError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise TransferError(
            f"copying {display_url(source)} -> {display_url(destination)} failed: {type(e).__name__}: {e}"
        ) from e


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
    dst_fs, dst = open_fs(destination, destination_options)
    hashes: dict[str, str] = {}
    total = 0
    if source.startswith("data:"):
        try:
            n, h = copy_data_url(source, dst_fs, dst)
        except (OSError, ValueError) as e:
            raise TransferError(f"writing inline data to {display_url(destination)} failed: {type(e).__name__}") from e
        return TransferResult(nbytes=n, files=1, checksums={dst: h})
    src_fs, src = open_fs(source, source_options)
    with transfer_errors(source, destination):
        if src_fs.isdir(src):
            base = src.rstrip("/")
            for path in sorted(src_fs.find(base)):
                rel = posixpath.relpath(path, base)
                target = posixpath.join(dst.rstrip("/"), rel)
                n, h = copy_file(src_fs, path, dst_fs, target, chunk_bytes)
                total += n
                hashes[target] = h
        else:
            try:  # one request answers both whether it exists and its size
                size = src_fs.size(src)
            except FileNotFoundError:
                raise TransferError(f"{display_url(source)} does not exist") from None
            target = posixpath.join(dst, posixpath.basename(src)) if destination.endswith("/") else dst
            n, h = copy_file(src_fs, src, dst_fs, target, chunk_bytes, size=size)
            total += n
            hashes[target] = h
    return TransferResult(nbytes=total, files=len(hashes), checksums=hashes)
