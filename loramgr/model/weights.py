"""Adapters against a model's modules: name resolution, compatibility check, fuse and unfuse.

Everything here works on any ``torch.nn.Module`` and needs torch only (no PEFT, no transformers), so
a user can fuse an adapter into a model from any library, and :mod:`loramgr.model.peftmodel` builds on the
same checks. An adapter is a :class:`~loramgr.adapter.LoraAdapter` (read from files) or anything with
a PEFT ``config`` and a state dict ``tensors`` (:class:`PeftAdapterLike`, e.g. a merge result).

Layouts: ΔW = s · B · A with A: r x in, B: out x r. A model stores that delta
as ``nn.Linear`` weight (out x in), transformers' GPT-2 ``Conv1D`` weight (in x out: PEFT's
``fan_in_fan_out``), a convolution weight (out x in x kh x kw, the factors flattened) or an
``nn.Embedding`` weight (num_embeddings x dim, the transpose of B · A).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..adapter import LoraAdapter, ModuleSpec
from ..compat.names import ModuleIndex
from ..errors import IncompatibleError, InvalidAdapterError
from ..formats.lycoris import require_plain_lora

if TYPE_CHECKING:
    import torch

#: submodules PEFT adds inside an adapted layer; they are never targets themselves
_PEFT_INTERNALS = frozenset(
    {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
     "lora_magnitude_vector", "modules_to_save", "original_module"}
)  # fmt: skip


@runtime_checkable
class PeftAdapterLike(Protocol):
    """An adapter held in memory the way PEFT saves it: an adapter config and a state dict.

    ``config`` is the adapter_config.json content (a dict, or a ``peft.LoraConfig``); ``tensors`` has
    keys like ``base_model.model.<module>.lora_A.weight``. A merge result (``MergedAdapter``) is one.
    """

    config: Any
    tensors: Mapping[str, torch.Tensor]


AdapterLike = LoraAdapter | PeftAdapterLike


class InMemoryAdapter(LoraAdapter):
    """A :class:`LoraAdapter` whose factors live in a dict instead of a safetensors file."""

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, label: str) -> None:
        from ..formats.peft import describe
        from ..safetensors_io import TORCH_DTYPE_NAMES, SafetensorsHeader, TensorEntry

        # describe() validates a PEFT state dict from its header; build that header from the tensors
        # so in-memory adapters get exactly the checks and ModuleSpecs of files read from disk.
        st_names = {torch_name: st for st, torch_name in TORCH_DTYPE_NAMES.items()}
        entries = {
            key: TensorEntry(st_names.get(str(t.dtype).removeprefix("torch."), "F32"), tuple(t.shape), (0, 0))
            for key, t in tensors.items()
        }
        header = SafetensorsHeader(path=Path(label), tensors=entries)
        for key in ("r", "lora_alpha"):  # describe() relies on these, as read_peft_folder checks them
            value = config.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise InvalidAdapterError(f"{label}: config {key} must be a positive number, found {value!r}")
        super().__init__(describe(dict(config), header, weights_file=""), label, label=label)
        self._tensors = tensors

    def factors(self, name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec(name)
        a, b = self._tensors[spec.key_a], self._tensors[spec.key_b]
        a = a.reshape(a.shape[0], -1)
        b = b.reshape(b.shape[0], -1)
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return a, b


def as_lora_adapter(adapter: AdapterLike) -> LoraAdapter:
    """Accept a LoraAdapter as is, or wrap an object with a PEFT ``config`` and ``tensors``."""
    if isinstance(adapter, LoraAdapter):
        if adapter.info.extras is None and adapter.info.format == "peft":
            return _with_extras(adapter)
        return adapter
    if isinstance(adapter, PeftAdapterLike):
        config = adapter.config
        if hasattr(config, "to_dict"):  # a peft.LoraConfig
            config = config.to_dict()
        config = {k: (getattr(v, "value", v) if k == "peft_type" else v) for k, v in dict(config).items()}
        label = getattr(adapter, "label", None) or f"<{type(adapter).__name__}>"
        return InMemoryAdapter(config, adapter.tensors, label=str(label))
    raise TypeError(f"expected a LoraAdapter or an object with .config and .tensors, got {type(adapter).__name__}")


def _with_extras(adapter: LoraAdapter) -> LoraAdapter:
    """A version recorded before loramgr read saved modules, biases and token rows, described again from its
    stored config and weights header, so that fuse and apply see every part of it."""
    from dataclasses import replace

    from ..formats.peft import describe
    from ..safetensors_io import read_header

    fresh = describe(dict(adapter.info.config), read_header(adapter.weights_path), adapter.info.weights_file)
    info = replace(adapter.info, modules=fresh.modules, extras=fresh.extras)
    return LoraAdapter(info, adapter.folder, label=adapter.label, weights_path=adapter.weights_path,
                       digest=adapter.digest)


@dataclass(frozen=True)
class Mismatch:
    """One reason an adapter does not fit a model: the adapter's module name and what is wrong."""

    module: str
    # "missing" | "ambiguous" | "duplicate" | "not a weight layer" | "kind" | "shape"; fuse adds
    # "tied", hotswap "rank" | "not loaded"
    problem: str
    detail: str

    def __str__(self) -> str:
        return f"{self.module}: {self.detail}"


