"""Column limits, checked before anything is stored.

SQLite keeps a string of any length in a ``VARCHAR(200)`` and a NUL inside one; PostgreSQL refuses
both, in the middle of a transaction, after the blobs were stored. So every row is checked here
against its table's columns first, the same way on both databases. :data:`LIMITS` is the length of
every bounded string column of ``registry_schema.models`` (a test checks they agree).
"""

from __future__ import annotations

from typing import Any

from ..errors import FieldLimitError

LIMITS: dict[str, dict[str, int]] = {
    "adapters": {"name": 200, "display_name": 200},
    "base_models": {"name": 300, "revision": 100, "architecture": 200, "structural_fingerprint": 80,
                    "structural_dtype_fingerprint": 80, "content_digest": 80},
    "registry_meta": {"key": 40},
    "versions": {"version": 100, "version_key": 400, "digest": 80, "format": 40, "adapter_type": 40,
                 "base_model_name": 300, "base_model_revision": 100, "task_type": 60},
    "files": {"path": 500, "digest": 80},
    "lineage": {"parent_digest": 80, "parent_name": 200, "parent_version": 100},
    "modules": {"name": 500, "kind": 20, "dtype": 20},
    "tags": {"tag": 100},
}


def check_row(table: str, row: dict[str, Any], label: str | None = None) -> None:
    """Refuse a row (column -> value) with a string longer than its column or holding a NUL (one-line error)."""
    limits = LIMITS[table]
    for column, value in row.items():
        check_value(f"{table}.{column}", value, limits.get(column), label)


def column_limit(table: str, column: str) -> int | None:
    """The length a string column allows (None: unbounded)."""
    return LIMITS[table].get(column)


def check_value(field: str, value: Any, limit: int | None, label: str | None = None) -> None:
    where = f"{label}: " if label else ""
    if isinstance(value, str):
        if "\x00" in value:
            raise FieldLimitError(f"{where}{field} contains a NUL character", field=field,
                                  hint="remove it; the registry's databases cannot store one")
        if limit is not None and len(value) > limit:
            raise FieldLimitError(
                f"{where}{field} is {len(value)} characters long; the registry keeps at most {limit}",
                field=field, limit=limit, hint="shorten it",
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_value(f"{field}[{key!r}]", key, None, label)
            check_value(f"{field}[{key!r}]", item, None, label)
    elif isinstance(value, list | tuple):
        for item in value:
            check_value(field, item, None, label)
