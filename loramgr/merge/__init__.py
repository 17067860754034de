"""Combining and compressing LoRA adapters (the maths of each method: docs/merge-methods.md).

::

    from loramgr.merge import MergeOptions, combine, compress
    merged = combine([a, b], MergeOptions(method="svd", weights=(0.7, 0.3), rank=16))
    merged.save_pretrained("out/")

Modules: ``options`` (the one options type and its check), ``methods`` (the registry of methods),
``lowrank`` (factored SVD, re-ranking), ``core_space`` (TIES, DARE, magnitude pruning, TSV, Iso and
KnOTS in the adapters' own space: the default space), ``elementwise`` (TIES, DARE, magnitude pruning
on dense deltas: full space), ``dense`` (the same, block by block from the factors), ``engine``
(checks and the streaming loop over open adapters), ``result`` (PEFT config and deterministic saving), ``recipes`` (the
provenance of a result), ``operations`` (the combine and compress steps the CLI and the Python API
call: sources from the registry, checks, delivery).

The maths and the file I/O run on numpy arrays (``tensorfile``: reading sources, writing results
module by module, bfloat16 by hand); torch is imported only for DARE's masks in full space (PEFT's
random stream) and for ``MergedAdapter.tensors``. The options, the registry of methods and recipes
import without numpy; the rest is imported on first use, so the CLI can check a merge's options
before loading anything heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loramgr.merge.methods import METHODS, MergeMethod
from loramgr.merge.options import MergeOptions
from loramgr.merge.recipes import Recipe

if TYPE_CHECKING:
    from loramgr.merge.engine import combine, compress
    from loramgr.merge.result import MergedAdapter, ModuleReport

__all__ = [
    "METHODS", "MergeMethod", "MergeOptions", "MergedAdapter", "ModuleReport", "Recipe", "combine", "compress",
]

# these need numpy: imported on first use
_LAZY = {
    "combine": "loramgr.merge.engine",
    "compress": "loramgr.merge.engine",
    "MergedAdapter": "loramgr.merge.result",
    "ModuleReport": "loramgr.merge.result",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'loramgr.merge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
