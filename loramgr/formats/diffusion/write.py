"""The factors of a diffusion-transformer LoRA in either namespace, ΔW per module, and export to each convention.

Original -> diffusers is exact: a fused module's A is shared by its parts and B is split by rows
(what diffusers' loaders do), a ``swap`` module has its B row halves exchanged. Diffusers -> original
fuses the parts of a fused module block-diagonally: A = [A_q; A_k; A_v], B = diag(B_q, B_k, B_v), rank
r_q + r_k + r_v; a part the file lacks contributes zero rows. When the parts' scales differ the scales are
folded into B (alpha = rank, scale 1), which changes ΔW by one float rounding of B and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...adapter import AdapterInfo, LoraAdapter
from ...errors import ConflictError, InvalidAdapterError, UnsupportedAdapterError
from ..lycoris import require_plain_lora
from .families import COMPONENT, Family, Rule, by_name
from .read import COMFY_PREFIX, KOHYA_PREFIX

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

    from ...merge.tensorfile import StoredTensor

#: export format -> the namespace its module names are in
TARGETS = {"kohya": "original", "comfyui": "original", "xlabs": "original", "diffusers": "diffusers",
           "peft": "diffusers"}


@dataclass
class Factors:
    """One module's LoRA factors: ΔW = scale · B · A. A and B are 2-D arrays of their stored values
    (:meth:`~loramgr.merge.tensorfile.StoredTensor.raw`: bfloat16 as its bits), so that rows cut, joined
    and zero-filled keep every bit; only a scale folded into B rounds, as torch rounds."""

    a: NDArray[Any]
    b: NDArray[Any]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> NDArray[np.float64]:
        from ...merge.tensorfile import raw_values

        return self.scale * (raw_values(self.b) @ raw_values(self.a))


def _scaled(raw: NDArray[Any], factor: float, dtype: str | None = None) -> NDArray[Any]:
    """``raw`` times ``factor`` in float64, rounded to ``dtype`` (default its own) as torch rounds."""
    from ...merge.tensorfile import raw_dtype, raw_values, stored_tensor

    return stored_tensor(raw_values(raw) * factor, dtype or raw_dtype(raw)).raw()


def _as_dtype(raw: NDArray[Any], dtype: str) -> NDArray[Any]:
    from ...merge.tensorfile import raw_dtype

    return raw if raw_dtype(raw) == dtype else _scaled(raw, 1.0, dtype)


def _common_dtype(parts: list[NDArray[Any]]) -> str:
    """torch's type promotion for the float dtypes of ``parts`` (float16 with bfloat16 gives float32)."""
    from ...merge.tensorfile import raw_dtype

    dtypes = {raw_dtype(p) for p in parts}
    if len(dtypes) == 1:
        return dtypes.pop()
    return "F64" if "F64" in dtypes else "F32"


def _stored(raw: NDArray[Any]) -> StoredTensor:
    from ...merge.tensorfile import StoredTensor

    return StoredTensor.from_raw(raw)


def is_diffusion(info: AdapterInfo) -> bool:
    """Whether ``info`` is a diffusion-transformer adapter read by this package (a family is known)."""
    return bool(info.config.get("namespace")) and bool(info.config.get("family") or info.config.get("families"))


def family_of(info: AdapterInfo) -> Family:
    name = info.config.get("family")
    if not name:
        candidates = " or ".join(info.config.get("families") or [])
        raise UnsupportedAdapterError(
            f"the modules of this adapter exist in several model families ({candidates}), and the conversion "
            "between module layouts differs between them",
            adapter_type=info.adapter_type,
            hint="export it in its own convention (diffusers)",
        )
    return by_name(str(name))


def load_factors(adapter: LoraAdapter) -> dict[str, Factors]:
    """Every module's factors under its name in the adapter's own namespace (no component prefix)."""
    info = adapter.info
    require_plain_lora(info, "reading the factors of a diffusion LoRA")
    result: dict[str, Factors] = {}
    with adapter.open_weights() as handle:
        for spec in info.modules:
            a = handle.stored(spec.key_a).raw()
            b = handle.stored(spec.key_b).raw()
            name = spec.name.removeprefix(COMPONENT + ".") if info.config.get("namespace") == "diffusers" else spec.name
            result[name] = Factors(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), spec.scale)
    return result


