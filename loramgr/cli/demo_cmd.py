"""``loramgr demo``: install, combine, compress and load two adapters on a tiny model built in code."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="Registry folder for the demo (default: a new temporary folder; your registry is untouched).")
def demo(home: Path | None) -> None:
    """Run loramgr's main job end to end on built-in defaults (nothing is downloaded)."""
    from ..demo import run

    run(home, echo=click.echo)


COMMANDS = [demo]
