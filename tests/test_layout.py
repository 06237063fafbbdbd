"""The package's shape: imports run downhill only, and no class holds several jobs.

Two checks of the import rules:

* a static one over every ``import`` in the source, lazy ones inside functions included
  (``if TYPE_CHECKING:`` blocks left out), followed transitively, so that an import
  that only runs on some code path still counts;
* ``python -c`` in a fresh interpreter: import every module of a package, then look at
  ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "golem_dask"
#: Modules every layer may use: they import nothing else of the package.
LEAVES = {"golem_dask", "golem_dask.errors", "golem_dask.config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _skipped_lines(tree: ast.Module) -> set[int]:
    """Imports that never run with the module's code: under ``if TYPE_CHECKING:``, and in a
    package's module-level ``__getattr__`` (it runs only when that attribute is asked for:
    ``golem_dask.GolemCluster`` imports the cluster, ``import golem_dask.chain`` does not)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def imports_of(name: str) -> set[str]:
    """Every module (ours or not) that ``name`` imports anywhere in its code."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _skipped_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    found.add(f"{module}.{alias.name}")
    return found


def closure(name: str) -> dict[str, str]:
    """Every module ``name`` reaches through imports, each with the module that imports it."""
    via: dict[str, str] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        for imported in imports_of(current):
            # Importing a.b.c runs a/__init__ and a/b/__init__ too.
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix not in via and prefix != name:
                    via[prefix] = current
                    if prefix in MODULES:
                        todo.append(prefix)
    return via


def chain_to(name: str, target: str, via: dict[str, str]) -> str:
    path = [target]
    while path[-1] != name and path[-1] in via:
        path.append(via[path[-1]])
    return " <- ".join(path)


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def modules_of(package: str) -> Iterator[str]:
    return (m for m in sorted(MODULES) if in_package(m, package))


RULES = [
    # (package, what it must never reach, except)
    ("golem_dask.protocol", ["golem_dask"], ["golem_dask.protocol", *LEAVES]),
    ("golem_dask.chain", ["golem_dask"], ["golem_dask.chain", "golem_dask.protocol", *LEAVES]),
    ("golem_dask.chain", ["golem_dask.payment", "golem_dask.cluster", "distributed.deploy"], []),
    ("golem_dask.provider", ["golem_dask.payment", "golem_dask.cluster", "distributed.deploy"], []),
    ("golem_dask.payment", ["golem_dask.market", "golem_dask.cluster", "golem_dask.provider"], []),
    # Market and provider are siblings: a provider uses the hub link, nothing else of market.
    ("golem_dask.market", ["golem_dask.provider", "golem_dask.payment", "golem_dask.cluster"], []),
    ("golem_dask.provider", ["golem_dask.market"], ["golem_dask.market.link", "golem_dask.market"]),
    # The yagna backend sits on both seams; only the cluster composes it.
    ("golem_dask.yagna", ["golem_dask.cluster", "golem_dask.provider", "distributed.deploy"], []),
    ("golem_dask.market", ["golem_dask.yagna"], []),
    ("golem_dask.payment", ["golem_dask.yagna"], []),
]


@pytest.mark.parametrize(("package", "forbidden", "allowed"), RULES,
                         ids=[f"{p.split('.')[-1]}-not-{'-'.join(f.split('.')[-1] for f in fs)}" for p, fs, _ in RULES])
def test_imports_run_downhill(package: str, forbidden: list[str], allowed: list[str]) -> None:
    broken = []
    checked = 0
    for name in modules_of(package):
        checked += 1
        via = closure(name)
        for reached in sorted(via):
            if any(in_package(reached, f) for f in forbidden) and not any(
                    reached == a or (in_package(reached, a) and a != "golem_dask") for a in allowed):
                broken.append(chain_to(name, reached, via))
    assert checked > 0, f"no modules found in {package}"
    assert not broken, f"{package} must not import {forbidden}:\n  " + "\n  ".join(broken)


def test_the_static_check_sees_lazy_imports() -> None:
    """The checker itself: a function-level import counts, a TYPE_CHECKING one does not."""
    via = closure("golem_dask.cluster")
    assert "golem_dask.market.local" in via  # imported inside make_market()
    assert "golem_dask.payment.factory" in via  # imported inside GolemCluster.__init__
    assert "web3" not in imports_of("golem_dask.payment.ethereum")  # only under TYPE_CHECKING there


FRESH_CHECK = """
import importlib, json, pkgutil, sys
import {package} as root
names = [root.__name__] + [m.name for m in pkgutil.walk_packages(root.__path__, root.__name__ + ".")]
for name in names:
    if not name.endswith("worker_entry"):
        importlib.import_module(name)
print(json.dumps({{"imported": names, "modules": sorted(sys.modules)}}))
"""


@pytest.mark.parametrize("package", ["golem_dask.provider", "golem_dask.chain", "golem_dask.protocol"])
def test_a_fresh_interpreter_importing_the_package_loads_no_requestor_side(package: str) -> None:
    out = subprocess.run([sys.executable, "-c", FRESH_CHECK.format(package=package)], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["imported"]) > 3
    loaded = set(result["modules"])
    for forbidden in ("golem_dask.payment", "golem_dask.cluster", "golem_dask.worker", "distributed.deploy"):
        assert not [m for m in loaded if in_package(m, forbidden)], f"{package} loaded {forbidden}"
    if package == "golem_dask.protocol":
        assert not [m for m in loaded if in_package(m, "golem_dask.chain") or in_package(m, "golem_dask.market")]


def test_provider_help_never_imports_dask_deploy() -> None:
    code = ("import sys\nfrom golem_dask.cli import main\n"
            "try:\n    main(['provider', '--help'])\nexcept SystemExit as e:\n    code = e.code\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('distributed.deploy', 'golem_dask.cluster', "
            "'golem_dask.payment')))\nprint('EXIT', code, 'LOADED', bad)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "--hub" in result.stdout, result.stderr  # the help really printed
    assert result.stdout.strip().splitlines()[-1] == "EXIT 0 LOADED []"


CLASS_LIMIT = 300


def test_no_class_holds_several_jobs() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > CLASS_LIMIT:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"classes over {CLASS_LIMIT} lines (split them along their jobs): {long}"


def test_the_readme_layout_names_every_module_and_only_existing_ones() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed: set[str] = set()
    folders: list[str] = []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        entry = line.split()[0]
        folders = folders[:indent - 1]
        if entry.endswith("/"):
            folders.append(entry.rstrip("/"))
            listed.add("/".join(folders))
        elif "." in entry:
            listed.add("/".join([*folders, entry]))
    actual = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")
              if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    actual = {a for a in actual if not (a.endswith("__init__.py") and a != "__init__.py")}
    in_runtime = {a for a in actual if a.startswith(("provider/runtime/", "chain/contracts/"))}
    assert {a for a in listed if "." in a.split("/")[-1]} - actual == set(), "listed but missing"
    assert actual - in_runtime - listed == set(), "in the tree but not in the README"
    assert {"provider/runtime", "chain/contracts"} <= listed
