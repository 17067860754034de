"""Destructive and checking operations: remove, gc, verify.

remove and gc build a :class:`Plan` first (what goes, how many bytes) and execute it separately, so
``--dry-run`` prints exactly what would happen. remove deletes database rows only; the blobs they
referenced become orphans that gc frees (unless another version still uses them).
"""

from __future__ import annotations

from collections.abc import Callable

from packaging.version import Version

from ..errors import InvalidReferenceError
from . import refs
from .core import SELECT_VERSION, Registry
from .database import lock_names
from .manifests import delete_manifest, iter_manifests
from .records import Plan, PlanItem, StoredVersion, VerifyProblem, VerifyReport

Progress = Callable[[str, int, int], None]


def plan_remove(registry: Registry, reference: str, *, all_versions: bool = False) -> Plan:
    """The versions a reference removes: exactly one, or every version of a name with ``all_versions``."""
    parsed = refs.parse_reference(reference)
    plan = Plan("remove")
    with registry.transaction() as tx:
        rows = [registry.resolve(reference, tx)]  # NotFoundError when nothing matches
        newest = rows[0]
        if parsed.kind in ("name", "specifier"):
            count = tx.value("SELECT COUNT(*) FROM versions WHERE adapter_id = :adapter", adapter=newest.adapter_id)
            if parsed.specifier is not None or all_versions:  # else: the newest is the one, or the name is refused
                by_version = {Version(r[3]): StoredVersion(*r) for r in tx.rows(
                    SELECT_VERSION + " WHERE v.adapter_id = :adapter", adapter=newest.adapter_id)}
                matching = parsed.specifier.filter(by_version) if parsed.specifier is not None else by_version
                rows = [by_version[v] for v in matching]
                count = len(rows)
            if count > 1 and not all_versions:
                raise InvalidReferenceError(
                    f"{reference!r} matches {count} versions of {newest.name}",
                    reference=reference,
                    hint="name one version (name==1.0.0, name@tag) or pass --all to remove every one of them",
                )
        for row in sorted(rows, key=lambda r: Version(r.version)):
            plan.items.append(PlanItem("version", row.ref, row.size))
            plan.version_ids.append(row.id)
        # combined versions whose lineage names a removed one keep its digest, not its bytes: say so
        removed = {row.digest: row.ref for row in rows}
        children = tx.rows(
            "SELECT l.parent_digest, a.name, v.version FROM lineage l "
            "JOIN versions v ON v.id = l.child_id JOIN adapters a ON a.id = v.adapter_id "
            "WHERE l.parent_digest IN (:digests) AND v.id NOT IN (:ids)",
            digests=list(removed), ids=plan.version_ids,
        )
        for parent, name, version in sorted(children):
            plan.dependents.setdefault(removed[parent], []).append(f"{name}=={version}")
    return plan


def execute_remove(registry: Registry, plan: Plan) -> None:
    with registry.transaction() as tx:
        names = tx.rows("SELECT a.name, v.version FROM adapters a JOIN versions v ON v.adapter_id = a.id "
                        "WHERE v.id IN (:ids)", ids=plan.version_ids)
        lock_names(tx, [name for name, _ in names])
        adapter_ids = [r[0] for r in tx.rows("SELECT DISTINCT adapter_id FROM versions WHERE id IN (:ids)",
                                             ids=plan.version_ids)]
        # files, modules, lineage and tags go with their version (ON DELETE CASCADE)
        tx.execute("DELETE FROM versions WHERE id IN (:ids)", ids=plan.version_ids)
        tx.execute("DELETE FROM adapters WHERE id IN (:ids) "
                   "AND NOT EXISTS (SELECT 1 FROM versions WHERE versions.adapter_id = adapters.id)", ids=adapter_ids)
    # after the rows: an interruption in between leaves a manifest without rows, which gc deletes
    for name, version in names:
        delete_manifest(registry.root, name, version)


def plan_gc(registry: Registry) -> Plan:
    """Blobs no version references, manifests of versions not in the database, and temporary files left by
    interrupted writes.

    The store is listed once and compared with the referenced digests as sets: the cost is one
    directory read per blob folder and one stat per orphan, whatever the number of versions."""
    plan = Plan("gc")
    with registry.transaction() as tx:
        referenced = {r[0] for r in tx.rows("SELECT DISTINCT digest FROM files")}
        versions = set(tx.rows("SELECT a.name, v.version FROM adapters a JOIN versions v ON v.adapter_id = a.id"))
    for path, record in iter_manifests(registry.root):
        if record is None or (record.get("name"), record.get("version")) not in versions:
            plan.items.append(PlanItem("manifest", str(path.relative_to(registry.root)), path.stat().st_size, path))
    # a blob item carries no path (but a stray file's): execute_gc deletes blobs by digest, folder by folder
    plan.items += [PlanItem("blob", digest, size, path) for digest, size, path in registry.store.orphans(referenced)]
    for temp in registry.store.temp_files():
        size = temp.stat().st_size if temp.is_file() else 0
        plan.items.append(PlanItem("temp", temp.name, size, temp))
    return plan


def execute_gc(registry: Registry) -> Plan:
    """Plan and delete under the store's exclusive lock, so no install can be mid-way."""
    with registry.store.lock(exclusive=True):
        plan = plan_gc(registry)
        registry.store.delete_blobs([item.label for item in plan.items if item.what == "blob" and item.path is None])
        for item in plan.items:
            if item.path is not None:
                registry.store.delete(item.path)
    return plan


def verify(registry: Registry, reference: str | None = None, *, progress: Progress | None = None) -> VerifyReport:
    """Re-hash every stored blob (or one version's) and name the versions that use a bad one."""
    query = ("SELECT f.digest, a.name, v.version FROM files f JOIN versions v ON v.id = f.version_id "
             "JOIN adapters a ON a.id = v.adapter_id")
    with registry.transaction() as tx:
        if reference is not None:
            rows = tx.rows(query + " WHERE v.id = :id", id=registry.resolve(reference, tx).id)
        else:
            rows = tx.rows(query)
    users: dict[str, list[str]] = {}
    for digest, name, version in rows:
        users.setdefault(digest, []).append(f"{name}=={version}")
    problems = []
    for i, digest in enumerate(sorted(users)):
        path = registry.store.path(digest)
        if not path.is_file():
            problems.append(VerifyProblem(digest, "missing", sorted(set(users[digest]))))
        elif not registry.store.verify(digest, progress):
            problems.append(VerifyProblem(digest, "corrupt", sorted(set(users[digest]))))
        if progress:
            progress("verified blobs", i + 1, len(users))
    return VerifyReport(len(users), problems)
