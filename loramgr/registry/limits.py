"""Column limits, checked before anything is stored.

SQLite keeps a string of any length in a ``VARCHAR(200)`` and a NUL inside one; PostgreSQL refuses
both, in the middle of a transaction, after the blobs were stored. So every row is checked here
against its table's columns first, the same way on both databases.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String

from ..errors import FieldLimitError


def check_row(row: Any, label: str | None = None) -> None:
    """Refuse a model instance with a string longer than its column or holding a NUL (one-line error)."""
    table = row.__table__
    for column in table.columns:
        value = getattr(row, column.key, None)
        check_value(f"{table.name}.{column.name}", value, column.type.length if isinstance(column.type, String)
                    else None, label)


def column_limit(model: Any, column: str) -> int | None:
    """The length a model's string column allows (None: unbounded)."""
    kind = model.__table__.columns[column].type
    return kind.length if isinstance(kind, String) else None


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