class ModelMismatchError(IncompatibleError):
    """An adapter that does not fit a model; ``mismatches`` lists every problem, not only the first."""

    def __init__(self, adapter: str, mismatches: list[Mismatch], *, n_modules: int, hint: str) -> None:
        self.adapter = adapter
        self.mismatches = mismatches
        counts: dict[str, int] = {}
        for m in mismatches:
            counts[m.problem] = counts.get(m.problem, 0) + 1
        summary = ", ".join(f"{n} {problem}" for problem, n in counts.items())
        listing = "; ".join(str(m) for m in mismatches)
        super().__init__(
            f"adapter {adapter} does not fit the model ({summary}; {n_modules} adapter modules): {listing}",
            hint=hint,
        )


# ---------------------------------------------------------------------------------------------------
# name resolution


def _candidate_paths(model: torch.nn.Module) -> set[str]:
    return {path for path, _ in model.named_modules() if path and not _PEFT_INTERNALS.intersection(path.split("."))}


def resolve_names(model: torch.nn.Module, names: Iterable[str]) -> tuple[dict[str, str], list[Mismatch]]:
    """Map adapter module names to module paths of ``model``; unresolved names come back as mismatches.

    The rules are :class:`loramgr.compat.names.ModuleIndex`'s, the same ``loramgr check`` applies to a
    base fingerprint: the name itself; the model paths that end with it (wrapper levels the model
    adds, as ``LlamaForCausalLM`` around ``LlamaModel`` or a ``PeftModel``); the longest tail of it the
    model has (wrapper levels the adapter has, never a layer index); kohya names by their "_" form.
    """
    mapping, unresolved = ModuleIndex(_candidate_paths(model)).resolve(names, where="the model")
    return mapping, [Mismatch(u.module, u.problem, u.detail) for u in unresolved]


def resolve_module_names(model: torch.nn.Module, adapter: AdapterLike) -> dict[str, str]:
    """Adapter module name -> path in ``model`` for every module; raises listing all that fail."""
    lora = as_lora_adapter(adapter)
    mapping, problems = resolve_names(model, lora.module_names)
    if problems:
        raise ModelMismatchError(lora.label, problems, n_modules=len(lora.module_names), hint=_HINT)
    return mapping


_HINT = "the adapter was trained for another base model; check its base_model against this model"


# ---------------------------------------------------------------------------------------------------
# layouts and the compatibility check


