"""``loramgr base add | list | show | remove``: register base models by fingerprint.

``add`` reads safetensors headers only (seconds, whatever the size); ``--content`` also hashes every
weight file (reads all bytes). The fingerprint is stored by the registry (``Registry.add_base``) so that
``install --base``, ``check`` and ``combine`` can compare adapters' bases without the files.
"""

from __future__ import annotations

import click

from .registry_cmds import open_registry, quiet_option
from .render import echo_json, human_size, progress_bars, table


@click.group(name="base")
def base() -> None:
    """Register base models (fingerprints read from safetensors headers) for checks and installs."""


@base.command(name="add")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", help="Name to register it under (default: config.json _name_or_path or the folder name).")
@click.option("--revision", help="Revision or commit the files come from.")
@click.option("--content", is_flag=True, help="Also sha256 every weight file (reads every byte; slow for big models).")
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
@quiet_option
def add(path: str, name: str | None, revision: str | None, content: bool, as_json: bool, quiet: bool) -> None:
    """Fingerprint a base model folder or .safetensors file (sharded and diffusers folders too) and register it."""
    from pathlib import Path

    from ..compat.basemodel import fingerprint_base_model
    from ..installer import refuse_adapter_as_base

    refuse_adapter_as_base(Path(path))
    with progress_bars(quiet=quiet) as progress:
        fingerprint = fingerprint_base_model(path, revision=revision, content=content, progress=progress)
    fingerprint.name = name or fingerprint.name or Path(path).resolve().name
    open_registry().add_base(fingerprint)
    if as_json:
        echo_json(fingerprint.to_dict())
        return
    size = human_size(sum(fingerprint.files.values()))
    click.echo(f"registered base {fingerprint.name} ({fingerprint.architecture or 'unknown architecture'}, "
               f"{len(fingerprint.tensors)} tensors, {size}, {fingerprint.structural[:19]})")


@base.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print every base model as JSON.")
def list_(as_json: bool) -> None:
    """List registered base models."""
    bases = open_registry().list_bases()
    if as_json:
        echo_json([b.to_dict() | {"tensors": len(b.tensors)} for b in bases])
        return
    if not bases:
        click.echo("no base models registered; try 'loramgr base add PATH'")
        return
    click.echo(table(
        ["NAME", "ARCHITECTURE", "TENSORS", "SIZE", "STRUCTURAL", "CONTENT"],
        [[b.name, b.architecture or "-", len(b.tensors), human_size(sum(b.files.values())), b.structural[:19],
          (b.content or "-")[:19]] for b in bases],
    ))


@base.command(name="show")
@click.argument("name")
@click.option("--modules", is_flag=True, help="List every Linear / Conv module with its weight shape.")
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
def show(name: str, modules: bool, as_json: bool) -> None:
    """Show a registered base model's fingerprint (and, with --modules, its adaptable modules)."""
    from ..compat.basemodel import module_shapes

    fingerprint = open_registry().get_base(name)
    if as_json:
        echo_json(fingerprint.to_dict())
        return
    for label, value in (
        ("name", fingerprint.name), ("revision", fingerprint.revision), ("architecture", fingerprint.architecture),
        ("source", fingerprint.source), ("structural", fingerprint.structural),
        ("structural+dtypes", fingerprint.structural_dtypes), ("content", fingerprint.content or "not computed"),
        ("tensors", len(fingerprint.tensors)), ("parameters", f"{fingerprint.n_params:,}"),
    ):
        click.echo(f"{label:>18}: {value if value is not None else '-'}")
    for key, value in sorted(fingerprint.sizes.items()):
        click.echo(f"{key:>18}: {value}")
    if modules:
        shapes = module_shapes(fingerprint)
        click.echo(table(["MODULE", "KIND", "SHAPE"], [[m, s.kind, "x".join(map(str, s.shape))]
                                                        for m, s in sorted(shapes.items())]))


@base.command(name="remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also when installed versions are linked to it: unlink them.")
def remove(name: str, force: bool) -> None:
    """Remove a registered base model. Refused while installed versions are linked to it (they keep
    their files either way; with --force they lose the link and keep the base name they declare)."""
    from ..registry.bases import remove_base

    unlinked = remove_base(open_registry(), name, unlink=force)
    click.echo(f"removed base {name}" + (f"; unlinked {', '.join(unlinked)}" if unlinked else ""))


COMMANDS = [base]
