"""PEFT's initialisation methods (``init_lora_weights``), and the conversion of base-changing ones to plain LoRA.

Most of PEFT's ``init_lora_weights`` values only choose the starting A and B (``True``, ``"gaussian"``,
``"eva"``, ``"orthogonal"``, ``"mica"``): the trained adapter is a plain delta ΔW = s·B·A on the original
base. PiSSA (``"pissa"``, ``"pissa_niter_N"``), OLoRA, CorDA, LoRA-GA and LoftQ instead start from
non-zero factors A0, B0 and *change the base* at initialisation, W_res = W - s·B0·A0 (LoftQ also
quantizes it), so the trained adapter is a delta against W_res, not against W:

    W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B, -B0]·[A; A0]

PEFT writes that plain LoRA of twice the rank when asked
(``save_pretrained(out, path_initial_model_for_weight_conversion=init_folder)``, peft/peft_model.py and
``LoraModel.subtract_mutated_init``): A' = cat([A, A0], dim 0), B' = cat([B, -B0], dim 1); the config gets
``init_lora_weights: true``, r and every rank_pattern value doubled, lora_alpha doubled (times sqrt(2)
with rsLoRA, so that each module keeps its scale) and every alpha_pattern value doubled.
:func:`convert_init` writes the same files from the trained adapter and the initial one PEFT saved before
training. LoftQ has no such form: its base holds quantization error, not s·B0·A0.

Operations that add an adapter's deltas to the original base (apply, fuse, combine) call
:func:`require_plain_delta` first, so that an unconverted adapter is refused by name instead of
giving another model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidAdapterError, UnsupportedAdapterError

if TYPE_CHECKING:
    from ..adapter import AdapterInfo, LoraAdapter

#: init methods that change the base weights at initialisation, by the name PEFT's docs give them
BASE_CHANGING = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA", "loftq": "LoftQ"}
#: init methods that only choose the starting factors: the adapter is a plain delta on the original base
FACTOR_ONLY = ("gaussian", "eva", "orthogonal", "mica")
#: the config block PEFT writes next to some methods (a sign of the method even where init_lora_weights was reset)
METHOD_CONFIGS = {"loftq_config": "loftq", "eva_config": "eva", "corda_config": "corda", "lora_ga_config": "lora_ga"}


def init_method(config: dict[str, Any]) -> str | None:
    """The initialisation method an adapter config names (``init_lora_weights`` as written, e.g.
    ``"pissa_niter_4"``), or None for PEFT's default (``true``) and ``false``.

    A method's own config block (``loftq_config``, ``eva_config``, ``corda_config``) without the
    method in ``init_lora_weights`` is no sign: PEFT keeps those blocks after a conversion, which sets
    ``init_lora_weights`` back to true.
    """
    value = config.get("init_lora_weights")
    if isinstance(value, str) and value.strip():
        return value.strip().lower()
    return None


def method_family(method: str) -> str:
    """``pissa`` for ``pissa_niter_16``; other methods are their own family."""
    return "pissa" if method.startswith("pissa") else method


def changes_base(method: str) -> bool:
    """Whether adapters of this init method are deltas against a base PEFT changed at initialisation."""
    return method_family(method) in BASE_CHANGING


def describe_method(method: str) -> str:
    """A short, user-facing name: ``PiSSA (init_lora_weights='pissa_niter_4')``."""
    name = BASE_CHANGING.get(method_family(method), method)
    return f"{name} (init_lora_weights={method!r})"


def init_note(method: str | None) -> str | None:
    """The note install records (``show`` prints it) for an adapter of a base-changing init method."""
    if method is None or not changes_base(method):
        return None
    fix = ("it has no exact plain-LoRA form" if method_family(method) == "loftq"
           else "convert it with 'loramgr convert-init'")
    return (f"initialised with {describe_method(method)}: a delta against the base PEFT changed at "
            f"initialisation, not the original base; {fix} before apply, fuse or combine")


def require_plain_delta(info: AdapterInfo, operation: str, *, label: str | None = None) -> None:
    """Refuse ``operation`` for an adapter whose factors are not a delta s·B·A on the original base's weights:
    an unconverted PiSSA / OLoRA / CorDA / LoRA-GA / LoftQ adapter (:func:`require_original_base`), or LoRA
    on PEFT ``target_parameters`` (:func:`loramgr.formats.moe.require_no_parameter_targets`).

    The guard of every operation that adds the deltas to an original base (apply, fuse, combine,
    compress). Raises UnsupportedAdapterError in one line naming the method and the fix.
    """
    from .moe import require_no_parameter_targets

    require_original_base(info, operation, label=label)
    require_no_parameter_targets(info, operation, label=label)


def require_original_base(info: AdapterInfo, operation: str, *, label: str | None = None) -> None:
    """Refuse ``operation`` for an adapter initialised by a method that changed the base (see the module
    docstring), naming the method and the fix."""
    method = info.init_method or init_method(info.config)
    if method is None or not changes_base(method):
        return
    where = f" for {label}" if label else ""
    message = (f"{operation} is not possible{where}: it was initialised with {describe_method(method)}, so its "
               f"factors are a delta against the base PEFT changed at initialisation, not the original base")
    if method_family(method) == "loftq":
        hint = ("LoftQ's base holds quantization error, so there is no exact plain-LoRA form: load it with "
                "PEFT on the quantized base LoftQ wrote")
    else:
        hint = (f"convert it to plain LoRA first: loramgr convert-init {label or 'ADAPTER'} --initial "
                "INITIAL_ADAPTER_FOLDER --output FOLDER (the adapter PEFT saved before training), or PEFT's "
                "save_pretrained(..., path_initial_model_for_weight_conversion=INITIAL_ADAPTER_FOLDER)")
    raise UnsupportedAdapterError(message, adapter_type=method, path=label, hint=hint)


# ---------------------------------------------------------------------------------------------------
# conversion to plain LoRA


def converted_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the converted adapter, as PEFT's save_pretrained writes it (see the module docstring).

    With rsLoRA PEFT refuses rank_pattern / alpha_pattern (it would double alpha_pattern values where
    sqrt(2) keeps the scale); here every alpha is multiplied by the factor that keeps s, so that case
    converts exactly too.
    """
    converted = dict(config)
    converted["init_lora_weights"] = True
    converted["r"] = 2 * config["r"]
    alpha_factor = math.sqrt(2) if config.get("use_rslora") else 2
    converted["lora_alpha"] = config["lora_alpha"] * alpha_factor
    if config.get("rank_pattern"):
        converted["rank_pattern"] = {key: 2 * value for key, value in config["rank_pattern"].items()}
    if config.get("alpha_pattern"):
        converted["alpha_pattern"] = {key: alpha_factor * value for key, value in config["alpha_pattern"].items()}
    return converted