def _split(rule: Rule, index: str, f: Factors) -> dict[str, Factors]:
    names = rule.part_paths(index)
    if rule.layout == "swap" or (rule.layout == "swap_last" and f.b.shape[0] == 2 * f.a.shape[1]):
        half = f.b.shape[0] // 2
        return {names[0]: Factors(f.a, np.concatenate([f.b[half:], f.b[:half]]), f.scale)}
    if rule.layout in ("rename", "swap_last"):
        return {names[0]: f}
    out = f.b.shape[0]
    if rule.layout == "split":
        sizes = [out // len(names)] * len(names)
    elif out == 3 * f.a.shape[1]:  # split_mlp with the q, k, v rows only (XLabs single blocks): no MLP part
        names, sizes = names[:3], [out // 3] * 3
    else:  # split_mlp: q, k, v have dim rows each (dim = the input width), the MLP the rest
        dim = f.a.shape[1]
        sizes = [dim, dim, dim, out - 3 * dim]
    if sum(sizes) != out or min(sizes) <= 0:
        raise InvalidAdapterError(
            f"module {rule.original_path(index)}: {out} output rows do not split into {len(names)} parts",
            module=rule.original_path(index),
        )
    rows = np.split(f.b, np.cumsum(sizes)[:-1])
    return {name: Factors(f.a, part, f.scale) for name, part in zip(names, rows, strict=True)}


def to_diffusers(family: Family, factors: dict[str, Factors]) -> dict[str, Factors]:
    """Original-namespace factors as diffusers-namespace factors (exact)."""
    result: dict[str, Factors] = {}
    for name, f in factors.items():
        found = family.rule_for_original(name)
        if found is None:
            raise UnsupportedAdapterError(f"module {name} has no counterpart in diffusers' {family.title} model",
                                          adapter_type="lora")
        result.update(_split(*found, f))
    return result


def _fuse(rule: Rule, index: str, parts: dict[int, Factors]) -> Factors:
    present = list(parts.values())
    sizes: list[int] = []
    for number in range(len(rule.parts)):
        if number in parts:
            sizes.append(parts[number].b.shape[0])
        elif rule.layout == "split":
            sizes.append(present[0].b.shape[0])
        else:  # the MLP part of Flux's linear1 is 4 x dim wide (mlp_ratio 4), the attention parts dim
            dim = present[0].a.shape[1]
            sizes.append(4 * dim if number == 3 else dim)
    scales = {f.scale for f in present}
    fold = len(scales) > 1
    scale = 1.0 if fold else present[0].scale
    from ...merge.tensorfile import raw_dtype

    dtype = raw_dtype(present[0].b)
    a_dtype = _common_dtype([parts[n].a for n in sorted(parts)])
    a = np.concatenate([_as_dtype(parts[n].a, a_dtype) for n in sorted(parts)])
    b = np.zeros((sum(sizes), a.shape[0]), dtype=present[0].b.dtype)  # all bits zero: +0.0 in every dtype
    row = col = 0
    for number, size in enumerate(sizes):
        if number in parts:
            part = parts[number]
            block = _scaled(part.b, part.scale, dtype) if fold else _as_dtype(part.b, dtype)
            b[row : row + size, col : col + part.rank] = block
            col += part.rank
        row += size
    return Factors(a, b, scale)


def full_rows(family: Family, factors: dict[str, Factors]) -> dict[str, Factors]:
    """Original-namespace factors with every fused q, k, v + MLP module at its full height.

    An XLabs single block adapts only the q, k, v rows of ``linear1``; the checkpoint's ``linear1`` also
    has the MLP rows (4 x dim, as :func:`_fuse` assumes), which such a LoRA leaves unchanged: zero rows.
    """
    result = dict(factors)
    for name, f in factors.items():
        found = family.rule_for_original(name)
        dim = f.a.shape[1]
        if found and found[0].layout == "split_mlp" and f.b.shape[0] == 3 * dim:
            zeros = np.zeros((4 * dim, f.rank), dtype=f.b.dtype)
            result[name] = Factors(f.a, np.concatenate([f.b, zeros]), f.scale)
    return result


def to_original(family: Family, factors: dict[str, Factors]) -> dict[str, Factors]:
    """Diffusers-namespace factors as original-namespace factors (block-diagonal fusion, see the module doc)."""
    result: dict[str, Factors] = {}
    groups: dict[tuple[Rule, str], dict[int, Factors]] = {}
    for name, f in factors.items():
        found = family.rule_for_part(name)
        if found is None:
            raise UnsupportedAdapterError(f"module {name} has no counterpart in the original {family.title} checkpoint",
                                          adapter_type="lora")
        rule, number, index = found
        groups.setdefault((rule, index), {})[number] = f
    for (rule, index), parts in groups.items():
        target = rule.original_path(index)
        if rule.fused:
            result[target] = _fuse(rule, index, parts)
        else:
            # a swap is its own inverse; a rename keeps the factors
            result[target] = next(iter(_split(rule, index, parts[0]).values()))
    return result


def factors_in(adapter: LoraAdapter, namespace: str) -> dict[str, Factors]:
    """The adapter's factors with module names of ``namespace`` ("original" or "diffusers")."""
    info = adapter.info
    factors = load_factors(adapter)
    if info.config.get("namespace") == namespace:
        return factors
    family = family_of(info)
    if family.same_names:
        return factors
    return to_diffusers(family, factors) if namespace == "diffusers" else to_original(family, factors)


def deltas(adapter: LoraAdapter, namespace: str = "diffusers") -> dict[str, torch.Tensor]:
    """ΔW (float64 torch tensors) of every module, named in ``namespace``: the normalised view every
    comparison uses."""
    import torch

    return {name: torch.from_numpy(f.delta()) for name, f in factors_in(adapter, namespace).items()}


def export_diffusion(adapter: LoraAdapter, destination: str | Path, fmt: str, *, overwrite: bool = False) -> Path:
    """Write the adapter in convention ``fmt`` (kohya, comfyui, xlabs, diffusers or a PEFT folder)."""
    from ..convert import _atomic_save, _scalar
    from ..peft import PEFT_PREFIX, write_peft_folder
    from ..peftconfig import lora_config

    destination = Path(destination)
    if fmt != "peft" and destination.exists() and not overwrite:
        raise ConflictError(f"{destination} already exists", hint="choose another output path or remove the file")
    info = adapter.info
    other = info.config.get("other_keys") or []
    # diff / diff_b tensors of an original-names file carry over to ComfyUI's names, the one target that reads them
    carried = other if fmt == "comfyui" and info.config.get("namespace") == "original" else []
    if other and not carried:
        raise UnsupportedAdapterError(
            f"export to {fmt} would drop {len(other)} tensor(s) that are not LoRA factors, e.g. {other[0]}",
            adapter_type=info.adapter_type, hint="keep the file in its own convention",
        )
    factors = factors_in(adapter, TARGETS[fmt])
    tensors: dict[str, StoredTensor] = {}
    metadata: dict[str, str] = {"format": "pt"}
    if fmt in ("kohya", "comfyui"):
        if info.config.get("family"):
            factors = full_rows(family_of(info), factors)
        for name, f in factors.items():
            base = KOHYA_PREFIX + name.replace(".", "_") if fmt == "kohya" else COMFY_PREFIX + name
            kohya = fmt == "kohya"
            down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
            tensors[base + down], tensors[base + up] = _stored(f.a), _stored(f.b)
            tensors[base + ".alpha"] = _scalar(f.scale * f.rank)
        if fmt == "kohya":
            metadata.update({"ss_network_module": "networks.lora", "ss_base_model_version": family_of(info).name})
        elif info.config.get("family"):  # the family, for modules that exist in several (Flux.1 and Flux.2)
            metadata["modelspec.architecture"] = f"{info.config['family']}/lora"
        if carried:
            with adapter.open_weights() as handle:
                for key in carried:
                    tensors[COMFY_PREFIX + key.removeprefix(COMFY_PREFIX)] = handle.stored(key)
    elif fmt == "xlabs":
        tensors = _xlabs_tensors(info, factors)
    else:
        scales = {name: (f.rank, f.scale * f.rank) for name, f in factors.items()}
        config = lora_config(scales)
        if fmt == "peft":
            peft_tensors = {}
            for name, f in factors.items():
                peft_tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _stored(f.a)
                peft_tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _stored(f.b)
            return write_peft_folder(destination, config, peft_tensors)
        for name, f in factors.items():
            tensors[f"{COMPONENT}.{name}.lora_A.weight"] = _stored(f.a)
            tensors[f"{COMPONENT}.{name}.lora_B.weight"] = _stored(f.b)
        from ..convert import _DIFFUSERS_KEYS
        from ..diffusers import METADATA_KEY

        packed = {f"{COMPONENT}.{k}": config[k] for k in _DIFFUSERS_KEYS}
        metadata[METADATA_KEY] = json.dumps(packed, sort_keys=True)
    _atomic_save(tensors, destination, metadata)
    return destination


def _xlabs_tensors(info: AdapterInfo, factors: dict[str, Factors]) -> dict[str, StoredTensor]:
    """XLabs processor keys: the attention of Flux.1 double blocks, q, k, v of linear1 and linear2 of single
    blocks; XLabs has no alpha, so the scale goes into B."""
    from .read import XLABS_MODULES

    leaves = {(kind, module): leaf for (kind, leaf), module in XLABS_MODULES.items()}
    tensors = {}
    for name, f in factors.items():
        kind, _, rest = name.partition("_blocks.")
        block, _, module = rest.partition(".")
        leaf = leaves.get((kind, module))
        b = f.b
        if leaf == "qkv_lora":  # linear1: only its q, k, v rows, when the MLP rows are unchanged
            dim = f.a.shape[1]
            leaf = leaf if b.shape[0] == 3 * dim or not _stored(b[3 * dim :]).any_nonzero() else None
            b = b[: 3 * dim]
        if leaf is None or family_of(info).name != "flux1":
            raise UnsupportedAdapterError(
                f"XLabs files hold only the attention of Flux.1 double blocks and the q, k, v and output "
                f"projections of its single blocks, and module {name} is not one",
                adapter_type=info.adapter_type, hint="export with --format comfyui or kohya",
            )
        base = f"{kind}_blocks.{block}.processor.{leaf}"
        tensors[base + ".down.weight"] = _stored(f.a)
        tensors[base + ".up.weight"] = _stored(b if f.scale == 1.0 else _scaled(b, f.scale))
    return tensors
