"""kohya / Stable-Diffusion single-file adapters (``lora_unet_...``, ``lora_te1_...``).

Layout: key = prefix + module path with "." replaced by "_", tensors
``<name>.lora_down.weight`` (A), ``<name>.lora_up.weight`` (B) and ``<name>.alpha`` (a scalar;
missing or 0 means alpha = rank). Convolutions keep 4-D factors: down [r, in, kh, kw], up [out, r, 1, 1].

Module names. "_" also occurs inside module names (``down_blocks``, ``to_q``), so a kohya name cannot be
turned back into a module path without the model's module list. loramgr therefore keeps the kohya name
as ``ModuleSpec.name`` and marks the adapter as unresolved: ``info.config["module_names"] == "kohya"``
plus a line in ``info.notes``. :func:`resolve_kohya_names` maps names against a base model's module
paths with the resolver every check uses (:class:`loramgr.compat.names.ModuleIndex`);
:func:`resolve_kohya_info` returns a copy whose names are module paths
(``config["module_names"] == "paths"``) and remembers the original names in ``config["kohya_names"]``
so that an export back to kohya reproduces them exactly.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..adapter import AdapterInfo, ModuleSpec, factors_fit
from ..errors import IncompatibleError, InvalidAdapterError
from ..safetensors_io import SafetensorsHeader
from .lycoris import describe_module, detect_adapter_type, split_key

#: kohya prefix -> the diffusers pipeline components whose modules it names ("" = a bare model)
PREFIX_COMPONENTS: dict[str, tuple[str, ...]] = {
    "lora_unet_": ("unet", "transformer"),
    "lora_transformer_": ("transformer",),
    "lora_te1_": ("text_encoder",),
    "lora_te2_": ("text_encoder_2",),
    "lora_te3_": ("text_encoder_3",),
    "lora_te_": ("text_encoder",),
    # LyCORIS' own wrapper (create_lycoris) names the modules of the one model it wraps: a UNet or a
    # diffusion transformer inside a pipeline, else the bare model itself
    "lycoris_": ("unet", "transformer"),
}
#: pipeline component -> the prefix loramgr writes for it (SDXL-style te1/te2 when both encoders exist)
COMPONENT_PREFIXES = {
    "unet": "lora_unet_",
    "transformer": "lora_unet_",
    "text_encoder": "lora_te_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
}
#: the first level of a CLIP text model's module paths below ``text_model`` (T5's ``encoder.block`` is not one)
CLIP_LEAVES = ("encoder_layers_", "embeddings_", "final_layer_norm")
UNRESOLVED_NOTE = "module names are kohya names; resolve them against a base model (install --base) to check or convert"

_SCALAR_FORMATS = {"F16": "<e", "F32": "<f", "F64": "<d", "BF16": "bf16", "I64": "<q", "I32": "<i"}


def kohya_prefix(name: str) -> str | None:
    """The known kohya prefix a module name starts with (longest match), or None."""
    for prefix in sorted(PREFIX_COMPONENTS, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix
    return None


def kohya_name(module_path: str, prefix: str | None = None) -> str:
    """The kohya name of a module path; a leading pipeline component ("unet.") chooses the prefix."""
    component, _, rest = module_path.partition(".")
    if prefix is None:
        if component in COMPONENT_PREFIXES and rest:
            prefix, module_path = COMPONENT_PREFIXES[component], rest
        else:
            prefix = "lora_unet_"
    return prefix + module_path.replace(".", "_")


def read_scalars(header: SafetensorsHeader, keys: Iterable[str]) -> dict[str, float]:
    """Values of scalar (one-element) tensors, read from the file without torch.

    kohya keeps alpha in the data section, so metadata reading needs these few bytes per module.
    """
    values: dict[str, float] = {}
    with open(header.path, "rb") as handle:
        for key in keys:
            entry = header.tensors[key]
            fmt = _SCALAR_FORMATS.get(entry.dtype)
            if fmt is None or entry.numel != 1:
                raise InvalidAdapterError(
                    f"{header.path}: {key} should be a one-element float tensor, found {entry.dtype} "
                    f"{list(entry.shape)}",
                    path=str(header.path),
                    module=key,
                )
            handle.seek(header.data_offset + entry.offsets[0])
            raw = handle.read(entry.offsets[1] - entry.offsets[0])
            # bfloat16 is the top half of a float32
            value = float(struct.unpack("<f", b"\x00\x00" + raw)[0] if fmt == "bf16" else struct.unpack(fmt, raw)[0])
            if not math.isfinite(value):
                raise InvalidAdapterError(f"{header.path}: {key} is {value}, not a finite number",
                                          path=str(header.path), module=key,
                                          hint="re-save the adapter with a finite alpha")
            values[key] = value
    return values


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:  # "Dynamic" and other non-numbers
        return None
    return value if value is not None and math.isfinite(value) else None  # "nan" / "inf" say nothing either


def kohya_summary(metadata: dict[str, str]) -> dict[str, Any]:
    """The training metadata people look at, from kohya's ss_* / sshs_* and modelspec.* keys."""
    summary = {
        "network_module": metadata.get("ss_network_module"),
        "network_dim": metadata.get("ss_network_dim"),
        "network_alpha": metadata.get("ss_network_alpha"),
        "base_model_version": metadata.get("ss_base_model_version"),
        "sd_model_name": metadata.get("ss_sd_model_name"),
        "base_model_hash": metadata.get("ss_new_sd_model_hash"),
        "sshs_model_hash": metadata.get("sshs_model_hash"),
        "sshs_legacy_hash": metadata.get("sshs_legacy_hash"),
        "architecture": metadata.get("modelspec.architecture"),
        "title": metadata.get("modelspec.title"),
        "trigger_phrase": metadata.get("modelspec.trigger_phrase"),
    }
    return {k: v for k, v in summary.items() if v not in (None, "")}


