"""Does an adapter fit a base model and a serving engine? Findings, not exceptions.

:func:`check` is the ``loramgr check`` step, for the CLI and for Python (``loramgr.check``): it opens
adapters and base models from paths or the registry and returns a :class:`CheckReport`.
:func:`check_adapters` is the same check on what is already open. Both return every problem at once
(a user fixing an adapter wants the whole list), each a :class:`~loramgr.compat.findings.Finding` with a
severity ("error": it will not load, or loads wrong; "warning": it loads, but probably not as meant;
"info": what could not be checked) and a machine-readable code. Callers that must refuse (combine,
install --base) raise on errors; ``loramgr check`` prints them and exits 1.

What is checked (docs/check.md):
- against a base fingerprint: every module resolves to one base module (:mod:`loramgr.compat.names`,
  the resolver fuse and apply use too) and its factors fit (A: r x in, B: out x r); a rank above
  min(d_in, d_out) is flagged;
- adapters checked together share a base: structural fingerprints equal (error), content digests
  (warning), declared names (warning);
- the engine's rules (:mod:`loramgr.compat.engines`);
- with a tensor reader: NaN / Inf, and adapters whose ΔW is zero.

Imports no torch: tensors come through the caller's reader as their stored bytes
(:class:`loramgr.merge.tensorfile.StoredTensor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import AdapterInfo, LoraAdapter, ModuleSpec
from ..errors import InvalidAdapterError
from ..formats.extras import base_findings
from ..formats.moe import KIND as PARAMETER
from .basemodel import BaseFingerprint, ModuleShape, fingerprint_base_model, module_shapes
from .engines import EngineSpec, Subject, engine_findings, parse_engine, same_name
from .findings import BASE_MISMATCH_CODES, CODES, Finding
from .identify import identify_adapter, identify_base_shapes, mismatch
from .names import ModuleIndex

if TYPE_CHECKING:
    from ..merge.tensorfile import StoredTensor
    from ..registry import Registry

__all__ = [
    "BASE_MISMATCH_CODES", "CODES", "CheckReport", "EngineSpec", "Finding", "TensorReader", "check",
    "check_adapters", "parse_engine", "safetensors_reader",
]  # fmt: skip

#: (adapter index, info) -> (tensor key, tensor) pairs; lets checks read values without knowing storage
TensorReader = Callable[[int, AdapterInfo], Iterable[tuple[str, "StoredTensor"]]]
#: an adapter to check: a registry reference, a path (a path-like, or a string naming a file or folder
#: that exists), or an adapter already open
Source = str | os.PathLike[str] | LoraAdapter
#: a base model: a registered base's name, a path, or a fingerprint
BaseSource = str | os.PathLike[str] | BaseFingerprint

_PROBLEM_CODES = {"missing": "missing-module", "ambiguous": "ambiguous-module", "duplicate": "duplicate-module"}


def _fits(spec: ModuleSpec, shape: ModuleShape, fan_in_fan_out: bool) -> str | None:
    """None when the factors fit the base weight, else what was expected and found."""
    out_f, in_f = shape.out_features, shape.in_features
    # embedding LoRA: A is r x num_embeddings, B dim x r; GPT-2 Conv1D (fan_in_fan_out) stores in x out
    if spec.kind == "embedding" or (fan_in_fan_out and len(shape.shape) == 2):
        out_f, in_f = shape.shape[1], shape.shape[0]
    kernel = spec.kernel
    if spec.kind == "conv" and kernel and len(shape.shape) == len(kernel) and kernel[1:] != shape.shape[1:]:
        return f"A has kernel {list(kernel)} but the base weight is {list(shape.shape)}"
    if (spec.out_features, spec.in_features) != (out_f, in_f) and spec.in_features and spec.out_features:
        return (
            f"adapter expects a {spec.out_features} x {spec.in_features} weight (A {spec.rank} x "
            f"{spec.in_features}, B {spec.out_features} x {spec.rank}) but the base has {list(shape.shape)}"
        )
    return None


def _check_parameters(info: AdapterInfo, label: str, base: BaseFingerprint, where: str) -> list[Finding]:
    """LoRA on parameters (PEFT ``target_parameters``): each names a parameter of the model transformers
    builds, experts x out x in (or experts x in x out where the experts module is transposed)."""
    findings: list[Finding] = []
    shapes = {**{k: shape for k, (shape, _) in base.tensors.items()}, **base.parameters}
    for spec in (m for m in info.modules if m.kind == PARAMETER):
        shape = shapes.get(spec.name)
        if shape is None:
            findings.append(Finding("error", "missing-module", label, spec.name, f"no such parameter in {where}"))
            continue
        experts = spec.kernel[0] if spec.kernel else 1
        fits = {(experts, spec.out_features, spec.in_features), (experts, spec.in_features, spec.out_features)}
        if tuple(shape) not in fits:
            findings.append(Finding("error", "shape", label, spec.name, f"adapter expects {experts} experts of "
                                    f"{spec.out_features} x {spec.in_features} but the base has {list(shape)}"))
    return findings


def _check_against_base(info: AdapterInfo, label: str, base: BaseFingerprint) -> list[Finding]:
    findings: list[Finding] = []
    shapes = module_shapes(base)
    size_problem = mismatch(identify_adapter(info), identify_base_shapes(shapes))
    if size_problem:  # another size of the same family: say that, not one shape error per module
        return [Finding("error", "base-structure", label, None, size_problem)]
    where = f"base {base.name or base.source}"
    findings += _check_parameters(info, label, base, where)
    mapping, unresolved = ModuleIndex(shapes).resolve(
        [m.name for m in info.modules if m.kind != PARAMETER], where=where
    )
    for problem in unresolved:
        findings.append(Finding("error", _PROBLEM_CODES[problem.problem], label, problem.module, problem.detail))
    fan_in_fan_out = bool(info.config.get("fan_in_fan_out"))
    for spec in info.modules:
        path = mapping.get(spec.name)
        if path is None or info.adapter_type == "ia3":
            continue
        problem_text = _fits(spec, shapes[path], fan_in_fan_out)
        if problem_text:
            findings.append(Finding("error", "shape", label, spec.name, problem_text))
        elif spec.kind != "embedding" and spec.rank > min(spec.in_features, spec.out_features) > 0:
            findings.append(
                Finding("warning", "rank-above-dims", label, spec.name, f"rank {spec.rank} exceeds min(d_in, d_out) = "
                        f"{min(spec.in_features, spec.out_features)}: the extra rank adds parameters, not capacity")
            )
    findings += base_findings(info, label, base.tensors)  # saved modules, biases, token rows (formats/extras.py)
    # kohya records the sha256 of the base checkpoint file; a single-file base with content digests can be compared
    declared_hash = (info.config.get("kohya") or {}).get("base_model_hash")
    file_digests = list((base.content_digests or {}).values())
    if declared_hash and len(file_digests) == 1 and file_digests[0] != f"sha256:{declared_hash}":
        message = f"trained on a base file with sha256 {declared_hash[:12]}, not this one (another fine-tune?)"
        findings.append(Finding("warning", "base-content", label, None, message))
    if info.base_model and base.name and not same_name(info.base_model, base.name):
        message = f"adapter declares base {info.base_model!r}, checking against {base.name!r}"
        findings.append(Finding("warning", "base-declared", label, None, message))
    return findings


def _check_shared_base(
    labels: list[str], infos: list[AdapterInfo], bases: list[BaseFingerprint | None], base: BaseFingerprint | None
) -> list[Finding]:
    findings: list[Finding] = []
    ref = base
    for label, fp in zip(labels, bases, strict=True):
        if fp is None:
            continue
        if ref is None:
            ref = fp
            continue
        if fp.structural != ref.structural:
            theirs, ours = fp.name or fp.structural[:19], ref.name or ref.structural[:19]
            message = f"made for a base of another structure ({theirs} vs {ours}): its modules do not fit"
            findings.append(Finding("error", "base-structure", label, None, message))
        elif fp.content and ref.content and fp.content != ref.content:
            findings.append(Finding("warning", "base-content", label, None, "made for another fine-tune of the same "
                                    "architecture (content digests differ)"))
    everyone = ", ".join(labels)
    hashes = {(i.config.get("kohya") or {}).get("base_model_hash") for i in infos} - {None}
    if len(hashes) > 1:
        findings.append(Finding("warning", "base-content", everyone, None,
                                "kohya adapters were trained on different base files (ss_new_sd_model_hash differs)"))
    declared = {i.base_model for i in infos if i.base_model}
    if len(declared) > 1:
        findings.append(Finding("warning", "base-declared", everyone, None,
                                f"adapters declare different base models: {', '.join(sorted(declared))}"))
    return findings


def _check_values(info: AdapterInfo, label: str, tensors: Iterable[tuple[str, StoredTensor]]) -> list[Finding]:
    findings: list[Finding] = []
    owner = {k: m.name for m in info.modules for k in (m.key_a, m.key_b, *m.extra_keys) if k}
    b_keys = {m.key_b for m in info.modules}
    nonzero_b = False
    for key, tensor in tensors:
        bad = tensor.non_finite()
        if bad is not None:
            findings.append(Finding("error", "non-finite", label, owner.get(key, key), f"tensor {key} contains {bad}"))
        if key in b_keys and tensor.any_nonzero():
            nonzero_b = True
    if info.adapter_type == "lora" and not nonzero_b:
        findings.append(Finding("warning", "zero-delta", label, None, "every lora_B is zero: ΔW = 0 (an untrained "
                                "adapter?)"))
    return findings


def check_adapters(
    adapters: list[AdapterInfo],
    *,
    base: BaseFingerprint | None = None,
    engine: str | EngineSpec | None = None,
    labels: list[str] | None = None,
    adapter_bases: list[BaseFingerprint | None] | None = None,
    tensor_reader: TensorReader | None = None,
) -> list[Finding]:
    """Check adapters against a base model, each other and an engine; every finding, errors first.

    ``labels`` name the adapters in findings (default ``#1``, ``#2``...). ``adapter_bases`` are the
    fingerprints each adapter was installed with (``install --base``), for the shared-base and
    architecture checks. ``tensor_reader`` enables the value checks (NaN / Inf / zero ΔW).
    """
    spec = parse_engine(engine) if isinstance(engine, str) else engine
    labels = labels or [f"#{i + 1}" for i in range(len(adapters))]
    bases = adapter_bases or [None] * len(adapters)
    if len(labels) != len(adapters) or len(bases) != len(adapters):
        raise ValueError("labels and adapter_bases must have one entry per adapter")
    findings: list[Finding] = []
    for i, (info, label) in enumerate(zip(adapters, labels, strict=True)):
        if not info.modules:
            findings.append(Finding("error", "empty", label, None, "the adapter has no modules (empty)"))
            continue
        if base is not None:
            findings += _check_against_base(info, label, base)
        if spec is not None:
            findings += engine_findings(Subject(info, label, spec, base, bases[i]))
        if tensor_reader is not None:
            findings += _check_values(info, label, tensor_reader(i, info))
    findings += _check_shared_base(labels, adapters, bases, base)
    if base is None:
        findings.append(Finding("info", "no-base", ", ".join(labels), None,
                                "no base model given: modules and shapes not checked"))
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda x: order[x.severity])


def safetensors_reader(paths: list[str]) -> TensorReader:
    """A TensorReader over each adapter's weights file (one path per adapter, in order)."""

    def read(index: int, info: AdapterInfo) -> Iterable[tuple[str, StoredTensor]]:
        from ..merge.tensorfile import TensorFile

        with TensorFile(paths[index]) as source:
            for key in source.header.tensors:
                yield key, source.stored(key)

    return read


# ---------------------------------------------------------------------------------------------------
# the check step: sources in, report out


@dataclass(frozen=True)
class CheckReport:
    """Every finding of one check, errors first, with the adapters' labels and the engine checked for."""

    findings: list[Finding]
    labels: list[str]
    engine: EngineSpec | None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors


class _Registry:
    """The registry, opened the first time a reference needs it."""

    def __init__(self, registry: Registry | None) -> None:
        self._registry = registry

    def __call__(self) -> Registry:
        if self._registry is None:
            from ..api import registry

            self._registry = registry()
        return self._registry


def _open_adapter(source: Source, registry: _Registry) -> tuple[str, LoraAdapter, BaseFingerprint | None]:
    """(label, adapter, the base it was installed for: known for references only) for one source."""
    if isinstance(source, LoraAdapter):
        return source.label, source, None
    if isinstance(source, os.PathLike) or os.path.exists(source):
        from ..api import load

        return str(source), load(Path(source)), None
    adapter = registry().open_adapter(source)
    linked: BaseFingerprint | None = registry().base_of(source)
    return source, adapter, linked


def open_base(source: BaseSource, registry: Registry | Callable[[], Registry]) -> BaseFingerprint:
    """A base model as users name it (``check --base``, ``export --base``, ``deploy``): a fingerprint, a
    checkpoint path (fingerprinted now, headers only) or a registered base's name."""
    if isinstance(source, BaseFingerprint):
        return source
    if isinstance(source, os.PathLike) or os.path.exists(source):
        return fingerprint_base_model(Path(source))
    opened = registry if not callable(registry) else registry()
    found: BaseFingerprint = opened.get_base(source)
    return found


def check(
    adapters: Sequence[Source],
    *,
    base: BaseSource | None = None,
    engine: str | EngineSpec | None = None,
    values: bool = False,
    registry: Registry | None = None,
) -> CheckReport:
    """Check adapters (references, paths or open adapters) against a base model, each other and an engine.

    ``base`` is a registered base's name, a base model's path (fingerprinted now, headers only) or a
    fingerprint. Without one, adapters given by reference that were all installed for the same
    registered base (``install --base``) are checked against it. ``values`` also reads every tensor (NaN / Inf, ΔW = 0).
    A malformed ``engine`` raises :class:`~loramgr.errors.EngineSpecError` before anything is opened.
    """
    spec = parse_engine(engine) if isinstance(engine, str) else engine
    if not adapters:
        raise InvalidAdapterError("no adapters to check", hint="give at least one adapter reference or path")
    opener = _Registry(registry)
    opened = [_open_adapter(source, opener) for source in adapters]
    labels = [label for label, _, _ in opened]
    linked = [b for _, _, b in opened]
    base_fp = open_base(base, opener) if base is not None else None
    if base_fp is None and all(b is not None for b in linked) and len({b.structural for b in linked if b}) == 1:
        base_fp = linked[0]  # every adapter was installed for the same registered base: check against it
    reader = safetensors_reader([str(a.weights_path) for _, a, _ in opened]) if values else None
    findings = check_adapters(
        [a.info for _, a, _ in opened],
        base=base_fp,
        engine=spec,
        labels=labels,
        adapter_bases=linked,
        tensor_reader=reader,
    )
    return CheckReport(findings, labels, spec)
