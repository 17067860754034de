"""combine() and compress() on open adapters: check, plan the modules, merge them one at a time.

Checks come first, in this order, all before any tensor is read, so a bad merge fails in
milliseconds: the options (:meth:`MergeOptions.validate`); the plain-LoRA guard over every source
(a LoHa is refused as a LoHa, whatever else would be wrong with it); what the sources must share
(module names, bias, base model, layout); and whether the merge would only copy its one source.

Streaming: each source file is opened once (LoraAdapter.open_weights) and read one module at a time;
only one module's factors (and, for full-space element-wise methods, its dense deltas) are in memory
at a time. Given a ``weights_file``, the output goes there module by module as it is produced (a
spill file beside it, assembled at the end: :class:`~loramgr.merge.tensorfile.SpillWriter`), so the
peak memory is one module's working set whatever the adapter's size; without one it is kept in memory.
The maths runs on numpy arrays: no torch (except for DARE's masks in full space, PEFT's torch stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from loramgr import __version__
from loramgr.adapter import LoraAdapter
from loramgr.errors import IncompatibleError, MergeOptionError, NothingToMergeError, UnsupportedAdapterError
from loramgr.fileio import write_atomic_with
from loramgr.formats.lycoris import require_plain_lora
from loramgr.formats.peftconfig import one_model_names
from loramgr.merge.lowrank import Factors
from loramgr.merge.methods import MergeMethod, ModuleJob
from loramgr.merge.options import DTYPES, MergeOptions, compress_options, flag
from loramgr.merge.recipes import Recipe, RecipeSource
from loramgr.merge.result import (
    METADATA,
    Array,
    MergedAdapter,
    ModuleReport,
    OutputModule,
    build_config,
    shape_factors,
    tensor_keys,
)
from loramgr.merge.tensorfile import SpillWriter, TensorFile, round_to_dtype
from loramgr.merge.threads import single_threaded

Progress = Callable[[str, int, int], None]

#: how an operation names itself in the plain-LoRA guard's message
@dataclass(frozen=True)
class PlannedModule:
    """One output module: its layout and the indices of the sources that target it."""

    layout: OutputModule
    present: tuple[int, ...]


def combine(
    adapters: Sequence[LoraAdapter], options: MergeOptions, *, progress: Progress | None = None
) -> MergedAdapter:
    """Merge ``adapters`` with ``options`` (see docs/merge-methods.md for each method's maths).

    ``progress(module_name, done, total)`` is called after each module. Raises MergeOptionError for
    bad options, NothingToMergeError when the result would only copy a single source,
    IncompatibleError for adapters that do not fit together, UnsupportedAdapterError for adapter
    types that cannot be summed (DoRA, LoHa, ...).
    """
    return merge(adapters, options, operation="combine", progress=progress)


def compress(
    adapter: LoraAdapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> MergedAdapter:
    """Re-rank one adapter to ``rank`` and/or the smallest rank keeping ``energy`` (optimal, per module).

    The optimal re-rank (``svd``) of the one source; it also bakes rsLoRA and alpha_pattern scales
    into the factors, so the output has scale 1 everywhere. Refused when no module would lose rank.
    """
    options = compress_options(rank=rank, energy=energy, dtype=dtype)
    return merge([adapter], options, operation="compress", progress=progress)


def merge(
    adapters: Sequence[LoraAdapter],
    options: MergeOptions,
    *,
    operation: str,
    progress: Progress | None = None,
    weights_file: Path | None = None,
) -> MergedAdapter:
    """What :func:`combine` and :func:`compress` share; ``operation`` ("combine" or "compress") names
    the step in errors. The result carries its :class:`~loramgr.merge.recipes.Recipe`.

    With ``weights_file`` the tensors are written there (atomically) as they are produced and the
    result holds none of them; without it they are held in memory."""
    adapters = list(adapters)
    method = options.validate(len(adapters), operation)
    require_plain_loras(adapters, operation)
    _check_adapters(adapters, options)
    options = options.with_defaults(len(adapters), method)
    refuse_copy(adapters, options, method, operation)
    plan = _plan(adapters, options)
    # the PEFT folder describes one model: a UNet LoRA read from a diffusers or kohya file loses its "unet."
    paths = one_model_names([a.info for a in adapters], [p.layout.name for p in plan])
    weights = options.weights or ()
    dtype = options.dtype or _source_dtype(adapters)

    arrays: dict[str, Array] = {}
    reports: list[ModuleReport] = []
    with ExitStack() as stack:
        stack.enter_context(single_threaded() if method.factored(options) else nullcontext())
        opened: dict[Path, TensorFile] = {}  # a file given twice (combine a a) is still opened once
        for adapter in adapters:
            if adapter.weights_path not in opened:
                opened[adapter.weights_path] = stack.enter_context(adapter.open_weights())
        files = [opened[adapter.weights_path] for adapter in adapters]
        writer = None
        if weights_file is not None:
            writer = SpillWriter(weights_file.with_name(f".{weights_file.name}.spill"), dtype)
            stack.callback(writer.discard)
        for done, planned in enumerate(plan, start=1):
            layout = planned.layout
            job = _load_job(adapters, files, weights, planned)
            factors = method.merge_module(job, options)
            a, b = shape_factors(round_to_dtype(factors.a, dtype), round_to_dtype(factors.b, dtype), layout)
            key_a, key_b = tensor_keys(paths[layout.name], layout.kind)
            if writer is None:
                arrays[key_a], arrays[key_b] = a, b
            else:
                writer.add(key_a, a)
                writer.add(key_b, b)
            reports.append(replace(_report(adapters, planned, factors), name=paths[layout.name]))
            del job, factors, a, b
            if progress is not None:
                progress(layout.name, done, len(plan))
        if writer is not None and weights_file is not None:
            write_atomic_with(weights_file, lambda tmp: writer.finish(tmp, METADATA))

    first = adapters[0].info
    config = build_config(
        {r.name: r.rank for r in reports},
        base_model=first.base_model,
        revision=first.base_model_revision,
        task_type=next((a.info.task_type for a in adapters if a.info.task_type), None),
        fan_in_fan_out=bool(first.config.get("fan_in_fan_out", False)),
    )
    recipe = Recipe(
        sources=tuple(RecipeSource(a.label, w, a.digest) for a, w in zip(adapters, weights, strict=True)),
        options=options,
        loramgr_version=__version__,
    )
    return MergedAdapter(config=config, arrays=arrays, modules=reports, dtype=dtype, recipe=recipe,
                         weights_path=weights_file)


def require_plain_loras(adapters: Sequence[LoraAdapter], operation: str) -> None:
    """The plain-LoRA guard over every source, before any other check looks at them."""
    for adapter in adapters:
        require_plain_lora(adapter.info, operation, label=adapter.label)


def refuse_copy(adapters: list[LoraAdapter], options: MergeOptions, method: MergeMethod, operation: str) -> None:
    """Refuse a merge whose result would be its one source again (as a re-factored copy).

    One source with weight 1, through a method that gives a source back unchanged, with no module
    losing rank: the delta stays what it was. A weight or scale other than 1, an energy, a rank
    below some module's rank, an element-wise method (pruning) or another dtype each change it.
    """
    if len(adapters) != 1 or not method.copies_single_source or options.energy is not None:
        return
    if options.dtype is not None and options.dtype != _source_dtype(adapters):
        return
    if options.weights is not None and options.weights[0] != 1.0:
        return
    if options.scale != 1.0:
        return
    adapter = adapters[0]
    top = max((spec.rank for spec in adapter.info.modules), default=0)
    if options.rank is not None and options.rank < top:
        return
    if operation == "compress":
        raise NothingToMergeError(
            f"every module of {adapter.label} has rank {top} or less: compressing it to rank {options.rank} "
            "would only copy it",
            operation=operation, reference=adapter.label,
            hint=f"give a {flag('rank')} below {top}, or {flag('energy')} to choose each module's rank",
        )
    raise NothingToMergeError(
        f"combining {adapter.label} alone with weight 1 would only copy it", operation=operation,
        reference=adapter.label,
        hint=f"combine needs at least two adapters; use compress to re-rank one, or {flag('weights')} to scale it",
    )


def _check_adapters(adapters: list[LoraAdapter], options: MergeOptions) -> None:
    """Refuse what cannot be summed as ΔW = s B A, before reading any tensor."""
    for adapter in adapters:
        info = adapter.info
        if info.config.get("module_names") == "kohya":
            raise IncompatibleError(
                f"{adapter.label}: its module names are kohya names, not module paths of a base model",
                hint="install it with --base BASE (see 'loramgr base add') so the names resolve",
            )
        if info.config.get("bias", "none") not in (None, "none"):
            raise UnsupportedAdapterError(
                f"{adapter.label}: bias={info.config['bias']!r} trains biases a merge would drop",
                adapter_type=info.adapter_type,
                hint="merge adapters saved with bias='none'",
            )
        if info.config.get("modules_to_save"):
            raise UnsupportedAdapterError(
                f"{adapter.label}: modules_to_save {info.config['modules_to_save']} are full copies a merge "
                "would drop",
                adapter_type=info.adapter_type,
                hint="merge adapters without modules_to_save",
            )
    first = adapters[0]
    for adapter in adapters[1:]:
        if adapter.info.base_model != first.info.base_model and not options.allow_different_bases:
            raise IncompatibleError(
                f"{adapter.label}: base model {adapter.info.base_model!r} differs from "
                f"{first.info.base_model!r} of {first.label}",
                hint=f"merge adapters of one base model, or give {flag('allow_different_bases')}",
            )
        fan = bool(adapter.info.config.get("fan_in_fan_out", False))
        if fan != bool(first.info.config.get("fan_in_fan_out", False)):
            raise IncompatibleError(
                f"{adapter.label}: fan_in_fan_out={fan} differs from {first.label}",
                hint="the adapters target different layer types; they cannot share one config",
            )


def _plan(adapters: list[LoraAdapter], options: MergeOptions) -> list[PlannedModule]:
    """The output modules in order of first appearance, with shape and rank checks."""
    names: dict[str, list[int]] = {}
    for index, adapter in enumerate(adapters):
        for name in adapter.module_names:
            names.setdefault(name, []).append(index)
    plan = []
    for name, present in names.items():
        first = adapters[present[0]].spec(name)
        for index in present[1:]:
            spec = adapters[index].spec(name)
            if (spec.in_features, spec.out_features, spec.kind) != (
                first.in_features, first.out_features, first.kind
            ):
                raise IncompatibleError(
                    f"{adapters[index].label}: module {name} is {spec.kind} {spec.out_features}x"
                    f"{spec.in_features} but {first.kind} {first.out_features}x{first.in_features} in "
                    f"{adapters[present[0]].label}",
                    hint="the adapters were trained on different architectures",
                )
        if options.strict and len(present) < len(adapters):
            lacking = ", ".join(adapters[i].label for i in range(len(adapters)) if i not in present)
            raise IncompatibleError(
                f"{lacking}: no module {name} (strict)",
                hint=f"drop {flag('strict')} to count a missing module as zero",
            )
        limit = min(first.in_features, first.out_features)
        if options.rank is not None and options.rank > limit:
            raise MergeOptionError(
                f"{flag('rank')} {options.rank} exceeds min(d_in, d_out) = {limit} of module {name}",
                option="rank", value=options.rank, hint=f"give {flag('rank')} {limit} or less",
            )
        layout = OutputModule(name, first.in_features, first.out_features, first.kind, first.kernel)
        plan.append(PlannedModule(layout=layout, present=tuple(present)))
    return plan


def _report(adapters: list[LoraAdapter], planned: PlannedModule, factors: Factors) -> ModuleReport:
    layout = planned.layout
    return ModuleReport(
        name=layout.name,
        rank=factors.rank,
        kept_energy=factors.kept_energy,
        sources=tuple(adapters[i].label for i in planned.present),
        missing_in=tuple(a.label for i, a in enumerate(adapters) if i not in planned.present),
        in_features=layout.in_features,
        out_features=layout.out_features,
        kind=layout.kind,
        kernel=layout.kernel,
    )


def _load_job(
    adapters: list[LoraAdapter], files: list[TensorFile], weights: tuple[float, ...], planned: PlannedModule
) -> ModuleJob:
    name = planned.layout.name
    coefs, used_weights, scales, factors = [], [], [], []
    for index in planned.present:
        adapter = adapters[index]
        scale = adapter.spec(name).scale
        coefs.append(weights[index] * scale)
        used_weights.append(weights[index])
        scales.append(scale)
        factors.append(adapter.array_factors(name, files[index]))
    limit = min(planned.layout.in_features, planned.layout.out_features)
    return ModuleJob(name=name, coefs=coefs, weights=used_weights, scales=scales, factors=factors, max_rank=limit)


def _source_dtype(adapters: list[LoraAdapter]) -> str:
    """The sources' common dtype; float32 when they disagree (no source loses precision)."""
    found = {spec.dtype for adapter in adapters for spec in adapter.info.modules}
    return found.pop() if len(found) == 1 and found <= set(DTYPES) else "float32"

