"""Commands for folders of diffusion LoRA files: duplicates."""

from __future__ import annotations

import click

from .render import echo_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def duplicates(as_json: bool) -> None:
    """List installed versions whose tensors are equal under different headers (metadata edits, renames)."""
    from ..formats.hashes import find_duplicates
    from .registry_cmds import open_registry

    groups = find_duplicates(open_registry())
    if as_json:
        echo_json(groups)
        return
    if not groups:
        click.echo("no duplicates: every installed version has its own tensors")
    for group in groups:
        click.echo("same tensors: " + ", ".join(group))


COMMANDS = [duplicates]
