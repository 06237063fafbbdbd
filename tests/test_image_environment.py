"""Package sync: the worker image records the environment it holds, the client compares it
with its own before renting, and a task naming a package a worker lacks fails as a task."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from golem_dask.cli import main
from golem_dask.image import (
    ENVIRONMENT_LABEL,
    NOT_FOR_WORKERS,
    VERSIONS_LABEL,
    check_image,
    client_environment,
    client_versions,
    environment_hash,
)


@dataclass
class FakeImage:
    """What check_image reads of a docker SDK image."""

    labels: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ("golem-dask-worker:test",)
    short_id: str = "sha256:0"


def image_holding(packages: dict[str, str], excluded: list[str] | None) -> FakeImage:
    environment = {"hash": environment_hash(packages), "packages": packages, "excluded": excluded}
    return FakeImage({VERSIONS_LABEL: json.dumps(client_versions()), ENVIRONMENT_LABEL: json.dumps(environment)})


def test_the_environment_is_this_venvs_distributions_without_golem_dask_and_the_installers() -> None:
    here = client_environment()
    assert here["dask"] and here["distributed"] and here["numpy"]
    assert not NOT_FOR_WORKERS & set(here)
    assert "numpy" not in client_environment(exclude=["NumPy"])  # names compare as the index does
    assert environment_hash(here) == environment_hash(dict(reversed(list(here.items()))))


def test_an_image_of_this_environment_passes_and_one_that_differs_is_named() -> None:
    here = client_environment()
    assert check_image(image_holding(here, [])) == []
    drifted = {**here, "numpy": "0.0.1"}
    del drifted["msgpack"]
    assert check_image(image_holding(drifted, [])) == ["msgpack (not in the image)",
                                                       f"numpy 0.0.1 in the image, {here['numpy']} here"]
    # What the build left out on purpose is not reported; an image built from a requirements
    # file (or before environments were recorded) is compared by its versions only.
    assert check_image(image_holding({k: v for k, v in here.items() if k != "msgpack"}, ["msgpack"])) == []
    assert check_image(image_holding({"dask": here["dask"]}, None)) == []
    assert check_image(FakeImage({VERSIONS_LABEL: json.dumps(client_versions())})) == []


def test_image_build_flags_are_checked_before_anything_is_built(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["image", "build", "--requirements", str(tmp_path / "missing.txt")])
    assert exit_info.value.code == 2 and "no such file" in capsys.readouterr().err


def test_a_task_naming_a_missing_module_loads_as_a_stand_in_that_raises_naming_it(tmp_path: Path) -> None:
    """In a fresh interpreter: what distributed would fail to unpickle (and so kill the
    worker reading it) loads, and raises ModuleNotFoundError when the task uses it."""
    (tmp_path / "gone_mod.py").write_text("def f(x):\n    return x + 1\n\nclass Box:\n    def open(self):\n"
                                          "        return 1\n")
    script = textwrap.dedent(f"""
        import pickle, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import gone_mod
        frames = pickle.dumps(gone_mod.f), pickle.dumps(gone_mod.Box())
        sys.path.pop(0); del sys.modules["gone_mod"]
        import distributed.protocol.pickle as dp
        try:
            dp.loads(frames[0])
        except ModuleNotFoundError:
            print("plain: fails")
        from golem_dask.worker import preload_source
        exec(compile(preload_source(), "preload", "exec"), {{"__name__": "golem_preload"}})
        f, box = dp.loads(frames[0]), dp.loads(frames[1])
        for use in (lambda: f(1), lambda: box.open()):
            try:
                use()
            except ModuleNotFoundError as e:
                print("stand-in:", e)
        print("still loads:", dp.loads(pickle.dumps([1, 2])))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "plain: fails"
    assert lines[1].startswith("stand-in: No module named 'gone_mod': the worker's environment lacks it")
    assert lines[2].startswith("stand-in: No module named 'gone_mod'")
    assert lines[3] == "still loads: [1, 2]"
