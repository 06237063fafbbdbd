"""Worker images that hold the requestor's environment.

Dask refuses to mix versions between client, scheduler and workers, and users' images
drift from their environments.  ``golem-dask image build`` makes an image on this machine
from wheels downloaded here (pip inside a container may not reach or trust the package
index): every distribution installed in this environment at its exact version (local
projects built as wheels; ``--exclude`` leaves some out, ``--requirements FILE`` gives the
list instead), with Python, dask and distributed pinned to this client's.  Two labels
record it: the versions dask insists on, which :func:`check_image` compares before any
negotiation (a mismatch is refused), and the whole environment with its hash, which it
compares too (a package that differs is named, before a task that imports it fails on a
worker).

Without a base image it makes one: ``debootstrap --variant=minbase`` of Debian bookworm
(Python 3.11) imported with ``docker import``.

For the Golem network's providers, which run VMs, ``golem-dask image build --gvmi``
converts the worker image to a GVMI file (:func:`build_gvmi`) and prints the package
reference a demand carries; the user serves the file over HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from golem_dask.errors import ConfigError

logger = logging.getLogger(__name__)

#: What the base image installs from Debian: Python, and the OpenMP runtime that wheels
#: such as LightGBM's and XGBoost's load from the system.
BASE_PACKAGES = ("python3", "python3-venv", "libgomp1")
#: Named after its packages, so a base from an older list is not reused.
BASE_TAG = "golem-dask-base:bookworm-" + "-".join(p for p in BASE_PACKAGES if not p.startswith("python3"))
VERSIONS_LABEL = "golem-dask.versions"
ENVIRONMENT_LABEL = "golem-dask.environment"
#: Distributions never copied into a worker image: golem-dask itself and the Golem daemon
#: (a worker needs neither), and the installers the image's venv brings its own of.
NOT_FOR_WORKERS = frozenset({"golem-dask", "golem-node", "pip", "setuptools", "wheel"})
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: Packages a worker needs beside dask and distributed, pinned to this machine's versions
#: (those not installed here are left out: dask warns when client and workers differ).
WORKER_PACKAGES = (
    "numpy", "pandas", "pyarrow", "cloudpickle", "msgpack", "toolz", "tornado",
    # Optional accelerators dask uses when the client has them: graphs pickled by the
    # client then refer to them, and a worker without them cannot load its tasks.
    "cytoolz", "lz4", "zstandard", "bokeh",
)


def client_versions() -> dict[str, str]:
    """The versions a worker image must match: Python major.minor, dask, distributed.

    Examples
    --------
    >>> sorted(client_versions())
    ['dask', 'distributed', 'python']
    """
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "dask": importlib.metadata.version("dask"),
        "distributed": importlib.metadata.version("distributed"),
    }


def default_tag() -> str:
    """``golem-dask-worker:py3.11-dask2026.8.0``: the image this client can use."""
    v = client_versions()
    return f"golem-dask-worker:py{v['python']}-dask{v['dask']}"


def mismatches(image_versions: Mapping[str, str], wanted: Mapping[str, str] | None = None, *,
               where: str = "here", what: str = "the image") -> list[str]:
    """What differs between an image's label and this client (or ``wanted``).

    ``what`` names the image's side and ``where`` the wanted side in the messages.

    Examples
    --------
    >>> mismatches({"python": "3.11", "dask": "2024.1.0"}, {"python": "3.11", "dask": "2026.8.0"},
    ...            where="for the requestor")
    ['dask 2024.1.0 in the image != 2026.8.0 for the requestor']
    """
    wanted = wanted or client_versions()
    return [
        f"{name} {image_versions.get(name, 'unknown')} in {what} != {version} {where}"
        for name, version in wanted.items()
        if image_versions.get(name) != version
    ]


def image_versions(image: Any) -> dict[str, str]:
    """The versions an image's :data:`VERSIONS_LABEL` names (``image``: a docker SDK image).

    Raises ConfigError if the label is missing or malformed.
    """
    raw = (image.labels or {}).get(VERSIONS_LABEL)
    tag = (image.tags or [image.short_id])[0]
    if raw is None:
        raise ConfigError(
            f"image {tag} has no {VERSIONS_LABEL} label, so its dask version is unknown; "
            "build one with 'golem-dask image build --base <image>'"
        )
    try:
        versions = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"image {tag} has a malformed {VERSIONS_LABEL} label: {raw!r}") from e
    if not isinstance(versions, dict):
        raise ConfigError(f"image {tag} has a malformed {VERSIONS_LABEL} label: {raw!r}")
    return {str(k): str(v) for k, v in versions.items()}


def check_image(image: Any) -> list[str]:
    """Refuse an image whose label says it runs other versions than this client; return
    the packages of this environment it holds at another version or not at all.

    ``image`` is a docker SDK image object.  Raises ConfigError naming the versions.
    """
    tag = (image.tags or [image.short_id])[0]
    wrong = mismatches(image_versions(image))
    if wrong:
        raise ConfigError(
            f"image {tag} does not match this client: {'; '.join(wrong)}. "
            "Rebuild it with 'golem-dask image build' so workers and client agree"
        )
    raw = (image.labels or {}).get(ENVIRONMENT_LABEL)
    try:
        recorded = json.loads(raw) if raw else {}
        held = {canonical(str(k)): str(v) for k, v in dict(recorded.get("packages") or {}).items()}
    except (ValueError, TypeError, AttributeError):
        held = {}
    if not isinstance(recorded, dict) or recorded.get("excluded") is None:
        return []  # built from a requirements file (or before environments were recorded)
    here = client_environment(recorded["excluded"])
    if recorded.get("hash") == environment_hash(here):
        return []
    return environment_differences(held, here)


def canonical(name: str) -> str:
    """A distribution's name as the package index compares it (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _mtime(folder: str) -> float:
    try:
        return os.stat(folder or ".").st_mtime
    except OSError:
        return 0.0


