"""The one writer of PEFT LoRA configs: adapter_config.json, the LoraConfig ``apply`` builds, and the
per-component config diffusers keeps in ``lora_adapter_metadata``.

Each module's rank and scale must come out of the config exactly, and no other module of the model
may pick up a module's settings. PEFT 0.21 looks rank_pattern / alpha_pattern keys up with
``re.match(rf"(.*\\.)?({key})$", module_name)`` (``peft.utils.other.get_pattern_key``): a key is a
regex matching a suffix of the module name, so ``layers.1.q_proj`` would also match
``vision.layers.1.q_proj``, and its dots match any character. Keys are therefore written as
``^`` + re.escape(full module name), which can only match that one module. ``target_modules`` lists
full module names, not leaf names: a leaf ("q_proj", or the "0" of ``to_out.0``, which also names the
block ``blocks.0``) would wrap every other module of that name. PEFT matches list entries as suffixes
too, so a module whose path ends with a target's full name (``vision.layers.0.q_proj`` for
``layers.0.q_proj``) is also wrapped, with the default rank and B = 0: it changes nothing.

A PEFT folder describes one model, loaded with ``PeftModel.from_pretrained(model, folder)``: its module
names are that model's paths. Adapters read from diffusers and kohya files name their modules under a
pipeline component ("unet.down_blocks.0...", the component a ``lora_unet_`` prefix stands for), which
:func:`one_model_names` removes (the UNet's own paths lack it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..adapter import AdapterInfo, ModuleSpec
from ..errors import UnsupportedAdapterError
from .diffusers import COMPONENTS
from .kohya import kohya_prefix


def pattern_key(module: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT matches to ``module`` and to nothing else."""
    return "^" + re.escape(module)


def alpha_for(spec: ModuleSpec, rslora: bool) -> float:
    """The alpha that gives ``spec`` its scale under the (rs)LoRA convention ``rslora``."""
    if spec.use_rslora == rslora:
        return spec.alpha
    return spec.scale * (math.sqrt(spec.rank) if rslora else spec.rank)


def module_scales(specs: Iterable[tuple[str, ModuleSpec]]) -> tuple[bool, dict[str, tuple[int, float]]]:
    """(use_rslora, name -> (rank, alpha)) that give each module its own scale under one convention.

    rsLoRA is kept when every module uses it; otherwise alphas are rewritten as alpha = scale · r.
    """
    pairs = list(specs)
    rslora = bool(pairs) and all(spec.use_rslora for _, spec in pairs)
    return rslora, {name: (spec.rank, alpha_for(spec, rslora)) for name, spec in pairs}


def _most_common(values: Iterable[Any]) -> Any:
    """The most common value; ties go to the smaller, so the choice does not depend on module order."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def lora_config(
    modules: Mapping[str, tuple[int, float]],
    *,
    use_rslora: bool = False,
    fan_in_fan_out: bool = False,
    base_model: str | None = None,
    revision: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """A PEFT LoRA config (adapter_config.json content) for modules given as name -> (rank, alpha).

    ``r`` and ``lora_alpha`` are the most common rank and alpha; every module that differs gets an
    anchored key in ``rank_pattern`` / ``alpha_pattern``.
    """
    if not modules:
        raise ValueError("a LoRA config needs at least one module")
    rank = _most_common(r for r, _ in modules.values())
    alpha = _most_common(float(a) for _, a in modules.values())
    names = sorted(modules)
    return {
        "alpha_pattern": {pattern_key(n): float(modules[n][1]) for n in names if float(modules[n][1]) != alpha},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {pattern_key(n): modules[n][0] for n in names if modules[n][0] != rank},
        "revision": revision,
        "target_modules": names,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def pipeline_component(info: AdapterInfo, name: str) -> str | None:
    """The diffusers pipeline component that module ``name`` of ``info`` is named under, or None.

    Only a component the format put there counts: a diffusers file's ``unet.`` prefix, or the component a
    kohya prefix stands for. A module path that merely starts with such a word is the model's own
    (GPT-2's ``transformer.h.0.attn.c_attn``, also as LyCORIS names it on a bare GPT-2).
    """
    component, dot, rest = name.partition(".")
    if not dot or component not in COMPONENTS:
        return None
    if info.format == "diffusers":
        return component
    original = (info.config.get("kohya_names") or {}).get(name) if info.format == "kohya" else None
    prefix = kohya_prefix(original) if original else None
    if original and prefix and original[len(prefix) :] == rest.replace(".", "_"):
        return component
    return None


def one_model_names(sources: Iterable[AdapterInfo], names: Iterable[str]) -> dict[str, str]:
    """Each module name (as ``sources`` name it) -> its path in the one model a PEFT folder of them describes.

    Refused in one line when the modules span several pipeline components (a UNet and a text encoder are
    two models), or when two names become one path (a module named with and without its component).
    """
    infos = list(sources)
    components = {name: next((c for info in infos if (c := pipeline_component(info, name))), None) for name in names}
    spanned = sorted({c for c in components.values() if c})
    if len(spanned) > 1:
        raise UnsupportedAdapterError(
            f"a PEFT folder holds one model, but these modules span {', '.join(spanned)}",
            hint="export with --format diffusers, or combine the adapters of one component at a time",
        )
    mapped = {name: name.removeprefix(f"{c}.") if c else name for name, c in components.items()}
    seen: dict[str, str] = {}
    for name, path in mapped.items():
        if path in seen:
            raise UnsupportedAdapterError(
                f"modules {seen[path]} and {name} are the same module of the {spanned[0]} once written as a PEFT "
                "folder",
                hint="combine adapters that name their modules alike (all installed from diffusers or kohya "
                "files, or all PEFT folders)",
            )
        seen[path] = name
    return mapped
