"""Which module of a model an adapter's module name means: the one resolver behind check, fuse and apply.

Adapters name their modules in three ways: a module path as PEFT saves it (stored without PEFT's
``base_model.model.``), a diffusers path under a pipeline component (``unet.down_blocks.0...``), or a
kohya name (``lora_unet_down_blocks_0_...``: a prefix standing for a pipeline component, then the path
with "." replaced by "_"). A model offers module paths: a live model's ``named_modules()``, or the
weight-bearing modules of a base fingerprint. :class:`ModuleIndex` maps the first onto the second with
the same rules for both, so ``loramgr check`` and ``fuse`` / ``apply`` reach the same verdict.

PEFT loads a module only under its exact path. loramgr relaxes that for one difference only: wrapper
levels that one side has and the other lacks.

- A path matches the model path equal to it; else the model paths that end with it (the model adds
  wrapper levels: an adapter made on ``LlamaModel`` in a ``LlamaForCausalLM``, any model inside a
  ``PeftModel``); else the longest tail of it that the model has, dropping leading components that are
  not a layer index (the adapter has wrapper levels the model lacks; dropping a layer index would move
  the adapter to another layer). Never both at once: that replaces a level (``decoder.layers.0.q_proj``
  for ``model.layers.0.q_proj``) and names another model, which PEFT would not load.
- A kohya name matches the paths whose "_" form, taken from the root of a component its prefix stands
  for (or from the root of a bare model), equals it: how kohya's and diffusers' loaders build these
  names. Only if none does, the same with wrapper levels of the model skipped (a ``PeftModel``'s
  ``base_model.model.``); a skipped level is never a layer index or a pipeline component.
- A kohya name of a CLIP text encoder that matches nothing is tried in the other transformers layout:
  sd-scripts names ``lora_te_text_model_encoder_layers_0_...`` (transformers 4), while transformers 5's
  CLIPTextModel has no ``text_model`` level, so the same file must fit a base saved by either.
- More than one match is an error ("ambiguous"), never a guess; so is a model path that two adapter
  modules resolve to ("duplicate").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..formats.kohya import CLIP_LEAVES, COMPONENT_PREFIXES, PREFIX_COMPONENTS, kohya_prefix
from ..formats.peft import PEFT_PREFIX

#: a kohya name with no component prefix, only "lora_", names a module of a bare model
_BARE_PREFIX = "lora_"


@dataclass(frozen=True)
class Unresolved:
    """An adapter module name that resolves to no single model module."""

    module: str
    problem: str  # "missing" | "ambiguous" | "duplicate"
    detail: str

    def __str__(self) -> str:
        return f"{self.module}: {self.detail}"


class ModuleIndex:
    """The module paths of one model, indexed for resolving adapter module names against them."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = frozenset(p for p in paths if p)
        # "a.b.c" -> ["x.a.b.c", ...]: model paths with wrapper levels in front of a name
        self._tails: dict[str, list[str]] = {}
        for path in self.paths:
            parts = path.split(".")
            for i in range(1, len(parts)):
                self._tails.setdefault(".".join(parts[i:]), []).append(path)
        self._kohya: list[dict[tuple[str, str], set[str]]] | None = None

    def candidates(self, name: str) -> list[str]:
        """The model paths ``name`` may mean, sorted: none (missing), one, or several (ambiguous)."""
        stripped = name.removeprefix(PEFT_PREFIX)
        for exact in (name, stripped):
            if exact in self.paths:
                return [exact]
        prefix = kohya_prefix(stripped) or (_BARE_PREFIX if stripped.startswith(_BARE_PREFIX) else None)
        if prefix is not None and "." not in stripped:
            components = PREFIX_COMPONENTS.get(prefix, ())
            rest = stripped[len(prefix) :]
            found = self._kohya_candidates(rest, components)
            other = _other_clip_layout(prefix, rest)
            return found or (self._kohya_candidates(other, components) if other else [])
        if stripped in self._tails:
            return sorted(self._tails[stripped])
        parts = stripped.split(".")
        for i in range(1, len(parts)):
            if parts[i - 1].isdigit():
                break
            tail = ".".join(parts[i:])
            if tail in self.paths:
                return [tail]
        return []

    def resolve(self, names: Iterable[str], *, where: str = "the model") -> tuple[dict[str, str], list[Unresolved]]:
        """Adapter module name -> model path for every name that resolves; the others as problems.

        ``where`` names the model in the problems' text ("the model", "base llama-3-8b").
        """
        mapping: dict[str, str] = {}
        problems: list[Unresolved] = []
        for name in names:
            found = self.candidates(name)
            if len(found) == 1:
                mapping[name] = found[0]
            elif found:
                shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
                problems.append(Unresolved(name, "ambiguous", f"matches {len(found)} modules of {where} ({shown})"))
            else:
                problems.append(Unresolved(name, "missing", f"no such module in {where}"))
        seen: dict[str, str] = {}
        for name, path in mapping.items():
            if path in seen:
                problems.append(Unresolved(name, "duplicate", f"resolves to {path}, as does {seen[path]}"))
            seen[path] = name
        return mapping, problems

    def _kohya_candidates(self, rest: str, components: tuple[str, ...]) -> list[str]:
        if self._kohya is None:
            self._kohya = self._kohya_index()
        for level in self._kohya:  # the model's own paths first, then with wrapper levels skipped
            found: set[str] = set()
            for component in components:
                found |= level.get((component, rest), set())
            if not found:
                found = level.get(("", rest), set())
            if found:
                return sorted(found)
        return []

    def _kohya_index(self) -> list[dict[tuple[str, str], set[str]]]:
        """(component or "", "_" form of the path below it) -> paths; without and with wrapper levels."""
        own: dict[tuple[str, str], set[str]] = {}
        wrapped: dict[tuple[str, str], set[str]] = {}
        for path in self.paths:
            parts = path.split(".")
            for i in range(len(parts)):
                skipped = parts[:i]
                if any(p.isdigit() or p in COMPONENT_PREFIXES for p in skipped):
                    break
                index = wrapped if skipped else own
                rest = parts[i:]
                if rest[0] in COMPONENT_PREFIXES and len(rest) > 1:
                    index.setdefault((rest[0], "_".join(rest[1:])), set()).add(path)
                index.setdefault(("", "_".join(rest)), set()).add(path)
        return [own, wrapped]


def _other_clip_layout(prefix: str, rest: str) -> str | None:
    """The "_" form of a CLIP text-encoder path in the other transformers layout (``text_model`` removed or
    added), or None when ``rest`` is no CLIP text-encoder path."""
    if not prefix.startswith("lora_te"):
        return None
    if rest.startswith("text_model_"):
        return rest[len("text_model_") :]
    if rest.startswith(CLIP_LEAVES):
        return "text_model_" + rest
    return None
