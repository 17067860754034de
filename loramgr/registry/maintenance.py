"""Destructive and checking operations: remove, gc, verify.

remove and gc build a :class:`Plan` first (what goes, how many bytes) and execute it separately, so
``--dry-run`` prints exactly what would happen. remove deletes database rows only; the blobs they
referenced become orphans that gc frees (unless another version still uses them).
"""

from __future__ import annotations

from collections.abc import Callable

from packaging.version import Version
from sqlalchemy import delete, select

from registry_schema.models import Adapter, AdapterVersion, File, Lineage

from ..errors import InvalidReferenceError
from . import refs
from .core import Registry
from .database import lock_names
from .manifests import delete_manifest, iter_manifests
from .records import Plan, PlanItem, VerifyProblem, VerifyReport

Progress = Callable[[str, int, int], None]


def plan_remove(registry: Registry, reference: str, *, all_versions: bool = False) -> Plan:
    """The versions a reference removes: exactly one, or every version of a name with ``all_versions``."""
    parsed = refs.parse_reference(reference)
    plan = Plan("remove")
    with registry.session() as session:
        if parsed.kind in ("name", "specifier"):
            newest = registry.resolve(reference, session)  # NotFoundError when nothing matches
            by_version = {Version(r.version): r for r in newest.adapter.versions}
            matching = list(parsed.specifier.filter(by_version)) if parsed.specifier is not None else list(by_version)
            if len(matching) > 1 and not all_versions:
                raise InvalidReferenceError(
                    f"{reference!r} matches {len(matching)} versions of {newest.adapter.name}",
                    reference=reference,
                    hint="name one version (name==1.0.0, name@tag) or pass --all to remove every one of them",
                )
            rows = [by_version[v] for v in matching]
        else:
            rows = [registry.resolve(reference, session)]
        for row in sorted(rows, key=lambda r: Version(r.version)):
            plan.items.append(PlanItem("version", f"{row.adapter.name}=={row.version}", row.size))
            plan.version_ids.append(row.id)
        # combined versions whose lineage names a removed one keep its digest, not its bytes: say so
        removed = {row.digest: f"{row.adapter.name}=={row.version}" for row in rows}
        children = session.execute(
            select(Lineage.parent_digest, Adapter.name, AdapterVersion.version)
            .join(AdapterVersion, AdapterVersion.id == Lineage.child_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(Lineage.parent_digest.in_(list(removed)), AdapterVersion.id.not_in(plan.version_ids))
        ).all()
        for parent, name, version in sorted(children):
            plan.dependents.setdefault(removed[parent], []).append(f"{name}=={version}")
    return plan


def execute_remove(registry: Registry, plan: Plan) -> None:
    with registry.session() as session:
        names = session.execute(
            select(Adapter.name, AdapterVersion.version).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
            .where(AdapterVersion.id.in_(plan.version_ids))
        ).all()
        lock_names(session, [name for name, _ in names])
        adapter_ids = set(
            session.scalars(select(AdapterVersion.adapter_id).where(AdapterVersion.id.in_(plan.version_ids)))
        )
        session.execute(delete(AdapterVersion).where(AdapterVersion.id.in_(plan.version_ids)))
        for adapter_id in adapter_ids:
            left = session.scalar(select(AdapterVersion.id).where(AdapterVersion.adapter_id == adapter_id).limit(1))
            if left is None:
                session.execute(delete(Adapter).where(Adapter.id == adapter_id))
    # after the rows: an interruption in between leaves a manifest without rows, which gc deletes
    for name, version in names:
        delete_manifest(registry.root, name, version)


def plan_gc(registry: Registry) -> Plan:
    """Blobs no version references, manifests of versions not in the database, and temporary files left by
    interrupted writes."""
    plan = Plan("gc")
    with registry.session() as session:
        referenced = set(session.scalars(select(File.digest).distinct()))
        versions = {(name, version) for name, version in session.execute(
            select(Adapter.name, AdapterVersion.version).join(AdapterVersion, AdapterVersion.adapter_id == Adapter.id)
        )}
    for path, record in iter_manifests(registry.root):
        if record is None or (record.get("name"), record.get("version")) not in versions:
            plan.items.append(PlanItem("manifest", str(path.relative_to(registry.root)), path.stat().st_size, path))
    for blob in registry.store.iter_blobs():
        if blob.digest not in referenced:
            plan.items.append(PlanItem("blob", blob.digest, blob.size, blob.path))
    for temp in registry.store.temp_files():
        size = temp.stat().st_size if temp.is_file() else 0
        plan.items.append(PlanItem("temp", temp.name, size, temp))
    return plan


def execute_gc(registry: Registry) -> Plan:
    """Plan and delete under the store's exclusive lock, so no install can be mid-way."""
    with registry.store.lock(exclusive=True):
        plan = plan_gc(registry)
        for item in plan.items:
            if item.path is not None:
                registry.store.delete(item.path)
    return plan


def verify(registry: Registry, reference: str | None = None, *, progress: Progress | None = None) -> VerifyReport:
    """Re-hash every stored blob (or one version's) and name the versions that use a bad one."""
    with registry.session() as session:
        query = select(File.digest, Adapter.name, AdapterVersion.version).join(
            AdapterVersion, AdapterVersion.id == File.version_id
        ).join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        if reference is not None:
            row = registry.resolve(reference, session)
            query = query.where(AdapterVersion.id == row.id)
        users: dict[str, list[str]] = {}
        for digest, name, version in session.execute(query):
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
