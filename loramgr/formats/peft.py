"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (+ README.md).

Reading validates everything a later operation relies on, and names the file or module at fault:
the config parses and is a LoRA (or PEFT's own LoHa / LoKr, described as PEFT loads them), every
lora_A has its lora_B, ranks and shapes agree with each other and with the config (r, rank_pattern),
and, with ``check_values``, no tensor holds NaN or Inf.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..adapter import AdapterInfo, ModuleSpec
from ..errors import InvalidAdapterError, InvalidConfigFieldError, UnsupportedAdapterError
from ..safetensors_io import SafetensorsHeader, has_surrogate, read_header
from .extras import describe_notes, read_extras
from .initmethods import init_method, init_note
from .moe import parameter_targets, take_parameter_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
PEFT_PREFIX = "base_model.model."
#: the peft_type values read, and the config key of each one's alpha
PEFT_TYPES = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}
#: the tensors each module of a PEFT LoHa / LoKr adapter must have (peft/tuners/loha|lokr/layer.py); LoKr
#: stores each Kronecker factor whole (lokr_w1) or as a low-rank pair (lokr_w1_a, lokr_w1_b)
_LYCORIS_PARTS = {
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
}
_LYCORIS_PAIRS = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b"}

# <module>.lora_A.weight, <module>.lora_embedding_A, <module>.lora_magnitude_vector[.weight], ...
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?P<suffix>\.weight|\.bias)?$"
)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def load_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidAdapterError(
            f"{path}: broken JSON at line {exc.lineno} column {exc.colno} ({exc.msg})",
            path=str(path),
            hint="fix the file or re-save the adapter with PEFT",
        ) from exc
    except UnicodeDecodeError as exc:
        raise InvalidAdapterError(f"{path}: not UTF-8 text", path=str(path)) from exc
    except RecursionError as exc:
        raise InvalidAdapterError(f"{path}: JSON nested too deeply", path=str(path)) from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{path}: expected a JSON object", path=str(path))
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PEFT_TYPES:
        raise UnsupportedAdapterError(
            f"{path}: peft_type is {config.get('peft_type')!r}, not 'LORA' (nor PEFT's own 'LOHA' / 'LOKR')",
            path=str(path),
            adapter_type=peft_type.lower() or None,
            hint="loramgr manages LoRA adapters (peft_type LORA), and stores PEFT's LoHa and LoKr as they are",
        )
    for key in ("r", PEFT_TYPES[peft_type]):
        if config.get(key) is None:
            raise InvalidConfigFieldError(f"{path}: {key} is missing", path=str(path), field=key)
    validate_config(config, str(path), alpha_key=PEFT_TYPES[peft_type])
    return config


#: the largest rank accepted (a rank is a tensor dimension; PEFT would allocate it)
MAX_RANK = 2**31


