"""Reproducible adapter sets: ``loramgr.toml`` lists what a project needs, ``loramgr.lock`` pins it.

::

    # loramgr.toml
    [adapters]
    sql-assistant = ">=1.0,<2"                                          # from the local registry
    house-style = { hub = "owner/house-style", revision = "v2.1.0" }    # from the Hub
    team-style = { oci = "oci://registry.example.com/team/style:1.0.0" } # from an OCI registry

``lock`` resolves every entry to an exact version, digest and file list (and for Hub entries the
commit, for OCI entries the manifest digest); ``sync`` makes a registry hold exactly that, verifying
every digest. sync plans first: it fetches and checks everything before it registers anything, so a
mismatch refuses the whole sync and installs nothing. It installs through the same halves as ``install``
(for the Hub :func:`~loramgr.hub.install.fetch_from_hub`, then :func:`~loramgr.hub.install.install_fetched`;
for OCI :func:`~loramgr.oci.pull.fetch_locked`, then :func:`~loramgr.oci.pull.register`), so a synced
version is stored and described exactly as an install of its locked commit or manifest would be.
The lock is sorted and has no timestamps, so it diffs well in git.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import IntegrityError, InvalidReferenceError, NotFoundError, ProjectFileError
from .registry import Registry
from .registry.records import ManifestEntry, manifest_digest
from .registry.refs import check_name
from .store import sha256_file

if TYPE_CHECKING:
    from .hub.install import HubFetch

LOCK_VERSION = 1
Progress = Callable[[str, int, int], None]


@dataclass
class Requirement:
    name: str
    spec: str = ""  # PEP 440 specifier for registry entries
    hub: str | None = None  # owner/repo
    revision: str | None = None
    subfolder: str | None = None
    oci: str | None = None  # oci://host/repository:tag or @sha256:...

    @property
    def hub_reference(self) -> str:
        assert self.hub is not None  # only called for hub entries
        text = f"hf://{self.hub}" + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.subfolder}" if self.subfolder else "")


@dataclass
class Locked:
    name: str
    version: str
    digest: str
    files: list[ManifestEntry]
    hub: str | None = None
    revision: str | None = None
    commit: str | None = None
    subfolder: str | None = None
    oci: str | None = None  # oci://host/repository
    tag: str | None = None
    manifest: str | None = None  # the OCI manifest digest: what sync fetches

    def to_toml_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"name": self.name, "version": self.version, "digest": self.digest}
        for key in ("hub", "revision", "commit", "subfolder", "oci", "tag", "manifest"):
            value = getattr(self, key)
            if value is not None:
                table[key] = value
        table["files"] = [asdict(f) for f in sorted(self.files, key=lambda f: f.path)]
        return table


@dataclass
class SyncReport:
    already: list[str] = field(default_factory=list)
    installed: list[str] = field(default_factory=list)


def read_requirements(path: str | Path) -> list[Requirement]:
    path = Path(path)
    data = _read_toml(path)
    adapters = data.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise ProjectFileError(f"{path}: no [adapters] table", path=str(path),
                               hint='list adapters as name = ">=1.0" or name = { hub = "owner/repo" }')
    result = []
    for name, value in sorted(adapters.items()):
        try:
            check_name(name)
        except InvalidReferenceError as exc:
            raise ProjectFileError(f"{path}: {name}: {exc.message}", path=str(path), entry=name,
                                   hint=exc.hint) from None
        if isinstance(value, str):
            result.append(Requirement(name, _specifier(path, name, value)))
        elif isinstance(value, dict) and isinstance(value.get("hub"), str):
            unknown = set(value) - {"hub", "revision", "subfolder"}
            if unknown:
                raise ProjectFileError(f"{path}: {name}: unknown key(s) {', '.join(sorted(unknown))}",
                                       path=str(path), entry=name, hint="use hub, revision and subfolder")
            result.append(Requirement(name, hub=value["hub"], revision=value.get("revision"),
                                      subfolder=value.get("subfolder")))
        elif isinstance(value, dict) and isinstance(value.get("oci"), str) and set(value) == {"oci"}:
            result.append(Requirement(name, oci=value["oci"]))
        else:
            raise ProjectFileError(
                f"{path}: {name}: expected a version specifier or {{ hub = ... }} (or {{ oci = ... }})",
                path=str(path), entry=name)
    return result


def _specifier(path: Path, name: str, text: str) -> str:
    """An entry's version specifier; a bare version means exactly that version, as in Cargo and npm."""
    text = text.strip()
    if text in ("", "*"):
        return text
    if text[0] not in "=<>!~":
        try:
            return f"=={Version(text)}"
        except InvalidVersion:
            pass
    try:
        SpecifierSet(text)
    except InvalidSpecifier:
        raise ProjectFileError(
            f"{path}: {name}: invalid version specifier {text!r}", path=str(path),
            entry=name, hint='write e.g. "1.0.0", "==1.0.0", ">=1.0,<2" or "*"') from None
    return text


