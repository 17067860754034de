"""Commands that move adapters between machines: push (to the Hub or an OCI registry), lock and sync."""

from __future__ import annotations

from pathlib import Path

import click

from .registry_cmds import open_registry, quiet_option
from .render import QUIET_FLAG, global_flag, human_size, progress_bars


@click.command()
@click.argument("reference")
@click.argument("destination", required=False)
@click.option("--repo", "repo_id", help="Hub repository, owner/name (created if needed).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), default="peft", show_default=True,
              help="File format to upload.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and show the model card; upload nothing.")
@click.option("--tag", "tags", multiple=True, help="OCI: another tag besides the version (repeatable).")
@click.option("--insecure", is_flag=True, help="OCI: plain HTTP to a registry that is not on a loopback address.")
@click.option("--base-artifact", help="OCI: the base model's artifact (oci://...:tag) to link as the subject.")
@quiet_option
def push(reference: str, destination: str | None, repo_id: str | None, private: bool, fmt: str, dry_run: bool,
         tags: tuple[str, ...], insecure: bool, base_artifact: str | None, quiet: bool) -> None:
    """Publish an adapter version to the Hub (--repo, tagged v<version>) or to an OCI registry
    (DESTINATION oci://host/repository, tagged <version>)."""
    from ..hub.publish import prepare_push, run_push

    if destination is not None or not repo_id:
        if not destination or not destination.startswith("oci://") or repo_id:
            raise click.UsageError("give --repo owner/name for the Hub or a destination oci://host/repository, "
                                   "not both")
        if fmt != "peft" or private:
            raise click.UsageError("--format and --private are Hub options; an OCI push sends the stored files")
        from .oci_cmds import push_to_oci

        return push_to_oci(reference, destination, tags=tags, insecure=insecure, dry_run=dry_run,
                           base_artifact=base_artifact, quiet=quiet)
    if tags or insecure or base_artifact:
        raise click.UsageError("--tag, --insecure and --base-artifact apply to an oci:// destination")

    registry = open_registry()
    with prepare_push(registry, reference, repo_id=repo_id, private=private, fmt=fmt) as (plan, folder):
        if dry_run:
            click.echo(f"would push to {plan.repo_id} ({'private' if plan.private else 'public'}), tag {plan.tag}:")
            for name, size in plan.files:
                click.echo(f"  {name}  {human_size(size)}")
            click.echo(f"  README.md  {human_size(len(plan.card.encode()))}\n")
            click.echo(plan.card, nl=False)
            return
        if quiet or global_flag(QUIET_FLAG):  # huggingface_hub draws its own bars for large uploads
            from huggingface_hub.utils.tqdm import disable_progress_bars

            disable_progress_bars()
        said: list[str] = []  # push only speaks when the tag already holds these files
        commit = run_push(plan, folder, notify=said.append)
    for line in said:
        click.echo(line)
    if not said:
        click.echo(f"pushed {reference} to {repo_id}@{plan.tag} (commit {commit[:12]})")


@click.command(name="lock")
@click.option("--file", "requirements", type=click.Path(path_type=Path), default=Path("loramgr.toml"),
              show_default=True, help="The project's adapter list.")
@click.option("--output", type=click.Path(path_type=Path), default=Path("loramgr.lock"), show_default=True,
              help="Where to write the lock.")
@quiet_option
def lock_cmd(requirements: Path, output: Path, quiet: bool) -> None:
    """Resolve loramgr.toml to exact versions and digests in loramgr.lock."""
    from ..lockfile import lock, read_requirements, render_lock

    reqs = read_requirements(requirements)
    with progress_bars(quiet=quiet) as progress:
        locked = lock(open_registry(), reqs, progress=progress)
    text = render_lock(locked)
    from ..fileio import write_atomic

    write_atomic(output, text.encode("utf-8"))
    for entry in locked:
        click.echo(f"locked {entry.name}=={entry.version} {entry.digest[:19]}")
    click.echo(f"wrote {output}")


@click.command(name="sync")
@click.option("--file", "lock_path", type=click.Path(path_type=Path), default=Path("loramgr.lock"), show_default=True,
              help="The lock to install.")
@quiet_option
def sync_cmd(lock_path: Path, quiet: bool) -> None:
    """Install exactly what loramgr.lock says, verifying every digest (all or nothing)."""
    from ..lockfile import read_lock, sync

    with progress_bars(quiet=quiet) as progress:
        report = sync(open_registry(), read_lock(lock_path), progress=progress)
    for ref in report.installed:
        click.echo(f"installed {ref}")
    click.echo(f"{len(report.installed)} installed, {len(report.already)} already present and verified")


COMMANDS = [push, lock_cmd, sync_cmd]
