"""Registry commands: install, list, show, tag, untag, export, remove, verify, gc, doctor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..exporter import EXPORT_FORMATS
from ..merge.options import as_flags
from .render import echo_json, echo_warning, human_size, progress_bars, table

if TYPE_CHECKING:
    from ..registry import Registry, VersionDetails


#: ``-q/--quiet`` of every command that draws byte progress bars (on stderr, on a terminal only)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Draw no progress bars (drawn on a terminal only).")


def open_registry() -> Registry:
    from ..registry import Registry

    return Registry.open()


@click.command()
@click.argument("source")
@click.option("--name", help="Adapter name (default: the folder or file name).")
@click.option("--version", "version", help="PEP 440 version (default: 0.1.0, or the next minor version).")
@click.option("--allow-pickle", is_flag=True,
              help="Load a pickled adapter_model.bin (weights only) and store it as safetensors.")
@click.option("--base", "base", help="Record this registered base model for the adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--recursive", is_flag=True, help="Install every .safetensors file under the folder SOURCE.")
@quiet_option
def install(source: str, name: str | None, version: str | None, allow_pickle: bool, base: str | None,
            as_json: bool, recursive: bool, quiet: bool) -> None:
    """Install an adapter from a PEFT folder, a .safetensors file or hf://owner/repo[@rev][:subfolder]."""
    from ..installer import InstallOptions, install_source

    options = InstallOptions(name=name, version=version, base=base, allow_pickle=allow_pickle)
    registry = open_registry()
    if recursive:
        from .diffusion_cmds import install_recursive

        return install_recursive(registry, source, options, as_json, quiet=quiet)
    with progress_bars(quiet=quiet) as progress:
        result = install_source(registry, source, options, progress=progress)
    if as_json:
        echo_json(result.to_dict())
        return
    if result.created:
        click.echo(f"installed {result.ref} ({human_size(result.size)}, {result.digest[:19]})")
    else:
        click.echo(f"already installed as {result.ref} ({result.digest[:19]}); nothing new stored")
    for note in result.notes:
        if note != "already installed":
            echo_warning(note, label="note")


@click.command(name="list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print every version as JSON.")
@click.option("--digests", is_flag=True, help="Show full digests.")
@click.option("--base-family", help="Only versions whose shapes say this base family (flux1, wan, sdxl, ...).")
def list_(name: str | None, as_json: bool, digests: bool, base_family: str | None) -> None:
    """List installed adapter versions (all, or one adapter's)."""
    if base_family:
        from ..compat.identify import versions_for_family

        rows = versions_for_family(open_registry(), base_family, name)
    else:
        rows = open_registry().list_versions(name)
    if not rows and name and not base_family:
        open_registry().resolve(name)  # the one not-found error, with its did-you-mean
    if as_json:
        echo_json([r.to_dict() for r in rows])
        return
    if not rows:
        click.echo("no adapters installed; try 'loramgr install PATH'" if not base_family
                   else f"no installed adapter is for the {base_family} family")
        return
    click.echo(table(
        ["NAME", "VERSION", "TYPE", "RANK", "MODULES", "SIZE", "BASE MODEL", "TAGS", "DIGEST"],
        [
            [r.name, r.version, r.adapter_type if r.format == "peft" else f"{r.adapter_type} ({r.format})",
             r.rank, r.n_modules, human_size(r.size), r.base_model or "-", ",".join(r.tags),
             r.digest if digests else r.digest[:19]]
            for r in rows
        ],
    ))


@click.command()
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="Print everything known as JSON.")
@click.option("--recipe", "as_recipe", is_flag=True, help="Print the TOML recipe that reproduces a combined adapter.")
def show(reference: str, as_json: bool, as_recipe: bool) -> None:
    """Show one adapter version: NAME, NAME==VERSION, 'NAME>=1,<2', NAME@TAG or sha256:PREFIX."""
    details = open_registry().show(reference)
    if as_recipe:
        from ..merge.recipes import recipe_toml

        click.echo(recipe_toml(details), nl=False)
        return
    if as_json:
        echo_json(details.to_dict())
        return
    click.echo(render_show(details))


