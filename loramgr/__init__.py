"""loramgr: a package manager for LoRA adapters.

The public API, imported lazily so that ``import loramgr`` (and the CLI) stay fast::

    loramgr.install(path_or_hf_or_oci_ref, name=..., version=...)   an adapter into the registry
    loramgr.export(ref, destination, format=...)   peft, kohya, diffusers, comfyui, xlabs, gguf, ollama
    loramgr.get(ref)                      a registered adapter (tensors read when needed)
    loramgr.load(ref_or_path)             the same, or a PEFT folder / .safetensors file
    loramgr.combine([...], weights=..., method=..., rank=...)   a merge in memory
    loramgr.compose([(ref, weight), ...], method=...)
    loramgr.compress(ref, rank=... | energy=...)
    loramgr.register(merged, name=..., version=...)
    loramgr.apply(model, adapter)         a PeftModel (needs the peft extra)
    loramgr.fuse(model, adapter) / loramgr.unfuse(model, adapter)
    loramgr.hotswap(peft_model, name, adapter)
    loramgr.check([ref_or_path, ...], base=..., engine=...)   findings, as ``loramgr check``
    loramgr.Registry, loramgr.MergeOptions
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "install": "loramgr.api",
    "export": "loramgr.api",
    "get": "loramgr.api",
    "load": "loramgr.api",
    "combine": "loramgr.api",
    "compose": "loramgr.api",
    "compress": "loramgr.api",
    "register": "loramgr.api",
    "apply": "loramgr.model.peftmodel",
    "hotswap": "loramgr.model.peftmodel",
    "fuse": "loramgr.model.weights",
    "unfuse": "loramgr.model.weights",
    "check_against_model": "loramgr.model.weights",
    "check": "loramgr.compat.check",
    "Registry": "loramgr.registry",
    "MergeOptions": "loramgr.merge.options",
    "LoraAdapter": "loramgr.adapter",
    "AdapterInfo": "loramgr.adapter",
    "LoramgrError": "loramgr.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'loramgr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