def _installed() -> tuple[tuple[str, str, Path | None], ...]:
    """``(name, version, local folder or None)`` of every distribution importable here.  Read
    once per state of ``sys.path``'s folders: installing or removing a package changes its
    folder's mtime, so a cluster started after ``pip install`` sees it."""
    return _scan(tuple((folder, _mtime(folder)) for folder in sys.path))


@functools.lru_cache(maxsize=4)
def _scan(path_state: tuple[tuple[str, float], ...]) -> tuple[tuple[str, str, Path | None], ...]:
    found: dict[str, tuple[str, Path | None]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or canonical(name) in found:  # the first on sys.path is the one imported
            continue
        folder = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            url = json.loads(dist.read_text("direct_url.json") or "null")
            if "dir_info" in url and str(url.get("url", "")).startswith("file://"):
                folder = Path(urllib.parse.unquote(urllib.parse.urlparse(url["url"]).path))
        found[canonical(name)] = (dist.version, folder)
    return tuple(sorted((name, version, folder) for name, (version, folder) in found.items()))


def _skipped(exclude: Iterable[str]) -> frozenset[str]:
    return NOT_FOR_WORKERS | {canonical(n) for n in exclude}


def client_environment(exclude: Iterable[str] = ()) -> dict[str, str]:
    """The distributions installed here, name -> version, as a worker image should hold
    them (without :data:`NOT_FOR_WORKERS` and ``exclude``)."""
    skip = _skipped(exclude)
    return {name: version for name, version, _ in _installed() if name not in skip}


def local_projects(exclude: Iterable[str] = ()) -> dict[str, Path]:
    """Distributions installed here from a local folder (editable or not): name -> folder.
    The package index does not have them; the image gets wheels built from the folders."""
    skip = _skipped(exclude)
    return {name: folder for name, _, folder in _installed() if folder is not None and name not in skip}


def environment_hash(packages: Mapping[str, str]) -> str:
    """A short hash of ``name==version`` pins (equal environments, equal hashes)."""
    pins = "\n".join(f"{canonical(n)}=={v}" for n, v in sorted(packages.items(), key=lambda p: canonical(p[0])))
    return hashlib.sha256(pins.encode()).hexdigest()[:16]


def environment_differences(image: Mapping[str, str], here: Mapping[str, str]) -> list[str]:
    """The packages installed ``here`` that ``image`` holds at another version or lacks.

    >>> environment_differences({"numpy": "2.0.0"}, {"numpy": "2.1.0", "s3fs": "2026.9.0"})
    ['numpy 2.0.0 in the image, 2.1.0 here', 's3fs (not in the image)']
    """
    out = []
    for name, version in here.items():
        got = image.get(name)
        if got is None:
            out.append(f"{name} (not in the image)")
        elif got != version:
            out.append(f"{name} {got} in the image, {version} here")
    return out


def wheel_pins(folder: Path) -> dict[str, str]:
    """name -> version of the wheels in ``folder`` (what a ``--no-index`` install gets)."""
    from packaging.utils import parse_wheel_filename

    pins = {}
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        pins[canonical(str(name))] = str(version)
    return dict(sorted(pins.items()))


def _run(cmd: Sequence[str], log: Callable[[str], None], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(cmd))
    result = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise ConfigError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def _image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def build_base(log: Callable[[str], None] = print, mirror: str = DEBIAN_MIRROR) -> str:
    """Make the minimal Debian base image with Python (skipped if it exists)."""
    if _image_exists(BASE_TAG):
        return BASE_TAG
    if shutil.which("debootstrap") is None:
        raise ConfigError("building the base image needs debootstrap: apt-get install debootstrap "
                          "(or pass --base with an image that has python3 and python3-venv)")
    with tempfile.TemporaryDirectory(prefix="golem-rootfs-") as root:
        _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), "bookworm", root, mirror], log)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        try:
            _run(["docker", "import", "-", BASE_TAG], log, stdin=tar.stdout)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
    return BASE_TAG


