"""Adapters as PEFT layers in a model: apply (load next to the base weights) and hot-swap.

PEFT is an optional extra (``pip install 'loramgr[peft]'``): it is imported inside the functions,
and a missing PEFT is a :class:`~loramgr.errors.LoramgrError` that says how to install it.

:func:`apply` gives the model PEFT would give with ``PeftModel.from_pretrained`` of the adapter's
folder; it goes through PEFT itself so that everything downstream (``set_adapter``,
``merge_and_unload``, saving) keeps working. :func:`hotswap` replaces a loaded adapter's weights in
place, like ``peft.utils.hotswap``, but checks the whole new adapter before changing anything.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..adapter import LoraAdapter
from ..errors import ConflictError, IncompatibleError, MissingDependencyError, NotFoundError
from ..formats.extras import refuse_extras
from ..formats.initmethods import require_plain_delta
from ..formats.lycoris import require_plain_lora
from ..formats.moe import apply_parameter_targets
from ..formats.peft import PEFT_PREFIX
from ..formats.peftconfig import lora_config, module_scales
from .weights import (
    AdapterLike,
    InMemoryAdapter,
    Mismatch,
    ModelMismatchError,
    as_lora_adapter,
    checked_mapping,
    layout_of,
)

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel

#: what loramgr adds to an adapter's config when reading it, which PEFT's config does not take
LORAMGR_CONFIG_KEYS = ("base_identity",)
PEFT_INSTALL = "pip install 'loramgr[peft]'  (or: pip install peft transformers)"


def require_peft() -> None:
    """Fail early, with the install command, when the optional PEFT extra is missing."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "this operation needs PEFT, which is not installed", package="peft", hint=PEFT_INSTALL
        ) from exc


def _is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply(model: torch.nn.Module, adapter: AdapterLike, adapter_name: str = "default") -> PeftModel:
    """Load ``adapter`` into ``model`` as PEFT LoRA layers and return the PeftModel.

    A plain model is wrapped (and changed in place, as PEFT does); a PeftModel gets one more adapter,
    which ``set_adapter(adapter_name)`` activates. The adapter is checked against the model first, so
    a wrong-base adapter fails with every mismatch listed instead of PEFT's first shape error.

    A PEFT adapter whose module names match the model as they are is loaded by PEFT from its folder, the
    same way whether it was read from a folder or from the registry (bit-identical to
    ``PeftModel.from_pretrained``): DoRA, LoHa / LoKr, saved modules, biases and trainable tokens
    included. Otherwise (names resolved through a wrapper prefix or kohya underscores, or an
    in-memory adapter such as a merge result) a LoraConfig that targets the resolved paths exactly,
    with per-module rank and alpha, is built from the adapter's metadata and its factors loaded into
    it; an adapter with parts besides its LoRA factors is refused there, naming the part.
    """
    require_peft()
    from peft import get_peft_model, set_peft_model_state_dict

    is_peft = _is_peft_model(model)
    if is_peft and adapter_name in model.peft_config:  # type: ignore[operator]
        raise ConflictError(
            f"the model already has an adapter named {adapter_name!r}",
            hint="pass another adapter_name, or hotswap() to replace its weights",
        )
    if (loaded := apply_parameter_targets(model, adapter, adapter_name)) is not None:  # MoE: through PEFT
        return loaded
    base = model.get_base_model() if is_peft else model  # type: ignore[operator]
    lora, mapping = checked_mapping(base, adapter)
    require_plain_delta(lora.info, "apply", label=lora.label)  # PiSSA & co. unconverted

    as_is = all(name == path for name, path in mapping.items()) and _extras_as_is(base, lora, mapping)
    if as_is and lora.info.format == "peft" and not isinstance(lora, InMemoryAdapter):
        return _load_peft_folder(model, lora, adapter_name)
    require_plain_lora(lora.info, "apply", label=lora.label)
    refuse_extras([lora], "apply with module names other than the model's")
    config, state_dict = _peft_payload(base, lora, mapping)
    if is_peft:
        model.add_adapter(adapter_name, config)  # type: ignore[operator]
        peft_model: PeftModel = model  # type: ignore[assignment]
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    result: Any = set_peft_model_state_dict(peft_model, state_dict, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}" in k]
    if result.unexpected_keys or missing:
        raise IncompatibleError(
            f"PEFT did not take every tensor of {lora.label}: "
            f"unexpected {sorted(result.unexpected_keys)[:5]}, missing {sorted(missing)[:5]}",
            hint="please report this as a loramgr bug, with the adapter's config",
        )
    return peft_model