@dataclass(frozen=True)
class _Layout:
    """How a module stores the delta B · A (out x in, flattened)."""

    kind: str  # "linear" | "conv" | "embedding"
    out_features: int
    in_features: int  # flattened for convolutions
    transposed: bool  # weight holds (B · A)^T: GPT-2 Conv1D and embeddings

    def to_weight(self, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return delta.T
        return delta.reshape(weight.shape)


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer that owns the weight: PEFT wraps adapted layers, keeping the original as base_layer."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def layout_of(module: torch.nn.Module) -> _Layout | None:
    """The weight layout of a layer, or None when it has no weight a LoRA can change."""
    import torch

    module = base_layer(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    if isinstance(module, torch.nn.Embedding):
        return _Layout("embedding", weight.shape[1], weight.shape[0], True)
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return _Layout("conv", weight.shape[0], math.prod(weight.shape[1:]), False)
    if weight.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: y = x @ W + b, W is in x out
        return _Layout("linear", weight.shape[1], weight.shape[0], True)
    return _Layout("linear", weight.shape[0], weight.shape[1], False)


def _spec_problem(spec: ModuleSpec, path: str, layout: _Layout | None) -> Mismatch | None:
    # name the model's path only where it differs from the adapter's name: the message stays short
    where = "the model's layer" if path == spec.name else f"the model's {path}"
    if layout is None:
        return Mismatch(spec.name, "not a weight layer", f"{where} has no weight matrix to adapt")
    if (spec.kind == "embedding") != (layout.kind == "embedding"):
        return Mismatch(spec.name, "kind", f"the adapter has a {spec.kind} LoRA, {where} is {layout.kind}")
    if (spec.out_features, spec.in_features) != (layout.out_features, layout.in_features):
        what = "dim x num_embeddings" if spec.kind == "embedding" else "out x in"
        return Mismatch(
            spec.name,
            "shape",
            f"the adapter's delta is {spec.out_features} x {spec.in_features} ({what}), "
            f"{where} needs {layout.out_features} x {layout.in_features}",
        )
    return None


def checked_mapping(model: torch.nn.Module, adapter: AdapterLike) -> tuple[LoraAdapter, dict[str, str]]:
    """Resolve and check every module at once; returns the adapter and its name -> path mapping."""
    lora = as_lora_adapter(adapter)
    mapping, problems = resolve_names(model, lora.module_names)
    for name, path in mapping.items():
        problem = _spec_problem(lora.spec(name), path, layout_of(model.get_submodule(path)))
        if problem:
            problems.append(problem)
    if lora.info.extras or any(m.key_bias for m in lora.info.modules):
        from .extras import resolve_extras

        problems += resolve_extras(model, lora, mapping)[1]
    if problems:
        order = {n: i for i, n in enumerate(lora.module_names)}
        problems.sort(key=lambda m: order.get(m.module, 0))
        raise ModelMismatchError(lora.label, problems, n_modules=len(order), hint=_HINT)
    return lora, mapping


def check_against_model(model: torch.nn.Module, adapter: AdapterLike) -> None:
    """Raise one :class:`ModelMismatchError` (an IncompatibleError) listing every module that does not fit.

    Checks that each adapter module resolves to exactly one layer of ``model`` with a weight of the
    right kind and shape. Reads no tensor data (shapes come from the adapter's metadata). dtype and
    device never make an adapter incompatible: :func:`fuse` computes in float32 and casts.
    """
    checked_mapping(model, adapter)


# ---------------------------------------------------------------------------------------------------
# fuse / unfuse


def fuse(model: torch.nn.Module, adapter: AdapterLike, scale: float = 1.0, *, allow_tied: bool = False) -> None:
    """Add ``scale`` · ΔW of every adapter module to the model's weights, in place.

    The delta is computed in float32 on the weight's device and the sum cast back to the weight's
    dtype, so a bfloat16 model loses no more precision than one rounding. The whole adapter is
    checked first: a model is never left half-fused by a mismatch found halfway.

    A weight shared by several modules (GPT-2's ``wte`` and ``lm_head``) is refused unless
    ``allow_tied``: fusing would change the other module too, which the adapter never did.

    A PEFT adapter's saved modules (``modules_to_save``), trained biases and trainable token rows
    replace the model's tensors and its LoRA biases are added, as PEFT's ``merge_and_unload`` does
    (:mod:`loramgr.model.extras`); the replaced tensors are kept on the model for :func:`unfuse`.
    """
    _add_deltas(model, adapter, scale, "fuse", allow_tied)


def unfuse(model: torch.nn.Module, adapter: AdapterLike, scale: float = 1.0, *, allow_tied: bool = False) -> None:
    """Subtract ``scale`` · ΔW: the exact inverse of :func:`fuse` up to float rounding.

    A float32 model gets its weights back within about 1e-6; in half precision each fuse and unfuse
    rounds once, so keep a copy of the weights if they must come back bit for bit. The tensors that
    fuse replaced (saved modules, biases, token rows) come back bit for bit.
    """
    _add_deltas(model, adapter, -scale, "unfuse", allow_tied)


def _refuse_tied(model: torch.nn.Module, lora: LoraAdapter, mapping: dict[str, str], operation: str) -> None:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.removesuffix(".weight"))
    problems = []
    for name, path in mapping.items():
        sharing = owners.get(id(base_layer(model.get_submodule(path)).weight), [])
        if len(sharing) > 1:
            others = ", ".join(s for s in sharing if s != path and not s.startswith(path + "."))
            problems.append(Mismatch(name, "tied", f"its weight is shared with {others}"))
    if problems:
        raise ModelMismatchError(
            lora.label,
            problems,
            n_modules=len(mapping),
            hint=f"untie the weights first, or pass allow_tied=True to {operation} into the shared weight",
        )


def _add_deltas(model: torch.nn.Module, adapter: AdapterLike, factor: float, operation: str, allow_tied: bool) -> None:
    import torch

    lora = as_lora_adapter(adapter)
    require_plain_lora(lora.info, operation, label=lora.label)  # also PiSSA & co. unconverted, MoE parameters
    lora, mapping = checked_mapping(model, lora)
    if not math.isfinite(factor):
        raise InvalidAdapterError(f"cannot {operation} with scale {factor}", path=lora.label)
    if not allow_tied:
        _refuse_tied(model, lora, mapping, operation)
    from .extras import prepare

    # saved modules, trained biases and token rows: checked before any weight changes, written after
    extras_step = prepare(model, lora, mapping, factor, operation, allow_tied=allow_tied)
    with torch.no_grad():
        for name, path in mapping.items():
            module = base_layer(model.get_submodule(path))
            layout = layout_of(module)
            weight = module.weight
            if layout is None or not isinstance(weight, torch.Tensor):  # checked_mapping refused these
                raise IncompatibleError(f"{path} has no weight matrix")
            a, b = lora.factors(name, torch.float32)
            a, b = a.to(weight.device), b.to(weight.device)
            scale = lora.spec(name).scale * factor
            if weight.dtype == torch.float32 and weight.is_contiguous():
                # accumulate in place: no out x in temporary (180 MB for a 7B MLP weight)
                if layout.transposed:  # W holds (B·A)^T = A^T · B^T
                    weight.addmm_(a.T, b.T, alpha=scale)
                else:
                    weight.view(layout.out_features, -1).addmm_(b, a, alpha=scale)
            else:
                delta = layout.to_weight((b @ a) * scale, weight)
                weight.copy_((weight.float() + delta).to(weight.dtype))
    if extras_step is not None:
        extras_step()
