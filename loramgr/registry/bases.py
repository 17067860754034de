"""Base models in the registry: fingerprints stored by name, and the link from a version to its base.

A base model is registered once (``loramgr base add``) from its safetensors headers; adapters then
point at it (``install --base``, or a match on the name the adapter declares), and ``check`` and
``combine`` compare bases without reading any file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..errors import ConflictError, NotFoundError
from .database import Json, load_json
from .limits import check_row, column_limit

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint
    from .core import Registry


def add_base(registry: Registry, fingerprint: BaseFingerprint) -> bool:
    """Register ``fingerprint`` under its name; False when that exact structure is already registered."""
    name = fingerprint.name
    if not name:
        raise ConflictError("a base model needs a name", hint="pass --name")
    new = {
        "name": name,
        "revision": fingerprint.revision,
        "source": fingerprint.source,
        "architecture": fingerprint.architecture,
        "structural_fingerprint": fingerprint.structural,
        "structural_dtype_fingerprint": fingerprint.structural_dtypes,
        "content_digest": fingerprint.content,
        "details": fingerprint.to_dict(),
        "added_at": datetime.now(UTC),
    }
    check_row("base_models", new, name)  # before the database sees it: PostgreSQL refuses an overlong value mid-way
    with registry.transaction() as tx:
        row = tx.first("SELECT id, structural_fingerprint, content_digest FROM base_models WHERE name = :name",
                       name=name)
        if row is not None:
            row_id, structural, content = row
            if structural != fingerprint.structural:
                raise ConflictError(
                    f"base model {name!r} is already registered with another structure ({structural[:19]})",
                    hint="register this one under another --name",
                )
            if fingerprint.content and content != fingerprint.content:
                tx.execute("UPDATE base_models SET content_digest = :content, details = :details WHERE id = :id",
                           content=fingerprint.content, details=Json(fingerprint.to_dict()), id=row_id)
            return False
        tx.execute(f"INSERT INTO base_models ({', '.join(new)}) VALUES ({', '.join(':' + k for k in new)})",
                   **{**new, "details": Json(new["details"])})
        return True


def list_bases(registry: Registry) -> list[BaseFingerprint]:
    from ..compat.basemodel import BaseFingerprint

    with registry.transaction() as tx:
        rows = tx.rows("SELECT name, details FROM base_models")
    return [BaseFingerprint.from_dict(load_json(details)) for _, details in sorted(rows, key=lambda r: r[0])]


def find_base(registry: Registry, name: str) -> tuple[int, BaseFingerprint] | None:
    from ..compat.basemodel import BaseFingerprint

    if "\x00" in name or len(name) > (column_limit("base_models", "name") or len(name)):
        return None  # no registered base has such a name (and PostgreSQL refuses a NUL even in a query)
    with registry.transaction() as tx:
        row = tx.first("SELECT id, details FROM base_models WHERE name = :name", name=name)
    return (row[0], BaseFingerprint.from_dict(load_json(row[1]))) if row is not None else None


def get_base(registry: Registry, name: str) -> BaseFingerprint:
    found = find_base(registry, name)
    if found is None:
        raise NotFoundError(f"no base model named {name!r}", reference=name,
                            hint="register it with 'loramgr base add PATH --name NAME' (see 'loramgr base list')")
    return found[1]


def base_of(registry: Registry, reference: str) -> BaseFingerprint | None:
    """The base model a version was linked to at install, if any."""
    from ..compat.basemodel import BaseFingerprint

    with registry.transaction() as tx:
        version = registry.resolve(reference, tx)
        if version.base_model_id is None:
            return None
        details = tx.value("SELECT details FROM base_models WHERE id = :id", id=version.base_model_id)
    return BaseFingerprint.from_dict(load_json(details)) if details is not None else None


def remove_base(registry: Registry, name: str, *, unlink: bool = False) -> list[str]:
    """Remove base model ``name``; returns the versions (``name==version``) that were linked to it.

    Refused while installed versions are linked to it (as ``docker rmi`` refuses an image a container
    uses), unless ``unlink``: those versions then lose the link and keep the base name they declare.
    """
    get_base(registry, name)  # the not-found error with its hint
    with registry.transaction() as tx:
        base_id = tx.value("SELECT id FROM base_models WHERE name = :name", name=name)
        if base_id is None:  # removed meanwhile by another process
            return []
        linked = [f"{n}=={v}" for n, v in tx.rows(
            "SELECT adapters.display_name, versions.version FROM versions "
            "JOIN adapters ON adapters.id = versions.adapter_id WHERE versions.base_model_id = :id "
            "ORDER BY adapters.display_name, versions.id", id=base_id)]
        if linked and not unlink:
            shown = ", ".join(linked[:3]) + (f" and {len(linked) - 3} more" if len(linked) > 3 else "")
            raise ConflictError(f"base model {name!r} is linked to {len(linked)} installed version(s): {shown}",
                                hint="remove those versions first, or pass --force to unlink them")
        tx.execute("UPDATE versions SET base_model_id = NULL WHERE base_model_id = :id", id=base_id)
        tx.execute("DELETE FROM base_models WHERE id = :id", id=base_id)
        return linked
