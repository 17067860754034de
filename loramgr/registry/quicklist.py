"""``loramgr list``'s former fast path, now the registry's own: kept for the CLI that imports it.

The registry answers every query through the standard library's sqlite3 on the default SQLite
registry (:mod:`loramgr.registry.database`), so :meth:`Registry.list_versions` is as fast as this
module's separate query was; one implementation remains.
"""

from __future__ import annotations

from pathlib import Path

from .records import VersionRow


def quick_list(root: Path, name: str | None = None) -> list[VersionRow]:
    """The rows of ``loramgr list``: :meth:`Registry.list_versions` of the registry in ``root``."""
    from .core import Registry

    registry = Registry.open(root)
    try:
        return registry.list_versions(name)
    finally:
        registry.close()