def _requirements(extra: Sequence[str], requirements: Path | None, exclude: Sequence[str], wheels: Path,
                  log: Callable[[str], None]) -> list[str]:
    """pip arguments for what the image holds: this environment's pins (local projects
    built as wheels into ``wheels``), or ``requirements`` with the worker's essentials;
    dask and distributed always at this client's versions; ``extra`` as well."""
    reqs = [f"{name}=={version}" for name, version in client_versions().items() if name != "python"]
    if requirements is not None:
        for name in WORKER_PACKAGES:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                reqs.append(f"{name}=={importlib.metadata.version(name)}")
        reqs += ["-r", str(Path(requirements).resolve())]
    else:
        local = local_projects(exclude)
        for folder in local.values():
            _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(folder)], log)
        reqs += [f"{name}=={version}" for name, version in client_environment(exclude).items()
                 if name not in local and name not in ("dask", "distributed")]
    for name in extra:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def build(tag: str | None = None, base: str | None = None, extra_packages: Sequence[str] = (),
          log: Callable[[str], None] = print, *, requirements: Path | None = None,
          exclude: Sequence[str] = ()) -> str:
    """Build a worker image holding this environment; returns its tag.

    Parameters
    ----------
    requirements:
        A pip requirements file to install instead of this environment's distributions
        (dask, distributed and the worker's essentials stay pinned to this client's).
    exclude:
        Distributions of this environment to leave out (beside :data:`NOT_FOR_WORKERS`).

    Examples
    --------
    With a Docker engine (this is ``golem-dask image build``)::

        tag = build()   # e.g. 'golem-dask-worker:py3.11-dask2026.8.0'
    """
    tag = tag or default_tag()
    base = base or build_base(log)
    versions = client_versions()
    probe = _run(["docker", "run", "--rm", "--network", "none", base, "python3", "-c",
                  "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"], log)
    if probe.stdout.strip() != versions["python"]:
        raise ConfigError(f"base image {base} has Python {probe.stdout.strip()}, this client runs "
                          f"{versions['python']}; pick a base with the same Python")
    with tempfile.TemporaryDirectory(prefix="golem-image-") as ctx:
        wheels = Path(ctx) / "wheels"
        wheels.mkdir()
        reqs = _requirements(extra_packages, requirements, exclude, wheels, log)
        try:
            _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--find-links", str(wheels),
                  "-d", str(wheels), *reqs], log)
        except ConfigError as e:
            raise ConfigError(f"{e}\nLeave a package out with 'golem-dask image build --exclude NAME', or list "
                              "what workers need with --requirements FILE") from None
        pins = wheel_pins(wheels)
        environment = {"hash": environment_hash(pins), "packages": pins,
                       "excluded": sorted(canonical(n) for n in exclude) if requirements is None else None}
        (Path(ctx) / "Dockerfile").write_text(
            f"FROM {base}\n"
            "COPY wheels /tmp/wheels\n"
            "RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-index --no-cache-dir --no-deps "
            "/tmp/wheels/*.whl && rm -rf /tmp/wheels\n"
            "ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1\n"
            f"LABEL {VERSIONS_LABEL}='{json.dumps(versions, sort_keys=True)}'\n"
            f"LABEL {ENVIRONMENT_LABEL}='{json.dumps(environment, sort_keys=True)}'\n"
        )
        _run(["docker", "build", "--network", "none", "-t", tag, ctx], log)
    check = _run(["docker", "run", "--rm", "--network", "none", tag, "python", "-c",
                  "import dask, distributed, json, sys; print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
                  "'dask': dask.__version__, 'distributed': distributed.__version__}))"], log)
    wrong = mismatches(json.loads(check.stdout.strip().splitlines()[-1]), versions)
    if wrong:
        raise ConfigError(f"built {tag} but it runs other versions: {'; '.join(wrong)}")
    log(f"built {tag}: {versions}, {len(pins)} packages (environment {environment['hash']})")
    return tag


