"""Recipes: the TOML record of how a combined adapter was made, enough to make it again bit for bit.

```toml
[merge]
method = "svd"
rank = 16
seed = 0

[[sources]]
ref = "sql-assistant==1.0.0"
digest = "sha256:4f11..."
weight = 0.7

[output]
name = "sql-chat"
version = "1.0.0"
```
``loramgr show REF --recipe`` writes one; ``loramgr combine --recipe FILE`` reads it. Sources are
checked by digest, so a recipe never silently runs on other bytes than it recorded.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidReferenceError, MergeError


@dataclass
class RecipeSource:
    ref: str
    weight: float
    digest: str | None = None


@dataclass
class Recipe:
    sources: list[RecipeSource]
    merge: dict[str, Any] = field(default_factory=dict)  # MergeOptions fields, without weights
    output: dict[str, Any] = field(default_factory=dict)  # name, version
    loramgr_version: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSON stored in the registry's recipe column."""
        return {
            "method": self.merge.get("method"),
            "options": dict(self.merge),
            "sources": [{"ref": s.ref, "digest": s.digest, "weight": s.weight} for s in self.sources],
            "output": dict(self.output),
            "loramgr_version": self.loramgr_version,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Recipe:
        return cls(
            sources=[RecipeSource(s["ref"], float(s["weight"]), s.get("digest")) for s in record.get("sources", [])],
            merge=dict(record.get("options") or {}),
            output=dict(record.get("output") or {}),
            loramgr_version=record.get("loramgr_version"),
        )

    def to_toml(self) -> str:
        import tomli_w

        merge = {k: v for k, v in sorted(self.merge.items()) if v is not None and k != "weights"}
        document: dict[str, Any] = {"merge": merge}
        document["sources"] = [
            {k: v for k, v in (("ref", s.ref), ("digest", s.digest), ("weight", s.weight)) if v is not None}
            for s in self.sources
        ]
        if self.output:
            document["output"] = {k: v for k, v in self.output.items() if v is not None}
        header = f"# loramgr recipe (made by loramgr {self.loramgr_version})\n" if self.loramgr_version else ""
        return header + tomli_w.dumps(document)


def recipe_toml(shown: dict[str, Any]) -> str:
    """The recipe of a version as ``Registry.show`` returns it; refuses versions that were not combined."""
    record = shown.get("recipe")
    if not record:
        raise MergeError(
            f"{shown['name']}=={shown['version']} was installed, not combined, so it has no recipe",
            hint="only adapters made by 'loramgr combine' or 'compress' have one",
        )
    recipe = Recipe.from_record(record)
    recipe.output = {"name": shown["name"], "version": shown["version"]}
    return recipe.to_toml()


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidReferenceError(f"{path}: no such recipe file", reference=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidReferenceError(f"{path}: not valid TOML ({exc})", reference=str(path)) from None
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise InvalidReferenceError(
            f"{path}: no [[sources]] entries", reference=str(path), hint="list each source with ref and weight"
        )
    parsed = []
    for i, entry in enumerate(sources):
        if not isinstance(entry, dict) or "ref" not in entry:
            raise InvalidReferenceError(f"{path}: source {i + 1} has no ref", reference=str(path))
        parsed.append(RecipeSource(str(entry["ref"]), float(entry.get("weight", 1.0)), entry.get("digest")))
    merge = data.get("merge") or {}
    if not isinstance(merge, dict) or "method" not in merge:
        raise InvalidReferenceError(f"{path}: [merge] must name a method", reference=str(path))
    return Recipe(parsed, dict(merge), dict(data.get("output") or {}))