def validate_config(config: dict[str, Any], where: str, *, alpha_key: str = "lora_alpha") -> None:
    """Check the type and range of every config field loramgr reads, as PEFT's LoraConfig uses them.

    ``where`` names the file (and the metadata key) in the one-line error. Absent fields are fine here:
    the caller decides which ones are required.
    """

    def refuse(field: str, value: object, expected: str) -> InvalidConfigFieldError:
        return InvalidConfigFieldError(f"{where}: {field} must be {expected}, found {_shown(value)}",
                                       path=where, field=field)

    def check(field: str, value: object, ok: bool, expected: str) -> None:
        if not ok:
            raise refuse(field, value, expected)

    for field, value in _strings(config, ""):
        if has_surrogate(value):
            raise InvalidConfigFieldError(f"{where}: {field or 'a key'} holds a lone surrogate (not Unicode text)",
                                          path=where, field=field)
    present = {key: value for key, value in config.items() if value is not None}
    rank_expected = "a positive number (a whole number below 2**31)"
    if "r" in present:
        check("r", present["r"], _positive_int(present["r"]), rank_expected)
    if alpha_key in present:
        check(alpha_key, present[alpha_key], _finite(present[alpha_key]), "a finite number")
    for field, value_ok, expected in (("rank_pattern", _positive_int, rank_expected),
                                      ("alpha_pattern", _finite, "a finite number")):
        patterns = present.get(field, {})
        check(field, patterns, isinstance(patterns, dict), "an object of regex -> number")
        for key, value in patterns.items():
            check(f"{field}[{key!r}]", value, value_ok(value), expected)
            check(f"{field} key", key, _regex(rf"(.*\.)?({key})$"), "a valid regular expression")
    for field in ("target_modules", "exclude_modules"):
        targets = present.get(field, [])
        if isinstance(targets, str):
            check(field, targets, _regex(targets), "a valid regular expression")
        else:
            check(field, targets, isinstance(targets, list) and all(isinstance(t, str) for t in targets),
                  "a regular expression or a list of module names")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "inference_mode"):
        if field in present:
            check(field, present[field], isinstance(present[field], bool), "true or false")
    for field in ("base_model_name_or_path", "revision", "task_type", "init_lora_weights_path"):
        if field in present:
            check(field, present[field], isinstance(present[field], str), "a string")
    if "bias" in present:
        check("bias", present["bias"], present["bias"] in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'")
    if "modules_to_save" in present:
        saved = present["modules_to_save"]
        check("modules_to_save", saved, isinstance(saved, list) and all(isinstance(m, str) for m in saved),
              "a list of module names")
    if "layers_to_transform" in present:
        layers = present["layers_to_transform"]
        items = layers if isinstance(layers, list) else [layers]
        check("layers_to_transform", layers, all(_index(x) for x in items), "a layer index or a list of them")
    if "layers_pattern" in present:
        pattern = present["layers_pattern"]
        items = pattern if isinstance(pattern, list) else [pattern]
        check("layers_pattern", pattern, all(isinstance(x, str) for x in items), "a name or a list of names")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _strings(value: object, field: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield field, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield field, str(key)
            yield from _strings(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{field}[{i}]")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < MAX_RANK


def _index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def read_peft_folder(folder: str | Path, *, weights_file: str = WEIGHTS_NAME) -> AdapterInfo:
    """Read a PEFT adapter folder's metadata from its config and the safetensors header.

    No tensor data is read; :func:`check_tensor_values` does that.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InvalidAdapterError(f"{folder}: no such file or folder", path=str(folder), hint="check the path")
    if not (folder / CONFIG_NAME).is_file():
        raise InvalidAdapterError(
            f"{folder}: no {CONFIG_NAME} in this folder",
            path=str(folder),
            hint="point at a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
        )
    config = load_config(folder)
    weights = folder / weights_file
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise UnsupportedAdapterError(
                f"{folder}: the weights are a pickle ({PICKLE_NAME}), which can run code when loaded",
                path=str(folder / PICKLE_NAME),
                hint="pass --allow-pickle to load it safely (weights only) and store it as safetensors",
            )
        raise InvalidAdapterError(f"{folder}: no {WEIGHTS_NAME} in this folder", path=str(folder))
    header = read_header(weights)
    info = describe(config, header, weights_file)
    refuse_empty_factors(info, header)
    card = folder / CARD_NAME
    if card.is_file():
        info.card = read_card(card)  # before identification: the card's base_model is one of the claims it weighs
    from ..compat.identify import identify_adapter

    identity = identify_adapter(info)
    if identity is not None:
        info.config["base_identity"] = identity.to_dict()
        info.notes.extend(identity.warnings)
    return info


def refuse_empty_factors(info: AdapterInfo, header: SafetensorsHeader) -> None:
    """Refuse a module whose factor has a zero-size dimension: it adapts nothing, and the operations
    that divide by its rank or reshape it would fail on it."""
    for module in info.modules:
        for key in (module.key_a, module.key_b, *module.extra_keys):
            entry = header.tensors.get(key)
            if entry is not None and entry.numel == 0:
                raise InvalidAdapterError(
                    f"{header.path}: module {module.name}: {key} has shape {list(entry.shape)}, with no elements",
                    path=str(header.path), module=module.name, hint="re-save the adapter; a factor cannot be empty")


def describe(config: dict[str, Any], header: SafetensorsHeader, weights_file: str) -> AdapterInfo:
    """Build the AdapterInfo of a PEFT adapter from its config and weights header."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type in ("LOHA", "LOKR"):
        return _describe_lycoris(config, header, weights_file, peft_type.lower())
    path = str(header.path)
    parts: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    other: list[str] = []
    for key, entry in header.tensors.items():
        match = _KEY.match(key)
        if not match or match["suffix"] == ".bias":
            other.append(key)
            continue
        module = match["module"].removeprefix(PEFT_PREFIX)
        parts.setdefault(module, {})[match["part"]] = (key, entry.shape, entry.torch_dtype)

    parameter_specs = take_parameter_targets(config, parts, path, pattern_value=pattern_value)  # MoE experts
    use_rslora = bool(config.get("use_rslora"))
    use_dora = bool(config.get("use_dora"))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: list[ModuleSpec] = []
    for name in sorted(parts):
        found = parts[name]
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_part not in found or b_part not in found:
            have, missing = (a_part, b_part) if a_part in found else (b_part, a_part)
            raise InvalidAdapterError(
                f"{path}: module {name} has {have} but no {missing}",
                path=path,
                module=name,
                hint="the weights file is incomplete; re-save the adapter",
            )
        key_a, shape_a, dtype = found[a_part]
        key_b, shape_b, _ = found[b_part]
        if len(shape_a) < 2 or len(shape_b) < 2:
            raise InvalidAdapterError(
                f"{path}: module {name} has factors of shapes {list(shape_a)} and {list(shape_b)}, not matrices",
                path=path,
                module=name,
            )
        rank = shape_a[0]
        if shape_b[1] != rank or any(d != 1 for d in shape_b[2:]):
            raise InvalidAdapterError(
                f"{path}: module {name}: {a_part} {list(shape_a)} and {b_part} {list(shape_b)} disagree on the rank",
                path=path,
                module=name,
                hint="the factors must be A: r x in and B: out x r",
            )
        configured = int(pattern_value(rank_pattern, name, config["r"]))
        if configured != rank:
            raise InvalidAdapterError(
                f"{path}: module {name} has rank {rank} but the config says r={configured}",
                path=path,
                module=name,
                hint="fix r / rank_pattern in adapter_config.json to match the weights",
            )
        in_features = 1
        for d in shape_a[1:]:
            in_features *= d
        kind = "embedding" if embedding else ("conv" if len(shape_a) > 2 else "linear")
        extra = tuple(found[p][0] for p in ("lora_magnitude_vector",) if p in found)
        modules.append(
            ModuleSpec(
                name=name,
                rank=rank,
                alpha=float(pattern_value(alpha_pattern, name, config["lora_alpha"])),
                in_features=in_features,
                out_features=shape_b[0],
                key_a=key_a,
                key_b=key_b,
                dtype=dtype,
                kind=kind,
                use_rslora=use_rslora,
                kernel=tuple(shape_a) if kind == "conv" else None,
                extra_keys=extra,
            )
        )
    if not modules and not parameter_specs:
        raise InvalidAdapterError(
            f"{path}: no LoRA tensors (lora_A / lora_B) in the weights file",
            path=path,
            hint="is this a PEFT LoRA adapter?",
        )

    modules, extras, other = read_extras(config, header, modules, other)
    notes, target_list, leaves = _target_notes(config, modules, other)
    notes += describe_notes(modules, extras)
    if use_dora and not any(m.extra_keys for m in modules):
        notes.append("use_dora is set but no lora_magnitude_vector tensors were found")
    modules += parameter_specs
    target_list += parameter_targets(config)
    leaves = sorted({*leaves, *(m.name.rsplit(".", 1)[-1] for m in parameter_specs)})
    notes += filter(None, [init_note(init_method(config))])

    info = _peft_info(config, header, weights_file, adapter_type="dora" if use_dora else "lora", modules=modules,
                      alpha=float(config["lora_alpha"]), use_rslora=use_rslora, use_dora=use_dora, notes=notes,
                      targets=(target_list, leaves))
    info.init_method = init_method(config)
    info.extras = extras
    return info


def _peft_info(config: dict[str, Any], header: SafetensorsHeader, weights_file: str, *, adapter_type: str,
               modules: list[ModuleSpec], alpha: float, notes: list[str], targets: tuple[list[str], list[str]],
               use_rslora: bool = False, use_dora: bool = False) -> AdapterInfo:
    """The AdapterInfo of a PEFT folder of any type: what its config declares and its header holds."""
    return AdapterInfo(
        format="peft",
        adapter_type=adapter_type,
        modules=modules,
        weights_file=weights_file,
        config=config,
        rank=int(config["r"]),
        alpha=alpha,
        use_rslora=use_rslora,
        use_dora=use_dora,
        target_modules=targets[0],
        target_modules_found=targets[1],
        base_model=config.get("base_model_name_or_path"),
        base_model_revision=config.get("revision"),
        task_type=config.get("task_type"),
        dtypes=sorted({e.torch_dtype for e in header.tensors.values()}),
        n_params=sum(e.numel for e in header.tensors.values()),
        file_metadata=header.metadata,
        notes=notes,
    )


def _describe_lycoris(config: dict[str, Any], header: SafetensorsHeader, weights_file: str, kind: str) -> AdapterInfo:
    """A PEFT LoHa / LoKr folder, described as PEFT loads it: per module the rank and alpha of the config
    (``r`` / ``alpha`` with ``rank_pattern`` / ``alpha_pattern``: PEFT scales by alpha / r), every tensor
    kept. Which operations take such an adapter is :func:`~loramgr.formats.lycoris.require_plain_lora`'s say."""
    from .lycoris import SUFFIX_TYPES, describe_module, split_key

    path = str(header.path)
    parts: dict[str, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    other: list[str] = []
    for key, entry in header.tensors.items():
        split = split_key(key)
        if split is None or SUFFIX_TYPES.get(split[1]) != kind:
            other.append(key)
            continue
        module = split[0].removeprefix(PEFT_PREFIX)
        parts.setdefault(module, {})[split[1]] = (key, entry.shape, entry.torch_dtype)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: list[ModuleSpec] = []
    for name in sorted(parts):
        found = parts[name]
        wanted = [*_LYCORIS_PARTS[kind], *((_LYCORIS_PAIRS[p],) for p in found if p in _LYCORIS_PAIRS)]
        missing = [" or ".join(choices) for choices in wanted if not any(c in found for c in choices)]
        if missing:
            raise InvalidAdapterError(f"{path}: module {name} has no {missing[0]}", path=path, module=name,
                                      hint="the weights file is incomplete; re-save the adapter")
        configured = int(pattern_value(rank_pattern, name, config["r"]))
        # the factors that carry the rank: hada_w*_b [r, in], lokr_w*_a [out, r] (a whole LoKr factor has none)
        ranks: dict[str, int] = {p: found[p][1][0] for p in ("hada_w1_b", "hada_w2_b") if p in found}
        ranks |= {p: found[p][1][1] for p in ("lokr_w1_a", "lokr_w2_a") if p in found}
        wrong = next(((p, r) for p, r in ranks.items() if r != configured), None)
        if wrong:
            raise InvalidAdapterError(
                f"{path}: module {name} has {wrong[0]} of rank {wrong[1]} but the config says r={configured}",
                path=path, module=name, hint="fix r / rank_pattern in adapter_config.json to match the weights")
        spec = describe_module(name, kind, found, path=path)
        alpha = float(pattern_value(alpha_pattern, name, config["alpha"]))
        modules.append(replace(spec, rank=configured, alpha=alpha))
    if not modules:
        raise InvalidAdapterError(f"{path}: no {kind} tensors in the weights file", path=path,
                                  hint=f"is this a PEFT {kind.upper()} adapter?")
    notes, target_list, leaves = _target_notes(config, modules, other)
    return _peft_info(config, header, weights_file, adapter_type=kind, modules=modules, alpha=float(config["alpha"]),
                      notes=notes, targets=(target_list, leaves))


def _target_notes(
    config: dict[str, Any], modules: list[ModuleSpec], other: list[str]
) -> tuple[list[str], list[str], list[str]]:
    """(notes on target_modules and stray tensors, target_modules as a list, leaf names in the weights)."""
    notes: list[str] = []
    targets = config.get("target_modules")
    leaves = sorted({m.name.rsplit(".", 1)[-1] for m in modules})
    if isinstance(targets, str):
        target_list = [targets]
        unmatched = [m.name for m in modules if not re.fullmatch(targets, m.name)]
        if unmatched:
            notes.append(
                f"target_modules regex does not match {len(unmatched)} module(s) in the weights, e.g. {unmatched[0]}"
            )
    elif isinstance(targets, list):
        target_list = [str(t) for t in targets]
        def covers(target: str, module: str) -> bool:
            return module == target or module.endswith("." + target)

        uncovered = [m.name for m in modules if not any(covers(t, m.name) for t in target_list)]
        if uncovered:
            notes.append(f"weights hold {len(uncovered)} module(s) not in target_modules, e.g. {uncovered[0]}")
        absent = [t for t in target_list if not any(covers(t, m.name) for m in modules)]
        if absent:
            notes.append(f"target_modules lists {', '.join(absent)} but the weights have no such module")
    else:
        target_list = []
    if other:
        notes.append(f"{len(other)} tensor(s) besides the adapter's factors, e.g. {other[0]}")
    return notes, target_list, leaves


def check_tensor_values(path: str | Path, *, progress: Any = None) -> None:
    """Read every tensor's bytes once (this also proves the data section is readable) and refuse NaN / Inf."""
    from ..safetensors_io import find_non_finite

    path = Path(path)
    try:
        found = find_non_finite(read_header(path), progress)
    except OSError as exc:
        raise InvalidAdapterError(f"{path}: cannot read ({exc.strerror})", path=str(path)) from exc
    if found is not None:
        key, bad = found
        raise InvalidAdapterError(
            f"{path}: tensor {key} contains {bad}",
            path=str(path),
            module=key,
            hint="the training run diverged or the file is corrupt; use another checkpoint",
        )


def convert_pickle(bin_path: str | Path, out_path: str | Path) -> None:
    """Load a pickled state dict safely (tensors only) and write it as safetensors."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise InvalidAdapterError(
            f"{bin_path}: cannot be loaded as a weights-only pickle ({type(exc).__name__})",
            path=str(bin_path),
            hint="it may contain code or be corrupt; re-save the adapter as safetensors",
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidAdapterError(f"{bin_path}: not a state dict of tensors", path=str(bin_path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path), metadata={"format": "pt"})


def read_card(path: Path) -> dict[str, Any]:
    """license / description / tags / base_model from a model card (see :func:`loramgr.hub.modelcard.parse_card`)."""
    from ..hub.modelcard import parse_card

    card = parse_card(path.read_text(encoding="utf-8", errors="replace"))
    return {k: v for k, v in card.items() if v is not None or k in ("license", "description")}


def write_peft_folder(
    folder: str | Path, config: dict[str, Any], tensors: dict[str, Any], *, metadata: dict[str, str] | None = None
) -> Path:
    """Write a new PEFT folder: adapter_config.json and adapter_model.safetensors, deterministically
    (sorted keys).

    The folder is written whole (:func:`loramgr.fileio.atomic_folder`): ``folder`` must not exist or be
    empty, and an error half-way leaves it as it was.
    """
    from ..fileio import atomic_folder
    from ..merge.tensorfile import StoredTensor, safetensors_bytes

    folder = Path(folder)
    with atomic_folder(folder) as staging:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        metadata = metadata or {"format": "pt"}
        if all(isinstance(t, StoredTensor) for t in tensors.values()):  # tensors copied from a file, no torch
            (staging / WEIGHTS_NAME).write_bytes(safetensors_bytes({k: tensors[k] for k in sorted(tensors)}, metadata))
        else:
            from safetensors.torch import save_file

            ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
            save_file(ordered, str(staging / WEIGHTS_NAME), metadata=metadata)
    return folder
