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

The ``[merge]`` table records the options as applied, the ``space`` of an element-wise method and the
global ``scale`` included. A recipe written before merges had a space has no ``space`` key: its
element-wise method ran on the dense deltas, so it is read as ``space = "full"`` and makes the same
bytes again (:func:`recipe_options`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRecipeError, MissingRecipeError
from .methods import METHODS
from .options import MergeOptions

if TYPE_CHECKING:
    from ..registry import VersionDetails


@dataclass(frozen=True)
class RecipeSource:
    """One source of a merge: how it was referred to, its weight, and the digest it resolved to."""

    ref: str  # a reference (``name==version``), or the label of an adapter given as a folder or file
    weight: float
    digest: str | None = None


@dataclass(frozen=True)
class RecipeOutput:
    """Where a merge result was registered (or is to be)."""

    name: str | None = None
    version: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("name", self.name), ("version", self.version)) if v is not None}


@dataclass(frozen=True)
class Recipe:
    """The provenance of a merged adapter: its sources (by reference and digest, with their weights),
    the options as applied, and where it went. Enough to make the same bytes again."""

    sources: tuple[RecipeSource, ...]
    options: MergeOptions  # as applied; its weights are always the sources' weights
    output: RecipeOutput = field(default_factory=RecipeOutput)
    loramgr_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        weights = tuple(float(s.weight) for s in self.sources)
        if self.options.weights != weights:
            object.__setattr__(self, "options", replace(self.options, weights=weights))

    @property
    def method(self) -> str:
        return self.options.method

    def merge_table(self) -> dict[str, Any]:
        """The options without the weights (each source carries its own), as stored and written."""
        return {k: v for k, v in self.options.to_dict().items() if k != "weights"}

    def to_record(self) -> dict[str, Any]:
        """The JSON stored in the registry's recipe column."""
        return {
            "method": self.method,
            "options": self.merge_table(),
            "sources": [{"ref": s.ref, "digest": s.digest, "weight": s.weight} for s in self.sources],
            "output": self.output.to_dict(),
            "loramgr_version": self.loramgr_version,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Recipe:
        output = record.get("output") or {}
        return cls(
            sources=tuple(
                RecipeSource(s["ref"], float(s["weight"]), s.get("digest")) for s in record.get("sources", [])
            ),
            options=recipe_options(dict(record.get("options") or {})),
            output=RecipeOutput(output.get("name"), output.get("version")),
            loramgr_version=record.get("loramgr_version"),
        )

    def to_toml(self) -> str:
        import tomli_w

        document: dict[str, Any] = {"merge": dict(sorted(self.merge_table().items()))}
        document["sources"] = [
            {k: v for k, v in (("ref", s.ref), ("digest", s.digest), ("weight", s.weight)) if v is not None}
            for s in self.sources
        ]
        if self.output.to_dict():
            document["output"] = self.output.to_dict()
        header = f"# loramgr recipe (made by loramgr {self.loramgr_version})\n" if self.loramgr_version else ""
        return header + tomli_w.dumps(document)


def recipe_options(table: dict[str, Any]) -> MergeOptions:
    """A recipe's ``[merge]`` table as options. Without a ``space`` key the recipe predates spaces, when
    every element-wise method ran in full space: a method that has a full space gets ``space = "full"``."""
    name = table.get("method")
    method = METHODS.get(name) if isinstance(name, str) else None
    if "space" not in table and method is not None and "full" in method.spaces:
        table = {**table, "space": "full"}
    return MergeOptions.from_dict(table)


def recipe_toml(details: VersionDetails) -> str:
    """The recipe of a version as ``Registry.show`` describes it; refuses versions that were not combined."""
    if not details.recipe:
        raise MissingRecipeError(
            f"{details.ref} was installed, not combined, so it has no recipe",
            hint="only adapters made by 'loramgr combine' or 'compress' have one",
        )
    recipe = replace(Recipe.from_record(details.recipe), output=RecipeOutput(details.name, details.version))
    return recipe.to_toml()


def load_recipe(path: str | Path) -> Recipe:
    """A recipe TOML file (as ``loramgr show REF --recipe`` writes it)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRecipeError(f"{path}: no such recipe file", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRecipeError(f"{path}: not valid TOML ({exc})", path=str(path)) from None
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise InvalidRecipeError(f"{path}: no [[sources]] entries", path=str(path),
                                 hint="list each source with ref and weight")
    parsed = []
    for i, entry in enumerate(sources):
        if not isinstance(entry, dict) or "ref" not in entry:
            raise InvalidRecipeError(f"{path}: source {i + 1} has no ref", path=str(path))
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise InvalidRecipeError(f"{path}: source {i + 1} has weight {weight!r}, not a number", path=str(path))
        parsed.append(RecipeSource(str(entry["ref"]), float(weight), entry.get("digest")))
    merge = data.get("merge") or {}
    if not isinstance(merge, dict) or "method" not in merge:
        raise InvalidRecipeError(f"{path}: [merge] must name a method", path=str(path))
    output = data.get("output") or {}
    name, version = output.get("name"), output.get("version")
    return Recipe(
        sources=tuple(parsed),
        options=recipe_options(merge),
        output=RecipeOutput(str(name) if name is not None else None, str(version) if version is not None else None),
    )
