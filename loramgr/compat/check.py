"""Does an adapter fit a base model and a serving engine? Findings, not exceptions.

:func:`check_adapters` returns every problem at once (a user fixing an adapter wants the whole list),
each a :class:`Finding` with a severity: "error" (it will not load, or loads wrong), "warning" (it
loads, but probably not as meant) and "info" (what could not be checked). Callers that must refuse
(combine, install --base) raise on errors; ``loramgr check`` prints them and exits 1.

What is checked and why (DOMAIN.md section 3, docs/check.md):
- against a base fingerprint: every module exists (PEFT's ``base_model.model.`` stripped, kohya names
  resolved against the base's module paths) and its factors fit (A: r x in, B: out x r), rank is not
  above min(d_in, d_out);
- adapters checked together share a base: structural fingerprints equal (error), content digests
  (warning), declared names (warning);
- the engine's documented rules: vLLM (max_lora_rank, no DoRA, no modules_to_save, bias "none", linear
  modules only), LoRAX / TGI (architecture), llama.cpp (architecture, every tensor in the base), PEFT;
- with a tensor reader: NaN / Inf, and adapters whose ΔW is zero.

Imports no torch at module level: tensors only come through the caller's reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapter import AdapterInfo, ModuleSpec
from ..errors import LoramgrError
from ..formats.kohya import resolve_kohya_names
from ..formats.lycoris import TYPE_NAMES
from .basemodel import BaseFingerprint, ModuleShape, module_shapes

if TYPE_CHECKING:
    import torch

#: (adapter index, info) -> (tensor key, tensor) pairs; lets checks read values without knowing storage
TensorReader = Callable[[int, AdapterInfo], Iterable[tuple[str, "torch.Tensor"]]]

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ENGINES: dict[str, dict[str, type]] = {
    "vllm": {"max-rank": int},
    "lorax": {},
    "tgi": {},
    "llama.cpp": {},
    "peft": {},
}
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    adapter: str
    module: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.adapter}" + (f" [{self.module}]" if self.module else "")
        return f"{self.severity}: {where}: {self.message}"


@dataclass(frozen=True)
class EngineSpec:
    """A parsed ``--engine`` value such as ``vllm:max-rank=64``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.name + (f":{opts}" if opts else "")


def parse_engine(spec: str) -> EngineSpec:
    """Parse ``name[:key=value,...]``; unknown engines, options or values raise a LoramgrError."""
    name, _, rest = spec.strip().partition(":")
    name = name.lower()
    if name not in ENGINES:
        raise LoramgrError(f"unknown engine {name!r}", hint=f"use one of {', '.join(ENGINES)}")
    allowed = ENGINES[name]
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            known = ", ".join(f"{k}=N" for k in allowed) or "no options"
            raise LoramgrError(f"engine {name}: bad option {item!r}", hint=f"{name} takes {known}")
        try:
            options[key] = allowed[key](value)
        except ValueError as exc:
            raise LoramgrError(f"engine {name}: {key} must be a number, not {value!r}") from exc
    if name == "vllm":
        rank = options.setdefault("max-rank", 16)
        if rank not in VLLM_RANKS:
            raise LoramgrError(
                f"engine vllm: max-rank {rank} is not one of vLLM's max_lora_rank choices",
                hint=f"use one of {', '.join(map(str, VLLM_RANKS))}",
            )
    return EngineSpec(name, options)


def find_module(name: str, shapes: dict[str, ModuleShape]) -> str | None:
    """The base module an adapter module name refers to: exact, without ``base_model.model.``, or the
    one base path that ends with it (LlamaModel vs LlamaForCausalLM "model." prefix), or vice versa."""
    for candidate in (name, name.removeprefix(_PEFT_PREFIX)):
        if candidate in shapes:
            return candidate
    stripped = name.removeprefix(_PEFT_PREFIX)
    matches = [p for p in shapes if p.endswith("." + stripped) or stripped.endswith("." + p)]
    return matches[0] if len(matches) == 1 else None


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


def _check_against_base(info: AdapterInfo, label: str, base: BaseFingerprint) -> list[Finding]:
    findings: list[Finding] = []
    shapes = module_shapes(base)
    names = {m.name: m.name for m in info.modules}
    if info.config.get("module_names") == "kohya":
        resolved = resolve_kohya_names(names, shapes)
        names = {k: v for k, v in resolved.items() if v is not None} | {
            k: k for k, v in resolved.items() if v is None
        }
    fan_in_fan_out = bool(info.config.get("fan_in_fan_out"))
    for spec in info.modules:
        path = find_module(names[spec.name], shapes)
        if path is None:
            findings.append(Finding("error", label, spec.name, f"no such module in base {base.name or base.source}"))
            continue
        if info.adapter_type == "ia3":
            continue
        problem = _fits(spec, shapes[path], fan_in_fan_out)
        if problem:
            findings.append(Finding("error", label, spec.name, problem))
        elif spec.kind != "embedding" and spec.rank > min(spec.in_features, spec.out_features) > 0:
            findings.append(
                Finding("warning", label, spec.name, f"rank {spec.rank} exceeds min(d_in, d_out) = "
                        f"{min(spec.in_features, spec.out_features)}: the extra rank adds parameters, not capacity")
            )
    # kohya records the sha256 of the base checkpoint file; a single-file base with content digests can be compared
    declared_hash = (info.config.get("kohya") or {}).get("base_model_hash")
    file_digests = list((base.content_digests or {}).values())
    if declared_hash and len(file_digests) == 1 and file_digests[0] != f"sha256:{declared_hash}":
        message = f"trained on a base file with sha256 {declared_hash[:12]}, not this one (another fine-tune?)"
        findings.append(Finding("warning", label, None, message))
    if info.base_model and base.name and not _same_name(info.base_model, base.name):
        message = f"adapter declares base {info.base_model!r}, checking against {base.name!r}"
        findings.append(Finding("warning", label, None, message))
    return findings


