"""The combine and compress steps: one library function each, called by the CLI and the Python API.

:func:`combine` and :func:`compress` run a whole step in this order: check the options (before any
source is opened or numpy is imported), resolve the sources (a reference in the registry, checked
against a recorded digest; or an adapter already open), the plain-LoRA guard, the compatibility
checks of ``loramgr check``, the merge itself (:mod:`loramgr.merge.engine`), then deliver the result:
written to a folder, registered with its lineage (parents by digest) and recipe, or handed back in
memory. A result that goes to a folder or the registry is written module by module as it is merged
(into the folder's staging area, or the store's scratch area), never held whole in memory. The
recipe reproduces the result bit for bit (``loramgr show REF --recipe``, ``loramgr combine --recipe``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import LoraAdapter
from ..errors import IntegrityError, MergeError, MergeOptionError
from ..fileio import atomic_folder, require_new_folder
from ..formats.extras import refuse_extras
from .options import MergeOptions, compress_options, flag
from .recipes import Recipe, RecipeOutput, RecipeSource, load_recipe

#: the weights file of a PEFT folder (loramgr.formats.peft's name, without importing it here)
WEIGHTS_NAME = "adapter_model.safetensors"

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint
    from ..registry import InstallResult, Registry
    from .result import MergedAdapter

Progress = Callable[[str, int, int], None]
#: a source of a merge: a reference in the registry (a RecipeSource pins its digest) or an open adapter
Source = str | RecipeSource | LoraAdapter


@dataclass
class CombineResult:
    """The outcome of a combine or compress: the merged adapter and where it went."""

    merged: MergedAdapter
    installed: InstallResult | None = None  # when registered
    output: Path | None = None  # when written to a folder
    notes: list[str] = field(default_factory=list)  # warnings of the checks, modules some sources lack

    @property
    def recipe(self) -> Recipe:
        return self.merged.recipe


def combine(
    sources: Sequence[Source],
    options: MergeOptions,
    *,
    registry: Registry | None = None,
    name: str | None = None,
    version: str | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> CombineResult:
    """Combine ``sources`` with ``options``: register the result as ``name`` (``version``), or write it
    to the new folder ``output``, or (neither) return it in memory.

    The weights are ``options.weights`` (default 1.0 each). ``registry`` defaults to the one at
    LORAMGR_HOME, opened only when a source is a reference or the result is registered.
    """
    options.validate(len(sources), "combine")
    return _run(list(sources), options, "combine", registry, name, version, output, progress)


def compress(
    source: Source,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    registry: Registry | None = None,
    name: str | None = None,
    version: str | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> CombineResult:
    """Re-rank one adapter to ``rank`` and/or the smallest rank per module keeping ``energy``; the
    result goes where :func:`combine`'s does."""
    options = compress_options(rank=rank, energy=energy, dtype=dtype)
    options.validate(1, "compress")
    return _run([source], options, "compress", registry, name, version, output, progress)


