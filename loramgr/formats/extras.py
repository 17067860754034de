"""The parts of a PEFT LoRA adapter that are no low-rank delta, and the guard of the operations that drop them.

PEFT saves more than lora_A / lora_B when its config asks for it (``peft.utils.save_and_load``):

- ``modules_to_save``: every tensor of each such module, whole (``<module>.weight``, ``<module>.bias``);
  loading replaces the module (a classifier, an lm_head) by the trained copy.
- ``bias="all"`` / ``"lora_only"``: the trained biases of the base modules (``<module>.bias``, or
  ``<module>.base_layer.bias`` for a LoRA layer), which replace the base's.
- ``lora_bias=True``: ``<module>.lora_B.bias``; the layer's output gains scale · bias, as its weight gains
  scale · B · A.
- ``trainable_token_indices``: ``<embedding>.token_adapter.trainable_tokens_delta``, the new values of
  the listed rows of an embedding (PEFT's TrainableTokens writes them with ``index_copy``: despite the
  name, not a difference).

:func:`read_extras` turns those keys into :class:`~loramgr.adapter.ExtraTensor` entries (LoRA biases
into ``ModuleSpec.key_bias``), so install records them and ``show`` reports them; the model operations
(:mod:`loramgr.model.extras`) apply them exactly as PEFT does. :func:`refuse_extras` is the guard of
every operation that cannot carry them exactly (combine, compress, export to kohya or diffusers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..adapter import AdapterInfo, ExtraTensor, ModuleSpec
from ..errors import InvalidAdapterError, InvalidConfigFieldError, UnsupportedFeatureError
from ..safetensors_io import SafetensorsHeader

PEFT_PREFIX = "base_model.model."
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
LORA_BIAS_SUFFIX = ".lora_B.bias"
_WRAPPER_PARTS = ("modules_to_save.", "original_module.")
#: what each feature is called in messages: the config field that asks for it
FEATURE_NAMES = {
    "modules_to_save": "modules_to_save",
    "bias": "trained bias",
    "lora_bias": "lora_bias",
    "trainable_tokens": "trainable_token_indices",
}


def read_extras(
    config: dict[str, Any], header: SafetensorsHeader, modules: list[ModuleSpec], other: list[str]
) -> tuple[list[ModuleSpec], list[ExtraTensor], list[str]]:
    """(modules with their LoRA bias keys, the extra tensors, the keys still unaccounted for).

    ``other`` are the header's keys that are no LoRA factor. A key counts as a feature's only when the
    config asks for that feature, as PEFT only loads it then; the rest stay ``other`` (noted at install).
    """
    path = str(header.path)
    by_name = {m.name: m for m in modules}
    saved_names = _modules_to_save(config, path)
    tokens = _token_indices(config, path)
    bias_mode = config.get("bias") or "none"
    extras: list[ExtraTensor] = []
    saved: dict[tuple[str, str], ExtraTensor] = {}
    bias_keys: dict[str, str] = {}
    left: list[str] = []
    for key in other:
        name = key.removeprefix(PEFT_PREFIX)
        shape = tuple(header.tensors[key].shape)
        if config.get("lora_bias") and name.endswith(LORA_BIAS_SUFFIX) and name[: -len(LORA_BIAS_SUFFIX)] in by_name:
            module = by_name[name[: -len(LORA_BIAS_SUFFIX)]]
            if shape != (module.out_features,):
                raise InvalidAdapterError(
                    f"{path}: module {module.name}: {key} has shape {list(shape)}, not [{module.out_features}]",
                    path=path, module=module.name, hint="the weights file is damaged; re-save the adapter")
            bias_keys[module.name] = key
            continue
        if tokens is not None and name.endswith(TOKENS_SUFFIX):
            module_name = name[: -len(TOKENS_SUFFIX)]
            indices = _indices_for(tokens, module_name)
            if indices is not None:
                if len(shape) != 2 or shape[0] != len(indices):
                    raise InvalidAdapterError(
                        f"{path}: {key} has shape {list(shape)}, but trainable_token_indices lists "
                        f"{len(indices)} token(s) for {module_name}", path=path, module=module_name,
                        hint="the weights file and adapter_config.json disagree; re-save the adapter")
                extras.append(ExtraTensor("trainable_tokens", module_name, "weight", key, shape, indices))
                continue
        owner = _saved_module(name, saved_names)
        if owner is not None:
            # bias="all" also saves the wrapper's own names: <module>.modules_to_save.bias (the trained copy's
            # bias again) and <module>.original_module.bias (the original's, unused once the module is saved)
            param = name[len(owner) + 1 :]
            if not param.startswith(_WRAPPER_PARTS):
                saved[(owner, param)] = ExtraTensor("modules_to_save", owner, param, key, shape)
            elif param.startswith("modules_to_save."):
                param = param.removeprefix("modules_to_save.")
                saved.setdefault((owner, param), ExtraTensor("modules_to_save", owner, param, key, shape))
            continue
        if bias_mode != "none" and name.endswith(".bias") and ".lora_" not in name:
            module_name = name[: -len(".bias")].removesuffix(".base_layer")
            if bias_mode == "all" or module_name in by_name:
                extras.append(ExtraTensor("bias", module_name, "bias", key, shape))
                continue
        left.append(key)
    extras += saved.values()
    with_bias = [replace(m, key_bias=bias_keys[m.name]) if m.name in bias_keys else m for m in modules]
    return with_bias, sorted(extras, key=lambda e: (e.feature, e.module, e.param)), left


def _modules_to_save(config: dict[str, Any], path: str) -> list[str]:
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise InvalidConfigFieldError(f"{path}: modules_to_save must be a list of module names, found {saved!r}",
                                      path=path, field="modules_to_save")
    return saved


def _saved_module(name: str, saved_names: list[str]) -> str | None:
    """The module of a saved tensor: the outermost module path that ends with a modules_to_save entry,
    as PEFT wraps the first module it meets whose name ends with one (``key.endswith(target)``)."""
    if not saved_names:
        return None
    parts = name.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[:i])
        if any(candidate.endswith(target) for target in saved_names):
            return candidate
    return None


def _token_indices(config: dict[str, Any], path: str) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` checked: a list of row indices (the input embedding's) or an object
    of module name -> list of row indices."""
    value = config.get("trainable_token_indices")
    if value is None:
        return None

    def rows(items: object) -> bool:
        return isinstance(items, list) and bool(items) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items) and len(set(items)) == len(items)

    if isinstance(value, dict) and all(isinstance(k, str) and rows(v) for k, v in value.items()):
        return value
    if rows(value):
        return value  # type: ignore[no-any-return]
    raise InvalidConfigFieldError(
        f"{path}: trainable_token_indices must be a list of distinct token indices, or an object of module name "
        f"-> such a list, found {value!r}"[:300], path=path, field="trainable_token_indices")


