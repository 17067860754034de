"""Recovering a registry: rebuilding a lost database from the stored manifests, repairing corrupt blobs.

``loramgr doctor --rebuild`` (:func:`rebuild`) re-creates the rows of every version whose manifest
(``<home>/manifests/``) and blobs are intact, then records the home's registry id in the database, so
the database describes its blobs again. Tags and base-model registrations are not in the manifests and
are not rebuilt. A SQLite file that cannot be opened at all is first moved aside (kept, never deleted).

``loramgr verify --repair`` (:func:`repair`) restores a missing or corrupt blob from any place that
still has the right bytes: the file a version was installed from, or huggingface_hub's cache for a Hub
install; the versions whose blob nothing can restore are named.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..adapter import AdapterInfo
from ..errors import LoramgrError, RegistryError
from ..store import sha256_file
from .core import Registry
from .database import load_json, sqlite_path
from .manifests import adopt, iter_manifests, read_marker
from .records import ManifestEntry, Parent, SourceDetails, VerifyReport, manifest_digest

Progress = Callable[[str, int, int], None]


@dataclass
class RebuildReport:
    rebuilt: list[str] = field(default_factory=list)  # name==version
    present: list[str] = field(default_factory=list)  # already in the database
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (manifest, why)
    moved_aside: str | None = None  # where an unreadable SQLite file was moved
    registry_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rebuilt": self.rebuilt, "present": self.present,
                "skipped": [{"manifest": m, "reason": r} for m, r in self.skipped],
                "moved_aside": self.moved_aside, "registry_id": self.registry_id}


def rebuild(root: str | Path | None = None, url: str | None = None) -> RebuildReport:
    """Re-create the database rows of every intact stored version (see the module docstring)."""
    from .. import paths

    home = Path(root) if root else paths.home()
    url = url or paths.database_url(home)
    report = RebuildReport()
    try:
        registry = Registry.open(home, url, check_store=False)
    except RegistryError:
        path = sqlite_path(url)
        if path is None or not path.exists():
            raise
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        report.moved_aside = str(aside)
        registry = Registry.open(home, url, check_store=False)
    try:
        with registry.store.lock(exclusive=True):  # no install or gc meanwhile
            for path, record in iter_manifests(home):
                label = str(path.relative_to(home))
                try:
                    ref = _restore(registry, record)
                except (LoramgrError, KeyError, TypeError, ValueError) as exc:
                    report.skipped.append((label, str(exc) or type(exc).__name__))
                    continue
                (report.rebuilt if ref[1] else report.present).append(ref[0])
            report.registry_id = adopt(registry, read_marker(home))
    finally:
        registry.close()
    return report


def _restore(registry: Registry, record: dict[str, Any] | None) -> tuple[str, bool]:
    if record is None:
        raise ValueError("not readable JSON")
    entries = [ManifestEntry(f["path"], f["digest"], int(f["size"])) for f in record["files"]]
    if manifest_digest(entries) != record["digest"]:
        raise ValueError(f"its files do not add up to its digest {record['digest'][:19]}")
    for entry in entries:
        if not registry.store.verify(entry.digest):
            raise ValueError(f"blob {entry.digest[:19]} ({entry.path}) is missing or corrupt")
    with registry.transaction() as tx:
        result = registry._commit_version(
            tx,
            info=AdapterInfo.from_record(record["info"]),
            entries=entries,
            digest=record["digest"],
            canonical=record["name"],
            display=record.get("display_name") or record["name"],
            wanted=Version(record["version"]),
            source=record.get("source"),
            source_details=SourceDetails.from_dict(record.get("source_details")),
            parents=[Parent(p["name"], p["version"], p["digest"], float(p["weight"])) for p in record["parents"]],
            recipe=record.get("recipe"),
            installed_at=datetime.fromisoformat(record["installed_at"]),
        )
    return result.ref, result.created


@dataclass
class RepairReport:
    repaired: list[tuple[str, str]] = field(default_factory=list)  # (digest, the file it was restored from)
    lost: list[tuple[str, list[str]]] = field(default_factory=list)  # (digest, versions that use it)

    @property
    def ok(self) -> bool:
        return not self.lost

    def to_dict(self) -> dict[str, Any]:
        return {"repaired": [{"digest": d, "from": s} for d, s in self.repaired],
                "lost": [{"digest": d, "used_by": u} for d, u in self.lost]}


def repair(registry: Registry, report: VerifyReport, *, hub_cache: Path | None = None,
           progress: Progress | None = None) -> RepairReport:
    """Restore every blob ``report`` found missing or corrupt from a source that still has its bytes:
    the file it was installed from, or (for a Hub install) huggingface_hub's cache folder ``hub_cache``."""
    result = RepairReport()
    for problem in report.problems:
        for candidate in _candidates(registry, problem.digest, hub_cache):
            if candidate.is_file() and sha256_file(candidate, progress) == problem.digest:
                # the store replaces a blob whose stored bytes do not match its digest
                registry.store.put_file(candidate, progress)
                result.repaired.append((problem.digest, str(candidate)))
                break
        else:
            result.lost.append((problem.digest, problem.used_by))
    return result


def _candidates(registry: Registry, digest: str, hub_cache: Path | None) -> list[Path]:
    """Files that held these bytes at install: the folder or file installed from, the Hub cache."""
    with registry.transaction() as tx:
        rows = tx.rows("SELECT f.path, v.source, v.source_details FROM files f JOIN versions v ON v.id = f.version_id "
                       "WHERE f.digest = :digest", digest=digest)
    found: list[Path] = []
    for rel, source, details in rows:
        hub = SourceDetails.from_dict(load_json(details)).hub
        if hub is not None:
            if hub_cache is not None:
                snapshot = hub_cache / f"models--{hub.repo.replace('/', '--')}" / "snapshots" / hub.commit
                found.append(snapshot / hub.subfolder / rel if hub.subfolder else snapshot / rel)
        elif source:
            origin = Path(source)
            found.append(origin / rel if origin.is_dir() else origin)
    return found