def _card(metadata: dict[str, str]) -> dict[str, Any]:
    tags = [t.strip() for t in metadata.get("modelspec.tags", "").split(",") if t.strip()]
    card: dict[str, Any] = {
        "license": metadata.get("modelspec.license"),
        "description": metadata.get("modelspec.description"),
        "tags": tags,
    }
    for key in ("title", "trigger_phrase", "architecture"):
        if metadata.get(f"modelspec.{key}"):
            card[key] = metadata[f"modelspec.{key}"]
    return card


def read_kohya(header: SafetensorsHeader) -> AdapterInfo:
    """Describe a kohya-style file (plain LoRA/LoCon or any LyCORIS type) from its header.

    Only the alpha scalars are read from the data section. Keys that belong to no module are listed
    in ``config["other_keys"]`` and a note; conversions refuse such files rather than drop them.
    """
    path = str(header.path)
    grouped: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    other: list[str] = []
    for key, entry in header.tensors.items():
        split = split_key(key)
        if split is None:
            other.append(key)
            continue
        module, suffix = split
        grouped.setdefault(module, {})[suffix] = (key, entry.shape, entry.torch_dtype)
    shapes = {k: e.shape for k, e in header.tensors.items()}
    adapter_type = detect_adapter_type(header.tensors, shapes)
    # "<module>.weight" is only meaningful for IA3; elsewhere it is an unknown tensor
    if adapter_type != "ia3":
        for module in list(grouped):
            if "weight" in grouped[module]:
                other.append(grouped[module].pop("weight")[0])
                if not grouped[module]:
                    del grouped[module]
    alpha_keys = [parts["alpha"][0] for parts in grouped.values() if "alpha" in parts]
    alphas = read_scalars(header, alpha_keys)

    modules: list[ModuleSpec] = []
    for name in sorted(grouped):
        parts = grouped[name]
        kind = detect_adapter_type([key for key, _, _ in parts.values()], shapes)
        if kind in ("lora", "dora", "lora_tucker") or "lora_down.weight" in parts:
            spec = _lora_module(name, parts, path, kind)
        else:
            spec = describe_module(name, kind, parts, path=path)
        if spec.key_alpha:
            stored = alphas[spec.key_alpha]
            spec = dataclasses.replace(spec, alpha=stored if stored else float(spec.rank))
        modules.append(spec)
    if not modules:
        raise InvalidAdapterError(
            f"{path}: no adapter tensors (lora_down / lora_up or a LyCORIS type) found",
            path=path,
            hint="is this an adapter file? base-model checkpoints are added with 'loramgr base add'",
        )
    metadata = dict(header.metadata)
    ranks = Counter(m.rank for m in modules)
    alphas_seen = Counter(m.alpha for m in modules)
    rank = _number(metadata.get("ss_network_dim"))
    alpha = _number(metadata.get("ss_network_alpha"))
    notes = [UNRESOLVED_NOTE]
    if other:
        notes.append(f"{len(other)} tensor(s) belong to no adapter module, e.g. {sorted(other)[0]}")
    config: dict[str, Any] = {
        "module_names": "kohya",
        "kohya": kohya_summary(metadata),
        "other_keys": sorted(other),
    }
    return AdapterInfo(
        format="kohya",
        adapter_type=adapter_type,
        modules=modules,
        weights_file=Path(path).name,
        config=config,
        rank=int(rank) if rank else ranks.most_common(1)[0][0],
        alpha=alpha if alpha else alphas_seen.most_common(1)[0][0],
        use_dora=adapter_type == "dora",
        # leaf module names are unknown until the names are resolved ("to_q" and "q" look alike)
        target_modules=[],
        target_modules_found=[],
        base_model=metadata.get("ss_sd_model_name") or metadata.get("modelspec.architecture"),
        dtypes=sorted({e.torch_dtype for e in header.tensors.values()}),
        n_params=sum(e.numel for e in header.tensors.values()),
        file_metadata=metadata,
        card=_card(metadata),
        notes=notes,
    )