def _indices_for(tokens: list[int] | dict[str, list[int]], module: str) -> tuple[int, ...] | None:
    """The rows of ``module``: a list is the input embedding's; an object's keys end module names, as
    PEFT matches them (``key.endswith(target)``)."""
    if isinstance(tokens, list):
        return tuple(tokens)
    return next((tuple(indices) for target, indices in tokens.items() if module.endswith(target)), None)


def describe_notes(modules: Iterable[ModuleSpec], extras: list[ExtraTensor]) -> list[str]:
    """One line per feature, for ``show``: what the adapter replaces besides its low-rank deltas."""
    notes: list[str] = []
    saved = sorted({e.module for e in extras if e.feature == "modules_to_save"})
    if saved:
        notes.append(f"saves whole modules (modules_to_save): {', '.join(saved)}")
    biases = [e.module for e in extras if e.feature == "bias"]
    if biases:
        notes.append(f"trained biases of {len(biases)} module(s), e.g. {biases[0]}")
    lora_biases = [m.name for m in modules if m.key_bias]
    if lora_biases:
        notes.append(f"LoRA biases (lora_bias) on {len(lora_biases)} module(s)")
    for e in extras:
        if e.feature == "trainable_tokens" and e.indices is not None:
            shown = ", ".join(map(str, e.indices[:8])) + (", ..." if len(e.indices) > 8 else "")
            notes.append(f"trainable tokens of {e.module}: {len(e.indices)} row(s) ({shown})")
    return notes


# ---------------------------------------------------------------------------------------------------
# the guard


def features(info: AdapterInfo) -> list[tuple[str, str]]:
    """(feature, module) for every part of ``info`` that is no low-rank delta, empty for a plain LoRA.

    A record stored before loramgr read these parts (``extras`` None) is judged by what its config asks for.
    """
    found: list[tuple[str, str]] = []
    if info.extras is None:
        config = info.config
        found += [("modules_to_save", m) for m in (config.get("modules_to_save") or [])]
        if (config.get("bias") or "none") != "none":
            found.append(("bias", f"bias={config['bias']}"))
        if config.get("lora_bias"):
            found.append(("lora_bias", "its LoRA modules"))
        tokens = config.get("trainable_token_indices")
        if tokens:
            found += [("trainable_tokens", m) for m in (tokens if isinstance(tokens, dict) else ["the embedding"])]
        return found
    seen: set[tuple[str, str]] = set()
    for e in info.extras:
        if (e.feature, e.module) not in seen:
            seen.add((e.feature, e.module))
            found.append((e.feature, e.module))
    found += [("lora_bias", m.name) for m in info.modules if m.key_bias]
    return found


