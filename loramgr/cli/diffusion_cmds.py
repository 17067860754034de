"""Commands for folders of diffusion LoRA files: duplicates, link."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .render import echo_json, progress_bars

if TYPE_CHECKING:
    from ..installer import InstallOptions
    from ..registry import Registry


def install_recursive(registry: Registry, folder: str, options: InstallOptions, as_json: bool, *,
                      quiet: bool = False) -> None:
    """``loramgr install DIR --recursive``: every file under DIR, with progress; unreadable files listed."""
    from ..formats.diffusion.folders import install_tree

    with progress_bars(quiet=quiet) as progress:
        result = install_tree(registry, folder, options, progress=progress)
    if as_json:
        echo_json({"installed": [r.to_dict() for r in result.installed],
                   "skipped": [r.to_dict() for r in result.skipped],
                   "failed": [{"path": p, "error": e} for p, e in result.failed]})
    else:
        for done in result.installed:
            click.echo(f"installed {done.ref} ({done.digest[:19]})")
        for path, error in result.failed:
            click.echo(f"could not read {path}: {error}", err=True)
        click.echo(f"{len(result.installed)} installed, {len(result.skipped)} already installed, "
                   f"{len(result.failed)} could not be read")
    if result.failed:
        raise SystemExit(1)


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


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--symlink", is_flag=True, help="Symbolic links instead of hard links (across file systems).")
def link(folder: str, symlink: bool) -> None:
    """Lay out FOLDER with NAME.safetensors links to each adapter's newest file in the store, for a UI to read."""
    from ..formats.diffusion.folders import link_tree
    from .registry_cmds import open_registry

    made = link_tree(open_registry(), folder, symlink=symlink)
    click.echo(f"{len(made)} file(s) in {folder}")


COMMANDS = [duplicates, link]