def _extras_as_is(base: torch.nn.Module, lora: LoraAdapter, mapping: dict[str, str]) -> bool:
    """Whether the adapter's saved modules, biases and token rows name the model's modules as they are."""
    if not lora.info.extras:
        return True
    from .extras import resolve_extras

    paths, _ = resolve_extras(base, lora, mapping)
    return all(name == path for name, path in paths.items())


def _load_peft_folder(model: torch.nn.Module, lora: LoraAdapter, adapter_name: str) -> PeftModel:
    """Load a PEFT adapter the way PeftModel.from_pretrained loads its folder, for a folder and a registry
    version alike: the folder is put back together (its adapter_config.json as read, a link to the weights
    file or blob) and PEFT loads it, so PEFT's own layers compute DoRA, LoHa / LoKr and the rest."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from peft import PeftModel

    from ..formats.peft import CONFIG_NAME, WEIGHTS_NAME

    config = {k: v for k, v in lora.info.config.items() if k not in LORAMGR_CONFIG_KEYS}
    with tempfile.TemporaryDirectory(prefix="loramgr-apply-") as scratch:
        folder = Path(scratch)
        (folder / CONFIG_NAME).write_text(json.dumps(config), encoding="utf-8")
        os.symlink(lora.weights_path, folder / WEIGHTS_NAME)
        if _is_peft_model(model):
            model.load_adapter(str(folder), adapter_name=adapter_name)  # type: ignore[operator]
            return model  # type: ignore[return-value]
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)


def _peft_payload(
    base: torch.nn.Module, lora: LoraAdapter, mapping: dict[str, str]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A LoraConfig targeting exactly the resolved paths, and the state dict PEFT loads into it.

    The config comes from the one writer of PEFT configs (:func:`loramgr.formats.peftconfig.lora_config`):
    per-module rank and alpha under anchored pattern keys, so each module gets its own scale.
    """
    import torch
    from peft import LoraConfig

    specs = {path: lora.spec(name) for name, path in mapping.items()}
    use_rslora, scales = module_scales(specs.items())
    transposed = [layout_of(base.get_submodule(p)) for p in specs]
    fan_in_fan_out = all(t is not None and t.transposed and t.kind == "linear" for t in transposed)
    config = LoraConfig(
        **lora_config(scales, use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, task_type=lora.info.task_type)
    )
    state_dict: dict[str, torch.Tensor] = {}
    for name, path in mapping.items():
        spec = specs[path]
        a, b = lora.factors(name)
        if spec.kind == "embedding":
            state_dict[f"{PEFT_PREFIX}{path}.lora_embedding_A"] = a
            state_dict[f"{PEFT_PREFIX}{path}.lora_embedding_B"] = b
            continue
        if spec.kind == "conv" and spec.kernel:
            a = a.reshape(spec.kernel)
            b = b.reshape(b.shape[0], b.shape[1], *([1] * (len(spec.kernel) - 2)))
        state_dict[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
        state_dict[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    return config, {k: torch.as_tensor(v) for k, v in state_dict.items()}


def _factor_params(layer: Any, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) parameters of one PEFT LoRA layer for ``adapter_name``, in PEFT's storage layout."""
    if adapter_name in getattr(layer, "lora_A", {}):
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    if adapter_name in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    return None


def hotswap(peft_model: PeftModel, adapter_name: str, new_adapter: AdapterLike) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` with ``new_adapter``'s, in place.

    No module is added or replaced (a compiled model keeps its graph): factors of a smaller rank are
    zero-padded into the loaded ones, as PEFT's hotswap does, and each layer's scaling is set to the
    new adapter's (rsLoRA, alpha_pattern included). Loaded layers the new adapter does not target
    get zero factors, so the model computes exactly what a fresh load of the new adapter would.
    Refused, with every offending module listed and the model untouched: modules that carry no
    loaded LoRA layer, a rank larger than the loaded one, a DoRA adapter, a merged adapter.

    As with PEFT's hotswap, ``peft_model.peft_config[adapter_name]`` stays the first adapter's (rank,
    alpha): save the new adapter from its own source, not with ``peft_model.save_pretrained``.
    """
    require_peft()
    import torch
    from peft.tuners.lora import LoraLayer

    if not _is_peft_model(peft_model):
        raise IncompatibleError(
            f"hotswap needs a PeftModel, got {type(peft_model).__name__}",
            hint="load a first adapter with loramgr.model.peftmodel.apply()",
        )
    if adapter_name not in peft_model.peft_config:
        raise NotFoundError(
            f"the model has no adapter named {adapter_name!r} (it has {', '.join(peft_model.peft_config)})",
            reference=adapter_name,
        )
    base = peft_model.get_base_model()
    loaded: dict[str, Any] = {}
    for path, module in base.named_modules():
        if isinstance(module, LoraLayer) and _factor_params(module, adapter_name) is not None:
            if getattr(module, "use_dora", {}).get(adapter_name):
                raise IncompatibleError(
                    f"adapter {adapter_name!r} is a DoRA adapter: its magnitudes belong to its own weights",
                    hint="load the new adapter with apply() under another name",
                )
            if adapter_name in module.merged_adapters:
                raise ConflictError(
                    f"adapter {adapter_name!r} is merged into the base weights",
                    hint="call unmerge_adapter() first; swapping merged weights would corrupt them",
                )
            loaded[path] = module
    lora = as_lora_adapter(new_adapter)
    require_plain_lora(lora.info, "hot-swap", label=lora.label)
    refuse_extras([lora], "hot-swap")
    lora, mapping = checked_mapping(base, lora)

    problems: list[Mismatch] = []
    for name, path in mapping.items():
        layer = loaded.get(path)
        if layer is None:
            where = "the model's layer" if path == name else f"the model's {path}"
            problems.append(Mismatch(name, "not loaded", f"{where} has no LoRA layer of {adapter_name!r}"))
            continue
        params = _factor_params(layer, adapter_name)
        loaded_rank = params[0].shape[0] if params else 0
        if lora.spec(name).rank > loaded_rank:
            problems.append(Mismatch(name, "rank", f"rank {lora.spec(name).rank} > the loaded rank {loaded_rank}"))
    if problems:
        raise ModelMismatchError(
            lora.label,
            problems,
            n_modules=len(mapping),
            hint="hot-swap only into the same modules at the same or a smaller rank; use apply() otherwise",
        )

    by_path = {path: name for name, path in mapping.items()}
    with torch.no_grad():
        for path, layer in loaded.items():
            a_param, b_param = _factor_params(layer, adapter_name)  # type: ignore[misc]
            new_name = by_path.get(path)
            if new_name is None:  # not targeted by the new adapter: contributes nothing
                a_param.zero_()
                b_param.zero_()
                continue
            spec = lora.spec(new_name)
            a, b = lora.factors(new_name)
            r = spec.rank
            a_param[:r].copy_(a.reshape(a_param[:r].shape))
            b_param[:, :r].copy_(b.reshape(b_param[:, :r].shape))
            a_param[r:].zero_()  # the padding PEFT's hotswap also leaves: zero rows and columns
            b_param[:, r:].zero_()
            _set_scaling(layer, adapter_name, spec.scale)


def _set_scaling(layer: Any, adapter_name: str, scale: float) -> None:
    """Set the layer's scaling, and lora_alpha so that PEFT's set_scale() recomputes the same value."""
    import torch

    current = layer.scaling[adapter_name]
    if isinstance(current, torch.Tensor):  # prepare_model_for_compiled_hotswap made it a tensor
        current.fill_(scale)
    else:
        layer.scaling[adapter_name] = scale
    rank = layer.r[adapter_name]
    rslora = layer.use_rslora.get(adapter_name, False) if hasattr(layer, "use_rslora") else False
    layer.lora_alpha[adapter_name] = scale * (math.sqrt(rank) if rslora else rank)
