"""Files into and out of an activity's sandbox, without following what the worker made.

The sandbox (``/golem`` for the requestor, a directory of the provider's on the host) is
shared with the worker, which may have made anything there: a symlink
``/golem/output/x -> /etc/shadow`` (the provider would upload its own file), a symlink
``/golem/input -> /etc`` (the next transfer would write into the host's ``/etc``), a
FIFO that blocks whoever opens it, and may swap a file for a symlink while a transfer
runs.  So no path in the sandbox is ever resolved by name from the host's ``/``:

* every directory is opened from the sandbox root's descriptor, one component at a time,
  with ``O_NOFOLLOW | O_DIRECTORY`` (a symlink anywhere on the way is refused);
* a file is opened (or, for writing, created anew after unlinking what was there) with
  ``O_NOFOLLOW`` relative to its directory's descriptor, and must be a regular file;
* the copy (:func:`golem_dask.transfer.copy_file`, kernel copies and checks unchanged)
  is handed ``/proc/self/fd/N``, which reaches that very file whatever happens to its
  name meanwhile;
* a directory output is walked with :func:`os.fwalk` (``follow_symlinks=False``):
  symlinks and other non-regular files in it are **skipped**, and named in the
  transfer's result line, so a stray link does not fail a whole output collection.

``..`` is refused in every path, and ``/golem/.golem`` (the entry script and its order
pipe) is reserved for the provider.  A file that did not arrive whole is removed (by its
name in its directory's descriptor, and only if it is still the file this copy made).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golem_dask.errors import ActivityError
from golem_dask.provider.runtime.policy import TransferPolicy
from golem_dask.transfer import (
    CHUNK_BYTES,
    TransferError,
    TransferResult,
    copy_data_url,
    copy_file,
    display_url,
    transfer_errors,
)

logger = logging.getLogger(__name__)

#: Where an activity's files live, as the requestor names them (inside a container).
SANDBOX = "/golem"
#: In the sandbox, reserved for the provider: the worker's entry script and its order pipe.
CONTROL_DIR = ".golem"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang us
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)

Owner = tuple[int, int]


class SandboxError(ActivityError):
    """A sandbox path is outside the sandbox, reserved, or leads through a symlink."""


def sandbox_parts(path: str) -> list[str]:
    """The components of ``/golem/...`` below the sandbox root.

    Examples
    --------
    >>> sandbox_parts("/golem/input/a.csv"), sandbox_parts("/golem/output/")
    (['input', 'a.csv'], ['output'])
    >>> sandbox_parts("/golem/input/../../etc/passwd")
    Traceback (most recent call last):
    ...
    golem_dask.provider.runtime.sandbox.SandboxError: '/golem/input/../../etc/passwd' is outside the activity's sandbox /golem/
    """
    parts = path.split("/")
    if parts[:2] != ["", "golem"] or ".." in parts:
        raise SandboxError(f"{path!r} is outside the activity's sandbox {SANDBOX}/")
    return [p for p in parts[2:] if p not in ("", ".")]


def is_reserved(parts: Sequence[str]) -> bool:
    """Whether a sandbox path is in (or names) the provider's control directory."""
    return bool(parts) and parts[0].startswith(CONTROL_DIR)


def _link_refused(path: str, e: OSError) -> SandboxError:
    return SandboxError(f"{path} leads through a symlink or a non-directory in the sandbox; "
                        f"transfers never follow links the worker made ({errno.errorcode.get(e.errno or 0, e)})")