def lock(registry: Registry, requirements: list[Requirement], *, progress: Progress | None = None) -> list[Locked]:
    """Resolve every requirement to an exact version; Hub entries are installed (or found) first."""
    from .hub.install import install_from_hub
    from .installer import InstallOptions
    from .oci.pull import install_from_oci

    locked = []
    for req in requirements:
        oci = None
        if req.oci:
            result = install_from_oci(registry, req.oci, InstallOptions(name=req.name), progress=progress)
            details, hub, oci = registry.show(result.ref), None, result.oci
        elif req.hub:
            result = install_from_hub(registry, req.hub_reference, InstallOptions(name=req.name), progress=progress)
            details = registry.show(result.ref)
            hub = result.hub
        else:
            details = registry.show(req.name + (req.spec if req.spec not in ("", "*") else ""))
            # a registry entry installed from the Hub keeps its source, so sync can fetch it elsewhere
            hub = details.source_details.hub
            oci = details.source_details.oci
        locked.append(Locked(
            name=details.name, version=details.version, digest=details.digest, files=list(details.files),
            hub=hub.repo if hub else None, revision=hub.revision if hub else None,
            commit=hub.commit if hub else None, subfolder=hub.subfolder if hub else None,
            oci=oci.repository if oci else None, tag=oci.tag if oci else None,
            manifest=oci.manifest if oci else None,
        ))
    return locked


def render_lock(locked: list[Locked]) -> str:
    import tomli_w

    tables = [e.to_toml_table() for e in sorted(locked, key=lambda e: e.name)]
    document = {"lock-version": LOCK_VERSION, "adapter": tables}
    return "# loramgr.lock: written by 'loramgr lock'; do not edit\n" + tomli_w.dumps(document)


def read_lock(path: str | Path) -> list[Locked]:
    path = Path(path)
    data = _read_toml(path)
    if data.get("lock-version") != LOCK_VERSION:
        raise ProjectFileError(f"{path}: lock-version {data.get('lock-version')!r} is not {LOCK_VERSION}",
                               path=str(path), hint="re-create it with 'loramgr lock' or upgrade loramgr")
    entries = []
    for table in data.get("adapter", []):
        try:
            entries.append(Locked(
                name=table["name"], version=table["version"], digest=table["digest"],
                files=[ManifestEntry(f["path"], f["digest"], int(f["size"])) for f in table["files"]],
                hub=table.get("hub"), revision=table.get("revision"), commit=table.get("commit"),
                subfolder=table.get("subfolder"), oci=table.get("oci"), tag=table.get("tag"),
                manifest=table.get("manifest"),
            ))
        except KeyError as exc:
            raise ProjectFileError(f"{path}: an [[adapter]] entry has no {exc.args[0]}", path=str(path),
                                   entry=table.get("name"), hint="re-create it with 'loramgr lock'") from None
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        ref = f"{entry.name}=={entry.version}"
        if (entry.name, entry.version) in seen:
            raise ProjectFileError(f"{path}: {ref} is locked twice", path=str(path), entry=entry.name,
                                   hint="re-create it with 'loramgr lock'")
        seen.add((entry.name, entry.version))
        for f in entry.files:
            parts = PurePosixPath(f.path).parts
            if not parts or f.path.startswith("/") or "\\" in f.path or any(p in ("..", ".", "") for p in parts):
                raise ProjectFileError(f"{path}: {ref} lists file {f.path!r}, which is not a path inside the adapter",
                                       path=str(path), entry=entry.name, hint="re-create it with 'loramgr lock'")
    return entries


