"""Registry-level combine and compress: resolve sources, merge, then register with lineage and recipe.

The maths lives in :mod:`loramgr.merge`; this module connects it to the registry: sources come in
by reference, the result goes out as a new version whose lineage names its parents by digest and
whose recipe reproduces it bit for bit (``loramgr show REF --recipe``, ``loramgr combine --recipe``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..adapter import LoraAdapter
from ..errors import ConflictError, IntegrityError, MergeError
from ..registry import InstallResult, Parent, Registry
from .recipes import Recipe, RecipeSource, load_recipe

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint
    from . import MergedAdapter, MergeOptions

Progress = Callable[[str, int, int], None]


@dataclass
class CombineResult:
    merged: MergedAdapter
    recipe: Recipe
    installed: InstallResult | None = None
    output: Path | None = None
    notes: list[str] = field(default_factory=list)


def open_sources(registry: Registry, sources: Sequence[RecipeSource]) -> list[LoraAdapter]:
    """Resolve each source; a recorded digest must match what the reference resolves to."""
    adapters = []
    for source in sources:
        adapter = registry.open_adapter(source.ref if source.ref else str(source.digest))
        if source.digest and adapter.digest != source.digest:
            raise IntegrityError(
                f"{source.ref} is now {(adapter.digest or '')[:19]}, but the recipe was made from {source.digest[:19]}",
                digest=source.digest,
                hint=f"install the recorded version or edit the recipe to use ref = \"{source.digest}\"",
            )
        adapters.append(adapter)
    return adapters


def run_checks(
    adapters: Sequence[LoraAdapter], options: MergeOptions, bases: Sequence[BaseFingerprint | None] | None = None
) -> list[str]:
    """The plain-LoRA guard, then the same compatibility checks as ``loramgr check``, before any tensor is read.

    ``bases`` are the base fingerprints the adapters were installed for (None where unknown); when all
    share one, every module is checked against it too. ``allow_different_bases`` accepts the findings
    whose code says the bases differ (:data:`loramgr.compat.check.BASE_MISMATCH_CODES`), nothing else.
    """
    from ..compat.check import BASE_MISMATCH_CODES, check_adapters
    from ..formats.lycoris import require_plain_lora

    for adapter in adapters:
        require_plain_lora(adapter.info, "combine", label=adapter.label)
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


def merge_adapters(adapters: Sequence[LoraAdapter], options: MergeOptions, *, bases: Sequence[Any] | None = None,
                   progress: Progress | None = None) -> CombineResult:
    """Check, merge, and describe the result with its recipe (kept on ``merged.provenance``)."""
    from . import combine

    adapters = list(adapters)
    notes = run_checks(adapters, options, bases)
    merged = combine(adapters, options, progress=progress)
    weights = merged.options.weights or (1.0,) * len(adapters)
    recipe = Recipe(
        sources=[RecipeSource(a.label, w, a.digest) for a, w in zip(adapters, weights)],
        merge={k: v for k, v in merged.options.to_dict().items() if k != "weights"},
        loramgr_version=__version__,
    )
    merged.provenance = Provenance(recipe, adapters)
    notes += missing_notes(merged)
    return CombineResult(merged, recipe, notes=notes)


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


def combine_sources(
    registry: Registry,
    sources: Sequence[RecipeSource],
    options: MergeOptions,
    *,
    name: str | None = None,
    version: str | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> CombineResult:
    """Merge registered adapters; register the result as ``name`` or write it to ``output``."""
    if output is None and not name:
        raise MergeError("the combined adapter needs a --name (or --output DIR to write a folder instead)")
    if output is not None and Path(output).exists() and any(Path(output).iterdir()):
        raise ConflictError(f"{output} exists and is not empty", hint="choose a new or empty folder")
    adapters = open_sources(registry, sources)
    options = replace(options, weights=tuple(s.weight for s in sources))
    bases = [registry.base_of(a.label) for a in adapters]
    result = merge_adapters(adapters, options, bases=bases, progress=progress)
    if output is not None:
        result.output = result.merged.save_pretrained(output)
        return result
    result.installed = register_result(registry, result.merged, name=str(name), version=version)
    return result


@dataclass
class Provenance:
    """How a MergedAdapter was made: its recipe and the adapters it was made from."""

    recipe: Recipe
    parents: list[LoraAdapter]


def register_result(registry: Registry, merged: MergedAdapter, *, name: str, version: str | None) -> InstallResult:
    """Register a merge result with lineage (parents by digest) and its recipe."""
    from ..formats.peft import CONFIG_NAME, WEIGHTS_NAME, read_peft_folder

    provenance: Provenance | None = getattr(merged, "provenance", None)
    if provenance is None:
        raise MergeError("this adapter has no recorded provenance", hint="make it with loramgr.combine / compose")
    recipe = replace(provenance.recipe, output={"name": name, "version": version} if version else {"name": name})
    registry.store.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=registry.store.tmp_dir) as scratch:
        folder = merged.save_pretrained(Path(scratch) / "merged")
        info = read_peft_folder(folder)
        lineage = []
        for adapter, source in zip(provenance.parents, recipe.sources):
            parent_name, _, parent_version = adapter.label.partition("==")
            lineage.append(Parent(parent_name, parent_version, adapter.digest or "", source.weight))
        return registry.add(
            info,
            {CONFIG_NAME: folder / CONFIG_NAME, WEIGHTS_NAME: folder / WEIGHTS_NAME},
            name=name,
            version=version,
            source=f"combine:{recipe.merge.get('method')}",
            parents=lineage,
            recipe=recipe.to_record()
            | {"report": [{"module": m.name, "rank": m.rank, "kept_energy": m.kept_energy} for m in merged.modules]},
        )


def combine_from_recipe(
    registry: Registry,
    path: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> CombineResult:
    from . import MergeOptions

    recipe = load_recipe(path)
    options = options_from_dict(MergeOptions, recipe.merge)
    return combine_sources(
        registry,
        recipe.sources,
        options,
        name=name or recipe.output.get("name"),
        version=version or recipe.output.get("version"),
        output=output,
        progress=progress,
    )


def options_from_dict(cls: Any, data: dict[str, Any]) -> Any:
    try:
        return cls.from_dict(data)
    except TypeError as exc:
        raise MergeError(f"unknown merge parameter in recipe ({exc})") from None
