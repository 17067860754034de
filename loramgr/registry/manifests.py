"""Per-version manifests kept beside the blobs, and the marker that ties the blobs to their database.

Each stored version also has ``<home>/manifests/<name>/<version>.json``: everything its database rows
say (files, adapter metadata, source, lineage, recipe), written before the rows are committed. They
are what ``loramgr doctor --rebuild`` rebuilds a lost or damaged database from. ``remove`` deletes a
version's manifest after its rows; ``gc`` deletes manifests no row describes (an install interrupted
between the two writes).

``<home>/registry.json`` holds the registry's id, which the database also records (``registry_meta``).
Opening a database that is empty, or another registry's, next to blobs is refused (:func:`check_identity`):
otherwise ``list`` would say nothing is installed and ``gc`` would delete every blob.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RegistryError
from ..fileio import write_atomic

if TYPE_CHECKING:
    from .core import Registry

MARKER = "registry.json"
MANIFESTS = "manifests"
REBUILD = "run 'loramgr doctor --rebuild' to rebuild its rows from the manifests stored with the blobs"


def manifest_path(root: Path, name: str, version: str) -> Path:
    return root / MANIFESTS / name / f"{version}.json"


def write_manifest(root: Path, record: dict[str, Any]) -> None:
    write_atomic(manifest_path(root, record["name"], record["version"]),
                 json.dumps(record, indent=1, sort_keys=True).encode())


def delete_manifest(root: Path, name: str, version: str) -> None:
    path = manifest_path(root, name, version)
    path.unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def iter_manifests(root: Path) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """Every manifest file with its record (None where it does not parse)."""
    folder = root / MANIFESTS
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        yield path, record if isinstance(record, dict) else None


def read_marker(root: Path) -> str | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{root / MARKER} is not readable JSON ({exc})", hint="restore it from a backup") from None
    registry_id = data.get("registry_id") if isinstance(data, dict) else None
    if not isinstance(registry_id, str):
        raise RegistryError(f"{root / MARKER} names no registry_id", hint="restore it from a backup")
    return registry_id


def write_marker(root: Path, registry_id: str) -> None:
    write_atomic(root / MARKER, json.dumps({"registry_id": registry_id}, indent=1).encode() + b"\n")


_REGISTRY_ID = """SELECT value FROM registry_meta WHERE "key" = 'registry_id'"""


def database_id(registry: Registry) -> str | None:
    with registry.transaction() as tx:
        value: str | None = tx.value(_REGISTRY_ID)
    return value


def adopt(registry: Registry, registry_id: str | None = None) -> str:
    """Record ``registry_id`` (or the database's own, or a new one) in the database and the marker."""
    from .database import advisory_lock

    with registry.transaction() as tx:
        advisory_lock(tx, "loramgr:registry_meta")
        value: str | None = tx.value(_REGISTRY_ID)
        if value is None:
            value = registry_id or uuid.uuid4().hex
            tx.execute("""INSERT INTO registry_meta ("key", value) VALUES ('registry_id', :value)""", value=value)
        elif registry_id is not None:
            value = registry_id
            tx.execute("""UPDATE registry_meta SET value = :value WHERE "key" = 'registry_id'""", value=value)
    write_marker(registry.root, value)
    return value


def check_identity(registry: Registry) -> None:
    """Refuse a database that does not describe the blobs beside it; adopt a new or pre-marker one."""
    marker = read_marker(registry.root)
    in_database = database_id(registry)
    where = registry.database
    if in_database is not None:
        if marker is not None and marker != in_database:
            raise RegistryError(
                f"the blobs in {registry.root} belong to registry {marker}, but registry database {where} is "
                f"registry {in_database}", database=where,
                hint=f"point LORAMGR_DATABASE_URL at the database of these blobs, or {REBUILD}",
            )
        if marker is None and not registry.read_only:
            write_marker(registry.root, in_database)
        return
    with registry.transaction() as tx:
        has_versions = tx.value("SELECT id FROM versions LIMIT 1") is not None
    if not has_versions:
        blobs = sum(1 for _ in registry.store.iter_blobs())
        manifests = sum(1 for _ in iter_manifests(registry.root))
        if marker is not None or blobs or manifests:
            raise RegistryError(
                f"registry database {where} is empty, but {registry.root} holds {blobs} blob(s) and {manifests} "
                f"version manifest(s){f' of registry {marker}' if marker else ''}", database=where,
                hint=f"do not install or gc into it; {REBUILD}",
            )
    if not registry.read_only:
        adopt(registry, marker)
