"""diffusers-saved single-file adapters (``pytorch_lora_weights.safetensors``).

Keys are PEFT-style module paths under a pipeline component: ``unet.<path>.lora_A.weight`` /
``lora_B.weight`` (diffusers with the PEFT backend), the older ``<path>.lora.down.weight`` /
``lora.up.weight`` and ``lora_linear_layer.down/up`` forms, with prefixes ``unet.``, ``transformer.``,
``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``. loramgr keeps the component in the module
name ("unet.down_blocks.0...") so names are unique across the pipeline and match the module paths of
a pipeline fingerprint (:mod:`loramgr.compat.basemodel`). One model's ``save_lora_adapter`` writes its
module paths without a component (and its config in the metadata): those names stay bare, and the
module-name resolver finds them under whichever component of a pipeline has them.

Scale: diffusers stores the PEFT config as JSON in the ``lora_adapter_metadata`` metadata key, either
unprefixed (``save_lora_adapter`` of one model) or flattened per component ("unet.r",
"unet.lora_alpha", "unet.alpha_pattern", ... from ``save_lora_weights``). Without it diffusers loads
with alpha = rank, and so does loramgr (a note says so).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..adapter import AdapterInfo, ModuleSpec, factors_fit
from ..errors import InvalidAdapterError
from ..safetensors_io import SafetensorsHeader
from .kohya import read_scalars
from .peft import pattern_value, validate_config

METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")

_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|lora_magnitude_vector(?:\.weight)?|alpha)$"
)
_ROLE = {
    "lora_A.weight": "a",
    "lora.down.weight": "a",
    "lora_linear_layer.down.weight": "a",
    "lora_B.weight": "b",
    "lora.up.weight": "b",
    "lora_linear_layer.up.weight": "b",
    "alpha": "alpha",
}


def looks_like_diffusers(keys: list[str], metadata: dict[str, str] | None = None) -> bool:
    """True when every key starts with a pipeline component and some key is a LoRA factor, or when the file is
    one model's ``save_lora_adapter``: keys without a component, every one a LoRA part, the config in
    ``lora_adapter_metadata`` (diffusers loads it with ``load_lora_adapter(path, prefix=None)``)."""
    if not keys:
        return False
    if all(k.partition(".")[0] in COMPONENTS for k in keys):
        return any(_KEY.match(k) for k in keys)
    return bool(metadata and METADATA_KEY in metadata) and all(_KEY.match(k) for k in keys)


def component_configs(metadata: dict[str, str], path: str) -> dict[str, dict[str, Any]]:
    """The PEFT config per component from ``lora_adapter_metadata`` ("" = applies to all)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except RecursionError as exc:
        raise InvalidAdapterError(f"{path}: metadata {METADATA_KEY} nests too deeply", path=path) from exc
    except json.JSONDecodeError as exc:
        raise InvalidAdapterError(
            f"{path}: metadata {METADATA_KEY} is not valid JSON ({exc.msg})",
            path=path,
            hint="re-save the adapter with diffusers, or remove the broken metadata key",
        ) from exc
    if not isinstance(data, dict):
        raise InvalidAdapterError(f"{path}: metadata {METADATA_KEY} is not a JSON object", path=path)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        component, dot, rest = key.partition(".")
        if dot and component in COMPONENTS:
            configs.setdefault(component, {})[rest] = value
        else:
            configs.setdefault("", {})[key] = value
    for component, config in configs.items():
        validate_config(config, f"{path}: metadata {METADATA_KEY}{' ' + component if component else ''}")
    return configs


def read_diffusers(header: SafetensorsHeader) -> AdapterInfo:
    """Describe a diffusers LoRA file from its header (and any per-module alpha scalars)."""
    path = str(header.path)
    configs = component_configs(header.metadata, path)
    parts: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    other: list[str] = []
    for key, entry in header.tensors.items():
        match = _KEY.match(key)
        if not match:
            other.append(key)
            continue
        role = _ROLE.get(match["part"], "magnitude")
        parts.setdefault(match["module"], {})[role] = (key, entry.shape, entry.torch_dtype)
    alpha_keys = [p["alpha"][0] for p in parts.values() if "alpha" in p]
    alpha_values = read_scalars(header, alpha_keys)

    modules: list[ModuleSpec] = []
    use_dora = False
    use_rslora_any = False
    for name in sorted(parts):
        found = parts[name]
        if "a" not in found or "b" not in found:
            raise InvalidAdapterError(
                f"{path}: module {name} has only one of its two LoRA factors",
                path=path,
                module=name,
                hint="the file is incomplete; re-save the adapter",
            )
        key_a, shape_a, dtype = found["a"]
        key_b, shape_b, _ = found["b"]
        rank = shape_a[0]
        if not factors_fit(shape_a, shape_b):
            raise InvalidAdapterError(
                f"{path}: module {name}: A {list(shape_a)} and B {list(shape_b)} disagree on the rank",
                path=path,
                module=name,
            )
        component, _, inner = name.partition(".")
        if component not in COMPONENTS:  # one model's save_lora_adapter: module paths of that model
            inner = name
        config = configs.get(component) or configs.get("", {})
        use_rslora = bool(config.get("use_rslora"))
        use_rslora_any |= use_rslora
        use_dora |= bool(config.get("use_dora")) or "magnitude" in found
        if "alpha" in found:
            alpha = alpha_values[found["alpha"][0]] or float(rank)
        elif config:
            default_alpha = config.get("lora_alpha")
            alpha = float(pattern_value(config.get("alpha_pattern") or {}, inner,
                                        rank if default_alpha is None else default_alpha))
        else:
            alpha = float(rank)
        modules.append(
            ModuleSpec.from_factors(
                name,
                (key_a, shape_a),
                (key_b, shape_b),
                alpha=alpha,
                dtype=dtype,
                use_rslora=use_rslora,
                key_alpha=found["alpha"][0] if "alpha" in found else None,
                extra_keys=(found["magnitude"][0],) if "magnitude" in found else (),
            )
        )
    if not modules:
        raise InvalidAdapterError(f"{path}: no LoRA factors found", path=path, hint="is this a LoRA file?")
    notes: list[str] = []
    if not configs and not alpha_keys:
        notes.append(f"no {METADATA_KEY} in the file: alpha taken equal to rank, as diffusers does")
    if other:
        notes.append(f"{len(other)} tensor(s) belong to no LoRA module, e.g. {sorted(other)[0]}")
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(m.alpha for m in modules)
    first = next(iter(configs.values()), {})
    targets = first.get("target_modules") or []
    return AdapterInfo(
        format="diffusers",
        adapter_type="dora" if use_dora else "lora",
        modules=modules,
        weights_file=Path(path).name,
        config={"components": configs, "other_keys": sorted(other)},
        rank=int(first.get("r") or ranks.most_common(1)[0][0]),
        alpha=float(first.get("lora_alpha") or alphas.most_common(1)[0][0]),
        use_rslora=use_rslora_any,
        use_dora=use_dora,
        target_modules=[targets] if isinstance(targets, str) else [str(t) for t in targets],
        target_modules_found=sorted({m.name.rsplit(".", 1)[-1] for m in modules}),
        base_model=first.get("base_model_name_or_path"),
        base_model_revision=first.get("revision"),
        dtypes=sorted({e.torch_dtype for e in header.tensors.values()}),
        n_params=sum(e.numel for e in header.tensors.values()),
        file_metadata=dict(header.metadata),
        notes=notes,
    )