def sync(registry: Registry, locked: list[Locked], *, progress: Progress | None = None,
         offline: bool | None = None) -> SyncReport:
    """Make ``registry`` hold exactly the locked versions; all or nothing."""
    with ExitStack() as scratch:  # OCI downloads wait in scratch folders until every entry is verified
        return _sync(registry, locked, scratch, progress=progress, offline=offline)


def _sync(registry: Registry, locked: list[Locked], scratch: ExitStack, *, progress: Progress | None,
          offline: bool | None) -> SyncReport:
    from .hub.install import install_fetched
    from .installer import InstallOptions
    from .oci.pull import Fetched, fetch_locked, register

    report = SyncReport()
    plan: list[tuple[Locked, HubFetch]] = []
    oci_plan: list[tuple[Locked, Fetched]] = []
    for entry in locked:
        ref = f"{entry.name}=={entry.version}"
        if _present(registry, entry):
            report.already.append(ref)
            continue
        if entry.oci and entry.manifest:
            oci_plan.append((entry, fetch_locked(entry, scratch.enter_context(registry.store.scratch()),
                                                 progress=progress)[1]))
            continue
        if not entry.hub or not entry.commit:
            raise NotFoundError(f"{ref} ({entry.digest[:19]}) is not in this registry and the lock has no Hub source "
                                "for it", reference=ref, hint="install it here first, or lock it from the Hub")
        plan.append((entry, _fetch(entry, offline=offline, progress=progress)))
    for entry, fetched in plan:  # every digest checked: now register
        install_fetched(registry, fetched, InstallOptions(name=entry.name, version=entry.version), progress=progress,
                        expected_digest=entry.digest)  # what is registered is what the lock names
        report.installed.append(f"{entry.name}=={entry.version}")
    for entry, oci_fetched in oci_plan:
        register(registry, oci_fetched, InstallOptions(name=entry.name, version=entry.version),
                 expected_digest=entry.digest, progress=progress)
        report.installed.append(f"{entry.name}=={entry.version}")
    return report


def _present(registry: Registry, entry: Locked) -> bool:
    """True when the registry has this exact version with intact blobs; a different digest refuses."""
    ref = f"{entry.name}=={entry.version}"
    try:
        details = registry.show(ref)
    except NotFoundError:
        return False
    if details.digest != entry.digest:
        raise IntegrityError(f"{ref} here is {details.digest[:19]} but the lock says {entry.digest[:19]}",
                             digest=entry.digest, hint="remove the local version or re-lock")
    for f in details.files:
        if not registry.store.verify(f.digest):
            raise IntegrityError(f"{ref}: stored blob {f.digest[:19]} ({f.path}) is missing or corrupt",
                                 digest=f.digest, hint="remove the version and sync again")
    return True


def _fetch(entry: Locked, *, offline: bool | None, progress: Progress | None) -> HubFetch:
    """Fetch a locked Hub entry at its commit and check its files against the lock's digest."""
    from .hub.client import HubSource
    from .hub.install import fetch_from_hub

    source = HubSource(str(entry.hub), entry.revision, entry.subfolder)
    fetched = fetch_from_hub(source, commit=entry.commit, offline=offline, progress=progress)
    entries = []
    for f in entry.files:
        path = fetched.folder / f.path
        if f.path not in fetched.files:  # only the adapter files of this snapshot, never a path beside it
            raise IntegrityError(f"{entry.name}=={entry.version}: {f.path} is not an adapter file at commit "
                                 f"{entry.commit}", digest=entry.digest, hint="the lock and the repository disagree; "
                                 "re-lock")
        if not path.is_file():
            raise IntegrityError(f"{entry.name}=={entry.version}: {f.path} is missing at commit {entry.commit}",
                                 digest=entry.digest, hint="the lock and the repository disagree; re-lock")
        entries.append(ManifestEntry(f.path, sha256_file(path), path.stat().st_size))
    if manifest_digest(entries) != entry.digest:
        raise IntegrityError(f"{entry.name}=={entry.version}: the files at {entry.hub}@{fetched.origin.commit[:12]} "
                             f"do not match the lock's digest {entry.digest[:19]}", digest=entry.digest,
                             hint="nothing was installed; check the cache or re-lock")
    return fetched


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectFileError(f"{path}: no such file", path=str(path),
                               hint="create it, or run the command in your project") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProjectFileError(f"{path}: not valid TOML ({exc})", path=str(path)) from None