# -- VM images for the Golem network (GolemCluster(market="yagna")) --------------------

#: The compression Golem's VM runtime reads (it does not read zstd).
GVMI_COMPRESSION = "lzo"


@dataclass(frozen=True)
class VmImage:
    """A worker image converted for Golem's VM runtime, and how a demand names it."""

    path: Path
    sha3: str

    def reference(self, url: str) -> str:
        """``hash:sha3:<sha3-224>:<url>``, the ``golem.srv.comp.task_package`` of a demand;
        ``url`` ending in ``/`` is a folder the file is served from."""
        return f"hash:sha3:{self.sha3}:{url + self.path.name if url.endswith('/') else url}"


def build_gvmi(tag: str | None = None, output: Path | None = None, log: Callable[[str], None] = print) -> VmImage:
    """Convert the docker image ``tag`` (default: this client's worker image) to a GVMI.

    A GVMI is the image's filesystem as squashfs (``mksquashfs``, from squashfs-tools),
    followed by the image's config as JSON, preceded by its CRC-32 (4 bytes, little endian)
    and followed by its length (8 decimal digits): what the VM runtime reads.  Needs a
    Docker engine and root (the files keep their owners).
    """
    tag = tag or default_tag()
    if shutil.which("mksquashfs") is None:
        raise ConfigError("building a VM image needs mksquashfs: apt-get install squashfs-tools")
    if not _image_exists(tag):
        raise ConfigError(f"no docker image {tag}: build it first with 'golem-dask image build'")
    config = json.loads(_run(["docker", "image", "inspect", tag], log).stdout)[0]["Config"]
    output = Path(output or f"{tag.replace('/', '-').replace(':', '-')}.gvmi").resolve()
    container = _run(["docker", "create", tag, "/bin/sh"], log).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="golem-gvmi-") as root:
            export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
            try:
                _run(["tar", "-x", "--numeric-owner", "-C", root], log, stdin=export.stdout)
            finally:
                if export.stdout is not None:
                    export.stdout.close()
                if export.wait() != 0:
                    raise ConfigError(f"docker export of {tag} failed")
            _run(["mksquashfs", root, str(output), "-comp", GVMI_COMPRESSION, "-noappend", "-quiet",
                  "-no-progress"], log)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
    config["Domainname"] = ""
    config.pop("User", None)
    body = json.dumps(config, separators=(",", ":")).encode()
    with output.open("ab") as f:
        f.write(zlib.crc32(body).to_bytes(4, "little") + body + f"{len(body):08d}".encode())
    image = VmImage(output, _sha3_224(output))
    log(f"built {output} ({output.stat().st_size} bytes) from {tag}")
    return image


def gvmi_config(path: Path) -> dict[str, Any]:
    """The image config at the end of a GVMI, its CRC checked.

    Raises
    ------
    ConfigError
        If the file ends in no well-formed config.
    """
    data = Path(path).read_bytes()
    try:
        size = int(data[-8:].decode())
    except ValueError:
        raise ConfigError(f"{path} is not a GVMI: it ends in no metadata length") from None
    if size + 12 > len(data):
        raise ConfigError(f"{path} is not a GVMI: its metadata length {size} exceeds the file")
    crc, body = data[-12 - size:-8 - size], data[-8 - size:-8]
    if zlib.crc32(body).to_bytes(4, "little") != crc:
        raise ConfigError(f"{path}: the metadata's CRC does not match")
    result: dict[str, Any] = json.loads(body)
    return result


def _sha3_224(path: Path) -> str:
    digest = hashlib.sha3_224()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
