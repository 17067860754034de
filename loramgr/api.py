"""The Python API: install and export adapters, get them from the registry, combine them, register or
save the result.

::

    import loramgr
    loramgr.install("runs/sql-lora", name="sql-assistant", version="1.0.0")   # or a file, or hf://...
    adapter = loramgr.get("sql-assistant>=1.0")      # metadata now, tensors when first needed
    mix = loramgr.compose([("sql-assistant", 0.7), ("house-style", 0.3)], method="svd", rank=16)
    mix.save_pretrained("out/")                        # a PEFT folder
    loramgr.register(mix, name="sql-chat", version="1.0.0")
    loramgr.export("sql-chat", "out.safetensors", format="kohya")

The same operations as the CLI (``loramgr install``, ``export`` and ``combine`` call the same code),
so the same inputs give the same digest, and the same mistakes the same error, from either.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import LoraAdapter
from .registry import InstallResult, Registry

if TYPE_CHECKING:
    from .merge import MergedAdapter

Source = str | os.PathLike[str] | LoraAdapter

_default_registry: Registry | None = None


def registry() -> Registry:
    """The registry at LORAMGR_HOME / LORAMGR_DATABASE_URL, opened once per process."""
    global _default_registry
    from . import paths

    if _default_registry is None or _default_registry.root != paths.home():
        _default_registry = Registry.open()
    return _default_registry


def install(
    source: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
    base: str | None = None,
    allow_pickle: bool = False,
    registry_: Registry | None = None,
) -> InstallResult:
    """Install a PEFT folder, an adapter file (.safetensors: kohya, diffusers, LyCORIS) or
    ``hf://owner/repo[@revision][:subfolder]``, as ``loramgr install`` does.

    ``name`` defaults to the folder, file or repository name, ``version`` to the next minor version (or
    the Hub tag's); ``base`` names a registered base model the adapter must fit; ``allow_pickle`` loads a
    pickled adapter_model.bin weights-only and stores it as safetensors.
    """
    from .installer import InstallOptions, install_source

    options = InstallOptions(name=name, version=version, base=base, allow_pickle=allow_pickle)
    return install_source(registry_ or registry(), source, options)


def export(
    reference: str,
    destination: str | os.PathLike[str],
    *,
    format: str = "peft",
    base: str | os.PathLike[str] | None = None,
    registry_: Registry | None = None,
) -> Path:
    """Write a registered version as a PEFT folder, a kohya, diffusers or llama.cpp GGUF file, or an Ollama
    folder (GGUF + Modelfile), as ``loramgr export`` does; returns the path written. ``base`` (a registered
    base model's name or a checkpoint folder) replaces the base linked at install."""
    from .exporter import export_version

    return export_version(registry_ or registry(), reference, destination, fmt=format, base=base)


def get(reference: str, *, registry_: Registry | None = None) -> LoraAdapter:
    """A registered adapter version by reference (``name``, ``name==1.0``, ``name>=1,<2``, ``name@tag``,
    ``sha256:prefix``). Metadata is read now; tensors are read from the store when first needed."""
    return (registry_ or registry()).open_adapter(reference)


def load(source: Source, *, registry_: Registry | None = None) -> LoraAdapter:
    """An adapter from a reference, a PEFT folder or a single .safetensors file (a path-like)."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, os.PathLike):
        path = Path(source)
        if path.is_dir():
            from .formats.peft import read_peft_folder

            return LoraAdapter(read_peft_folder(path), path, label=str(path))
        from .formats.detect import read_adapter_file

        return LoraAdapter(read_adapter_file(path), path.parent, label=str(path), weights_path=path)
    return get(source, registry_=registry_)


def combine(
    sources: Sequence[Source],
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    registry_: Registry | None = None,
    **options: Any,
) -> MergedAdapter:
    """Combine adapters in memory; keyword arguments are :class:`loramgr.merge.MergeOptions` fields,
    e.g. ``method="ties", density=0.3`` (in core space, the default; ``space="full"`` for the
    element-wise result on the dense deltas), ``method="tsv"``, ``scale=0.8``, ``rank=16``.

    The same step as ``loramgr combine`` (:func:`loramgr.merge.operations.combine`): the same checks,
    errors and bytes. A source given as a string is a reference in the registry; a path is read from
    disk.
    """
    from .merge.operations import combine as combine_step
    from .merge.options import MergeOptions

    given = {"method": method, **options} | ({"weights": tuple(weights)} if weights is not None else {})
    merge_options = MergeOptions.from_dict(given)
    return combine_step([_source(s) for s in sources], merge_options, registry=registry_).merged


def compose(
    items: Sequence[tuple[Source, float] | Source],
    *,
    method: str = "linear",
    registry_: Registry | None = None,
    **options: Any,
) -> MergedAdapter:
    """Like :func:`combine`, with each source given with its weight: ``[("a", 0.7), ("b", 0.3)]``."""
    sources: list[Source] = []
    weights: list[float] = []
    for item in items:
        if isinstance(item, tuple):
            sources.append(item[0])
            weights.append(float(item[1]))
        else:
            sources.append(item)
            weights.append(1.0)
    return combine(sources, weights=weights, method=method, registry_=registry_, **options)


def compress(source: Source, *, rank: int | None = None, energy: float | None = None,
             dtype: str | None = None, registry_: Registry | None = None) -> MergedAdapter:
    """The optimal lower-rank approximation of one adapter (per-module rank with ``energy``): the same
    step as ``loramgr compress``."""
    from .merge.operations import compress as compress_step

    return compress_step(_source(source), rank=rank, energy=energy, dtype=dtype, registry=registry_).merged


def _source(source: Source) -> str | LoraAdapter:
    """A reference stays a reference (the merge step resolves it); a path is read from disk."""
    return load(source) if isinstance(source, os.PathLike) else source


def register(merged: MergedAdapter, *, name: str, version: str | None = None,
             registry_: Registry | None = None) -> InstallResult:
    """Register a combined adapter with its lineage and recipe (as ``loramgr combine --name`` does)."""
    from .merge.operations import register_result

    return register_result(registry_ or registry(), merged, name=name, version=version)
