"""The local registry: versioned adapters in a database over a content-addressed blob store.

Names are imported on first use. The default SQLite registry is queried through the standard
library's sqlite3 (see ``database``), so no command that only reads or tags imports SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Registry
    from .maintenance import execute_gc, execute_remove, plan_gc, plan_remove, verify
    from .records import (
        HubOrigin,
        InstallResult,
        Parent,
        Plan,
        SourceDetails,
        StoredModule,
        StoredVersion,
        VerifyReport,
        VersionDetails,
        VersionRow,
    )
    from .refs import Reference, parse_reference

_LAZY = {
    "Registry": "core",
    "execute_gc": "maintenance",
    "execute_remove": "maintenance",
    "plan_gc": "maintenance",
    "plan_remove": "maintenance",
    "verify": "maintenance",
    "HubOrigin": "records",
    "InstallResult": "records",
    "SourceDetails": "records",
    "StoredModule": "records",
    "StoredVersion": "records",
    "VersionDetails": "records",
    "Parent": "records",
    "Plan": "records",
    "VerifyReport": "records",
    "VersionRow": "records",
    "Reference": "refs",
    "parse_reference": "refs",
}

__all__ = [
    "HubOrigin",
    "InstallResult",
    "Parent",
    "Plan",
    "Reference",
    "Registry",
    "SourceDetails",
    "StoredModule",
    "StoredVersion",
    "VerifyReport",
    "VersionDetails",
    "VersionRow",
    "execute_gc",
    "execute_remove",
    "parse_reference",
    "plan_gc",
    "plan_remove",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'loramgr.registry' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"loramgr.registry.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
