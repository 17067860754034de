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


@dataclass
class InstallResult:
    name: str
    version: str
    digest: str
    created: bool  # False: these exact bytes were already installed under this name
    size: int
    notes: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}=={self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        return asdict(self)


@dataclass
class PlanItem:
    what: str  # "version" | "blob" | "temp"
    label: str
    size: int
    path: Path | None = None


@dataclass
class Plan:
    """What a destructive command will do; printed as is with --dry-run."""

    action: str
    items: list[PlanItem] = field(default_factory=list)
    version_ids: list[int] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.items if i.what != "version")

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "items": [{"what": i.what, "label": i.label, "size": i.size} for i in self.items],
            "bytes": self.freed,
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
