"""Commands for OCI registries: ``list-remote``, and the OCI half of ``push`` (``push REF oci://...``)."""

from __future__ import annotations

import click

from .registry_cmds import open_registry
from .render import echo_json, human_size, progress_bars, table


@click.command(name="list-remote")
@click.argument("repository")
@click.option("--insecure", is_flag=True, help="Use plain HTTP for a registry that is not on a loopback address.")
@click.option("--json", "as_json", is_flag=True, help="Print every tag as JSON.")
def list_remote_cmd(repository: str, insecure: bool, as_json: bool) -> None:
    """List the tags of an OCI repository (oci://host/repository) and the adapter each holds."""
    from ..oci.pull import list_remote

    rows = list_remote(repository, insecure=insecure)
    if as_json:
        echo_json([r.to_dict() for r in rows])
        return
    if not rows:
        click.echo(f"{repository} has no tags")
        return
    click.echo(table(
        ["TAG", "ADAPTER", "VERSION", "SIZE", "BASE MODEL", "MANIFEST"],
        [[r.tag, r.name or f"({r.kind})", r.version or "", human_size(r.size) if r.size else "", r.base_model or "",
          r.digest[:19]] for r in rows],
    ))


def push_to_oci(reference: str, destination: str, *, tags: tuple[str, ...], insecure: bool, dry_run: bool,
                base_artifact: str | None, quiet: bool = False) -> None:
    """``loramgr push REF oci://host/repository[:tag]``: plan, then push (or print the plan)."""
    from ..oci.push import plan_push, run_push

    plan = plan_push(open_registry(), reference, destination, tags=list(tags), base_artifact=base_artifact,
                     insecure=insecure)
    if dry_run:
        click.echo(f"would push {plan.reference} to {plan.target}, tags {', '.join(plan.tags)}:")
        for layer in plan.layers:
            click.echo(f"  {layer.path}  {human_size(layer.size)}  {layer.media_type}")
        if plan.subject:
            click.echo(f"  subject {plan.subject['digest']}")
        click.echo(f"manifest {plan.manifest_digest}\n")
        click.echo(plan.card, nl=False)
        return
    with progress_bars(quiet=quiet) as progress:
        result = run_push(plan, insecure=insecure, progress=progress)
    for line in result.notes:
        click.echo(line)
    if result.pushed:
        click.echo(f"pushed {plan.reference} to {result.repository}:{','.join(result.tags)} "
                   f"(manifest {result.manifest_digest})")
    else:
        click.echo(f"nothing pushed (manifest {result.manifest_digest})")


COMMANDS = [list_remote_cmd]