def convert_init(trained: LoraAdapter | str | Path, initial: LoraAdapter | str | Path, output: str | Path) -> Path:
    """Write the plain LoRA equivalent of a PiSSA / OLoRA / CorDA / LoRA-GA adapter as a PEFT folder.

    ``trained`` is the adapter after training; ``initial`` the one PEFT saved before training
    (``peft_model.save_pretrained(init_folder)`` right after ``get_peft_model``), holding A0 and B0.
    Each is an open adapter, a folder, or a registry reference. The folder ``output`` gets the tensors
    and config PEFT's own conversion writes; it applies to the original base. Nothing is written when a
    check fails.
    """
    import torch

    from ..fileio import require_new_folder
    from .peft import PEFT_PREFIX, write_peft_folder

    require_new_folder(Path(output))
    trained, initial = _open_source(trained), _open_source(initial)
    info = trained.info
    method = info.init_method or init_method(info.config)
    label = trained.label
    if info.format != "peft" or info.adapter_type != "lora" or info.use_dora:
        raise UnsupportedAdapterError(
            f"{label}: convert-init takes a PEFT LoRA adapter, not a {info.adapter_type} ({info.format}) adapter",
            path=label, adapter_type=info.adapter_type)
    if method is None or not changes_base(method):
        what = f"initialised with {method!r}" if method else "initialised the default way"
        raise UnsupportedAdapterError(
            f"{label}: nothing to convert: it is {what}, already a plain delta on the original base",
            path=label, hint="install or apply it as it is")
    if method_family(method) == "loftq":
        raise UnsupportedAdapterError(
            f"{label}: a LoftQ adapter cannot be converted: its base holds quantization error, not s·B0·A0",
            path=label, adapter_type=method, hint="load it with PEFT on the quantized base LoftQ wrote")
    _require_same_modules(trained, initial)
    tensors: dict[str, torch.Tensor] = {}
    with _open(trained) as trained_file, _open(initial) as initial_file:
        unknown = sorted(set(trained_file.keys()) - {k for m in info.modules for k in (m.key_a, m.key_b)})
        if unknown:  # PEFT's conversion keeps only lora_A / lora_B: refuse rather than drop tensors
            raise UnsupportedAdapterError(
                f"{label}: convert-init handles lora_A / lora_B only, and the adapter also has {unknown[0]}",
                path=label, hint="convert it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)")
        for spec in info.modules:
            start = initial.spec(spec.name)
            a, b = trained_file.get_tensor(spec.key_a), trained_file.get_tensor(spec.key_b)
            a0, b0 = initial_file.get_tensor(start.key_a), initial_file.get_tensor(start.key_b)
            key = f"{PEFT_PREFIX}{spec.name}"
            if spec.kind == "embedding":
                raise UnsupportedAdapterError(
                    f"{label}: module {spec.name} is an embedding LoRA, which {describe_method(method)} does not "
                    "initialise; PEFT's conversion drops it", path=label, module=spec.name)
            tensors[f"{key}.lora_A.weight"] = torch.cat([a, a0.to(a.dtype)], dim=0)
            tensors[f"{key}.lora_B.weight"] = torch.cat([b, -b0.to(b.dtype)], dim=1)
    config = converted_config({k: v for k, v in info.config.items() if k != "base_identity"})
    return write_peft_folder(output, config, tensors)


