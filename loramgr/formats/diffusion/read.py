"""Recognising the key conventions of diffusion-transformer LoRA files and reading them.

=============  =====================================================================================
convention     keys
=============  =====================================================================================
kohya          ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``alpha``
               (sd-scripts Flux, SD3: ``lora_unet_joint_blocks_0_x_block_attn_qkv``, musubi-tuner
               Wan: ``lora_unet_blocks_0_self_attn_q``)
comfyui        ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (or ``lora_down``),
               ``.alpha``, ``.diff`` / ``.diff_b`` (BFL, ComfyUI, ai-toolkit, the original Wan names)
xlabs          ``double_blocks.0.processor.qkv_lora1.down.weight`` (image), ``qkv_lora2`` (text),
               ``proj_lora1/2``; ``single_blocks.0.processor.qkv_lora`` (the q, k, v rows of
               ``linear1``), ``proj_lora`` (``linear2``); no alpha (scale 1)
diffusers      ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (read by
               :mod:`loramgr.formats.diffusers`, then given its family here)
=============  =====================================================================================

The first three name modules of the original checkpoint, the last diffusers' modules; either way
the module names of the :class:`~loramgr.adapter.AdapterInfo` are dotted module paths, the family
is ``config["family"]`` and the namespace ``config["namespace"]`` ("original" | "diffusers").
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from ...adapter import AdapterInfo, ModuleSpec, factors_fit
from ...errors import InvalidAdapterError
from ...safetensors_io import SafetensorsHeader
from ..diffusers import COMPONENTS
from ..kohya import kohya_summary, read_scalars
from .families import COMPONENT, FAMILIES, FLUX1, Family, choose, families_of_diffusers, families_of_original

CONVENTIONS = ("kohya", "comfyui", "xlabs", "diffusers")
COMFY_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"

_PARTS = {
    ".lora_A.weight": "a", ".lora_down.weight": "a", ".lora_B.weight": "b", ".lora_up.weight": "b",
    ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff", ".dora_scale": "dora",
}  # fmt: skip
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<block>\d+)\.processor\."
    r"(?P<leaf>qkv_lora[12]?|proj_lora[12]?)\.(down|up)\.weight$"
)
#: XLabs processor LoRA -> the original module it adds to (single blocks: q, k, v rows of linear1, and linear2)
XLABS_MODULES = {("double", "qkv_lora1"): "img_attn.qkv", ("double", "qkv_lora2"): "txt_attn.qkv",
                 ("double", "proj_lora1"): "img_attn.proj", ("double", "proj_lora2"): "txt_attn.proj",
                 ("single", "qkv_lora"): "linear1", ("single", "proj_lora"): "linear2"}


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def detect_convention(
    keys: list[str], metadata: dict[str, str] | None = None
) -> tuple[str, list[Family], dict[str, str]] | None:
    """(convention, candidate families, tensor key -> module path) for an original-names file, else None.

    Every key must belong to one module of a family (a Flux kohya file with CLIP modules, say, is left to
    the plain kohya reader, which resolves names against a base model). Several candidates remain when
    the modules exist in several families (see :func:`.families.choose`); the paths are the first's.
    """
    if not keys:
        return None
    matches = [_XLABS.match(k) for k in keys]
    if all(m is not None and (m["kind"], m["leaf"]) in XLABS_MODULES for m in matches):
        modules = {m[0]: f"{m['kind']}_blocks.{m['block']}.{XLABS_MODULES[(m['kind'], m['leaf'])]}"
                   for m in matches if m is not None}
        return "xlabs", [FLUX1], modules
    # PEFT state dicts saved with the adapter name ("lora_A.default.weight"), as diffusers' Qwen loader accepts
    split = {k: _split(k.replace(".default.", ".")) for k in keys}
    if any(s is None for s in split.values()):
        return None
    bodies = {k: s[0] for k, s in split.items() if s is not None}
    if all(b.startswith(KOHYA_PREFIX) for b in bodies.values()):
        names = {b.removeprefix(KOHYA_PREFIX) for b in bodies.values()}
        found: list[tuple[Family, dict[str, str]]] = []
        for family in FAMILIES:
            resolved = {n: family.resolve_kohya(n) for n in names}
            if all(resolved.values()):
                found.append((family, {k: str(resolved[b.removeprefix(KOHYA_PREFIX)]) for k, b in bodies.items()}))
        if not found:
            return None
        chosen = choose([f for f, _ in found], metadata or {})
        family, paths = next((f, p) for f, p in found if f is (chosen or found[0][0]))
        return "kohya", [family] if chosen else [f for f, _ in found], paths
    if all(b.startswith(COMFY_PREFIX) for b in bodies.values()) or not any(
        b.startswith(KOHYA_PREFIX) for b in bodies.values()
    ):  # ComfyUI's diffusion_model. prefix, or the bare module paths of the original checkpoint
        paths = {k: b.removeprefix(COMFY_PREFIX) for k, b in bodies.items()}
        # full-weight deltas (diff / diff_b) may sit on any module (norms, biases): the LoRA modules decide
        lora_paths = {paths[k] for k, part in split.items() if part is not None and part[1] != "diff"}
        families = families_of_original(lora_paths)
        if families:
            return "comfyui", families, paths
    return None


def read_original(
    header: SafetensorsHeader, convention: str, candidates: list[Family], modules: dict[str, str]
) -> AdapterInfo:
    """Describe a kohya / ComfyUI / XLabs diffusion-transformer file; names are original module paths."""
    path = str(header.path)
    parts: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    other: list[str] = []
    for key, module in modules.items():
        entry = header.tensors[key]
        if convention == "xlabs":
            role = "a" if key.endswith(".down.weight") else "b"
        else:
            split = _split(key.replace(".default.", "."))
            role = split[1] if split else "other"
        if role in ("diff", "other"):
            other.append(key)
            continue
        parts.setdefault(module, {})[role] = (key, entry.shape, entry.torch_dtype)
    alphas = read_scalars(header, [p["alpha"][0] for p in parts.values() if "alpha" in p])
    specs: list[ModuleSpec] = []
    dora = False
    for name in sorted(parts):
        found = parts[name]
        if "a" not in found or "b" not in found:
            raise InvalidAdapterError(
                f"{path}: module {name} has only one of its two LoRA factors", path=path, module=name,
                hint="the file is incomplete; re-save the adapter",
            )
        (key_a, shape_a, dtype), (key_b, shape_b, _) = found["a"], found["b"]
        if not factors_fit(shape_a, shape_b):
            raise InvalidAdapterError(
                f"{path}: module {name}: down {list(shape_a)} and up {list(shape_b)} do not fit", path=path,
                module=name, hint="expected down [r, in] and up [out, r]",
            )
        fields: dict[str, Any] = {"dtype": dtype}
        if "alpha" in found:
            fields["key_alpha"] = found["alpha"][0]
            fields["alpha"] = alphas[found["alpha"][0]] or float(shape_a[0])
        if "dora" in found:
            dora = True
            fields["extra_keys"] = (found["dora"][0],)
        specs.append(ModuleSpec.from_factors(name, (key_a, shape_a), (key_b, shape_b), **fields))
    if not specs:
        raise InvalidAdapterError(f"{path}: no LoRA factors found", path=path, hint="is this a LoRA file?")
    metadata = dict(header.metadata)
    family = choose(candidates, metadata) or _by_width(candidates, specs)
    notes = []
    if other:
        notes.append(f"{len(other)} full-weight (diff / diff_b) tensor(s) besides the LoRA factors, "
                     f"e.g. {sorted(other)[0]}")
    if convention == "xlabs":
        notes.append("XLabs files carry no alpha: scale 1 (alpha = rank), as XLabs and diffusers load them")
    if family is None:
        notes.append(f"the modules exist in {' and '.join(f.title for f in candidates)}; the metadata does not "
                     "say which: conversions between module layouts are refused")
    config: dict[str, Any] = {
        "family": family.name if family else None,
        "families": [f.name for f in candidates],
        "namespace": "original",
        "convention": convention,
        "module_names": "paths",
        "other_keys": sorted(other),
    }
    if convention == "kohya":
        config["kohya"] = kohya_summary(metadata)
    return AdapterInfo(
        format=convention,
        adapter_type="dora" if dora else "lora",
        modules=specs,
        weights_file=Path(path).name,
        config=config,
        rank=Counter(s.rank for s in specs).most_common(1)[0][0],
        alpha=Counter(s.alpha for s in specs).most_common(1)[0][0],
        use_dora=dora,
        target_modules_found=sorted({s.name.rsplit(".", 1)[-1] for s in specs}),
        base_model=metadata.get("ss_sd_model_name") or metadata.get("modelspec.architecture"),
        dtypes=sorted({e.torch_dtype for e in header.tensors.values()}),
        n_params=sum(e.numel for e in header.tensors.values()),
        file_metadata=metadata,
        notes=notes,
    )


def annotate_diffusers(info: AdapterInfo) -> AdapterInfo:
    """Give a diffusers-convention file its family when all its modules are one family's transformer modules."""
    names = [m.name for m in info.modules]
    prefix = COMPONENT + "."
    if names and all(n.startswith(prefix) for n in names):
        inner = [n.removeprefix(prefix) for n in names]
    elif names and not any(n.partition(".")[0] in COMPONENTS for n in names):
        inner = names  # one model's save_lora_adapter: the transformer's own module paths
    else:
        return info
    families = families_of_diffusers(inner)
    if families:
        info.config["namespace"] = "diffusers"
        info.config["convention"] = "diffusers"
        info.config["families"] = [f.name for f in families]
        chosen = choose(families, info.file_metadata) or _by_width(families, info.modules)
        info.config["family"] = chosen.name if chosen else None
        if chosen is None and len(families) > 1:
            info.notes.append(f"the modules exist in {' and '.join(f.title for f in families)}; neither the metadata "
                              "nor the widths say which: conversions to original names are refused")
    return info


def _by_width(families: list[Family], modules: list[ModuleSpec]) -> Family | None:
    """The one candidate family with a published model of this width (Flux 3072, SD3 1536 / 2432, ...)."""
    if len(families) == 1:
        return families[0]
    from ...compat.identify import PUBLISHED, identify_shapes

    shapes = {m.name: (m.out_features, m.in_features) for m in modules}
    fitting = []
    for family in families:
        found = identify_shapes(shapes, family=family.name)
        dims = found.dims if found else {}
        if dims and any(p.family == family.name and all(p.dims.get(k) == v for k, v in dims.items() if k in p.dims)
                        for p in PUBLISHED):
            fitting.append(family)
    return fitting[0] if len(fitting) == 1 else None