def open_dir(root: Path, parts: Sequence[str], path: str, *, create: bool = False, owner: Owner | None = None) -> int:
    """A descriptor of the sandbox directory ``parts`` (``path`` names it in errors).

    Each component is opened from its parent's descriptor with ``O_NOFOLLOW``; missing ones
    are made (``create``) and given to ``owner`` (the worker's uid and gid).
    """
    fd = os.open(root, _DIR)
    try:
        for name in parts:
            made = False
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            child = _open_beneath(name, _DIR, fd, path)
            os.close(fd)
            fd = child
            if made and owner is not None:
                os.fchown(fd, *owner)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_beneath(name: str, flags: int, dir_fd: int, path: str) -> int:
    """``os.open(name, flags, dir_fd=dir_fd)`` (flags carry O_NOFOLLOW), its failures named by ``path``."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise TransferError(f"{path} does not exist") from None
    except OSError as e:
        if e.errno in _LINK_ERRNOS:
            raise _link_refused(path, e) from e
        raise


def _open_regular(dir_fd: int, name: str, path: str) -> int:
    """``name`` in ``dir_fd`` opened for reading: a regular file, never through a symlink."""
    fd = _open_beneath(name, _READ, dir_fd, path)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SandboxError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


@dataclass
class _NewFile:
    """A file this transfer created in a sandbox directory; removed if it did not arrive whole."""

    dir_fd: int
    name: str
    fd: int

    @property
    def proc_path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.name, dir_fd=self.dir_fd)


def _create(dir_fd: int, name: str, path: str, owner: Owner | None) -> _NewFile:
    """A new, empty regular file ``name`` in ``dir_fd``, replacing what was there (never writing through it)."""
    try:
        os.unlink(name, dir_fd=dir_fd)  # unlink never follows: a symlink goes, its target stays
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise SandboxError(f"{path} is a directory; name a file, or end the path with / to copy into it") from None
    try:
        fd = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        raise SandboxError(f"{path} was re-created by the worker during the transfer; not written") from None
    if owner is not None:
        os.fchown(fd, *owner)
    return _NewFile(dir_fd, name, fd)


@dataclass
class _Tally:
    """What a sandbox transfer moved, and what it left out."""

    nbytes: int = 0
    checksums: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def result(self) -> TransferResult:
        return TransferResult(nbytes=self.nbytes, files=len(self.checksums), checksums=self.checksums)


@contextlib.contextmanager
def _closing(*fds: int) -> Iterator[None]:
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)


class _Writer:
    """Creates files under one sandbox directory (``base``), making subdirectories as needed."""

    def __init__(self, root: Path, base: Sequence[str], owner: Owner | None) -> None:
        self.root, self.base, self.owner = root, list(base), owner

    def write(self, rel: Sequence[str], fill: Any) -> tuple[int, str]:
        """Create ``base/rel`` and fill it with ``fill(path)``; removes it if that fails.

        ``rel`` comes from the source (e.g. S3 keys below a prefix): ``..`` and empty
        components are refused, not normalised.
        """
        shown = "/".join([SANDBOX, *self.base, *rel])
        if not rel or any(p in ("", ".", "..") for p in rel):
            raise SandboxError(f"{shown}: the source names a path that is not in the sandbox")
        dir_fd = open_dir(self.root, [*self.base, *rel[:-1]], shown, create=True, owner=self.owner)
        with _closing(dir_fd):
            new = _create(dir_fd, rel[-1], shown, self.owner)
            with _closing(new.fd):
                try:
                    return fill(new.proc_path)  # type: ignore[no-any-return]
                except BaseException:
                    new.remove()
                    raise


def copy_into(root: Path, source: str, destination: str, options: Mapping[str, Any] | None,
              policy: TransferPolicy, owner: Owner | None = None, chunk: int = CHUNK_BYTES) -> TransferResult:
    """Copy the URL ``source`` (a file or a tree) to ``destination`` (``/golem/...``) in ``root``.

    A destination ending in ``/`` is a directory: the source keeps its name inside it.
    ``owner``: the uid and gid that get the files and directories made (the worker's).

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> copy_into(root, "data:,hello", "/golem/tls/ca.pem", None, TransferPolicy.trusting()).nbytes
    5
    >>> os.symlink("/etc", root / "tls" / "etc")  # what a worker could make
    >>> copy_into(root, "data:,x", "/golem/tls/etc/passwd", None, TransferPolicy.trusting())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    golem_dask.provider.runtime.sandbox.SandboxError: /golem/tls/etc/passwd leads through a symlink ...
    """
    parts = sandbox_parts(destination)
    if is_reserved(parts):
        raise SandboxError(f"{destination!r} is reserved for the provider; write elsewhere under {SANDBOX}/")
    into_dir = destination.endswith("/") or not parts
    local = _local_fs()
    tally = _Tally()
    if source.startswith("data:"):
        policy.prepare(source, options)
        if into_dir:
            raise SandboxError(f"{destination}: inline data has no name; give the file's path")
        try:
            n, h = _Writer(root, parts[:-1], owner).write(parts[-1:], lambda p: copy_data_url(source, local, p))
        except (OSError, ValueError) as e:
            raise TransferError(f"writing inline data to {destination} failed: {type(e).__name__}") from e
        tally.nbytes, tally.checksums[destination] = n, h
        return tally.result()
    src_fs, src = policy.open(source, options)
    with transfer_errors(source, destination):
        if not src_fs.exists(src):
            raise TransferError(f"{display_url(source)} does not exist")
        if src_fs.isdir(src):  # a tree lands in the destination, named or not with a /
            base = src.rstrip("/")
            writer = _Writer(root, parts, owner)
            files = [(path, posixpath.relpath(path, base).split("/")) for path in sorted(src_fs.find(base))]
        elif into_dir:
            writer, files = _Writer(root, parts, owner), [(src, [posixpath.basename(src)])]
        else:
            writer, files = _Writer(root, parts[:-1], owner), [(src, parts[-1:])]
        for path, rel in files:
            n, h = writer.write(rel, lambda p, path=path: copy_file(src_fs, path, local, p, chunk, remove_partial=False))
            tally.nbytes += n
            tally.checksums["/".join([SANDBOX, *writer.base, *rel])] = h
    return tally.result()


def _walk_files(top_fd: int, skipped: list[str]) -> Iterator[tuple[list[str], int, str]]:
    """``(relative parts, directory fd, name)`` of every regular file below ``top_fd``.

    Symlinks (to files or directories) and other non-regular files are left out and
    their relative paths appended to ``skipped``.
    """
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=top_fd, follow_symlinks=False):
        prefix = [p for p in dirpath.split("/") if p not in ("", ".")]
        for name in list(dirnames):
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    dirnames.remove(name)
                    skipped.append("/".join([*prefix, name]))
        dirnames.sort()
        for name in sorted(filenames):
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                skipped.append("/".join([*prefix, name]))
                continue
            yield [*prefix, name], dir_fd, name


def copy_out_of(root: Path, source: str, destination: str, options: Mapping[str, Any] | None,
                policy: TransferPolicy, chunk: int = CHUNK_BYTES) -> tuple[TransferResult, list[str]]:
    """Copy ``source`` (``/golem/...``, a file or a tree) in ``root`` to the URL ``destination``.

    Returns what was copied and the sandbox paths skipped (symlinks, FIFOs, sockets).

    Examples
    --------
    >>> import tempfile
    >>> root, out = Path(tempfile.mkdtemp()), tempfile.mkdtemp()
    >>> (root / "output").mkdir()
    >>> _ = (root / "output" / "result.csv").write_text("a,b\\n")
    >>> os.symlink("/etc/passwd", root / "output" / "leak")  # what a worker could make
    >>> result, skipped = copy_out_of(root, "/golem/output/", out + "/", None, TransferPolicy.trusting())
    >>> result.files, skipped, sorted(os.listdir(out))
    (1, ['leak'], ['result.csv'])
    """
    parts = sandbox_parts(source)
    dst_fs, dst = policy.open(destination, options, writing=True)
    local = _local_fs()
    tally = _Tally()
    with transfer_errors(source, destination):
        parent_fd = open_dir(root, parts[:-1], source)
        with _closing(parent_fd):
            try:
                kind = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False).st_mode if parts else stat.S_IFDIR
            except FileNotFoundError:
                raise TransferError(f"{source} does not exist") from None
            if stat.S_ISDIR(kind):
                top_fd = os.open(parts[-1], _DIR, dir_fd=parent_fd) if parts else os.dup(parent_fd)
                with _closing(top_fd):
                    for rel, dir_fd, name in _walk_files(top_fd, tally.skipped):
                        shown = posixpath.join(source.rstrip("/"), *rel)
                        fd = _open_regular_or_skip(dir_fd, name, shown, tally)
                        if fd is None:
                            continue
                        with _closing(fd):
                            target = posixpath.join(dst.rstrip("/"), *rel)
                            n, h = copy_file(local, f"/proc/self/fd/{fd}", dst_fs, target, chunk)
                        tally.nbytes += n
                        tally.checksums[target] = h
            else:
                fd = _open_regular(parent_fd, parts[-1], source)
                with _closing(fd):
                    target = posixpath.join(dst, parts[-1]) if destination.endswith("/") else dst
                    n, h = copy_file(local, f"/proc/self/fd/{fd}", dst_fs, target, chunk)
                tally.nbytes += n
                tally.checksums[target] = h
    if tally.skipped:
        logger.warning("transfer of %s skipped %d symlinks or special files: %s", source, len(tally.skipped),
                       ", ".join(tally.skipped[:10]))
    return tally.result(), tally.skipped


def _open_regular_or_skip(dir_fd: int, name: str, shown: str, tally: _Tally) -> int | None:
    """A file found by the walk, or None (and noted) if the worker swapped it for a link meanwhile."""
    try:
        return _open_regular(dir_fd, name, shown)
    except (SandboxError, TransferError):
        tally.skipped.append(shown)
        return None


def _local_fs() -> Any:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()
