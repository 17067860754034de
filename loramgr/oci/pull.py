"""``loramgr install oci://host/repository:tag|@sha256:...``: fetch, verify, then register.

Every layer is streamed into a scratch folder of the store (which holds the shared store lock, so
``gc`` waits) and checked against its descriptor's size and digest as it arrives; the version's
digest, computed from the layer descriptors before anything is downloaded, must match the one the
pusher annotated. Only when every file is in and verified does the one install sequence run, so a
damaged or replaced layer leaves the registry as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError, InvalidReferenceError, UnsupportedAdapterError
from ..registry import InstallResult, Registry
from ..registry.records import ManifestEntry, OciOrigin, Parent, SourceDetails, manifest_digest
from . import layout
from .client import OciClient
from .reference import OciReference, parse_oci_reference

if TYPE_CHECKING:
    from ..installer import InstallOptions

Progress = Callable[[str, int, int], None]
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Fetched:
    """An artifact's files in a local folder, every one verified against its layer digest."""

    reference: OciReference  # with the manifest digest
    manifest_digest: str
    artifact: layout.Artifact
    folder: Path

    @property
    def target(self) -> Path:
        """What the install reads: the folder, or the single weights file of a kohya/diffusers adapter."""
        paths = [x.path for x in self.artifact.layers]
        if "adapter_config.json" not in paths:
            weights = [p for p in paths if p.endswith(".safetensors")]
            if len(weights) == 1:
                return self.folder / weights[0]
        return self.folder

    @property
    def version_digest(self) -> str:
        return version_digest(self.artifact)

    def origin(self) -> OciOrigin:
        """What the registry records as the version's source (and ``lock`` pins)."""
        return OciOrigin(
            repository=self.reference.repository_url,
            tag=self.reference.tag,
            manifest=self.manifest_digest,
            base=self.artifact.base or None,
            subject=(self.artifact.subject or {}).get("digest"),
        )


@dataclass
class RemoteTag:
    """One line of ``list-remote``."""

    tag: str
    digest: str
    name: str | None = None
    version: str | None = None
    size: int = 0
    base_model: str | None = None
    kind: str = "adapter"  # "adapter" | "referrers" (the tag-schema index) | "other"
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def version_digest(artifact: layout.Artifact) -> str:
    """The registry's version digest of these files, from their descriptors alone (a layer digest is the
    file's sha256)."""
    return manifest_digest([ManifestEntry(x.path, x.digest, x.size) for x in artifact.layers])


def fetch(source: str | OciReference, folder: Path, *, insecure: bool = False, allow_pickle: bool = False,
          expected_digest: str | None = None, progress: Progress | None = None) -> Fetched:
    """Download an artifact's layers into ``folder`` (empty), verifying each; nothing else is written.

    ``expected_digest``: the version digest the files must have (a lockfile's pin); checked from the
    manifest before any layer is downloaded, and again after.
    """
    ref = parse_oci_reference(source) if isinstance(source, str) else source
    if not ref.reference:
        raise InvalidReferenceError(f"{ref} names no tag or digest", reference=str(ref),
                                    hint=f"write {ref.repository_url}:<tag>; 'loramgr list-remote' lists tags")
    client = OciClient(ref, insecure=insecure)
    body, _media_type, digest = client.get_manifest(ref.reference)
    artifact = layout.parse_manifest(body, label=str(ref))
    pickles = [x.path for x in artifact.layers if x.path.endswith(_PICKLES)]
    if pickles and not allow_pickle:
        raise UnsupportedAdapterError(f"{ref}: {pickles[0]} is a pickle, which can run code when loaded",
                                      hint="pass --allow-pickle if you trust this artifact")
    computed = version_digest(artifact)
    for wanted, what in ((expected_digest, "the lock"), (artifact.annotations.get(layout.VERSION_DIGEST),
                                                         "the pusher")):
        if wanted and not pickles and computed != wanted:
            raise IntegrityError(f"{ref}: its files make version {computed[:19]}, but {what} recorded {wanted[:19]}",
                                 digest=wanted, hint="nothing was installed; the artifact was changed after it "
                                 "was recorded")
    descriptor = artifact.config_descriptor
    if descriptor.get("mediaType") == layout.CONFIG and int(descriptor.get("size") or 0) <= (1 << 20):
        artifact.config = layout.parse_config(client.get_blob_bytes(str(descriptor["digest"])))
    total, done = artifact.size, 0
    for layer in artifact.layers:
        label = f"pulling {layer.path}"

        def report(n: int, _size: int, base: int = done, label: str = label) -> None:
            if progress is not None:
                progress(label, base + n, total)

        client.download_blob(layer.digest, layer.size, folder / layer.path, report)
        done += layer.size
    return Fetched(ref.with_reference(tag=ref.tag, digest=digest), digest, artifact, folder)


