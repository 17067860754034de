"""combine() and compress(): validate, plan the modules, merge them one at a time.

Streaming: only one module's factors (and, for element-wise methods, its dense deltas) are in memory
at a time, next to the output built so far; sources are read lazily through LoraAdapter.factors.
Every refusal happens before any tensor is read, so a bad recipe fails in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from loramgr.adapter import LoraAdapter
from loramgr.errors import IncompatibleError, MergeError, UnsupportedAdapterError
from loramgr.merge.elementwise import module_seed
from loramgr.merge.lowrank import Factors, rerank_dense
from loramgr.merge.methods import METHODS, MergeMethod, ModuleJob
from loramgr.merge.options import DTYPES, MergeOptions, check_common
from loramgr.merge.result import (
    MergedAdapter,
    ModuleReport,
    OutputModule,
    build_config,
    shape_factors,
    tensor_keys,
)
from loramgr.merge.threads import single_threaded

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PlannedModule:
    """One output module: its layout and the indices of the sources that target it."""

    layout: OutputModule
    present: tuple[int, ...]


def combine(
    adapters: Sequence[LoraAdapter], options: MergeOptions, *, progress: Progress | None = None
) -> MergedAdapter:
    """Merge ``adapters`` with ``options`` (see docs/merge-methods.md for each method's maths).

    ``progress(module_name, done, total)`` is called after each module. Raises MergeError for bad
    parameters, IncompatibleError for adapters that do not fit together, UnsupportedAdapterError for
    adapter types that cannot be summed (DoRA, LoHa, ...).
    """
    adapters = list(adapters)
    method = _method(options)
    _check_options(options, method, len(adapters))
    options = options.with_defaults(len(adapters), method.uses_seed)
    _check_adapters(adapters, options)
    plan = _plan(adapters, options)
    weights = options.weights or ()
    dtype = getattr(torch, options.dtype or _source_dtype(adapters))

    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    with single_threaded() if method.factored else nullcontext():
        for done, planned in enumerate(plan, start=1):
            layout = planned.layout
            job = _load_job(adapters, weights, planned)
            factors = _merge_module(method, job, options, layout)
            a, b = shape_factors(factors.a.to(dtype), factors.b.to(dtype), layout)
            key_a, key_b = tensor_keys(layout.name, layout.kind)
            tensors[key_a], tensors[key_b] = a, b
            reports.append(_report(adapters, planned, factors))
            del job, factors
            if progress is not None:
                progress(layout.name, done, len(plan))

    first = adapters[0].info
    config = build_config(
        {r.name: r.rank for r in reports},
        base_model=first.base_model,
        revision=first.base_model_revision,
        task_type=next((a.info.task_type for a in adapters if a.info.task_type), None),
        fan_in_fan_out=bool(first.config.get("fan_in_fan_out", False)),
    )
    return MergedAdapter(
        config=config, tensors=tensors, modules=reports, options=options, sources=[a.label for a in adapters]
    )


def compress(
    adapter: LoraAdapter,
    *,
    rank: int | None = None,
    energy: float | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> MergedAdapter:
    """Re-rank one adapter to ``rank`` and/or the smallest rank keeping ``energy`` (optimal, per module).

    The same as ``combine([adapter], MergeOptions(method="svd", rank=rank, energy=energy))``; it also
    bakes rsLoRA and alpha_pattern scales into the factors, so the output has scale 1 everywhere.
    """
    if rank is None and energy is None:
        raise MergeError(f"{adapter.label}: compress needs a rank or an energy",
                         hint="e.g. rank=8 or energy=0.95")
    options = MergeOptions(method="svd", rank=rank, energy=energy, dtype=dtype)
    return combine([adapter], options, progress=progress)


def _method(options: MergeOptions) -> MergeMethod:
    try:
        return METHODS[options.method]
    except KeyError:
        raise MergeError(
            f"unknown merge method {options.method!r}", hint=f"use one of {', '.join(METHODS)}"
        ) from None


def _check_options(options: MergeOptions, method: MergeMethod, n_adapters: int) -> None:
    if n_adapters == 0:
        raise MergeError("no adapters to merge", hint="give at least one adapter")
    check_common(options)
    if options.weights is not None and len(options.weights) != n_adapters:
        raise MergeError(
            f"{len(options.weights)} weight(s) for {n_adapters} adapter(s)",
            hint="give one weight per adapter, in the same order",
        )
    if method.uses_density:
        if options.density is None:
            raise MergeError(f"method {method.name} needs a density", hint="e.g. density=0.5 keeps half")
        if not (0.0 < options.density <= 1.0):
            raise MergeError(f"density {options.density} is outside (0, 1]", hint="e.g. density=0.5")
    elif options.density is not None:
        raise MergeError(
            f"method {method.name} does not use a density (got {options.density})",
            hint="drop density, or use ties, dare_linear, dare_ties or magnitude_prune",
        )
    if options.seed is not None and not method.uses_seed:
        raise MergeError(
            f"method {method.name} is deterministic and does not use a seed (got {options.seed})",
            hint="drop seed; only dare_linear and dare_ties draw random masks",
        )


def _check_adapters(adapters: list[LoraAdapter], options: MergeOptions) -> None:
    """Refuse what cannot be summed as ΔW = s B A, before reading any tensor."""
    for adapter in adapters:
        info = adapter.info
        if info.use_dora or info.adapter_type == "dora":
            raise UnsupportedAdapterError(
                f"{adapter.label}: DoRA adapters cannot be merged (their delta depends on the base weights)",
                adapter_type="dora",
                hint="merge plain LoRA adapters only",
            )
        if info.adapter_type != "lora":
            from loramgr.formats.lycoris import TYPE_NAMES

            kind = TYPE_NAMES.get(info.adapter_type, info.adapter_type)
            raise UnsupportedAdapterError(
                f"{adapter.label}: a {kind} adapter is not a LoRA and cannot be merged",
                adapter_type=info.adapter_type,
                hint="merge plain LoRA adapters only",
            )
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
                hint="merge adapters of one base model, or set allow_different_bases",
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
                hint="drop strict to count a missing module as zero",
            )
        limit = min(first.in_features, first.out_features)
        if options.rank is not None and options.rank > limit:
            raise MergeError(
                f"rank {options.rank} exceeds min(d_in, d_out) = {limit} of module {name}",
                hint=f"give a rank <= {limit}",
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
    )


def _load_job(adapters: list[LoraAdapter], weights: tuple[float, ...], planned: PlannedModule) -> ModuleJob:
    name = planned.layout.name
    coefs, used_weights, scales, factors = [], [], [], []
    for index in planned.present:
        adapter = adapters[index]
        scale = adapter.spec(name).scale
        coefs.append(weights[index] * scale)
        used_weights.append(weights[index])
        scales.append(scale)
        factors.append(adapter.factors(name, torch.float32))
    return ModuleJob(name=name, coefs=coefs, weights=used_weights, scales=scales, factors=factors)


def _merge_module(
    method: MergeMethod, job: ModuleJob, options: MergeOptions, layout: OutputModule
) -> Factors:
    if method.factored:
        return method.merge_factors(job, options)
    dense = method.merge_dense(job, options)
    limit = min(layout.in_features, layout.out_features)
    rank = options.rank or min(method.default_rank([a.shape[0] for a, _ in job.factors]), limit)
    return rerank_dense(dense, rank=rank, energy=options.energy, seed=module_seed(0, job.name, "rerank"))


def _source_dtype(adapters: list[LoraAdapter]) -> str:
    """The sources' common dtype; float32 when they disagree (no source loses precision)."""
    found = {spec.dtype for adapter in adapters for spec in adapter.info.modules}
    return found.pop() if len(found) == 1 and found <= set(DTYPES) else "float32"

