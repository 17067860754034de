"""The registry: adapter versions in a database over the content-addressed blob store.

Install order is what makes failures harmless: validate everything first (nothing written), then
store every blob, then commit the database rows in one transaction. An error or Ctrl-C at any point
leaves ``list`` unchanged and at most orphan blobs or temporary files, which ``gc`` removes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from registry_schema.version_key import version_key

from .. import paths
from ..adapter import AdapterInfo, LoraAdapter, with_largest_rank
from ..errors import (
    AmbiguousReferenceError,
    ConflictError,
    IntegrityError,
    InvalidAdapterError,
    NotFoundError,
    RegistryError,
)
from ..store import BlobStore, sha256_file
from . import refs
from .database import (
    Json,
    Transaction,
    describe_url,
    home_is_writable,
    load_json,
    lock_names,
    open_database,
    time_to_seconds,
)
from .limits import check_row
from .manifests import write_manifest
from .records import (
    InstallResult,
    ManifestEntry,
    Parent,
    SourceDetails,
    StoredVersion,
    VersionDetails,
    VersionRow,
    manifest_digest,
)

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint

Progress = Callable[[str, int, int], None]

#: what a reference resolves to; the rest of a version is read only for the one version asked about
SELECT_VERSION = """
SELECT v.id, v.adapter_id, a.name, v.version, v.digest, v.size, v.base_model_id
FROM versions v JOIN adapters a ON a.id = v.adapter_id
"""
_NEWEST_PAGE = 32  # versions read at a time, newest first, looking for the newest final release


def _now() -> datetime:
    return datetime.now(UTC)


_RETRIES = 5  # a commit that lost a serialisation conflict is run again this many times at most


@dataclass
class NewVersion:
    """The rows one stored version adds, column -> value, checked against the columns before storing."""

    version: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)
    modules: list[dict[str, Any]] = field(default_factory=list)
    parents: list[dict[str, Any]] = field(default_factory=list)

    def check(self, adapter: dict[str, Any], *, label: str) -> None:
        """Refuse, before anything is stored, a version whose rows one of the databases would not keep."""
        check_row("adapters", adapter, label)
        check_row("versions", self.version, label)
        for table, rows in (("files", self.files), ("modules", self.modules), ("lineage", self.parents)):
            for row in rows:
                check_row(table, row, label)


def manifest_record(new: NewVersion, *, canonical: str, display: str) -> dict[str, Any]:
    """What ``<home>/manifests/<name>/<version>.json`` keeps of a version: all its rows but the tags."""
    row = new.version
    return {
        "name": canonical, "display_name": display, "version": row["version"], "digest": row["digest"],
        "files": [{"path": f["path"], "digest": f["digest"], "size": f["size"]} for f in new.files],
        "info": row["info"], "source": row["source"], "source_details": row["source_details"],
        "recipe": row["recipe"],
        "parents": [{"name": p["parent_name"], "version": p["parent_version"], "digest": p["parent_digest"],
                     "weight": p["weight"]} for p in new.parents],
        "base_model_id": row["base_model_id"], "installed_at": row["installed_at"].isoformat(),
    }


class Registry:
    """A loramgr home: the blob store and the database that describes what is stored.

    Open one with :meth:`open` (``LORAMGR_HOME`` / ``LORAMGR_DATABASE_URL`` by default); the database
    is migrated once, here.
    """

    def __init__(self, root: Path, url: str, *, check_store: bool = True) -> None:
        self.root = root
        # a home that cannot be written (read-only media, another user's) is opened for reading only
        self.read_only = not home_is_writable(root, url)
        self.store = BlobStore(root, read_only=self.read_only)
        self.database = describe_url(url)
        self.db = open_database(url, read_only=self.read_only)
        if check_store:
            from .manifests import check_identity

            check_identity(self)

    @classmethod
    def open(cls, root: str | Path | None = None, url: str | None = None, *, check_store: bool = True) -> Registry:
        """The registry in ``root``; ``check_store=False`` skips the check that the database describes the
        blobs beside it (only ``loramgr doctor --rebuild`` opens a registry that way)."""
        home = Path(root) if root else paths.home()
        return cls(home, url or paths.database_url(home), check_store=check_store)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction; any database failure inside it becomes one RegistryError line naming the database."""
        with self.db.transaction() as tx:
            yield tx

    # -- storing a version -----------------------------------------------------------------------

    def add(
        self,
        info: AdapterInfo,
        files: dict[str, Path],
        *,
        name: str,
        version: str | None = None,
        source: str | None = None,
        source_details: SourceDetails | None = None,
        parents: list[Parent] | None = None,
        recipe: dict[str, Any] | None = None,
        base_model_id: int | None = None,
        share_files: bool = False,
        expected_digest: str | None = None,
        progress: Progress | None = None,
    ) -> InstallResult:
        """Store validated adapter files and register them as a version (the step every install ends in).

        The registry's storage primitive: ``files`` (path inside the adapter -> file on disk) were read
        and validated into ``info`` by the caller (:func:`loramgr.installer.install_source` for every
        source, :func:`loramgr.merge.operations.register_result` for a combination).

        ``share_files``: the files are never rewritten in place (huggingface_hub's cache), so blobs may
        be hard links to them rather than copies (see :meth:`BlobStore.put_file`).

        ``expected_digest``: the version's digest must be this one, checked before any blob is stored.
        """
        info = with_largest_rank(info)  # installs and combinations alike: RANK is what a server's limit sees
        display = name
        canonical = refs.check_name(name)
        wanted = refs.parse_version(version) if version is not None else None
        if wanted is not None:
            known = self._existing_digest(canonical, wanted)
            if known is not None:
                # hash without storing, so a refused install writes nothing at all
                entries = [ManifestEntry(rel, sha256_file(f, progress), f.stat().st_size) for rel, f in files.items()]
                digest = manifest_digest(entries)
                if digest != known:
                    raise ConflictError(
                        f"{canonical}=={wanted} is already installed with other bytes ({known[:19]})",
                        hint="a version is immutable: install these files under a new --version",
                    )
                return InstallResult(canonical, str(wanted), digest, False, sum(e.size for e in entries),
                                     ["already installed"])
        # every column limit is checked before the first blob is written (PostgreSQL would refuse mid-way)
        placeholder = [ManifestEntry(rel, "sha256:" + "0" * 64, 0) for rel in sorted(files)]
        self._new_version(
            info=info, entries=placeholder, digest=placeholder[0].digest if placeholder else "", adapter_id=0,
            version=wanted or Version("0.1.0"), source=source, source_details=source_details or SourceDetails(),
            parents=parents or [], recipe=recipe, base_model_id=base_model_id, installed_at=_now(),
        ).check({"name": canonical, "display_name": display}, label=display)
        with self.store.lock(exclusive=False):
            ordered = sorted(files.items())
            def check(staged: list[tuple[str, int]]) -> None:
                found = manifest_digest([ManifestEntry(rel, d, n) for (rel, _), (d, n) in zip(ordered, staged)])
                if expected_digest is not None and found != expected_digest:
                    raise IntegrityError(
                        f"{display}: these files are {found[:19]}, not the expected {expected_digest[:19]}",
                        digest=expected_digest, hint="nothing was stored; the source and the lock disagree",
                    )

            blobs = self.store.put_files([file for _, file in ordered], progress, share=share_files,
                                         before_commit=check)
            entries = [ManifestEntry(rel, blob.digest, blob.size) for (rel, _), blob in zip(ordered, blobs)]
            digest = manifest_digest(entries)
            for attempt in range(_RETRIES):
                try:
                    with self.transaction() as tx:
                        return self._commit_version(
                            tx,
                            info=info,
                            entries=entries,
                            digest=digest,
                            canonical=canonical,
                            display=display,
                            wanted=wanted,
                            source=source,
                            source_details=source_details or SourceDetails(),
                            parents=parents or [],
                            recipe=recipe,
                            base_model_id=base_model_id,
                        )
                except RegistryError as exc:
                    if not exc.retryable or attempt == _RETRIES - 1:
                        raise
            raise AssertionError("unreachable")

    def _existing_digest(self, canonical: str, version: Version) -> str | None:
        with self.transaction() as tx:
            digest: str | None = tx.value(
                "SELECT v.digest FROM versions v JOIN adapters a ON a.id = v.adapter_id "
                "WHERE a.name = :name AND v.version_key = :key", name=canonical, key=version_key(version),
            )
        return digest

    def _commit_version(
        self,
        tx: Transaction,
        *,
        info: AdapterInfo,
        entries: list[ManifestEntry],
        digest: str,
        canonical: str,
        display: str,
        wanted: Version | None,
        source: str | None,
        source_details: SourceDetails,
        parents: list[Parent],
        recipe: dict[str, Any] | None,
        base_model_id: int | None = None,
        installed_at: datetime | None = None,
    ) -> InstallResult:
        size = sum(e.size for e in entries)
        lock_names(tx, [canonical])  # PostgreSQL: installs of one name queue here, as on SQLite
        adapter = tx.first("SELECT id, display_name FROM adapters WHERE name = :name", name=canonical)
        if adapter is None:
            adapter = (tx.value("INSERT INTO adapters (name, display_name, created_at) "
                                "VALUES (:name, :display, :now) RETURNING id",
                                name=canonical, display=display, now=_now()), display)
        adapter_id, display_name = adapter
        if wanted is not None:
            existing = tx.first("SELECT version, digest FROM versions WHERE adapter_id = :adapter "
                                "AND version_key = :key", adapter=adapter_id, key=version_key(wanted))
            if existing is not None:
                if existing[1] == digest:
                    return InstallResult(canonical, existing[0], digest, False, size, ["already installed"])
                raise ConflictError(
                    f"{canonical}=={wanted} is already installed with other bytes ({existing[1][:19]})",
                    hint="a version is immutable: install these files under a new --version",
                )
        else:
            # by digest, whose index finds the few versions with these bytes; by name first would scan them all
            same = next((version for adapter, version in tx.rows(
                "SELECT adapter_id, version FROM versions WHERE digest = :digest ORDER BY id", digest=digest,
            ) if adapter == adapter_id), None)
            if same is not None:
                return InstallResult(canonical, same, digest, False, size, ["already installed"])
            top = tx.value("SELECT version FROM versions WHERE adapter_id = :adapter ORDER BY version_key DESC LIMIT 1",
                           adapter=adapter_id)
            wanted = refs.next_minor([Version(top)] if top is not None else [])
        new = self._new_version(
            info=info, entries=entries, digest=digest, adapter_id=adapter_id, version=wanted, source=source,
            source_details=source_details, parents=parents, recipe=recipe, base_model_id=base_model_id,
            installed_at=installed_at or _now(),
        )
        columns = new.version
        values = {k: Json(v) if k in ("source_details", "info", "recipe") else v for k, v in columns.items()}
        names, placeholders = ", ".join(columns), ", ".join(f":{k}" for k in columns)
        version_id = tx.value(f"INSERT INTO versions ({names}) VALUES ({placeholders}) RETURNING id", **values)
        tx.execute_many(
            "INSERT INTO files (version_id, path, digest, size) VALUES (:version_id, :path, :digest, :size)",
            [{"version_id": version_id, **f} for f in new.files],
        )
        tx.execute_many(
            "INSERT INTO modules (version_id, name, kind, rank, alpha, in_features, out_features, dtype) "
            "VALUES (:version_id, :name, :kind, :rank, :alpha, :in_features, :out_features, :dtype)",
            [{"version_id": version_id, **m} for m in new.modules],
        )
        tx.execute_many(
            "INSERT INTO lineage (child_id, position, parent_digest, parent_name, parent_version, weight) "
            "VALUES (:child_id, :position, :parent_digest, :parent_name, :parent_version, :weight)",
            [{"child_id": version_id, **p} for p in new.parents],
        )
        if not self.read_only:
            write_manifest(self.root, manifest_record(new, canonical=canonical, display=display_name))
        return InstallResult(canonical, columns["version"], digest, True, size, list(info.notes))

    @staticmethod
    def _new_version(
        *,
        info: AdapterInfo,
        entries: list[ManifestEntry],
        digest: str,
        adapter_id: int,
        version: Version,
        source: str | None,
        source_details: SourceDetails,
        parents: list[Parent],
        recipe: dict[str, Any] | None,
        base_model_id: int | None,
        installed_at: datetime,
    ) -> NewVersion:
        row = {
            "adapter_id": adapter_id,
            "version": str(version),
            "version_key": version_key(version),
            "digest": digest,
            "format": info.format,
            "adapter_type": info.adapter_type,
            "rank": info.rank,
            "alpha": info.alpha,
            "use_rslora": info.use_rslora,
            "use_dora": info.use_dora,
            "base_model_name": info.base_model,
            "base_model_revision": info.base_model_revision,
            "base_model_id": base_model_id,
            "task_type": info.task_type,
            "n_modules": len(info.modules),
            "n_params": info.n_params,
            "size": sum(e.size for e in entries),
            "source": source,
            "source_details": source_details.to_dict(),
            "info": info.to_record(),
            "recipe": recipe,
            "installed_at": installed_at,
        }
        return NewVersion(
            version=row,
            files=[{"path": e.path, "digest": e.digest, "size": e.size} for e in entries],
            modules=[{"name": m.name, "kind": m.kind, "rank": m.rank, "alpha": m.alpha, "in_features": m.in_features,
                      "out_features": m.out_features, "dtype": m.dtype} for m in info.modules],
            parents=[{"position": i, "parent_digest": p.digest, "parent_name": p.name, "parent_version": p.version,
                      "weight": p.weight} for i, p in enumerate(parents)],
        )

    # -- lookups ---------------------------------------------------------------------------------

    def resolve(self, reference: str, tx: Transaction | None = None) -> StoredVersion:
        """The version a reference names; NotFoundError / AmbiguousReferenceError otherwise.

        Reads the rows of that one version: the newest (``NAME``) or ``NAME==VERSION`` is one indexed
        lookup on ``version_key``; only a specifier (``NAME>=1,<2``) reads the version strings of its name."""
        if tx is None:
            with self.transaction() as own:
                return self.resolve(reference, own)
        ref = refs.parse_reference(reference)
        if ref.kind in ("digest", "hash"):
            return self._resolve_digest(tx, ref, reference)
        adapter = tx.first("SELECT id, name FROM adapters WHERE name = :name", name=ref.name)
        if adapter is None:
            known = [r[0] for r in tx.rows("SELECT name FROM adapters")]
            raise NotFoundError(f"no adapter named {ref.name!r}", reference=reference,
                                hint=refs.did_you_mean(str(ref.name), known)
                                or "run 'loramgr list' to see installed adapters")
        adapter_id, name = adapter
        if ref.kind == "tag":
            version_id = tx.value("SELECT version_id FROM tags WHERE adapter_id = :adapter AND tag = :tag",
                                  adapter=adapter_id, tag=ref.tag)
            if version_id is None:
                known = sorted(r[0] for r in tx.rows("SELECT tag FROM tags WHERE adapter_id = :adapter",
                                                     adapter=adapter_id))
                raise NotFoundError(
                    f"{name} has no tag {ref.tag!r}", reference=reference,
                    hint=f"its tags: {', '.join(known)}" if known else "tag a version with 'loramgr tag'",
                )
        elif ref.kind == "exact":
            assert ref.version is not None  # parse_reference sets it for an exact reference
            version_id = tx.value("SELECT id FROM versions WHERE adapter_id = :adapter AND version_key = :key",
                                  adapter=adapter_id, key=version_key(ref.version))
        elif ref.kind == "name":
            version_id = _newest(tx, adapter_id)
        else:
            ids = {Version(v): i for i, v in tx.rows("SELECT id, version FROM versions WHERE adapter_id = :adapter",
                                                      adapter=adapter_id)}
            chosen = ref.select(ids)
            version_id = ids[chosen] if chosen is not None else None
        if version_id is None:
            listed = ", ".join(str(v) for v in sorted(Version(r[0]) for r in tx.rows(
                "SELECT version FROM versions WHERE adapter_id = :adapter", adapter=adapter_id)))
            raise NotFoundError(f"no version of {name} matches {reference!r}", reference=reference,
                                hint=f"installed versions: {listed}")
        return self._stored(tx, version_id)

    @staticmethod
    def _stored(tx: Transaction, version_id: int) -> StoredVersion:
        row = tx.first(SELECT_VERSION + " WHERE v.id = :id", id=version_id)
        assert row is not None  # the id comes from a row read in this transaction
        return StoredVersion(*row)

    @staticmethod
    def _resolve_digest(tx: Transaction, ref: refs.Reference, reference: str) -> StoredVersion:
        prefix = ref.digest_prefix or ""
        if ref.kind == "hash":
            from ..formats.hashes import version_matches

            query = SELECT_VERSION.replace("v.base_model_id", "v.base_model_id, v.info")  # every record: rare
            rows = [StoredVersion(*r[:7]) for r in tx.rows(query) if version_matches(load_json(r[7]), str(ref.tag),
                                                                                     prefix)]
        else:  # a prefix of hex digits, so LIKE needs no escaping
            rows = [StoredVersion(*r) for r in tx.rows(SELECT_VERSION + " WHERE v.digest LIKE :prefix",
                                                       prefix=f"{prefix}%")]
        if not rows:
            raise NotFoundError(f"no adapter version with digest {prefix}…", reference=reference,
                                hint="run 'loramgr list --digests' to see stored digests")
        if len(rows) > 1:
            names = sorted(r.ref for r in rows)
            raise AmbiguousReferenceError(
                f"{reference} matches {len(rows)} versions: {', '.join(names)}", reference=reference,
                candidates=names,
            )
        return rows[0]

    def list_versions(self, name: str | None = None) -> list[VersionRow]:
        """Every version (or every version of one adapter), by name then PEP 440 order."""
        query = """
        SELECT a.name, v.id, v.version, v.digest, v.format, v.adapter_type, v.rank, v.alpha, v.n_modules, v.size,
               v.base_model_name, v.installed_at
        FROM versions v JOIN adapters a ON a.id = v.adapter_id
        """
        with self.transaction() as tx:
            if name is not None:
                rows = tx.rows(query + " WHERE a.name = :name ORDER BY v.version_key", name=refs.check_name(name))
            else:
                rows = tx.rows(query + " ORDER BY a.name, v.version_key")
            tags: dict[int, list[str]] = {}
            for version_id, tag in tx.rows("SELECT version_id, tag FROM tags ORDER BY lower(tag)"):
                tags.setdefault(version_id, []).append(tag)
        result = [
            VersionRow(
                name=r[0], version=r[2], digest=r[3], format=r[4], adapter_type=r[5], rank=r[6], alpha=r[7],
                n_modules=r[8], size=r[9], base_model=r[10], tags=tags.get(r[1], []),
                installed_at=time_to_seconds(r[11]),
            )
            for r in rows
        ]
        result.sort(key=lambda v: v.name)  # stable: versions stay in PEP 440 order; names by code point everywhere
        return result

    def show(self, reference: str) -> VersionDetails:
        """Everything known about one version (``to_dict()`` is JSON-able)."""
        with self.transaction() as tx:
            from .details import describe_version

            return describe_version(tx, self.resolve(reference, tx).id)

    def open_adapter(self, reference: str) -> LoraAdapter:
        """A version as a LoraAdapter reading its tensors straight from the blob store."""
        with self.transaction() as tx:
            row = self.resolve(reference, tx)
            info = AdapterInfo.from_record(load_json(tx.value("SELECT info FROM versions WHERE id = :id", id=row.id)))
            stored = tx.rows("SELECT path, digest FROM files WHERE version_id = :id", id=row.id)
        label = row.ref
        # every read of stored bytes is verified: a blob altered or collected meanwhile is refused here
        files = {path: self.store.read_path(digest, used_by=label) for path, digest in stored}
        if info.weights_file not in files:
            raise InvalidAdapterError(f"{label}: its weights file is not in the store manifest")
        return LoraAdapter(info, self.root, label=label, weights_path=files[info.weights_file], digest=row.digest)

    # -- tags ------------------------------------------------------------------------------------

    def tag(self, reference: str, tag: str) -> tuple[str, str | None]:
        """Point ``tag`` at a version; returns (version, the version it pointed at before, if any)."""
        refs.check_tag(tag)
        check_row("tags", {"tag": tag}, reference)
        with self.transaction() as tx:
            lock_names(tx, [n for n in [refs.parse_reference(reference).name] if n])
            row = self.resolve(reference, tx)
            existing = tx.first(
                "SELECT t.id, v.version FROM tags t JOIN versions v ON v.id = t.version_id "
                "WHERE t.adapter_id = :adapter AND t.tag = :tag", adapter=row.adapter_id, tag=tag,
            )
            if existing is None:
                tx.execute("INSERT INTO tags (adapter_id, tag, version_id) VALUES (:adapter, :tag, :version)",
                           adapter=row.adapter_id, tag=tag, version=row.id)
                return row.version, None
            tx.execute("UPDATE tags SET version_id = :version WHERE id = :id", version=row.id, id=existing[0])
            return row.version, existing[1]

    def untag(self, name: str, tag: str) -> str:
        with self.transaction() as tx:
            row = self.resolve(f"{name}@{tag}", tx)
            tx.execute("DELETE FROM tags WHERE adapter_id = :adapter AND tag = :tag", adapter=row.adapter_id, tag=tag)
            return row.version

    # -- base models (see registry/bases.py) -----------------------------------------------------

    def add_base(self, fingerprint: BaseFingerprint) -> bool:
        from .bases import add_base

        return add_base(self, fingerprint)

    def list_bases(self) -> list[BaseFingerprint]:
        from .bases import list_bases

        return list_bases(self)

    def get_base(self, name: str) -> BaseFingerprint:
        from .bases import get_base

        return get_base(self, name)

    def base_of(self, reference: str) -> BaseFingerprint | None:
        from .bases import base_of

        return base_of(self, reference)


def _newest(tx: Transaction, adapter_id: int) -> int | None:
    """The newest final release of an adapter (the newest version if all are pre-releases), newest first
    through the ``version_key`` index: usually one row read, however many versions there are."""
    offset, first = 0, None
    version_id: int
    while True:
        page = tx.rows("SELECT id, version FROM versions WHERE adapter_id = :adapter "
                       "ORDER BY version_key DESC LIMIT :limit OFFSET :offset",
                       adapter=adapter_id, limit=_NEWEST_PAGE, offset=offset)
        for version_id, text in page:
            first = first if first is not None else version_id
            if not Version(text).is_prerelease:
                return version_id
        if len(page) < _NEWEST_PAGE:
            return first
        offset += _NEWEST_PAGE
