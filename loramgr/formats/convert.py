"""Export an adapter as a PEFT folder, a kohya file or a diffusers file, with ΔW unchanged.

Scale is the trap: diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank,
which changes ΔW = (alpha / r)·B·A whenever alpha != r. loramgr never rescales silently: factors are
copied bit for bit and the true per-module alpha is written where the format has a place for it
(kohya ``.alpha`` tensors; PEFT ``lora_alpha`` + ``alpha_pattern``; diffusers ``lora_adapter_metadata``),
the PEFT fields by the one config writer, :mod:`loramgr.formats.peftconfig`.
Only ``fold_scale=True`` (diffusers) multiplies B by the scale and declares alpha = rank, for readers
that ignore the metadata; ΔW is then equal up to one float rounding of B.

kohya files get ``sshs_model_hash`` / ``sshs_legacy_hash`` computed as kohya's sd-scripts does (over the
bytes of the file saved with only its ``ss_*`` metadata), and ``modelspec.*`` keys.
Only plain LoRA converts between formats; other types are refused by name (:func:`require_plain_lora`),
except a kohya file exported to kohya, which is copied tensor for tensor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import AdapterInfo, LoraAdapter, ModuleSpec
from ..errors import ConflictError, InvalidAdapterError, UnsupportedAdapterError
from .diffusers import COMPONENTS, METADATA_KEY
from .kohya import CLIP_LEAVES, COMPONENT_PREFIXES, kohya_name, resolve_kohya_info
from .lycoris import require_plain_lora
from .peft import PEFT_PREFIX, write_peft_folder
from .peftconfig import alpha_for, lora_config, module_scales

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint
    from ..merge.tensorfile import StoredTensor

#: the LoraConfig fields written per component into diffusers' lora_adapter_metadata
_DIFFUSERS_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_dropout",
                   "target_modules")


def _load(adapter: LoraAdapter, keys: Iterable[str]) -> dict[str, StoredTensor]:
    from ..merge.tensorfile import TensorFile

    with TensorFile(adapter.weights_path) as source:
        return {key: source.stored(key) for key in keys}


def _check_convertible(info: AdapterInfo, target: str) -> None:
    require_plain_lora(info, f"conversion from {info.format} to {target}")
    embeddings = [m.name for m in info.modules if m.kind == "embedding"]
    if embeddings and target != "peft":
        raise UnsupportedAdapterError(
            f"{target} files have no embedding LoRA, and module {embeddings[0]} is one",
            adapter_type=info.adapter_type,
            hint="export with --format peft",
        )
    other = info.config.get("other_keys") or []
    if other:
        raise UnsupportedAdapterError(
            f"conversion from {info.format} to {target} would drop {len(other)} tensor(s) that belong to no "
            f"LoRA module, e.g. {other[0]}",
            adapter_type=info.adapter_type,
            hint="export to the adapter's own format instead",
        )


def _with_paths(info: AdapterInfo, module_paths: Iterable[str] | None, target: str) -> AdapterInfo:
    """kohya names become module paths, or the export is refused: PEFT and diffusers key by path."""
    if info.config.get("module_names") not in ("kohya", "partial"):
        return info
    if module_paths is None:
        raise UnsupportedAdapterError(
            f"exporting a kohya adapter to {target} needs module paths, and kohya names cannot be turned "
            "into paths without the base model",
            adapter_type=info.adapter_type,
            hint="pass the base model (--base / module_paths=) so the names can be resolved",
        )
    return resolve_kohya_info(info, module_paths, strict=True)


def _atomic_save(tensors: Mapping[str, StoredTensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that a reader never sees half of it."""
    from ..fileio import write_atomic
    from ..merge.tensorfile import safetensors_bytes

    write_atomic(path, safetensors_bytes({k: tensors[k] for k in sorted(tensors)}, metadata))


