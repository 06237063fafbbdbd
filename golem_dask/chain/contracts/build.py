"""Compile the shipped Vyper contracts into JSON artefacts.

Run ``python -m golem_dask.chain.contracts.build`` after editing a ``*.vy`` file in
this folder, and ``python -m golem_dask.chain.contracts.build --check`` in CI to fail
when a shipped artefact no longer matches its source.  Needs the pinned compiler
(``pip install 'golem-dask[contracts]'``); the library itself only reads the artefacts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The folder holding the ``*.vy`` sources and their ``*.json`` artefacts.
CONTRACTS_DIR = Path(__file__).resolve().parent

#: The compiler every source pins with ``# pragma version``; artefacts built with any
#: other version would not be reproducible.
VYPER_VERSION = "0.4.3"


class BuildError(RuntimeError):
    """The compiler is missing or a contract failed to compile."""


def _import_vyper() -> Any:
    try:
        import vyper
        import vyper.compiler
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BuildError(
            f"the Vyper compiler is not installed; run `pip install vyper=={VYPER_VERSION}` "
            "(or `pip install 'golem-dask[contracts]'`)"
        ) from e
    installed = vyper.__version__.split("+")[0]
    if installed != VYPER_VERSION:
        raise BuildError(
            f"vyper {installed} is installed but the contracts pin {VYPER_VERSION}; "
            f"run `pip install vyper=={VYPER_VERSION}`"
        )
    return vyper


def compile_contract(source_path: Path) -> dict[str, Any]:
    """Compile one Vyper source file into an artefact dictionary.

    Parameters
    ----------
    source_path:
        Path of a ``*.vy`` file.

    Returns
    -------
    dict
        ``{"abi", "bytecode", "contract_name", "runtime_bytecode", "source_sha256", "vyper_version"}``.

    Raises
    ------
    BuildError
        If Vyper is missing, the wrong version, or the source does not compile.

    Examples
    --------
    >>> art = compile_contract(CONTRACTS_DIR / "GolemDaskToken.vy")
    >>> art["contract_name"], art["vyper_version"]
    ('GolemDaskToken', '0.4.3')
    """
    vyper = _import_vyper()
    source_bytes = source_path.read_bytes()
    try:
        # Compile with the bare file name, not the absolute path, so the output cannot
        # depend on where the repository happens to be checked out.
        out = vyper.compiler.compile_code(
            source_bytes.decode("utf-8"),
            contract_path=source_path.name,
            output_formats=["abi", "bytecode", "bytecode_runtime"],
        )
    except Exception as e:  # vyper raises many unrelated exception types
        raise BuildError(f"{source_path.name} failed to compile: {e}") from e
    return {
        "contract_name": source_path.stem,
        "vyper_version": VYPER_VERSION,
        "source_sha256": hashlib.sha256(source_bytes).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
        # What the chain holds once deployed: a payer compares the batch contract's code with it.
        "runtime_bytecode": out["bytecode_runtime"],
    }


def render_artifact(artifact: dict[str, Any]) -> str:
    """Serialise an artefact exactly as it is shipped (sorted keys, indent 2, newline).

    Examples
    --------
    >>> render_artifact({"b": 1, "a": [1]})
    '{\\n  "a": [\\n    1\\n  ],\\n  "b": 1\\n}\\n'
    """
    # Sorted keys make the file independent of dict ordering inside the compiler, so
    # `--check` compares like with like across Vyper patch releases of the same version.
    return json.dumps(artifact, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def sources(directory: Path = CONTRACTS_DIR) -> list[Path]:
    """The ``*.vy`` files in ``directory``, sorted by name."""
    return sorted(directory.glob("*.vy"))


def build(directory: Path = CONTRACTS_DIR, *, check: bool = False) -> list[Path]:
    """Compile every ``*.vy`` in ``directory`` and write or verify its artefact.

    Parameters
    ----------
    directory:
        Folder with the sources; artefacts go next to them as ``<name>.json``.
    check:
        If true, write nothing and return the artefacts that are missing or differ.

    Returns
    -------
    list of Path
        In write mode the artefacts written; in check mode the stale artefacts.

    Examples
    --------
    >>> build(check=True)  # the shipped artefacts match their sources
    []
    """
    changed: list[Path] = []
    for source in sources(directory):
        target = source.with_suffix(".json")
        text = render_artifact(compile_contract(source))
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current == text:
            continue
        changed.append(target)
        if not check:
            target.write_text(text, encoding="utf-8", newline="\n")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m golem_dask.chain.contracts.build",
        description="Compile golem-dask's Vyper contracts into JSON artefacts.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="recompile and exit 1 if a shipped artefact is missing or differs",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=CONTRACTS_DIR,
        help="folder with the *.vy sources (default: the package's contracts folder)",
    )
    args = parser.parse_args(argv)
    if not sources(args.dir):
        print(f"error: no *.vy files in {args.dir}", file=sys.stderr)
        return 2
    try:
        changed = build(args.dir, check=args.check)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for path in changed:
            print(
                f"stale: {path} does not match its source; run "
                "`python -m golem_dask.chain.contracts.build`",
                file=sys.stderr,
            )
        if not changed:
            print(f"ok: {len(sources(args.dir))} artefact(s) up to date")
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("all artefacts already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
