"""Plain results the registry returns to its callers (the CLI renders them, scripts get them as JSON)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    digest: str
    size: int


#: documentation, not payload: a version's identity does not change when its model card is regenerated
#: (``loramgr push`` uploads a generated card; installing that push back gives the same digest)
CARD_FILES = frozenset({"README.md"})


def manifest_digest(entries: list[ManifestEntry]) -> str:
    """An adapter version's identity: sha256 of its canonical manifest (paths, digests, sizes) of every
    file except the model card."""
    payload = [asdict(e) for e in sorted(entries, key=lambda e: e.path) if e.path not in CARD_FILES]
    canonical = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Parent:
    """A source of a combined adapter, as recorded in lineage."""

    name: str
    version: str
    digest: str
    weight: float


@dataclass(frozen=True)
class HubOrigin:
    """Where an adapter came from on the Hub: what was asked for and the commit it resolved to."""

    repo: str
    revision: str | None  # as asked (a tag, a branch, a commit), None for the default branch
    commit: str
    subfolder: str | None
    card: dict[str, Any] = field(default_factory=dict)  # license, base_model, tags, description

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HubOrigin:
        return cls(repo=data["repo"], revision=data.get("revision"), commit=data["commit"],
                   subfolder=data.get("subfolder"), card=dict(data.get("card") or {}))


@dataclass(frozen=True)
class OciOrigin:
    """Where an adapter came from in an OCI registry: the repository, the tag asked for, the manifest."""

    repository: str  # oci://registry.example.com/team/sql-chat
    tag: str | None
    manifest: str  # sha256:<hex> of the manifest pulled
    base: dict[str, str] | None = None  # the base model's name, revision, fingerprint as annotated
    subject: str | None = None  # the manifest digest its ``subject`` points at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OciOrigin:
        return cls(repository=data["repository"], tag=data.get("tag"), manifest=data["manifest"],
                   base=dict(data["base"]) if data.get("base") else None, subject=data.get("subject"))


@dataclass(frozen=True)
class SourceDetails:
    """What the registry records about a version's source besides its one-line label."""

    hub: HubOrigin | None = None
    oci: OciOrigin | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.hub is not None:
            out["hub"] = self.hub.to_dict()
        if self.oci is not None:
            out["oci"] = self.oci.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SourceDetails:
        hub, oci = (data or {}).get("hub"), (data or {}).get("oci")
        return cls(hub=HubOrigin.from_dict(hub) if hub else None, oci=OciOrigin.from_dict(oci) if oci else None)


@dataclass
class InstallResult:
    name: str
    version: str
    digest: str
    created: bool  # False: these exact bytes were already installed under this name
    size: int
    notes: list[str] = field(default_factory=list)
    #: for an hf:// install, the Hub facts of this request (what ``lock`` pins). The stored version's
    #: own source may name another place when the same bytes were installed from there first.
    hub: HubOrigin | None = None
    #: for an oci:// install, the OCI facts of this request (the manifest ``lock`` pins)
    oci: OciOrigin | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}=={self.version}"

    def to_dict(self) -> dict[str, Any]:
        """What ``install --json`` prints."""
        return {"name": self.name, "version": self.version, "digest": self.digest, "created": self.created,
                "size": self.size, "notes": list(self.notes)}


@dataclass(frozen=True)
class StoredVersion:
    """A stored version as a reference resolves to it: which row it is, without its metadata."""

    id: int
    adapter_id: int
    name: str
    version: str
    digest: str
    size: int
    base_model_id: int | None

    @property
    def ref(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class StoredModule:
    """One adapted module of a stored version, as ``show`` lists it."""

    name: str
    kind: str
    rank: int
    alpha: float
    in_features: int
    out_features: int
    dtype: str


@dataclass(frozen=True)
class VersionDetails:
    """Everything known about one stored version (``Registry.show``); ``show --json`` prints :meth:`to_dict`.

    The fields from ``format`` to ``config`` are the adapter's metadata as read at install
    (:meth:`loramgr.adapter.AdapterInfo.to_record`, modules aside).
    """

    name: str
    display_name: str
    version: str
    digest: str
    tags: list[str]
    size: int
    installed_at: str  # ISO 8601, seconds
    source: str | None
    source_details: SourceDetails
    format: str
    adapter_type: str
    rank: int | None
    ranks_found: list[int]
    alpha: float | None
    use_rslora: bool
    use_dora: bool
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    target_modules: list[str]
    target_modules_found: list[str]
    base_model: str | None
    base_model_revision: str | None
    task_type: str | None
    n_modules: int
    n_params: int
    dtypes: list[str]
    file_metadata: dict[str, str]
    card: dict[str, Any]
    notes: list[str]
    weights_file: str
    config: dict[str, Any]
    files: list[ManifestEntry]
    modules: list[StoredModule]
    parents: list[Parent]
    recipe: dict[str, Any] | None  # how a combined version was made (see loramgr.merge.recipes)
    #: PEFT's init_lora_weights when it names a method (pissa, olora, corda, loftq, eva...)
    init_method: str | None = None
    #: saved modules, trained biases, lora_bias and token rows (loramgr.adapter.ExtraTensor.to_dict);
    #: None for a version stored before loramgr read them
    extras: list[dict[str, Any]] | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}=={self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["source_details"] = self.source_details.to_dict()
        return data


@dataclass
class VersionRow:
    """One line of ``loramgr list``."""

    name: str
    version: str
    digest: str
    format: str
    adapter_type: str
    rank: int | None
    alpha: float | None
    n_modules: int
    size: int
    base_model: str | None
    tags: list[str]
    installed_at: str

    def to_dict(self) -> dict[str, Any]:
        # asdict would copy every field recursively: ten times slower for the 100,000 rows of a big list
        return {"name": self.name, "version": self.version, "digest": self.digest, "format": self.format,
                "adapter_type": self.adapter_type, "rank": self.rank, "alpha": self.alpha,
                "n_modules": self.n_modules, "size": self.size, "base_model": self.base_model,
                "tags": list(self.tags), "installed_at": self.installed_at}


@dataclass(slots=True)
class PlanItem:
    what: str  # "version" | "blob" | "manifest" | "temp"
    label: str
    size: int
    path: Path | None = None


@dataclass
class Plan:
    """What a destructive command will do; printed as is with --dry-run."""

    action: str
    items: list[PlanItem] = field(default_factory=list)
    version_ids: list[int] = field(default_factory=list)
    #: remove: per removed version, the versions that stay and record it as a parent in their lineage
    dependents: dict[str, list[str]] = field(default_factory=dict)

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.items if i.what != "version")

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "items": [{"what": i.what, "label": i.label, "size": i.size} for i in self.items],
            "bytes": self.freed,
            **({"dependents": self.dependents} if self.dependents else {}),
        }


@dataclass
class VerifyProblem:
    digest: str
    problem: str  # "missing" | "corrupt"
    used_by: list[str]  # name==version references


@dataclass
class VerifyReport:
    checked: int
    problems: list[VerifyProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "problems": [asdict(p) for p in self.problems]}
