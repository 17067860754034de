"""The registry: adapter versions in a database over the content-addressed blob store.

Install order is what makes failures harmless: validate everything first (nothing written), then
store every blob, then commit the database rows in one transaction. An error or Ctrl-C at any point
leaves ``list`` unchanged and at most orphan blobs or temporary files, which ``gc`` removes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version
from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from registry_schema.models import Adapter, AdapterVersion, File, Lineage, Module, Tag

from .. import paths
from ..adapter import AdapterInfo, LoraAdapter
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
from .database import database_error, describe_url, home_is_writable, lock_names, open_database
from .limits import check_row
from .manifests import write_manifest
from .records import (
    InstallResult,
    ManifestEntry,
    Parent,
    SourceDetails,
    StoredModule,
    VersionDetails,
    VersionRow,
    manifest_digest,
)

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint

Progress = Callable[[str, int, int], None]


@functools.lru_cache(maxsize=4096)
def _parsed_version(text: str) -> Version:
    # list sorts every version; most registries repeat the same few strings (0.1.0, 1.0.0, ...)
    return Version(text)


def _now() -> datetime:
    return datetime.now(UTC)


_RETRIES = 5  # a commit that lost a serialisation conflict is run again this many times at most


def check_version_rows(row: AdapterVersion, adapter: Adapter, *, label: str) -> None:
    """Refuse, before anything is stored, a version whose rows one of the databases would not keep."""
    for item in (adapter, row, *row.files, *row.modules, *row.parents):
        check_row(item, label)


def manifest_record(row: AdapterVersion, *, canonical: str, display: str) -> dict[str, Any]:
    """What ``<home>/manifests/<name>/<version>.json`` keeps of a version: all its rows but the tags."""
    return {
        "name": canonical, "display_name": display, "version": row.version, "digest": row.digest,
        "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in row.files],
        "info": row.info, "source": row.source, "source_details": row.source_details, "recipe": row.recipe,
        "parents": [{"name": p.parent_name, "version": p.parent_version, "digest": p.parent_digest,
                     "weight": p.weight} for p in row.parents],
        "base_model_id": row.base_model_id, "installed_at": row.installed_at.isoformat(),
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
        self.engine = open_database(url, read_only=self.read_only)
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
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction; any database failure inside it becomes one RegistryError line naming the database."""
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise database_error(exc, self.database) from exc

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
        check_version_rows(self._version_row(
            info=info, entries=placeholder, digest=placeholder[0].digest if placeholder else "", adapter_id=0,
            version=str(wanted or "0.1.0"), source=source, source_details=source_details or SourceDetails(),
            parents=parents or [], recipe=recipe, base_model_id=base_model_id, installed_at=_now(),
        ), Adapter(name=canonical, display_name=display, created_at=_now()), label=display)
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
                    with self.session() as session:
                        return self._commit_version(
                            session,
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
        with self.session() as session:
            rows = session.execute(
                select(AdapterVersion.version, AdapterVersion.digest)
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                .where(Adapter.name == canonical)
            ).all()
        return next((digest for v, digest in rows if Version(v) == version), None)

    def _commit_version(
        self,
        session: Session,
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
        lock_names(session, [canonical])  # PostgreSQL: installs of one name queue here, as on SQLite
        adapter = session.scalar(select(Adapter).where(Adapter.name == canonical))
        if adapter is None:
            adapter = Adapter(name=canonical, display_name=display, created_at=_now())
            session.add(adapter)
            session.flush()
        existing = {Version(v.version): v for v in adapter.versions}
        if wanted is not None and wanted in existing:
            row = existing[wanted]
            if row.digest == digest:
                return InstallResult(canonical, row.version, digest, False, size, ["already installed"])
            raise ConflictError(
                f"{canonical}=={wanted} is already installed with other bytes ({row.digest[:19]})",
                hint="a version is immutable: install these files under a new --version",
            )
        if wanted is None:
            same = [v for v in existing.values() if v.digest == digest]
            if same:
                return InstallResult(canonical, same[0].version, digest, False, size, ["already installed"])
            wanted = refs.next_minor(existing)
        row = self._version_row(
            info=info, entries=entries, digest=digest, adapter_id=adapter.id, version=str(wanted), source=source,
            source_details=source_details, parents=parents, recipe=recipe, base_model_id=base_model_id,
            installed_at=installed_at or _now(),
        )
        session.add(row)
        session.flush()
        if not self.read_only:
            write_manifest(self.root, manifest_record(row, canonical=canonical, display=adapter.display_name))
        return InstallResult(canonical, row.version, digest, True, size, list(info.notes))

    @staticmethod
    def _version_row(
        *,
        info: AdapterInfo,
        entries: list[ManifestEntry],
        digest: str,
        adapter_id: int,
        version: str,
        source: str | None,
        source_details: SourceDetails,
        parents: list[Parent],
        recipe: dict[str, Any] | None,
        base_model_id: int | None,
        installed_at: datetime,
    ) -> AdapterVersion:
        row = AdapterVersion(
            adapter_id=adapter_id,
            version=version,
            digest=digest,
            format=info.format,
            adapter_type=info.adapter_type,
            rank=info.rank,
            alpha=info.alpha,
            use_rslora=info.use_rslora,
            use_dora=info.use_dora,
            base_model_name=info.base_model,
            base_model_revision=info.base_model_revision,
            base_model_id=base_model_id,
            task_type=info.task_type,
            n_modules=len(info.modules),
            n_params=info.n_params,
            size=sum(e.size for e in entries),
            source=source,
            source_details=source_details.to_dict(),
            info=info.to_record(),
            recipe=recipe,
            installed_at=installed_at,
        )
        row.files = [File(path=e.path, digest=e.digest, size=e.size) for e in entries]
        row.modules = [
            Module(
                name=m.name,
                kind=m.kind,
                rank=m.rank,
                alpha=m.alpha,
                in_features=m.in_features,
                out_features=m.out_features,
                dtype=m.dtype,
            )
            for m in info.modules
        ]
        row.parents = [
            Lineage(position=i, parent_digest=p.digest, parent_name=p.name, parent_version=p.version, weight=p.weight)
            for i, p in enumerate(parents)
        ]
        return row

    # -- lookups ---------------------------------------------------------------------------------

    def resolve(self, reference: str, session: Session | None = None) -> AdapterVersion:
        """The version a reference names; NotFoundError / AmbiguousReferenceError otherwise."""
        if session is None:
            with self.session() as own:
                return self.resolve(reference, own)
        ref = refs.parse_reference(reference)
        if ref.kind in ("digest", "hash"):
            prefix = ref.digest_prefix or ""
            if ref.kind == "hash":
                from ..formats.hashes import version_matches

                rows: Sequence[AdapterVersion] = [
                    r for r in session.scalars(select(AdapterVersion).options(*_eager())).all()
                    if version_matches(r.info, str(ref.tag), prefix)
                ]
            else:
                rows = session.scalars(
                    select(AdapterVersion).where(AdapterVersion.digest.startswith(prefix)).options(*_eager())
                ).all()
            if not rows:
                raise NotFoundError(f"no adapter version with digest {prefix}…", reference=reference,
                                    hint="run 'loramgr list --digests' to see stored digests")
            if len({r.digest for r in rows}) > 1 or len(rows) > 1:
                names = sorted(f"{r.adapter.name}=={r.version}" for r in rows)
                raise AmbiguousReferenceError(
                    f"{reference} matches {len(rows)} versions: {', '.join(names)}", reference=reference,
                    candidates=names,
                )
            return rows[0]
        adapter = session.scalar(select(Adapter).where(Adapter.name == ref.name))
        if adapter is None:
            known = session.scalars(select(Adapter.name)).all()
            raise NotFoundError(f"no adapter named {ref.name!r}", reference=reference,
                                hint=refs.did_you_mean(str(ref.name), known)
                                or "run 'loramgr list' to see installed adapters")
        if ref.kind == "tag":
            tag = session.scalar(select(Tag).where(Tag.adapter_id == adapter.id, Tag.tag == ref.tag))
            if tag is None:
                known = sorted(t.tag for t in adapter.tags)
                raise NotFoundError(
                    f"{adapter.name} has no tag {ref.tag!r}", reference=reference,
                    hint=f"its tags: {', '.join(known)}" if known else "tag a version with 'loramgr tag'",
                )
            return self._load(session, tag.version_id)
        versions = {Version(v.version): v for v in adapter.versions}
        chosen = ref.select(versions)
        if chosen is None:
            listed = ", ".join(str(v) for v in sorted(versions))
            raise NotFoundError(f"no version of {adapter.name} matches {reference!r}", reference=reference,
                                hint=f"installed versions: {listed}")
        return self._load(session, versions[chosen].id)

    def _load(self, session: Session, version_id: int) -> AdapterVersion:
        row = session.scalar(select(AdapterVersion).where(AdapterVersion.id == version_id).options(*_eager()))
        assert row is not None  # the id comes from a row we just read in this session
        return row

    def list_versions(self, name: str | None = None) -> list[VersionRow]:
        """Every version (or every version of one adapter), by name then PEP 440 order."""
        from sqlalchemy import func

        with self.session() as session:
            query = (
                select(
                    Adapter.name, AdapterVersion.id, AdapterVersion.version, AdapterVersion.digest,
                    AdapterVersion.format, AdapterVersion.adapter_type, AdapterVersion.rank, AdapterVersion.alpha,
                    AdapterVersion.n_modules, AdapterVersion.size, AdapterVersion.base_model_name,
                    AdapterVersion.installed_at,
                )
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            )
            if name is not None:
                query = query.where(Adapter.name == refs.check_name(name))
            rows = session.execute(query).all()
            tags: dict[int, list[str]] = {}
            for version_id, tag in session.execute(select(Tag.version_id, Tag.tag).order_by(func.lower(Tag.tag))):
                tags.setdefault(version_id, []).append(tag)
        result = [
            VersionRow(
                name=r.name, version=r.version, digest=r.digest, format=r.format, adapter_type=r.adapter_type,
                rank=r.rank, alpha=r.alpha, n_modules=r.n_modules, size=r.size, base_model=r.base_model_name,
                tags=tags.get(r.id, []), installed_at=r.installed_at.isoformat(timespec="seconds"),
            )
            for r in rows
        ]
        result.sort(key=lambda v: (v.name, _parsed_version(v.version)))
        return result

    def show(self, reference: str) -> VersionDetails:
        """Everything known about one version (``to_dict()`` is JSON-able)."""
        with self.session() as session:
            row = self.resolve(reference, session)
            return describe_version(row)

    def open_adapter(self, reference: str) -> LoraAdapter:
        """A version as a LoraAdapter reading its tensors straight from the blob store."""
        with self.session() as session:
            row = self.resolve(reference, session)
            info = AdapterInfo.from_record(row.info)
            label = f"{row.adapter.name}=={row.version}"
            # every read of stored bytes is verified: a blob altered or collected meanwhile is refused here
            files = {f.path: self.store.read_path(f.digest, used_by=label) for f in row.files}
            if info.weights_file not in files:
                raise InvalidAdapterError(f"{label}: its weights file is not in the store manifest")
            return LoraAdapter(info, self.root, label=label, weights_path=files[info.weights_file],
                               digest=row.digest)

    # -- tags ------------------------------------------------------------------------------------

    def tag(self, reference: str, tag: str) -> tuple[str, str | None]:
        """Point ``tag`` at a version; returns (version, the version it pointed at before, if any)."""
        refs.check_tag(tag)
        check_row(Tag(tag=tag), reference)
        with self.session() as session:
            lock_names(session, [n for n in [refs.parse_reference(reference).name] if n])
            row = self.resolve(reference, session)
            existing = session.scalar(select(Tag).where(Tag.adapter_id == row.adapter_id, Tag.tag == tag))
            previous = None
            if existing is None:
                session.add(Tag(adapter_id=row.adapter_id, tag=tag, version_id=row.id))
            else:
                previous = existing.version.version
                existing.version_id = row.id
            return row.version, previous

    def untag(self, name: str, tag: str) -> str:
        with self.session() as session:
            row = self.resolve(f"{name}@{tag}", session)
            session.execute(delete(Tag).where(Tag.adapter_id == row.adapter_id, Tag.tag == tag))
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


def _eager() -> Any:
    return (
        selectinload(AdapterVersion.files),
        selectinload(AdapterVersion.modules),
        selectinload(AdapterVersion.parents),
        selectinload(AdapterVersion.adapter).selectinload(Adapter.tags),
    )


def describe_version(row: AdapterVersion) -> VersionDetails:
    info = row.info
    tags = sorted(t.tag for t in row.adapter.tags if t.version_id == row.id)
    return VersionDetails(
        name=row.adapter.name,
        display_name=row.adapter.display_name,
        version=row.version,
        digest=row.digest,
        tags=tags,
        size=row.size,
        installed_at=row.installed_at.isoformat(timespec="seconds"),
        source=row.source,
        source_details=SourceDetails.from_dict(row.source_details),
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
        files=[ManifestEntry(f.path, f.digest, f.size) for f in row.files],
        modules=[StoredModule(m.name, m.kind, m.rank, m.alpha, m.in_features, m.out_features, m.dtype)
                 for m in row.modules],
        parents=[Parent(p.parent_name, p.parent_version, p.parent_digest, p.weight) for p in row.parents],
        recipe=row.recipe,
    )