def refuse_extras(adapters: Iterable[Any], operation: str) -> None:
    """Refuse ``operation`` for any adapter (a LoraAdapter, or an AdapterInfo) with parts besides its
    low-rank deltas: one line naming the adapter, the feature and the module.

    Combine and compress sum or re-rank deltas, and kohya / diffusers files hold nothing else: a saved
    module, a trained bias or a token row would be dropped, or (two adapters saving one lm_head) one of
    them would have to win, which only the user can say.
    """
    found: list[tuple[str, str, str]] = []  # (feature, module, adapter label)
    for adapter in adapters:
        info: AdapterInfo = getattr(adapter, "info", adapter)
        label = getattr(adapter, "label", None) or "the adapter"
        found += [(feature, module, label) for feature, module in features(info)]
    if not found:
        return
    found.sort(key=lambda f: _ORDER.index(f[0]))  # the most visible part first: a saved module
    feature, module, label = found[0]
    both = sorted({f[2] for f in found if f[:2] == (feature, module)})
    hint = "apply, fuse or export --format peft keep it; or re-train the adapter without it"
    if len(both) > 1:
        raise UnsupportedFeatureError(
            f"{operation} is not possible: {' and '.join(both)} both have {FEATURE_NAMES[feature]} {module}, and "
            f"{operation} cannot tell which one wins", feature=feature, module=module, path=both[0], hint=hint)
    others = len({(f[0], f[1]) for f in found}) - 1
    more = f" (and {others} more)" if others else ""
    raise UnsupportedFeatureError(
        f"{operation} is not possible for {label}: {module} has {FEATURE_NAMES[feature]}{more}, which "
        f"{operation} cannot carry exactly", feature=feature, module=module, path=label, hint=hint)


_ORDER = ("modules_to_save", "trainable_tokens", "lora_bias", "bias")


# ---------------------------------------------------------------------------------------------------
# against a base model's checkpoint (loramgr check)


def base_findings(info: AdapterInfo, label: str, tensors: dict[str, tuple[tuple[int, ...], str]]) -> list[Any]:
    """Errors of ``loramgr check`` for the extras that PEFT would fail to load into the base whose checkpoint
    holds ``tensors`` (name -> (shape, dtype)): a saved module or bias of another shape (a classifier for
    another number of labels), token rows beyond the embedding or of another width, a LoRA bias on a
    layer without bias. A tensor the checkpoint lacks is not judged (a tied lm_head is not stored)."""
    from ..compat.findings import Finding
    from ..compat.names import ModuleIndex

    extras = info.extras or []
    lora_biases = [m for m in info.modules if m.key_bias]
    if not extras and not lora_biases:
        return []
    index = ModuleIndex({key.rsplit(".", 1)[0] for key in tensors if "." in key})
    findings: list[Any] = []

    def base_path(module: str) -> str | None:
        found = index.candidates(module)
        return found[0] if len(found) == 1 else None

    for e in extras:
        path = base_path(e.module)
        entry = tensors.get(f"{path}.{e.param}") if path else None
        if entry is None:
            continue
        shape = tuple(entry[0])
        what = f"{FEATURE_NAMES[e.feature]} {e.module}.{e.param}"
        if e.feature == "trainable_tokens":
            last = max(e.indices or (0,))
            if len(shape) != 2 or shape[1] != e.shape[1] or last >= shape[0]:
                findings.append(Finding("error", "shape", label, e.module,
                                        f"{what}: rows up to {last} of width {e.shape[1]}, the base has {list(shape)}"))
        elif shape != e.shape:
            findings.append(Finding("error", "shape", label, e.module,
                                    f"{what} is {list(e.shape)}, the base has {list(shape)}"))
    for m in lora_biases:
        path = base_path(m.name)
        if path and f"{path}.weight" in tensors and f"{path}.bias" not in tensors:
            findings.append(Finding("error", "missing-module", label, m.name,
                                    f"the adapter has a LoRA bias (lora_bias), the base's {path} has no bias"))
    return findings