def render_show(d: VersionDetails) -> str:
    from ..compat.identify import show_lines

    ranks, declared = d.ranks_found, d.config.get("r")
    found = [f"found {', '.join(map(str, ranks))}"] if ranks and ranks != [d.rank] else []
    found += [f"config r {declared}"] if declared is not None and declared != d.rank else []
    rank = str(d.rank) + (f" ({'; '.join(found)})" if found else "")  # the largest module rank, as list shows
    lines = [
        f"{d.name} {d.version}" + (f"  [{', '.join(d.tags)}]" if d.tags else ""),
        f"  digest        {d.digest}",
        f"  type          {d.adapter_type} ({d.format})",
        f"  rank / alpha  {rank} / {d.alpha}" + ("  rsLoRA" if d.use_rslora else "") + ("  DoRA" if d.use_dora else ""),
        f"  targets       {', '.join(d.target_modules or d.target_modules_found)}",
        f"  modules       {d.n_modules} ({d.n_params:,} parameters, {', '.join(d.dtypes)})",
        f"  base model    {d.base_model or '-'}" + (f" @ {d.base_model_revision}" if d.base_model_revision else ""),
        f"  size          {human_size(d.size)} in {len(d.files)} file(s)",
        f"  source        {d.source or '-'}",
        f"  installed     {d.installed_at}",
    ]
    if d.task_type:
        lines.append(f"  task type     {d.task_type}")
    lines += show_lines(d.config)
    if d.card.get("license"):
        lines.append(f"  license       {d.card['license']}")
    if d.card.get("description"):
        lines.append(f"  description   {d.card['description'][:200]}")
    if d.parents:
        recipe = d.recipe or {}
        method = recipe.get("method", "?")
        params = {k: v for k, v in (recipe.get("options") or {}).items()
                  if v not in (None, False) and k not in ("method", "weights")
                  and not (k == "majority_sign" and "ties" not in method)}
        lines.append(f"  made by       {method}" + (f" {as_flags(params)}" if params else ""))
        for p in d.parents:
            lines.append(f"    {p.weight:+g} x {p.name}=={p.version}  {p.digest[:19]}")
    for note in d.notes:
        lines.append(f"  note          {note}")
    return "\n".join(lines)


@click.command()
@click.argument("reference")
@click.argument("tag_name", metavar="TAG")
def tag(reference: str, tag_name: str) -> None:
    """Point TAG at a version (moving it if it points elsewhere). 'latest' is implicit."""
    version, previous = open_registry().tag(reference, tag_name)
    if previous and previous != version:
        click.echo(f"moved tag {tag_name} from {previous} to {version}")
    else:
        click.echo(f"tagged {version} as {tag_name}")


@click.command()
@click.argument("reference", metavar="NAME[@TAG]")
@click.argument("tag_name", metavar="[TAG]", required=False)
def untag(reference: str, tag_name: str | None) -> None:
    """Remove a tag: 'untag NAME TAG' or 'untag NAME@TAG'. With a version (NAME==VERSION, sha256:...),
    the tag is removed only if it is on that version."""
    registry = open_registry()
    name, tag = untag_target(registry, reference, tag_name)
    version = registry.untag(name, tag)
    click.echo(f"removed tag {name}@{tag} (was on {name}=={version})")


def untag_target(registry: Registry, reference: str, tag: str | None) -> tuple[str, str]:
    """(adapter name, tag) from what a user typed after 'untag', refusing forms that name two things."""
    from ..errors import ConflictError, InvalidReferenceError
    from ..registry.refs import check_tag, parse_reference

    ref = parse_reference(reference)
    if ref.kind == "tag":
        if tag is not None and tag != ref.tag:
            raise InvalidReferenceError(f"{reference!r} names tag {ref.tag!r} but the command also names {tag!r}",
                                        reference=reference,
                                        hint="write 'loramgr untag NAME TAG' or 'loramgr untag NAME@TAG'")
        tag = ref.tag
    if tag is None:
        raise click.UsageError("name the tag to remove: 'loramgr untag NAME TAG' or 'loramgr untag NAME@TAG'")
    check_tag(tag)
    if ref.kind in ("name", "tag"):
        return registry.show(f"{reference.partition('@')[0]}@{tag}").name, tag  # the name as installed
    picked = registry.show(reference)  # a version reference: the tag must be on the version it picks
    tagged = registry.show(f"{picked.name}@{tag}")
    if tagged.version != picked.version:
        raise ConflictError(f"tag {tag!r} of {picked.name} is on {tagged.version}, not on {picked.version}",
                            hint=f"'loramgr untag {picked.name} {tag}' removes it from {tagged.version}")
    return picked.name, tag


@click.command()
@click.argument("reference")
@click.argument("destination", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="peft",
              show_default=True,
              help="File format to write.")
@click.option("--base", default=None, metavar="NAME|PATH",
              help="Base model (a registered name or a checkpoint folder) instead of the one linked at install: "
                   "gguf and ollama need its architecture, kohya names need its module paths.")
def export(reference: str, destination: str, fmt: str, base: str | None) -> None:
    """Write a stored adapter version out as a folder (PEFT, Ollama) or file (kohya, diffusers, GGUF).

    A folder format writes into a new or empty folder DESTINATION. A file format given an existing folder
    writes NAME.safetensors (NAME.gguf) inside it, as cp does; a DESTINATION without an extension gets the
    format's. Files get the mode of any new file (0644 under umask 022). kohya and diffusers are diffusion
    formats: an LLM adapter is refused in them (use peft or gguf).
    """
    from ..exporter import export_version

    path = export_version(open_registry(), reference, destination, fmt=fmt, base=base)
    click.echo(f"exported {reference} to {path}")


