"""``loramgr list`` without SQLAlchemy: a read-only query through the standard library's sqlite3.

Importing SQLAlchemy costs about a quarter of a second, half of ``list``'s budget (0.5 s with 10,000
versions). For the default SQLite registry at the current schema this module answers ``list`` with one
plain query; anything else (another database URL, no database yet, another schema revision, which
needs migrating or refusing, a database that is not the one of the home's blobs) returns None and the
caller uses :meth:`Registry.list_versions`, the reference implementation that a test compares this one
against.
"""

from __future__ import annotations

import json
import os
import sqlite3
from functools import cache
from pathlib import Path

from packaging.version import Version

from registry_schema import HEAD_REVISION

from .records import VersionRow

_QUERY = """
SELECT adapters.name, versions.id, versions.version, versions.digest, versions.format, versions.adapter_type,
       versions.rank, versions.alpha, versions.n_modules, versions.size, versions.base_model_name,
       versions.installed_at
FROM versions JOIN adapters ON adapters.id = versions.adapter_id
"""


@cache
def _version_key(text: str) -> Version:
    return Version(text)  # stored versions are normalised PEP 440 strings


def _marker(root: Path, default: str) -> str | None:
    """The registry id in ``<home>/registry.json`` (``default`` when there is no marker yet)."""
    try:
        data = json.loads((root / "registry.json").read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        return None
    return data.get("registry_id") if isinstance(data, dict) else None


def quick_list(root: Path, name: str | None = None) -> list[VersionRow] | None:
    """The rows of ``loramgr list`` read with sqlite3, or None when this fast path does not apply."""
    if os.environ.get("LORAMGR_DATABASE_URL"):
        return None
    path = root / "registry.db"
    if not path.is_file():
        return None
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        if revision is None or revision[0] != HEAD_REVISION:
            return None
        # a database that does not (yet) describe this home's blobs: the full path refuses it, with why
        registry_id = connection.execute("SELECT value FROM registry_meta WHERE key = 'registry_id'").fetchone()
        if registry_id is None or registry_id[0] != _marker(root, registry_id[0]):
            return None
        query: str = _QUERY
        params: tuple[str, ...] = ()
        if name is not None:
            from .refs import check_name

            query, params = _QUERY + " WHERE adapters.name = ?", (check_name(name),)
        rows = connection.execute(query, params).fetchall()
        tags: dict[int, list[str]] = {}
        for version_id, tag in connection.execute("SELECT version_id, tag FROM tags ORDER BY lower(tag)"):
            tags.setdefault(version_id, []).append(tag)
    except sqlite3.Error:
        return None  # locked past the timeout, or not what we expect: the full path says why
    finally:
        connection.close()
    result = [
        VersionRow(
            name=r[0], version=r[2], digest=r[3], format=r[4], adapter_type=r[5], rank=r[6], alpha=r[7],
            n_modules=r[8], size=r[9], base_model=r[10], tags=tags.get(r[1], []),
            installed_at=str(r[11])[:19].replace(" ", "T"),
        )
        for r in rows
    ]
    result.sort(key=lambda v: (v.name, _version_key(v.version)))
    return result
