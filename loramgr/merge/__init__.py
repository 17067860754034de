"""Combining and compressing LoRA adapters (DOMAIN.md section 4; maths in docs/merge-methods.md).

::

    from loramgr.merge import MergeOptions, combine, compress
    merged = combine([a, b], MergeOptions(method="svd", weights=(0.7, 0.3), rank=16))
    merged.save_pretrained("out/")

Modules: ``options`` (the one options type), ``methods`` (the registry), ``lowrank`` (factored SVD,
re-ranking), ``elementwise`` (TIES, DARE, magnitude pruning on dense deltas), ``engine`` (validation
and the streaming loop), ``result`` (PEFT config and deterministic saving).

Importing this package imports torch; the CLI imports it inside the commands that merge. The options
type alone is importable without torch from ``loramgr.merge.options``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loramgr.merge.options import MergeOptions

if TYPE_CHECKING:
    from loramgr.merge.engine import combine, compress
    from loramgr.merge.methods import METHODS, MergeMethod
    from loramgr.merge.result import MergedAdapter, ModuleReport

__all__ = ["METHODS", "MergeMethod", "MergeOptions", "MergedAdapter", "ModuleReport", "combine", "compress"]

# the rest needs torch: imported on first use, so the CLI can build its options from MergeOptions alone
_LAZY = {
    "combine": "loramgr.merge.engine",
    "compress": "loramgr.merge.engine",
    "METHODS": "loramgr.merge.methods",
    "MergeMethod": "loramgr.merge.methods",
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
