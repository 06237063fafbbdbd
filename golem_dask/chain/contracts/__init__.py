"""Smart contracts golem-dask deploys, shipped as Vyper source plus compiled artefacts.

The compiled artefacts (``*.json``) are package data, so nothing here needs the
Vyper compiler at runtime; ``python -m golem_dask.chain.contracts.build``
regenerates them from the ``*.vy`` sources (``--check`` verifies they are current).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from golem_dask.errors import ConfigError

__all__ = ["available_artifacts", "load_artifact"]


def available_artifacts() -> list[str]:
    """Names of the shipped contract artefacts, sorted.

    Examples
    --------
    >>> "GolemDaskToken" in available_artifacts()
    True
    """
    root = resources.files(__name__)
    return sorted(
        entry.name.removesuffix(".json")
        for entry in root.iterdir()
        if entry.name.endswith(".json")
    )


@functools.lru_cache(maxsize=None)
def _artifact_text(name: str) -> str:
    # Cache the text, not the parsed dict: callers get a fresh dict each time, so
    # one caller mutating its ABI cannot corrupt another's.
    resource = resources.files(__name__).joinpath(f"{name}.json")
    if not resource.is_file():
        raise ConfigError(
            f"no compiled contract artefact named {name!r}; shipped artefacts: "
            f"{available_artifacts()}. If you edited a .vy file, run "
            "`python -m golem_dask.chain.contracts.build`."
        )
    return resource.read_text(encoding="utf-8")


def load_artifact(name: str) -> dict[str, Any]:
    """Load the compiled artefact of contract ``name``.

    Parameters
    ----------
    name:
        Contract name without extension, e.g. ``"GolemDaskToken"``.

    Returns
    -------
    dict
        ``{"abi", "bytecode", "contract_name", "source_sha256", "vyper_version"}``;
        ``bytecode`` is the ``0x``-prefixed deployment bytecode.

    Raises
    ------
    ConfigError
        If no artefact of that name is shipped.

    Examples
    --------
    >>> artifact = load_artifact("GolemDaskToken")
    >>> artifact["contract_name"], artifact["bytecode"][:2]
    ('GolemDaskToken', '0x')
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"contract artefact name must be a bare name, got {name!r}")
    return json.loads(_artifact_text(name))
