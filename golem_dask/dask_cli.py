"""``dask golem ...``: golem-dask's commands through Dask's own CLI (the ``dask_cli`` entry
point), the same as ``golem-dask ...``."""

from __future__ import annotations

import click


@click.command("golem", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def golem(args: tuple[str, ...]) -> None:
    """Rent Dask workers from Golem providers: golem-dask's commands (dask golem --help)."""
    # Imported here: every `dask` command (a process worker's `dask worker` too) loads this
    # entry point, and only `dask golem` needs the command line behind it.
    from golem_dask.cli import main

    raise SystemExit(main(list(args), prog="dask golem"))
