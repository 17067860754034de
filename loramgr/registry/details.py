"""A stored version read back whole: its row, files, modules, lineage and tags as a typed
:class:`~loramgr.registry.records.VersionDetails` (what ``show`` prints)."""

from __future__ import annotations

from .database import Transaction, load_json, load_time
from .records import ManifestEntry, Parent, SourceDetails, StoredModule, VersionDetails


def describe_version(tx: Transaction, version_id: int) -> VersionDetails:
    """Everything stored about one version: its row, files, modules, lineage and tags."""
    row = tx.first(
        "SELECT a.name, a.display_name, v.version, v.digest, v.size, v.installed_at, v.source, v.source_details, "
        "v.info, v.recipe FROM versions v JOIN adapters a ON a.id = v.adapter_id WHERE v.id = :id", id=version_id,
    )
    assert row is not None  # the id comes from a row read in this transaction
    name, display_name, version, digest, size, installed_at, source, source_details, info, recipe = row
    info = load_json(info)
    files = sorted(tx.rows("SELECT path, digest, size FROM files WHERE version_id = :id", id=version_id))
    modules = sorted(tx.rows("SELECT name, kind, rank, alpha, in_features, out_features, dtype FROM modules "
                             "WHERE version_id = :id", id=version_id))
    parents = tx.rows("SELECT parent_name, parent_version, parent_digest, weight FROM lineage "
                      "WHERE child_id = :id ORDER BY position", id=version_id)
    tags = sorted(r[0] for r in tx.rows("SELECT tag FROM tags WHERE version_id = :id", id=version_id))
    return VersionDetails(
        name=name,
        display_name=display_name,
        version=version,
        digest=digest,
        tags=tags,
        size=size,
        installed_at=load_time(installed_at).isoformat(timespec="seconds"),
        source=source,
        source_details=SourceDetails.from_dict(load_json(source_details)),
        format=info["format"],
        adapter_type=info["adapter_type"],
        rank=info.get("rank"),
        ranks_found=list(info.get("ranks_found") or []),
        alpha=info.get("alpha"),
        use_rslora=bool(info.get("use_rslora")),
        use_dora=bool(info.get("use_dora")),
        rank_pattern=dict(info.get("rank_pattern") or {}),
        alpha_pattern=dict(info.get("alpha_pattern") or {}),
        target_modules=list(info.get("target_modules") or []),
        target_modules_found=list(info.get("target_modules_found") or []),
        base_model=info.get("base_model"),
        base_model_revision=info.get("base_model_revision"),
        task_type=info.get("task_type"),
        n_modules=int(info.get("n_modules") or 0),
        n_params=int(info.get("n_params") or 0),
        dtypes=list(info.get("dtypes") or []),
        file_metadata=dict(info.get("file_metadata") or {}),
        card=dict(info.get("card") or {}),
        notes=list(info.get("notes") or []),
        weights_file=info["weights_file"],
        config=dict(info.get("config") or {}),
        files=[ManifestEntry(*f) for f in files],
        modules=[StoredModule(*m) for m in modules],
        parents=[Parent(*p) for p in parents],
        recipe=load_json(recipe),
        init_method=info.get("init_method"),
        extras=list(info["extras"]) if info.get("extras") is not None else None,
    )