def combine_from_recipe(
    path: str | Path,
    *,
    registry: Registry | None = None,
    name: str | None = None,
    version: str | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> CombineResult:
    """Run a recipe file again; ``name`` and ``version`` default to the recipe's output."""
    recipe = load_recipe(path)
    name = name or recipe.output.name
    require_destination(name, output)
    return combine(recipe.sources, recipe.options, registry=registry, name=name,
                   version=version or recipe.output.version, output=output, progress=progress)


def require_destination(name: str | None, output: str | Path | None) -> None:
    """A command that merges must say where the result goes."""
    if output is None and not name:
        raise MergeOptionError(
            f"the combined adapter needs a {flag('name')} (or --output DIR to write a folder instead)", option="name"
        )


def _run(
    sources: list[Source],
    options: MergeOptions,
    operation: str,
    registry: Registry | None,
    name: str | None,
    version: str | None,
    output: str | Path | None,
    progress: Progress | None,
) -> CombineResult:
    from .engine import merge, require_plain_loras

    if output is not None:
        require_new_folder(Path(output))
    if registry is None and (name or not all(isinstance(s, LoraAdapter) for s in sources)):
        from ..registry import Registry

        registry = Registry.open()
    adapters, bases = open_sources(registry, sources)
    require_plain_loras(adapters, operation)  # also PiSSA & co. unconverted, MoE target_parameters
    refuse_extras(adapters, operation)  # saved modules, biases, token rows: no merge method can carry them
    notes = run_checks(adapters, options, bases)
    if output is not None:
        with atomic_folder(output) as staging:
            merged = merge(adapters, options, operation=operation, progress=progress,
                           weights_file=staging / WEIGHTS_NAME)
            merged.save_pretrained(staging)
        merged.weights_path = Path(output) / WEIGHTS_NAME
        return CombineResult(merged, output=Path(output), notes=notes + missing_notes(merged))
    if name and registry is not None:  # a name always comes with a registry (opened above)
        with registry.store.scratch() as scratch:
            folder = scratch / "merged"
            folder.mkdir()
            merged = merge(adapters, options, operation=operation, progress=progress,
                           weights_file=folder / WEIGHTS_NAME)
            installed = _register_folder(registry, merged, folder, name=name, version=version)
        merged.weights_path = None  # the scratch folder is gone: the result lives in the registry
        return CombineResult(merged, installed=installed, notes=notes + missing_notes(merged))
    merged = merge(adapters, options, operation=operation, progress=progress)
    return CombineResult(merged, notes=notes + missing_notes(merged))


def open_sources(registry: Registry | None, sources: Sequence[Source]) -> tuple[list[LoraAdapter], list[Any]]:
    """Each source as an open adapter, with the base model it was installed for (None where unknown).

    A reference is resolved in ``registry`` once, however often it is given (the base is looked up
    by the exact ``name==version`` it resolved to); a recorded digest must match what it resolves to.
    """
    adapters: list[LoraAdapter] = []
    bases: list[Any] = []
    opened: dict[str, tuple[LoraAdapter, Any]] = {}
    for source in sources:
        if isinstance(source, LoraAdapter):
            adapters.append(source)
            bases.append(None)
            continue
        if registry is None:
            raise ValueError(f"{source!r} is a reference, which needs a registry")
        pinned = source if isinstance(source, RecipeSource) else RecipeSource(source, 1.0)
        reference = pinned.ref if pinned.ref else str(pinned.digest)
        if reference not in opened:
            adapter = registry.open_adapter(reference)
            opened[reference] = adapter, registry.base_of(adapter.label)
        adapter, base = opened[reference]
        if pinned.digest and adapter.digest != pinned.digest:
            raise IntegrityError(
                f"{pinned.ref} is now {(adapter.digest or '')[:19]}, but the recipe was made from "
                f"{pinned.digest[:19]}",
                digest=pinned.digest,
                hint=f"install the recorded version or edit the recipe to use ref = \"{pinned.digest}\"",
            )
        adapters.append(adapter)
        bases.append(base)
    return adapters, bases


def run_checks(
    adapters: Sequence[LoraAdapter], options: MergeOptions, bases: Sequence[BaseFingerprint | None] | None = None
) -> list[str]:
    """The same compatibility checks as ``loramgr check``, before any tensor is read (the plain-LoRA
    guard, :func:`~loramgr.merge.engine.require_plain_loras`, has run before them).

    ``bases`` are the base fingerprints the adapters were installed for (None where unknown); when all
    share one, every module is checked against it too. ``allow_different_bases`` accepts the findings
    whose code says the bases differ (:data:`loramgr.compat.check.BASE_MISMATCH_CODES`), nothing else.
    """
    from ..compat.check import BASE_MISMATCH_CODES, check_adapters

    bases = list(bases) if bases is not None else [None] * len(adapters)
    known = [b for b in bases if b is not None]
    common = known[0] if len(known) == len(bases) and len({b.structural for b in known}) == 1 else None
    findings = check_adapters(
        [a.info for a in adapters], base=common, engine=None, labels=[a.label for a in adapters], adapter_bases=bases
    )
    errors = [f for f in findings if f.severity == "error"]
    if options.allow_different_bases:
        errors = [f for f in errors if f.code not in BASE_MISMATCH_CODES]
    if errors:
        first = errors[0]
        raise MergeError(f"{first.adapter}: {first.message}", hint="run 'loramgr check' on the sources for details")
    return [f"{f.adapter}: {f.message}" for f in findings if f.severity == "warning"]


def missing_notes(merged: MergedAdapter) -> list[str]:
    """One line per group of modules that some sources lack (a 7B merge can have hundreds of them)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for module in merged.modules:
        if module.missing_in:
            groups.setdefault(tuple(module.missing_in), []).append(module.name)
    notes = []
    for missing, names in groups.items():
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        notes.append(f"{len(names)} module(s) ({', '.join(leaves)}) not in {', '.join(missing)}: counted as zero there")
    return notes


def register_result(registry: Registry, merged: MergedAdapter, *, name: str, version: str | None) -> InstallResult:
    """Register a merge result with lineage (parents by digest) and its recipe.

    The files are written to a scratch folder that holds the store's shared lock, so a ``gc`` running
    meanwhile waits instead of deleting them.
    """
    with registry.store.scratch() as scratch:
        return _register_folder(registry, merged, scratch / "merged", name=name, version=version)


def _register_folder(registry: Registry, merged: MergedAdapter, folder: Path, *, name: str,
                     version: str | None) -> InstallResult:
    """Save ``merged`` into ``folder`` (its weights may be there already) and register that folder."""
    from ..formats.peft import CONFIG_NAME, read_peft_folder
    from ..registry import Parent

    recipe = replace(merged.recipe, output=RecipeOutput(name, version))
    merged.save_pretrained(folder)
    info = read_peft_folder(folder)
    lineage = []
    for source in recipe.sources:
        parent_name, _, parent_version = source.ref.partition("==")
        lineage.append(Parent(parent_name, parent_version, source.digest or "", source.weight))
    return registry.add(
        info,
        {CONFIG_NAME: folder / CONFIG_NAME, WEIGHTS_NAME: folder / WEIGHTS_NAME},
        name=name,
        version=version,
        source=f"combine:{recipe.method}",
        parents=lineage,
        recipe=recipe.to_record()
        | {"report": [{"module": m.name, "rank": m.rank, "kept_energy": m.kept_energy} for m in merged.modules]},
    )
