"""The documentation site builds, and says what the code does.

* ``mkdocs build --strict`` succeeds (no broken link, anchor or nav entry);
* every key of ``golem_dask/golem.yaml`` is a row of ``docs/configuration.md`` with its
  default exactly as the YAML file writes it, and the page documents no key the file lacks;
* every ``golem-dask`` sub-command, and every option of each, appears in ``docs/cli.md``.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from golem_dask.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GOLEM_YAML = ROOT / "golem_dask" / "golem.yaml"


# -- the site builds ---------------------------------------------------------------------


def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (site / "index.html").is_file()
    for page in ("quickstart", "configuration", "pricing-and-budget", "providers-and-hub", "security",
                 "architecture", "public-network", "cli"):
        assert (site / page / "index.html").is_file(), f"{page} was not built"


# -- configuration keys and defaults -----------------------------------------------------


def _raw(text: str, node: yaml.Node) -> str:
    """A scalar or flow collection as the YAML file spells it, on one line."""
    return " ".join(text[node.start_mark.index:node.end_mark.index].split())


def yaml_defaults(path: Path = GOLEM_YAML) -> dict[str, str]:
    """``{"golem.payment.budget": '"5"', ...}``: every leaf key under ``golem:`` with its
    default as written in the file.  A list of mappings (``golem.provider.local``) is walked
    entry by entry (``golem.provider.local[0].name``); a list of scalars is one value,
    written ``[a, b]``."""
    text = path.read_text()
    root = yaml.compose(text)
    assert isinstance(root, yaml.MappingNode)
    golem = next(value for key, value in root.value if key.value == "golem")
    found: dict[str, str] = {}

    def walk(node: yaml.Node, name: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, f"{name}.{key.value}")
        elif isinstance(node, yaml.SequenceNode) and any(isinstance(item, yaml.MappingNode) for item in node.value):
            for index, item in enumerate(node.value):
                walk(item, f"{name}[{index}]")
        elif isinstance(node, yaml.SequenceNode) and not node.flow_style:
            found[name] = "[" + ", ".join(_raw(text, item) for item in node.value) + "]"
        else:
            found[name] = _raw(text, node)

    walk(golem, "golem")
    return found


def documented_defaults(path: Path = DOCS / "configuration.md") -> dict[str, list[str]]:
    """Rows ``| `golem.x.y` | `default` | ... |`` of the page: key -> the defaults stated
    (a list, so that a key documented twice is caught)."""
    rows: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        key = re.fullmatch(r"`(golem\.[^`]+)`", cells[0])
        if key is None:
            continue
        default = re.fullmatch(r"`([^`]*)`", cells[1]) if len(cells) > 1 else None
        rows.setdefault(key.group(1), []).append(default.group(1) if default else f"<not in backticks: {cells[1:2]}>")
    return rows


def test_yaml_walk_sees_every_shape() -> None:
    defaults = yaml_defaults()
    assert defaults["golem.payment.budget"] == '"5"'
    assert defaults["golem.market.negotiation-timeout"] == "30s"
    assert defaults["golem.demand.runtime"] == "null"
    assert defaults["golem.provider.transfer-schemes"] == "[http, https, s3, gs, az, data]"
    assert defaults["golem.provider.local[0].price-per-cpu-hour"] == '"0.1"'
    assert "golem.provider.local" not in defaults
    assert len(defaults) > 100


def test_every_config_key_is_documented_with_its_default() -> None:
    in_yaml = yaml_defaults()
    in_docs = documented_defaults()
    missing = sorted(set(in_yaml) - set(in_docs))
    assert not missing, f"docs/configuration.md lacks rows for: {missing}"
    unknown = sorted(set(in_docs) - set(in_yaml))
    assert not unknown, f"docs/configuration.md documents keys golem.yaml does not have: {unknown}"
    twice = sorted(key for key, defaults in in_docs.items() if len(defaults) > 1)
    assert not twice, f"documented more than once: {twice}"
    wrong = {key: (in_docs[key][0], value) for key, value in in_yaml.items() if in_docs[key][0] != value}
    assert not wrong, "defaults in docs/configuration.md differ from golem.yaml (docs, yaml): " + repr(wrong)


# -- the command line --------------------------------------------------------------------


def cli_help(*args: str) -> str:
    """``golem-dask ARGS --help`` as the command prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def subcommands(*args: str) -> list[str]:
    """The sub-commands the CLI lists after ``golem-dask ARGS``: the ``{a,b,...}`` line of its
    positional arguments (an option's choices sit after the option, not alone on a line)."""
    found = re.search(r"^\s+\{([a-z0-9,-]+)\}\s*$", cli_help(*args), re.MULTILINE)
    return found.group(1).split(",") if found else []


def all_commands() -> list[tuple[str, ...]]:
    commands: list[tuple[str, ...]] = []
    for name in subcommands():
        nested = subcommands(name)
        commands.extend([(name, sub) for sub in nested] if nested else [(name,)])
    return commands


def test_cli_lists_the_commands_we_expect() -> None:
    names = subcommands()
    assert {"demo", "image", "devnet", "hub", "provider", "ledger", "pay", "providers"} <= set(names)


@pytest.mark.parametrize("command", all_commands(), ids=" ".join)
def test_every_cli_command_and_option_is_documented(command: tuple[str, ...]) -> None:
    page = (DOCS / "cli.md").read_text()
    title = "golem-dask " + " ".join(command)
    assert re.search(rf"^#+ `{re.escape(title)}`\s*$", page, re.MULTILINE), f"docs/cli.md has no heading for {title}"
    section = page.split(f"`{title}`\n", 1)[1].split("\n## ", 1)[0]
    options = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", cli_help(*command))) - {"--help"})
    undocumented = [option for option in options if f"`{option}`" not in section]
    assert not undocumented, f"docs/cli.md does not describe these options of {title}: {undocumented}"


def test_the_architecture_page_names_every_module_and_package() -> None:
    page = (DOCS / "architecture.md").read_text()
    package = ROOT / "golem_dask"
    names = [p.name for p in package.glob("*.py") if not p.name.startswith("_")]
    names += [f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith("_")]
    missing = sorted(name for name in names if f"`{name}`" not in page)
    assert not missing, f"docs/architecture.md does not describe {missing}"
