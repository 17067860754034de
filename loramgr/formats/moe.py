"""LoRA on parameters (PEFT ``target_parameters``): the fused expert tensors of MoE models.

transformers keeps the experts of Mixtral, Qwen3-MoE, gpt-oss and their relatives as 3-D parameters of
one module (``mlp.experts.gate_up_proj``: num_experts x out x in, or in x out where the module says
``is_transposed``), not as Linear layers. PEFT adapts them with ``lora.ParamWrapper``
(peft/tuners/lora/layer.py) and saves, per adapted parameter:

- ``<module>.lora_A.weight``: (rank · num_experts) x in, expert-major: A_e = A[e·r:(e+1)·r]
- ``<module>.lora_B.weight``: out x (rank · num_experts), expert-minor: B_e = B[:, e::num_experts]

with ΔW_e = s · B_e · A_e for each expert e (s = alpha / r, r per expert). The keys name the module,
not the parameter: when several parameters of one module are adapted, PEFT nests the wrappers in the
module's declaration order, the first parameter innermost, and the deeper ones are saved under
``<module>.base_layer[.base_layer...]``. So ``experts.base_layer.lora_A`` belongs to ``gate_up_proj``
and ``experts.lora_A`` to ``down_proj`` for transformers' experts modules, which declare gate_up_proj
(or gate_proj, up_proj) before down_proj. An adapter that nests parameters in an order loramgr cannot
tell from the files alone is refused by name.

Such a module is described as a :class:`~loramgr.adapter.ModuleSpec` of kind ``"parameter"`` named
``<module>.<parameter>``, with the per-expert rank, per-expert in / out features and ``kernel`` =
(num_experts, rank, in): the shape PEFT unflattens A to. Apply loads the adapter through PEFT itself
(:func:`apply_parameter_targets`); fuse, combine and export refuse it by name
(:func:`require_no_parameter_targets`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..adapter import ModuleSpec
from ..errors import InvalidAdapterError, UnsupportedAdapterError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from ..adapter import AdapterInfo

KIND = "parameter"
WRAPPER = ".base_layer"
#: the order transformers' fused experts modules declare their parameters in (PEFT's nesting order)
DECLARATION_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")

#: (key, shape, dtype) of each factor, as formats/peft.py collects them per module
Parts = dict[str, dict[str, tuple[str, tuple[int, ...], str]]]


def parameter_targets(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_parameters") or []
    return [str(t) for t in targets] if isinstance(targets, list) else []


def _targeted_parameters(module: str, targets: list[str]) -> list[str]:
    """The parameter names of ``module`` that ``target_parameters`` selects (PEFT's matching: the key
    ``<module>.<parameter>`` equals a target or ends with ``.<target>``)."""
    found: list[str] = []
    for target in targets:
        owner, _, param = target.rpartition(".")
        key = f"{module}.{param}"
        if (key == target or key.endswith("." + target)) and param not in found:
            found.append(param)
    return found


def take_parameter_targets(config: dict[str, Any], parts: Parts, path: str, *,
                           pattern_value: Any) -> list[ModuleSpec]:
    """Take the modules of ``parts`` that hold LoRA on parameters out of it, and describe each parameter.

    ``parts`` maps the module names of the weights file (``...experts.base_layer``) to their factors.
    ``pattern_value`` is PEFT's rank_pattern / alpha_pattern lookup (formats/peft.py). Raises
    InvalidAdapterError naming the module when the factors do not fit the config.
    """
    targets = parameter_targets(config)
    if not targets:
        return []
    nested: dict[str, dict[int, str]] = {}  # module -> nesting depth -> name in parts
    for name in parts:
        depth = 0
        module = name
        while module.endswith(WRAPPER):
            module, depth = module[: -len(WRAPPER)], depth + 1
        if _targeted_parameters(module, targets):
            nested.setdefault(module, {})[depth] = name
    specs: list[ModuleSpec] = []
    for module in sorted(nested):
        params = _in_nesting_order(module, _targeted_parameters(module, targets), nested[module], path)
        for depth, param in params.items():
            specs.append(_describe(config, f"{module}.{param}", parts.pop(nested[module][depth]), path,
                                   pattern_value))
    return specs


def _in_nesting_order(module: str, candidates: list[str], depths: dict[int, str], path: str) -> dict[int, str]:
    """Which parameter each nesting depth of ``module`` holds (depth 0: the outermost wrapper)."""
    levels = sorted(depths)
    if levels != list(range(len(levels))) or len(levels) > len(candidates):
        raise InvalidAdapterError(
            f"{path}: module {module} has LoRA factors at {len(levels)} nesting level(s) but target_parameters "
            f"selects {len(candidates)} of its parameters ({', '.join(candidates)})", path=path, module=module,
            hint="the weights file and target_parameters disagree; re-save the adapter with PEFT")
    if len(levels) == 1 and len(candidates) == 1:
        return {0: candidates[0]}
    if any(c not in DECLARATION_ORDER for c in candidates) or len(levels) != len(candidates):
        raise UnsupportedAdapterError(
            f"{path}: module {module} has LoRA on {len(levels)} of the parameters {', '.join(candidates)}, saved "
            "under nested names that depend on the base model's declaration order, which loramgr cannot tell",
            path=path, module=module, adapter_type="lora",
            hint="target one parameter per module, or load the adapter with PEFT (PeftModel.from_pretrained)")
    declared = sorted(candidates, key=DECLARATION_ORDER.index)
    return {len(declared) - 1 - i: param for i, param in enumerate(declared)}  # the first declared is innermost


def _describe(config: dict[str, Any], name: str, found: dict[str, tuple[str, tuple[int, ...], str]], path: str,
              pattern_value: Any) -> ModuleSpec:
    if "lora_A" not in found or "lora_B" not in found:
        missing = "lora_B" if "lora_A" in found else "lora_A"
        raise InvalidAdapterError(f"{path}: parameter {name} has no {missing}", path=path, module=name,
                                  hint="the weights file is incomplete; re-save the adapter")
    (key_a, shape_a, dtype), (key_b, shape_b, _) = found["lora_A"], found["lora_B"]
    rank = int(pattern_value(config.get("rank_pattern") or {}, name, config["r"]))
    rows = shape_a[0] if len(shape_a) == 2 else 0
    if len(shape_a) != 2 or len(shape_b) != 2 or rows % rank or shape_b[1] != rows:
        raise InvalidAdapterError(
            f"{path}: parameter {name}: lora_A {list(shape_a)} and lora_B {list(shape_b)} are not PEFT's per-expert "
            f"factors of rank {rank} (A: rank·experts x in, B: out x rank·experts)", path=path, module=name,
            hint="fix r / rank_pattern in adapter_config.json to match the weights")
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
    return ModuleSpec(name=name, rank=rank, alpha=alpha, in_features=shape_a[1], out_features=shape_b[0],
                      key_a=key_a, key_b=key_b, dtype=dtype, kind=KIND, use_rslora=bool(config.get("use_rslora")),
                      kernel=(rows // rank, rank, shape_a[1]))


def num_experts(spec: ModuleSpec) -> int:
    return spec.kernel[0] if spec.kernel else 1


def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's per-expert factors: A (experts x rank x in) and B (experts x out x rank)."""
    return a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)


