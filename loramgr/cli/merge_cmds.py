"""combine and compress: click options generated from :class:`loramgr.merge.options.MergeOptions`.

One options type serves the CLI, the Python API and recipes, so a flag and a keyword argument cannot
drift apart: each dataclass field becomes ``--field-name`` with the field's help text.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from ..errors import MergeOptionError
from ..merge.options import MergeOptions, check_weight_count, option_help
from .render import echo_json, echo_warning, progress_bars

_SKIP = {"weights"}  # given as --weights 0.7,0.3
_WORDS = {"method", "space", "majority_sign", "dtype"}  # names, not values: --method SVD is --method svd


def _lower(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return value.lower() if value is not None else None


def _click_type(name: str) -> tuple[Any, bool]:
    """(click type, is_flag) for a MergeOptions field annotation (evaluated from its string)."""
    hint = typing.get_type_hints(MergeOptions)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    base = args[0] if args else hint
    if base is bool:
        return None, True
    return {int: int, float: float, str: str}.get(base, str), False


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def merge_options(exclude: set[str] | frozenset[str] = frozenset()) -> Decorator:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(MergeOptions)):
            if f.name in _SKIP or f.name in exclude:
                continue
            click_type, is_flag = _click_type(f.name)
            flag = "--" + f.name.replace("_", "-")
            help_text = option_help(f.name)
            if is_flag:
                func = click.option(flag, f.name, is_flag=True, default=None, help=help_text)(func)
            else:
                callback = _lower if f.name in _WORDS else None
                func = click.option(flag, f.name, type=click_type, default=None, help=help_text,
                                    callback=callback)(func)
        return func

    return decorate


def options_from_flags(flags: dict[str, Any], weights: tuple[float, ...] | None) -> MergeOptions:
    values = {k: v for k, v in flags.items() if v is not None}
    if weights is not None:
        values["weights"] = weights
    return MergeOptions(**values)


def parse_weights(text: str | None, count: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    try:
        check_weight_count(weights, count)
    except MergeOptionError as err:  # a miscount is a usage error, reported by click
        raise click.BadParameter(str(err), param_hint="--weights") from None
    return weights


def result_dict(result: Any) -> dict[str, Any]:
    """What ``combine --json`` and ``compress --json`` print."""
    merged = result.merged
    return {
        "method": merged.options.method,
        "space": merged.options.space,
        "modules": [{"name": m.name, "rank": m.rank, "kept_energy": m.kept_energy} for m in merged.modules],
        "notes": list(result.notes),
        "installed": result.installed.to_dict() if result.installed is not None else None,
        "output": str(result.output) if result.output is not None else None,
    }


def _report(result: Any, as_json: bool) -> None:
    from .render import human_size

    if as_json:
        echo_json(result_dict(result))
        return
    merged = result.merged
    exact = all(m.kept_energy >= 1.0 - 1e-9 for m in merged.modules)
    ranks = sorted({m.rank for m in merged.modules})
    kept = min((m.kept_energy for m in merged.modules), default=1.0)
    space = f" in {merged.options.space} space" if merged.options.space else ""
    click.echo(
        f"{merged.options.method}{space}: {len(merged.modules)} module(s), rank {', '.join(map(str, ranks))}, "
        + ("exact" if exact else f"lowest kept energy {kept:.2%}")
    )
    lossy = [m for m in merged.modules if m.kept_energy < 1.0 - 1e-9]
    if lossy and len(lossy) <= 12:
        for m in lossy:
            click.echo(f"  {m.name}: rank {m.rank}, keeps {m.kept_energy:.2%} of the energy")
    elif lossy:
        energies = sorted(m.kept_energy for m in lossy)
        click.echo(f"  {len(lossy)} re-ranked modules keep {energies[0]:.2%} (lowest), "
                   f"{energies[len(energies) // 2]:.2%} (median) of their energy; 'loramgr show NAME --json' "
                   "lists every module")
    for note in result.notes:
        echo_warning(note, label="note")
    if result.installed is not None:
        inst = result.installed
        if inst.created:
            click.echo(f"registered {inst.ref} ({human_size(inst.size)}, {inst.digest[:19]})")
        else:
            click.echo(f"already registered as {inst.ref} ({inst.digest[:19]}): same bytes")
    if result.output is not None:
        click.echo(f"wrote {result.output}")


@click.command()
@click.argument("references", nargs=-1)
@click.option("--weights", "weights_text", help="Comma-separated weights, one per adapter, e.g. 0.7,0.3.")
@merge_options()
@click.option("--name", help="Register the result under this name.")
@click.option("--version", "version", help="Version of the result (default: 0.1.0 or the next minor).")
@click.option("--output", type=click.Path(), help="Write a PEFT folder here instead of registering.")
@click.option("--recipe", "recipe_path", type=click.Path(), help="Take sources and parameters from a TOML recipe.")
@click.option("-q", "--quiet", is_flag=True, help="Draw no progress bar (drawn on a terminal only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (modules, ranks, version) as JSON.")
def combine(references: tuple[str, ...], weights_text: str | None, name: str | None, version: str | None,
            output: str | None, recipe_path: str | None, quiet: bool, as_json: bool, **flags: Any) -> None:
    """Combine adapters into a new one with a merge method (see --method).

    Every method works on each adapter's delta s*B*A; see docs/merge-methods.md.
    """
    from ..merge.operations import combine as combine_step
    from ..merge.operations import combine_from_recipe, require_destination

    with progress_bars(modules="combining", quiet=quiet) as progress:
        if recipe_path:
            if references or any(v is not None for v in flags.values()) or weights_text:
                raise click.UsageError("--recipe takes sources and parameters from the file; give no others")
            result = combine_from_recipe(recipe_path, name=name, version=version, output=output, progress=progress)
        else:
            if not references:
                raise click.UsageError("name the adapters to combine, or give --recipe FILE")
            require_destination(name, output)
            options = options_from_flags(flags, parse_weights(weights_text, len(references)))
            result = combine_step(list(references), options, name=name, version=version, output=output,
                                  progress=progress)
    _report(result, as_json)


@click.command()
@click.argument("reference")
@click.option("--rank", type=int, help="Rank of the result (every module).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of the energy.")
@click.option("--dtype", help="dtype of the written factors (default: the source's).")
@click.option("--name", help="Register the result under this name.")
@click.option("--version", "version", help="Version of the result.")
@click.option("--output", type=click.Path(), help="Write a PEFT folder here instead of registering.")
@click.option("-q", "--quiet", is_flag=True, help="Draw no progress bar (drawn on a terminal only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (modules, ranks, version) as JSON.")
def compress(reference: str, rank: int | None, energy: float | None, dtype: str | None, name: str | None,
             version: str | None, output: str | None, quiet: bool, as_json: bool) -> None:
    """Re-rank one adapter to a smaller rank: the optimal approximation, computed from its factors."""
    from ..merge.operations import compress as compress_step
    from ..merge.operations import require_destination

    dtype = dtype.lower() if dtype is not None else None  # a name, as --method: Float16 is float16
    require_destination(name, output)
    with progress_bars(modules="compressing", quiet=quiet) as progress:
        result = compress_step(reference, rank=rank, energy=energy, dtype=dtype, name=name, version=version,
                               output=output, progress=progress)
    _report(result, as_json)


COMMANDS = [combine, compress]