def install_from_oci(
    registry: Registry,
    text: str,
    options: InstallOptions,
    *,
    insecure: bool = False,
    progress: Progress | None = None,
) -> InstallResult:
    """Install an artifact; the result carries the OCI facts of this request (``result.oci``, what
    ``lock`` pins)."""
    ref = parse_oci_reference(text)
    with registry.store.scratch() as scratch:
        fetched = fetch(ref, scratch / "artifact", insecure=insecure, allow_pickle=options.allow_pickle,
                        progress=progress)
        return register(registry, fetched, options, progress=progress)


def register(registry: Registry, fetched: Fetched, options: InstallOptions, *, expected_digest: str | None = None,
             progress: Progress | None = None) -> InstallResult:
    """Hand verified files to the install sequence, with the lineage and recipe the artifact carries;
    ``expected_digest`` (a lock's pin) is compared with the version's digest before anything is stored."""
    from ..hub.install import version_from_revision
    from ..installer import install_path

    artifact = fetched.artifact
    parents = [Parent(str(p.get("name")), str(p.get("version")), str(p.get("digest")), float(p.get("weight") or 0))
               for p in artifact.parents if isinstance(p, dict)]
    chosen = replace(
        options,
        name=options.name or artifact.name or fetched.reference.repository.rsplit("/", 1)[-1],
        version=options.version or artifact.version or version_from_revision(fetched.reference.tag),
    )
    origin = fetched.origin()
    result = install_path(
        registry,
        fetched.target,
        chosen,
        source_label=f"{fetched.reference.repository_url}@{fetched.manifest_digest}",
        source_details=SourceDetails(oci=origin),
        share_files=True,  # the verified downloads are ours and never rewritten: link them into the store
        parents=parents or None,
        recipe=artifact.recipe,
        expected_digest=expected_digest,
        progress=progress,
    )
    result.oci = origin
    return result


def list_remote(text: str, *, insecure: bool = False) -> list[RemoteTag]:
    """Every tag of a repository and what it holds (read from the manifests; no layer is downloaded)."""
    ref = parse_oci_reference(text)
    client = OciClient(ref.with_reference(), insecure=insecure)
    tags = [ref.tag] if ref.tag else client.list_tags()
    rows = []
    for tag in tags:
        body, media_type, digest = client.get_manifest(tag)
        if media_type == layout.INDEX or b'"manifests"' in body:
            kind = "referrers" if tag.startswith("sha256-") else "other"
            rows.append(RemoteTag(tag, digest, kind=kind))
            continue
        try:
            artifact = layout.parse_manifest(body, label=f"{ref.repository_url}:{tag}")
        except Exception:  # noqa: BLE001 - list-remote describes what it can, it refuses nothing
            rows.append(RemoteTag(tag, digest, kind="other"))
            continue
        rows.append(RemoteTag(tag, digest, name=artifact.name, version=artifact.version, size=artifact.size,
                              base_model=artifact.base.get("name"), files=[x.path for x in artifact.layers]))
    return rows


def fetch_locked(entry: Any, folder: Path, *, insecure: bool = False,
                 progress: Progress | None = None) -> tuple[Any, Fetched]:
    """Fetch a lockfile entry (``oci``, ``manifest``, ``digest``) by manifest digest and check the version
    digest against the lock; returns (entry, fetched) for :func:`register` once every entry is in."""
    ref = parse_oci_reference(f"{entry.oci}@{entry.manifest}").with_reference(tag=entry.tag, digest=entry.manifest)
    fetched = fetch(ref, folder / "artifact", insecure=insecure, expected_digest=entry.digest, progress=progress)
    return entry, fetched