def require_no_parameter_targets(info: AdapterInfo, operation: str, *, label: str | None = None) -> None:
    """Refuse ``operation`` for an adapter with LoRA on parameters: its factors hold every expert at once,
    so the operations that treat B·A as one weight delta would be wrong."""
    adapted = [m.name for m in info.modules if m.kind == KIND]
    if not adapted:
        return
    where = f" for {label}" if label else ""
    raise UnsupportedAdapterError(
        f"{operation} is not possible{where}: it has LoRA on PEFT target_parameters ({adapted[0]}"
        + (f" and {len(adapted) - 1} more" if len(adapted) > 1 else "")
        + "), per-expert factors that loramgr does not add as a weight delta",
        adapter_type="lora", path=label,
        hint="apply it with loramgr apply or PEFT (PeftModel.from_pretrained), which load it exactly")


# ---------------------------------------------------------------------------------------------------
# apply through PEFT


def apply_parameter_targets(model: torch.nn.Module, adapter: Any, adapter_name: str) -> PeftModel | None:
    """Load an adapter with LoRA on parameters through PEFT, after checking it against ``model``; None for
    any other adapter (the caller goes on as usual).

    PEFT's own loader is what makes it exact; the check first refuses, with every problem listed, an
    adapter whose modules or expert parameters are not in the model under their names with their shapes.
    """
    from ..model.weights import Mismatch, ModelMismatchError, as_lora_adapter, layout_of
    from .initmethods import require_original_base

    lora = as_lora_adapter(adapter)
    if not any(m.kind == KIND for m in lora.info.modules):
        return None
    require_original_base(lora.info, "apply", label=lora.label)
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    problems: list[Mismatch] = []
    for spec in lora.info.modules:
        if spec.kind == KIND:
            module_path, _, param = spec.name.rpartition(".")
            detail = _parameter_problem(base, module_path, param, spec)
        else:
            try:
                layout = layout_of(base.get_submodule(spec.name))
            except AttributeError:
                layout, detail = None, "the model has no such module (names must match the model's exactly)"
            else:
                detail = None if layout and (layout.out_features, layout.in_features) == (
                    spec.out_features, spec.in_features) else "the model's layer has another shape"
        if detail:
            problems.append(Mismatch(spec.name, "missing" if "no such" in detail else "shape", detail))
    if problems:
        raise ModelMismatchError(lora.label, problems, n_modules=len(lora.info.modules),
                                 hint="the adapter was trained for another base model; check its base_model")
    from ..model.peftmodel import _load_peft_folder

    return _load_peft_folder(model, lora, adapter_name)  # the one route of a PEFT folder, from disk or the store


def _parameter_problem(base: torch.nn.Module, module_path: str, param: str, spec: ModuleSpec) -> str | None:
    try:
        module = base.get_submodule(module_path)
    except AttributeError:
        return "the model has no such module (names must match the model's exactly)"
    value = getattr(module, param, None)
    shape = tuple(getattr(value, "shape", ()))
    experts = num_experts(spec)
    if len(shape) == 3:
        transposed = bool(getattr(module, "is_transposed", False))  # PEFT reads the same attribute
        in_out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        want = (experts, spec.in_features, spec.out_features)
        if (shape[0], *in_out) != want:
            return (f"the adapter has {experts} experts of {spec.out_features} x {spec.in_features} (out x in), "
                    f"the model's {param} is {list(shape)}")
        return None
    if len(shape) == 2 and experts == 1 and shape == (spec.out_features, spec.in_features):
        return None
    return f"the model's {module_path} has no parameter {param} of a matching shape ({list(shape) or 'none'})"