def _open_source(source: LoraAdapter | str | Path) -> LoraAdapter:
    """An adapter from a folder or file path (one that exists), or else a registry reference."""
    from ..adapter import LoraAdapter
    from ..api import load

    if isinstance(source, LoraAdapter):
        return source
    return load(Path(source) if Path(source).exists() else str(source))


def _open(adapter: LoraAdapter) -> Any:
    from safetensors import safe_open

    return safe_open(str(adapter.weights_path), framework="pt")


def _require_same_modules(trained: LoraAdapter, initial: LoraAdapter) -> None:
    """The initial adapter must be the same adapter before training: same modules, shapes and scales."""
    names, initial_names = set(trained.module_names), set(initial.module_names)
    missing = sorted(names - initial_names)
    if missing or initial_names - names:
        which = missing[0] if missing else sorted(initial_names - names)[0]
        where = "the initial adapter has no" if missing else "the trained adapter has no"
        raise InvalidAdapterError(
            f"{initial.label}: not the initial state of {trained.label}: {where} module {which}",
            path=initial.label, module=which,
            hint="pass the folder PEFT saved right after get_peft_model, before training")
    for name in sorted(names):
        spec, start = trained.spec(name), initial.spec(name)
        if (spec.rank, spec.in_features, spec.out_features) != (start.rank, start.in_features, start.out_features):
            raise InvalidAdapterError(
                f"{initial.label}: module {name} has rank {start.rank} and a {start.out_features} x "
                f"{start.in_features} delta, the trained adapter rank {spec.rank} and {spec.out_features} x "
                f"{spec.in_features}", path=initial.label, module=name,
                hint="pass the initial adapter of this training run")
        if not math.isclose(spec.scale, start.scale, rel_tol=1e-6):
            raise InvalidAdapterError(
                f"{initial.label}: module {name} has scale {start.scale:g}, the trained adapter {spec.scale:g}",
                path=initial.label, module=name, hint="pass the initial adapter of this training run")
