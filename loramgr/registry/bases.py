"""Base models in the registry: fingerprints stored by name, and the link from a version to its base.

A base model is registered once (``loramgr base add``) from its safetensors headers; adapters then
point at it (``install --base``, or a match on the name the adapter declares), and ``check`` and
``combine`` compare bases without reading any file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from registry_schema.models import BaseModel

from ..errors import ConflictError, NotFoundError
from .limits import check_row, column_limit

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint
    from .core import Registry


def add_base(registry: Registry, fingerprint: BaseFingerprint) -> bool:
    """Register ``fingerprint`` under its name; False when that exact structure is already registered."""
    name = fingerprint.name
    if not name:
        raise ConflictError("a base model needs a name", hint="pass --name")
    new = BaseModel(
        name=name,
        revision=fingerprint.revision,
        source=fingerprint.source,
        architecture=fingerprint.architecture,
        structural_fingerprint=fingerprint.structural,
        structural_dtype_fingerprint=fingerprint.structural_dtypes,
        content_digest=fingerprint.content,
        details=fingerprint.to_dict(),
        added_at=datetime.now(UTC),
    )
    check_row(new, name)  # before the database sees it: PostgreSQL refuses an overlong value mid-way
    with registry.session() as session:
        row = session.scalar(select(BaseModel).where(BaseModel.name == name))
        if row is not None:
            if row.structural_fingerprint != fingerprint.structural:
                raise ConflictError(
                    f"base model {name!r} is already registered with another structure "
                    f"({row.structural_fingerprint[:19]})",
                    hint="register this one under another --name",
                )
            if fingerprint.content and row.content_digest != fingerprint.content:
                row.content_digest = fingerprint.content
                row.details = fingerprint.to_dict()
            return False
        session.add(new)
        return True


def list_bases(registry: Registry) -> list[BaseFingerprint]:
    from ..compat.basemodel import BaseFingerprint

    with registry.session() as session:
        rows = session.scalars(select(BaseModel).order_by(BaseModel.name)).all()
        return [BaseFingerprint.from_dict(row.details) for row in rows]


def find_base(registry: Registry, name: str) -> tuple[int, BaseFingerprint] | None:
    from ..compat.basemodel import BaseFingerprint

    if "\x00" in name or len(name) > (column_limit(BaseModel, "name") or len(name)):
        return None  # no registered base has such a name (and PostgreSQL refuses a NUL even in a query)
    with registry.session() as session:
        row = session.scalar(select(BaseModel).where(BaseModel.name == name))
        return (row.id, BaseFingerprint.from_dict(row.details)) if row is not None else None


def get_base(registry: Registry, name: str) -> BaseFingerprint:
    found = find_base(registry, name)
    if found is None:
        raise NotFoundError(f"no base model named {name!r}", reference=name,
                            hint="register it with 'loramgr base add PATH --name NAME' (see 'loramgr base list')")
    return found[1]


def base_of(registry: Registry, reference: str) -> BaseFingerprint | None:
    """The base model a version was linked to at install, if any."""
    from ..compat.basemodel import BaseFingerprint

    with registry.session() as session:
        version = registry.resolve(reference, session)
        if version.base_model_id is None:
            return None
        row = session.get(BaseModel, version.base_model_id)
        return BaseFingerprint.from_dict(row.details) if row is not None else None


def remove_base(registry: Registry, name: str, *, unlink: bool = False) -> list[str]:
    """Remove base model ``name``; returns the versions (``name==version``) that were linked to it.

    Refused while installed versions are linked to it (as ``docker rmi`` refuses an image a container
    uses), unless ``unlink``: those versions then lose the link and keep the base name they declare.
    """
    from sqlalchemy import update

    from registry_schema.models import Adapter, AdapterVersion

    get_base(registry, name)  # the not-found error with its hint
    with registry.session() as session:
        row = session.scalar(select(BaseModel).where(BaseModel.name == name))
        if row is None:  # removed meanwhile by another process
            return []
        linked = [f"{n}=={v}" for n, v in session.execute(
            select(Adapter.display_name, AdapterVersion.version).join(AdapterVersion.adapter)
            .where(AdapterVersion.base_model_id == row.id).order_by(Adapter.display_name, AdapterVersion.id))]
        if linked and not unlink:
            shown = ", ".join(linked[:3]) + (f" and {len(linked) - 3} more" if len(linked) > 3 else "")
            raise ConflictError(f"base model {name!r} is linked to {len(linked)} installed version(s): {shown}",
                                hint="remove those versions first, or pass --force to unlink them")
        session.execute(update(AdapterVersion).where(AdapterVersion.base_model_id == row.id)
                        .values(base_model_id=None))
        session.delete(row)
        return linked