def _same_name(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        return x.rstrip("/").lower()

    return norm(a) == norm(b) or norm(a).rsplit("/", 1)[-1] == norm(b).rsplit("/", 1)[-1]


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
            findings.append(Finding("error", label, None, message))
        elif fp.content and ref.content and fp.content != ref.content:
            findings.append(Finding("warning", label, None, "made for another fine-tune of the same architecture "
                                    "(content digests differ)"))
    hashes = {(i.config.get("kohya") or {}).get("base_model_hash") for i in infos} - {None}
    if len(hashes) > 1:
        findings.append(Finding("warning", ", ".join(labels), None,
                                "kohya adapters were trained on different base files (ss_new_sd_model_hash differs)"))
    declared = {i.base_model for i in infos if i.base_model}
    if len(declared) > 1:
        findings.append(Finding("warning", ", ".join(labels), None,
                                f"adapters declare different base models: {', '.join(sorted(declared))}"))
    return findings


def _check_engine(info: AdapterInfo, label: str, engine: EngineSpec, base: BaseFingerprint | None,
                  own_base: BaseFingerprint | None) -> list[Finding]:
    f: list[Finding] = []
    kind = "dora" if info.use_dora else info.adapter_type
    type_name = TYPE_NAMES.get(kind, kind)

    def err(message: str, module: str | None = None) -> None:
        f.append(Finding("error", label, module, f"{engine.name}: {message}"))

    if engine.name != "peft" and info.format != "peft":
        err(f"serves PEFT adapter folders, this is a {info.format} file (export it with --format peft)")
    if engine.name == "peft" and info.format == "kohya":
        err("PEFT does not load kohya files; export with --format peft --base <model>")
    if kind != "lora" and not (engine.name == "peft" and kind == "dora" and info.format != "kohya"):
        err(f"{type_name} adapters are not supported")
    if engine.name == "vllm":
        limit = engine.options["max-rank"]
        pattern = info.config.get("rank_pattern") or {}
        ranks = [m.rank for m in info.modules] + [int(v) for v in pattern.values()] + [info.rank or 0]
        top = max(ranks)
        if top > limit:
            need = next((r for r in VLLM_RANKS if r >= top), None)
            hint = f"serve with --max-lora-rank {need}" if need else "vLLM has no max_lora_rank that large"
            worst = max(info.modules, key=lambda m: m.rank).name
            err(f"rank {top} exceeds max_lora_rank {limit} ({hint})", worst)
        if info.config.get("modules_to_save"):
            err(f"modules_to_save {info.config['modules_to_save']} is not supported")
        bias = info.config.get("bias", "none")
        if bias not in (None, "none"):
            err(f"bias {bias!r} is not supported (needs \"none\")")
        for spec in info.modules:
            if spec.kind == "conv":
                err("LoRA on convolutions is not supported (linear layers only)", spec.name)
        if info.base_model and base and base.name and not _same_name(info.base_model, base.name):
            f.append(Finding("warning", label, None, "vllm: its filesystem resolver compares "
                             f"base_model_name_or_path {info.base_model!r} with the served name {base.name!r}"))
    if engine.name in ("lorax", "tgi", "llama.cpp") and own_base and base:
        if own_base.architecture and base.architecture and own_base.architecture != base.architecture:
            err(f"adapter base architecture {own_base.architecture} differs from {base.architecture}")
        elif engine.name != "llama.cpp" and own_base.name and base.name and own_base.name != base.name:
            f.append(Finding("warning", label, None, f"{engine.name}: same architecture, other base name "
                             f"({own_base.name} vs {base.name})"))
    if engine.name == "llama.cpp" and base is None:
        f.append(Finding("info", label, None, "llama.cpp: pass a base model to verify every tensor exists in it"))
    return f


def _check_values(info: AdapterInfo, label: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> list[Finding]:
    import torch

    findings: list[Finding] = []
    owner = {k: m.name for m in info.modules for k in (m.key_a, m.key_b, *m.extra_keys) if k}
    b_keys = {m.key_b for m in info.modules}
    nonzero_b = False
    for key, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            findings.append(Finding("error", label, owner.get(key, key), f"tensor {key} contains {bad}"))
        if key in b_keys and bool(tensor.any()):
            nonzero_b = True
    if info.adapter_type == "lora" and not nonzero_b:
        findings.append(Finding("warning", label, None, "every lora_B is zero: ΔW = 0 (an untrained adapter?)"))
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
            findings.append(Finding("error", label, None, "the adapter has no modules (empty)"))
            continue
        if base is not None:
            findings += _check_against_base(info, label, base)
        if spec is not None:
            findings += _check_engine(info, label, spec, base, bases[i])
        if tensor_reader is not None:
            findings += _check_values(info, label, tensor_reader(i, info))
    findings += _check_shared_base(labels, adapters, bases, base)
    if base is None:
        findings.append(Finding("info", ", ".join(labels), None, "no base model given: modules and shapes not checked"))
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda x: order[x.severity])


def safetensors_reader(paths: list[str]) -> TensorReader:
    """A TensorReader over each adapter's weights file (one path per adapter, in order)."""

    def read(index: int, info: AdapterInfo) -> Iterable[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        with safe_open(paths[index], framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                yield key, handle.get_tensor(key)

    return read