@click.command()
@click.argument("reference")
@click.option("--all", "all_versions", is_flag=True, help="Remove every version of the named adapter.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed and stop.")
def remove(reference: str, all_versions: bool, dry_run: bool) -> None:
    """Remove an adapter version from the registry (its blobs go at the next 'loramgr gc')."""
    from ..registry import execute_remove, plan_gc, plan_remove

    registry = open_registry()
    plan = plan_remove(registry, reference, all_versions=all_versions)
    for item in plan.items:
        tags = registry.show(item.label).tags
        dropped = f" and its tag(s) {', '.join(sorted(tags))}" if tags else ""
        click.echo(f"{'would remove' if dry_run else 'removed'} {item.label}{dropped}")
        if item.label in plan.dependents:
            click.echo(f"  {', '.join(plan.dependents[item.label])} keep(s) it as a parent in their lineage "
                       "(by digest; 'combine --recipe' will need its bytes again)")
    if not dry_run:
        execute_remove(registry, plan)
        freeable = plan_gc(registry).freed
        if freeable:
            click.echo(f"run 'loramgr gc' to free {human_size(freeable)} of blobs no longer used")


@click.command()
@click.argument("reference", required=False)
@click.option("--repair", is_flag=True,
              help="Restore missing or corrupt blobs from the files they were installed from or the Hub cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
def verify(reference: str | None, repair: bool, as_json: bool, quiet: bool) -> None:
    """Re-hash every stored blob (or one version's); exit 1 if any is missing or corrupt (and not repaired)."""
    from ..registry import verify as run_verify

    registry = open_registry()
    with progress_bars(quiet=quiet) as progress:
        report = run_verify(registry, reference, progress=progress)
        repaired = None
        if repair and not report.ok:
            from ..hub.install import hub_cache_dir
            from ..registry.doctor import repair as run_repair

            repaired = run_repair(registry, report, hub_cache=hub_cache_dir(), progress=progress)
    if as_json:
        echo_json({**report.to_dict(), **({"repair": repaired.to_dict()} if repaired else {})})
    else:
        for p in report.problems:
            click.echo(f"{p.problem} blob {p.digest} used by {', '.join(p.used_by)}", err=True)
        click.echo(f"verified {report.checked} blob(s): " + ("all intact" if report.ok else
                                                              f"{len(report.problems)} problem(s)"))
        for digest, origin in repaired.repaired if repaired else []:
            click.echo(f"repaired blob {digest} from {origin}")
        for digest, users in repaired.lost if repaired else []:
            click.echo(f"lost blob {digest}: nothing holds its bytes; {', '.join(users)} must be installed again",
                       err=True)
    if not (report.ok or (repaired is not None and repaired.ok)):
        raise SystemExit(1)


@click.command()
@click.option("--rebuild", is_flag=True, required=True,
              help="Rebuild the database rows of every intact stored version from its manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(rebuild: bool, as_json: bool) -> None:
    """Recover a registry whose database was lost or damaged, from the manifests kept with its blobs."""
    from ..registry.doctor import rebuild as run_rebuild

    report = run_rebuild()
    if as_json:
        echo_json(report.to_dict())
        return
    if report.moved_aside:
        click.echo(f"moved the unreadable database aside to {report.moved_aside}")
    for ref in report.rebuilt:
        click.echo(f"rebuilt {ref}")
    for manifest, reason in report.skipped:
        click.echo(f"skipped {manifest}: {reason}", err=True)
    click.echo(f"rebuilt {len(report.rebuilt)} version(s), {len(report.present)} already present, "
               f"{len(report.skipped)} skipped (tags and base models are not rebuilt)")


#: the files ``gc`` names one per line before its summary (``--verbose``: all of them)
GC_SHOWN = 10


@click.command()
@click.option("--dry-run", is_flag=True, help="Print what would be freed and stop.")
@click.option("-v", "--verbose", is_flag=True, help=f"Name every file (default: the first {GC_SHOWN}).")
def gc(dry_run: bool, verbose: bool) -> None:
    """Delete blobs that no version uses and files left by interrupted installs."""
    from ..registry import execute_gc, plan_gc

    registry = open_registry()
    plan = plan_gc(registry) if dry_run else execute_gc(registry)
    verb = "would free" if dry_run else "freed"
    shown = plan.items if verbose else plan.items[:GC_SHOWN]
    for item in shown:
        click.echo(f"{verb} {item.what} {item.label} ({human_size(item.size)})")
    if len(shown) < len(plan.items):
        click.echo(f"... and {len(plan.items) - len(shown)} more (--verbose names them all)")
    click.echo(f"{verb} {human_size(plan.freed)} in {len(plan.items)} file(s)")


COMMANDS = [install, list_, show, tag, untag, export, remove, verify, gc, doctor]