def kohya_hashes(tensors: Mapping[str, StoredTensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them before saving.

    Both are taken over the file as serialized with only the ``ss_*`` metadata (so that adding user
    metadata later does not change them): the model hash is the sha256 of the tensor-data section, the
    legacy hash the first 8 hex digits of the sha256 of bytes [1 MiB, 1 MiB + 64 KiB).
    """
    from ..merge.tensorfile import safetensors_bytes

    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors_bytes({k: tensors[k] for k in sorted(tensors)}, training)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def _scalar(value: float) -> StoredTensor:
    """A float32 scalar tensor (kohya's ``.alpha``)."""
    import numpy as np

    from ..merge.tensorfile import stored_tensor

    return stored_tensor(np.array(value, dtype=np.float32), "F32")


def _scaled(tensor: StoredTensor, factor: float) -> StoredTensor:
    """``tensor`` times ``factor``, computed in float64 and rounded back to the tensor's dtype."""
    from ..merge.tensorfile import stored_tensor

    return stored_tensor(tensor.values() * factor, tensor.dtype)


def _kohya_names(info: AdapterInfo) -> dict[str, str]:
    """Module name -> kohya name: the original names when the adapter came from kohya."""
    if info.config.get("module_names") == "kohya":
        return {m.name: m.name for m in info.modules}
    known = info.config.get("kohya_names") or {}
    components = {m.name.partition(".")[0] for m in info.modules}
    names = {}
    for spec in info.modules:
        if spec.name in known:
            names[spec.name] = known[spec.name]
            continue
        component, _, rest = spec.name.partition(".")
        if component.startswith("text_encoder") and rest.replace(".", "_").startswith(CLIP_LEAVES):
            rest = "text_model." + rest  # sd-scripts and ComfyUI name CLIP modules with the transformers 4 level
        if component == "text_encoder" and rest and "text_encoder_2" in components:
            names[spec.name] = kohya_name(rest, "lora_te1_")
        elif component in COMPONENT_PREFIXES and rest:
            names[spec.name] = kohya_name(rest, COMPONENT_PREFIXES[component])
        else:
            names[spec.name] = kohya_name(spec.name)
    return names


def _common_alpha(info: AdapterInfo) -> float:
    """The one alpha a converted kohya file declares for every module.

    sd-scripts and ComfyUI read each module's ``.alpha``, but diffusers (0.42) turns differing alphas into
    an ``alpha_pattern`` whose keys PEFT never matches, so a module whose alpha is not the most common one
    is applied with the wrong scale (x8 for alpha 32 among alphas 4). With one alpha everywhere every
    reader agrees: a module whose own alpha differs gets the ratio folded into its lora_up, which changes
    its ΔW by one float rounding of lora_up and nothing else.
    """
    alphas = Counter(alpha_for(m, False) for m in info.modules)
    return float(min(alphas, key=lambda a: (-alphas[a], a)))


def to_kohya_file(
    adapter: LoraAdapter,
    path: str | Path,
    *,
    title: str | None = None,
    architecture: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a kohya ``.safetensors`` file: lora_down / lora_up / alpha per module, hashes, modelspec."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConflictError(f"{path} already exists", hint="choose another output path or remove the file")
    info = adapter.info
    same_format = info.format == "kohya"
    if not same_format:
        _check_convertible(info, "kohya")
    names = _kohya_names(info)
    tensors: dict[str, StoredTensor] = {}
    if same_format and (info.adapter_type != "lora" or info.config.get("other_keys")):
        # LyCORIS types: a verbatim copy is the only faithful kohya export
        from ..merge.tensorfile import TensorFile

        with TensorFile(adapter.weights_path) as source:
            tensors = {key: source.stored(key) for key in source.header.tensors}
    else:
        common = _common_alpha(info) if not same_format else None
        for spec in info.modules:
            name = names[spec.name]
            keys = [spec.key_a, spec.key_b] + ([spec.key_alpha] if spec.key_alpha else [])
            loaded = _load(adapter, keys)
            tensors[f"{name}.lora_down.weight"] = loaded[spec.key_a]
            tensors[f"{name}.lora_up.weight"] = loaded[spec.key_b]
            if same_format and spec.key_alpha:
                tensors[f"{name}.alpha"] = loaded[spec.key_alpha]  # the original tensor, same dtype
            elif common is not None:
                alpha = alpha_for(spec, False)
                if alpha != common:  # fold the module's own scale into lora_up (see _common_alpha)
                    tensors[f"{name}.lora_up.weight"] = _scaled(loaded[spec.key_b], alpha / common)
                tensors[f"{name}.alpha"] = _scalar(common)
            elif not (same_format and spec.alpha == spec.rank):
                tensors[f"{name}.alpha"] = _scalar(alpha_for(spec, False))
    metadata = dict(info.file_metadata) if same_format else {"ss_network_module": "networks.lora"}
    metadata.pop("format", None)
    if not same_format:
        metadata["ss_network_dim"] = str(info.rank or Counter(m.rank for m in info.modules).most_common(1)[0][0])
        alphas = Counter(alpha_for(m, False) for m in info.modules)
        metadata["ss_network_alpha"] = f"{alphas.most_common(1)[0][0]:g}"
        if info.base_model:
            metadata["ss_sd_model_name"] = info.base_model
    metadata.setdefault("modelspec.sai_model_spec", "1.0.0")
    metadata.setdefault("modelspec.implementation", "https://github.com/kohya-ss/sd-scripts")
    if architecture or "modelspec.architecture" not in metadata:
        metadata["modelspec.architecture"] = architecture or "unknown/lora"
    if title or "modelspec.title" not in metadata:
        metadata["modelspec.title"] = title or adapter.label
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    _atomic_save(tensors, path, metadata)
    return path


def to_peft_folder(
    adapter: LoraAdapter,
    folder: str | Path,
    *,
    module_paths: Iterable[str] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT folder. kohya names need ``module_paths`` (the base model's) to become paths.

    A PEFT folder describes one model, so an adapter spanning several pipeline components (unet and
    text_encoder) is refused; a single component's prefix ("unet.") is stripped.
    """
    folder = Path(folder)
    if (folder / "adapter_config.json").exists() and not overwrite:
        raise ConflictError(f"{folder} already holds an adapter", hint="choose another output folder")
    info = adapter.info
    _check_convertible(info, "peft")
    info = _with_paths(info, module_paths, "peft")
    components = {m.name.partition(".")[0] for m in info.modules} & set(COMPONENTS)
    if len(components) > 1:
        raise UnsupportedAdapterError(
            f"a PEFT folder holds one model, but this adapter spans {', '.join(sorted(components))}",
            adapter_type=info.adapter_type,
            hint="export with --format diffusers, or export one component at a time",
        )
    all_in_component = components and all(m.name.partition(".")[0] in components for m in info.modules)
    strip = f"{next(iter(components))}." if all_in_component else ""
    tensors: dict[str, StoredTensor] = {}
    for spec in info.modules:
        loaded = _load(adapter, [spec.key_a, spec.key_b])
        name = spec.name.removeprefix(strip)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = loaded[spec.key_a]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = loaded[spec.key_b]
    rslora, scales = module_scales((m.name.removeprefix(strip), m) for m in info.modules)
    config = lora_config(
        scales,
        use_rslora=rslora,
        fan_in_fan_out=bool(info.config.get("fan_in_fan_out", False)),
        base_model=base_model or info.base_model,
        revision=info.base_model_revision,
        task_type=info.task_type,
    )
    return write_peft_folder(folder, config, tensors)


def to_diffusers_file(
    adapter: LoraAdapter,
    path: str | Path,
    *,
    module_paths: Iterable[str] | None = None,
    component: str = "unet",
    fold_scale: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers LoRA file (``<component>.<path>.lora_A.weight``) with lora_adapter_metadata.

    Module paths without a pipeline component are put under ``component``. With ``fold_scale`` the
    scale goes into B and alpha = rank is declared, for loaders that ignore the metadata.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConflictError(f"{path} already exists", hint="choose another output path or remove the file")
    info = adapter.info
    _check_convertible(info, "diffusers")
    info = _with_paths(info, module_paths, "diffusers")
    if component not in COMPONENTS:
        raise InvalidAdapterError(f"unknown diffusers component {component!r}", hint=f"use one of {COMPONENTS}")
    by_component: dict[str, list[ModuleSpec]] = {}
    tensors: dict[str, StoredTensor] = {}
    for spec in info.modules:
        first = spec.name.partition(".")[0]
        name = spec.name if first in COMPONENTS else f"{component}.{spec.name}"
        comp = name.partition(".")[0]
        loaded = _load(adapter, [spec.key_a, spec.key_b])
        b = loaded[spec.key_b]
        if fold_scale:
            b = _scaled(b, spec.scale)
            spec = dataclasses.replace(spec, alpha=float(spec.rank), use_rslora=False)
        tensors[f"{name}.lora_A.weight"] = loaded[spec.key_a]
        tensors[f"{name}.lora_B.weight"] = b
        by_component.setdefault(comp, []).append(dataclasses.replace(spec, name=name.partition(".")[2]))
    packed: dict[str, Any] = {}
    for comp, specs in sorted(by_component.items()):
        rslora, scales = module_scales((m.name, m) for m in specs)
        config = lora_config(scales, use_rslora=rslora)
        if comp.startswith("text_encoder"):
            config = _either_clip_layout(config)
        packed.update({f"{comp}.{k}": config[k] for k in _DIFFUSERS_KEYS})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, sort_keys=True)}
    _atomic_save(tensors, path, metadata)
    return path


def _either_clip_layout(config: dict[str, Any]) -> dict[str, Any]:
    """A text encoder's config whose module names match with or without CLIP's ``text_model.`` level.

    diffusers 0.42 strips ``text_model.`` from the tensor keys when the CLIPTextModel has no such level
    (transformers 5) but not from ``lora_adapter_metadata``, so full names and ``^``-anchored patterns that
    contain it match no module. Names written from below that level match in both layouts, as PEFT
    matches target names and pattern keys as suffixes at a dot; below ``text_model`` they are unique.
    """
    import re

    def short(name: str) -> str:
        return name.removeprefix("text_model.")

    def key(pattern: str) -> str:
        name = pattern.removeprefix("^").replace("\\", "")
        return re.escape(short(name))

    config = dict(config)
    config["target_modules"] = [short(n) for n in config["target_modules"]]
    config["alpha_pattern"] = {key(k): v for k, v in config["alpha_pattern"].items()}
    config["rank_pattern"] = {key(k): v for k, v in config["rank_pattern"].items()}
    return config


def export_adapter(adapter: LoraAdapter, dest: str | Path, fmt: str, **options: Any) -> Path:
    """Dispatch on ``fmt`` ("peft" folder, "kohya" file, "diffusers" file); options go to the writer."""
    writers: dict[str, Callable[..., Path]] = {
        "peft": to_peft_folder,
        "kohya": to_kohya_file,
        "diffusers": to_diffusers_file,
    }
    from ..exporter import EXPORT_FORMATS
    from .diffusion.write import TARGETS as DIFFUSION_TARGETS
    from .diffusion.write import export_diffusion, is_diffusion

    if fmt not in writers and fmt not in DIFFUSION_TARGETS:
        from ..errors import UnknownFormatError

        raise UnknownFormatError(f"unknown export format {fmt!r}", format=fmt, known=EXPORT_FORMATS)
    if fmt in DIFFUSION_TARGETS and is_diffusion(adapter.info):
        return export_diffusion(adapter, dest, fmt, overwrite=bool(options.get("overwrite")))
    if fmt not in writers:
        raise UnsupportedAdapterError(
            f"{fmt} files hold LoRAs of diffusion transformers (Flux, Wan, Qwen-Image), and this "
            f"{adapter.info.format} adapter is not one", adapter_type=adapter.info.adapter_type,
            hint="export with --format peft, kohya or diffusers",
        )
    return writers[fmt](adapter, dest, **options)


def export_converted(
    adapter: LoraAdapter, destination: str | Path, *, fmt: str, base: BaseFingerprint | None = None, **options: Any
) -> Path:
    """:func:`export_adapter` for the CLI: a base fingerprint (``install --base``) supplies the module
    paths that kohya names need for PEFT and diffusers output."""
    if base is not None and fmt in ("peft", "diffusers") and "module_paths" not in options:
        from ..compat.basemodel import module_shapes

        options["module_paths"] = list(module_shapes(base))
    return export_adapter(adapter, destination, fmt, **options)
