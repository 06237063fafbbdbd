"""``golem-dask image build --gvmi``: a docker image as a Golem VM image, and its reference."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from docker_support import REQUIRED, docker_client  # noqa: F401

from golem_dask.errors import ConfigError
from golem_dask.image import BASE_TAG, build_gvmi, gvmi_config


@pytest.fixture
def mksquashfs() -> str:
    found = shutil.which("mksquashfs")
    if found is None:
        message = "mksquashfs missing: apt-get install squashfs-tools"
        if REQUIRED:
            pytest.fail(f"{message} (GOLEM_DASK_REQUIRE_DOCKER=1)")
        pytest.skip(message)
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="the image's files keep their owners: needs root")
def test_an_image_becomes_a_squashfs_with_its_config_and_a_sha3_reference(
        docker_client, mksquashfs: str, tmp_path: Path) -> None:  # noqa: F811
    containers_before = len(docker_client.containers.list(all=True))
    image = build_gvmi(BASE_TAG, tmp_path / "base.gvmi", log=lambda _: None)
    assert image.path == tmp_path / "base.gvmi"
    assert image.sha3 == hashlib.sha3_224(image.path.read_bytes()).hexdigest()
    assert image.reference("http://10.0.0.5:8000/") == f"hash:sha3:{image.sha3}:http://10.0.0.5:8000/base.gvmi"
    assert image.reference("https://x/y.gvmi") == f"hash:sha3:{image.sha3}:https://x/y.gvmi"
    # The config at the end is the image's own, checked by its CRC.
    inspected = json.loads(subprocess.run(["docker", "image", "inspect", BASE_TAG], capture_output=True,
                                          text=True, check=True).stdout)[0]["Config"]
    config = gvmi_config(image.path)
    assert config["Env"] == inspected["Env"] and "User" not in config
    # The front is a squashfs filesystem holding the image's files, owners kept.
    listing = subprocess.run(["unsquashfs", "-lln", str(image.path), "usr/bin/python3.11"], capture_output=True,
                             text=True, check=True).stdout
    assert "usr/bin/python3.11" in listing and " 0/0 " in listing
    assert len(docker_client.containers.list(all=True)) == containers_before
    # A changed byte in the metadata is caught.
    data = bytearray(image.path.read_bytes())
    data[-20] ^= 1
    broken = tmp_path / "broken.gvmi"
    broken.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="CRC"):
        gvmi_config(broken)


def test_a_missing_image_is_named(docker_client, mksquashfs: str, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match="golem-dask image build"):
        build_gvmi("golem-dask-no-such-image:0", tmp_path / "x.gvmi", log=lambda _: None)
