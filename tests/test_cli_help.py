"""The command line reads well: help for every command, through golem-dask and through
``dask golem``, and bad flags answered with a message and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from golem_dask.cli import main

COMMANDS = ["demo", "version", "status", "image", "image build", "ledger", "providers", "pay", "devnet", "hub", "provider"]


def help_of(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return str(capsys.readouterr().out)


def test_the_top_help_lists_every_command(capsys) -> None:  # type: ignore[no-untyped-def]
    text = help_of([], capsys)
    assert text.startswith("usage: golem-dask ") and "pay them per use" in text
    for command in COMMANDS:
        if " " not in command:
            assert f"\n    {command} " in text, command


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_help(command: str, capsys) -> None:  # type: ignore[no-untyped-def]
    text = help_of(command.split(), capsys)
    assert text.startswith(f"usage: golem-dask {command}") and "-h, --help" in text


@pytest.mark.parametrize("argv, says", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["demo", "--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["provider", "--name", "x"], "the following arguments are required: --hub"),
    (["image", "build", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_get_a_message_and_exit_2(argv: list[str], says: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_dask_golem_is_the_same_command_through_dasks_cli() -> None:
    dask = [sys.executable, "-c", "from dask.cli import run_cli; run_cli()"]
    listed = subprocess.run([*dask, "--help"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "golem" in listed.stdout
    helped = subprocess.run([*dask, "golem", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: dask golem ")
    version = subprocess.run([*dask, "golem", "version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip()
    bad = subprocess.run([*dask, "golem", "ledger", "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "dask golem: error: unrecognized arguments: --bogus" in bad.stderr