def _lora_module(
    name: str, parts: dict[str, tuple[str, tuple[int, ...], str]], path: str, kind: str
) -> ModuleSpec:
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        have = "lora_down" if "lora_down.weight" in parts else "lora_up"
        raise InvalidAdapterError(
            f"{path}: module {name} has {have} but not its partner",
            path=path,
            module=name,
            hint="the file is incomplete; re-save the adapter",
        )
    if kind != "lora":
        return describe_module(name, kind, parts, path=path)
    key_a, down, dtype = parts["lora_down.weight"]
    key_b, up, _ = parts["lora_up.weight"]
    if not factors_fit(down, up):
        raise InvalidAdapterError(
            f"{path}: module {name}: lora_down {list(down)} and lora_up {list(up)} do not fit",
            path=path,
            module=name,
            hint="expected down [r, in(, kh, kw)] and up [out, r(, 1, 1)]",
        )
    key_alpha = parts["alpha"][0] if "alpha" in parts else None
    return ModuleSpec.from_factors(name, (key_a, down), (key_b, up), dtype=dtype, key_alpha=key_alpha)


def resolve_kohya_names(names: Iterable[str], module_paths: Iterable[str]) -> dict[str, str | None]:
    """Map kohya module names to module paths of a known model; None for names that do not resolve.

    ``module_paths`` are dotted paths, either of a whole diffusers pipeline ("unet.down_blocks.0...",
    "text_encoder.text_model...") or of one bare model. A name resolves when exactly one path of a
    component its prefix stands for (or of the bare model) has that underscore form; two paths with
    the same underscore form leave the name unresolved (ambiguous) rather than guess. The rules are
    :class:`loramgr.compat.names.ModuleIndex`'s, shared with ``loramgr check``, fuse and apply.
    """
    from ..compat.names import ModuleIndex  # compat builds on this module's prefix tables

    index = ModuleIndex(module_paths)
    result: dict[str, str | None] = {}
    for name in names:
        found = index.candidates(name)
        result[name] = found[0] if len(found) == 1 else None
    return result


def resolve_kohya_info(info: AdapterInfo, module_paths: Iterable[str], *, strict: bool = True) -> AdapterInfo:
    """A copy of a kohya AdapterInfo whose module names are the base model's module paths.

    With ``strict`` (the default) a name that does not resolve raises IncompatibleError naming it:
    checks and conversions must not proceed with some modules silently missing.
    """
    if info.config.get("module_names") != "kohya":
        return info
    mapping = resolve_kohya_names([m.name for m in info.modules], module_paths)
    unresolved = sorted(name for name, path in mapping.items() if path is None)
    if unresolved and strict:
        raise IncompatibleError(
            f"{len(unresolved)} kohya module name(s) match no module of the base model, e.g. {unresolved[0]}",
            hint="check that the base model is the one this adapter was trained for",
        )
    modules = [dataclasses.replace(m, name=mapping[m.name] or m.name) for m in info.modules]
    config = dict(info.config)
    config["module_names"] = "paths" if not unresolved else "partial"
    config["kohya_names"] = {mapping[m.name]: m.name for m in info.modules if mapping[m.name]}
    notes = [n for n in info.notes if n != UNRESOLVED_NOTE]
    if unresolved:
        notes.append(f"{len(unresolved)} kohya name(s) unresolved, e.g. {unresolved[0]}")
    leaves = sorted({path.rsplit(".", 1)[-1] for path in mapping.values() if path})
    return dataclasses.replace(info, modules=modules, config=config, notes=notes, target_modules_found=leaves)
