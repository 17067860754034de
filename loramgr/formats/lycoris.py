"""Adapter types recognised by their tensor keys (LyCORIS and relatives), and the plain-LoRA guard.

kohya-style files carry more than LoRA: LyCORIS writes LoHa, LoKr, full diffs, IA3, GLoRA, OFT/BOFT,
DoRA and Tucker-decomposed LoCon under the same ``lora_unet_...`` names, told apart only by the tensor
suffixes. loramgr installs them faithfully (every tensor kept, the type recorded) but only plain LoRA
is a sum of low-rank deltas ΔW = s·B·A that can be concatenated, re-ranked or converted: IA3, GLoRA,
OFT and DoRA depend on the base weights (DoRA is even non-linear), LoHa/LoKr are Hadamard/Kronecker
products. Operations call :func:`require_plain_lora` so they refuse instead of silently producing a
wrong adapter (diffusers, for instance, drops ``dora_scale`` and loads a DoRA file as plain LoRA).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..adapter import AdapterInfo, ModuleSpec
from ..errors import InvalidAdapterError, UnsupportedAdapterError

#: tensor suffix (after "<module>.") -> the adapter type it marks; "lora" suffixes are plain LoRA parts
SUFFIX_TYPES: dict[str, str] = {
    "lora_down.weight": "lora",
    "lora_up.weight": "lora",
    "alpha": "lora",
    "lora_mid.weight": "lora_tucker",
    "dora_scale": "dora",
    "hada_w1_a": "loha",
    "hada_w1_b": "loha",
    "hada_w2_a": "loha",
    "hada_w2_b": "loha",
    "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr",
    "lokr_w1_a": "lokr",
    "lokr_w1_b": "lokr",
    "lokr_w2": "lokr",
    "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr",
    "lokr_t2": "lokr",
    "diff": "full",
    "diff_b": "full",
    "on_input": "ia3",
    "a1.weight": "glora",
    "a2.weight": "glora",
    "b1.weight": "glora",
    "b2.weight": "glora",
    "bm.weight": "glora",
    "oft_blocks": "oft",
    "oft_diag": "oft",
    "rescale": "oft",
}

#: human names used in messages
TYPE_NAMES = {
    "lora": "LoRA",
    "dora": "DoRA",
    "loha": "LoHa",
    "lokr": "LoKr",
    "full": "full (diff) fine-tune",
    "ia3": "IA3",
    "glora": "GLoRA",
    "oft": "OFT",
    "boft": "BOFT",
    "lora_tucker": "Tucker LoCon (lora_mid)",
}

# when a file mixes markers, the type that constrains operations most wins
_PRIORITY = ("dora", "oft", "glora", "ia3", "lokr", "loha", "full", "lora_tucker", "lora")


def split_key(key: str) -> tuple[str, str] | None:
    """Split a kohya/LyCORIS tensor key into (module name, known suffix), or None if unknown."""
    for suffix in sorted(SUFFIX_TYPES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    # IA3 stores its vector as "<module>.weight" next to "<module>.on_input"
    if key.endswith(".weight"):
        return key[: -len(".weight")], "weight"
    return None


def detect_adapter_type(keys: Iterable[str], shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """The adapter type (one of ADAPTER_TYPES) that a set of kohya-style tensor keys describes.

    PEFT's ``lora_magnitude_vector`` also means DoRA. BOFT is LyCORIS' OFT with 4-D ``oft_blocks``
    (butterfly factors), so ``shapes`` is needed to tell it from diagonal OFT.
    """
    found: set[str] = set()
    for key in keys:
        if "lora_magnitude_vector" in key:
            found.add("dora")
            continue
        parts = split_key(key)
        if parts is None:
            continue
        suffix = parts[1]
        kind = SUFFIX_TYPES.get(suffix)
        if kind == "oft" and suffix == "oft_blocks" and shapes and len(shapes.get(key, ())) == 4:
            kind = "boft"
        if kind:
            found.add(kind)
    if "boft" in found:
        return "boft"
    for kind in _PRIORITY:
        if kind in found:
            return kind
    return "lora"


def require_plain_lora(info: AdapterInfo, operation: str, *, label: str | None = None) -> None:
    """Refuse ``operation`` ("fuse", "combine", "conversion from kohya to peft", ...) for anything but plain LoRA.

    The one guard every operation that adds, sums or converts deltas runs first. Raises
    UnsupportedAdapterError in one line naming the adapter type and the operation, because treating
    those adapters as B·A products gives a silently wrong model; a plain LoRA whose factors are not a
    delta on the original base's weights (an unconverted PiSSA-style init, LoRA on MoE
    target_parameters) is refused by :func:`loramgr.formats.initmethods.require_plain_delta`, with its
    fix. ``label`` names the adapter.
    """
    extra = next((k for m in info.modules for k in m.extra_keys), None)
    if info.adapter_type == "lora" and not info.use_dora and extra is None:
        from .initmethods import require_plain_delta

        require_plain_delta(info, operation, label=label)  # PiSSA & co. unconverted, MoE target_parameters
        return
    kind = "dora" if info.use_dora else info.adapter_type
    name = TYPE_NAMES.get(kind, kind)
    what = f"a {name} adapter" if kind != "lora" else f"a LoRA adapter with tensors besides A and B ({extra})"
    where = f" for {label}" if label else ""
    raise UnsupportedAdapterError(
        f"{operation} is not possible{where}: {what} ({info.format} format) is not a plain LoRA delta s·B·A",
        adapter_type=kind,
        path=label,
        hint=_TOOLS.get(info.format, "use the adapter as installed, with a tool that implements this type"),
    )


#: where an adapter that loramgr will not add or convert can be used as it is
_TOOLS = {
    "peft": "PEFT loads it as saved: PeftModel.from_pretrained on the adapter's folder",
    "kohya": "use the file as installed, with a tool that implements LyCORIS types (the LyCORIS library)",
}


def _dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, flattened columns) of a weight-like shape."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1


def describe_module(
    name: str, kind: str, parts: dict[str, tuple[str, tuple[int, ...], str]], *, path: str
) -> ModuleSpec:
    """A ModuleSpec for a non-LoRA module: shapes as far as they mean in/out, every key kept.

    ``parts`` maps suffix -> (tensor key, shape, dtype). ``key_a``/``key_b`` point at the tensors that
    play A (r x in) and B (out x r) where the type has them; all other tensors go to ``extra_keys`` so
    that nothing is dropped when the adapter is stored or exported verbatim.
    """
    dtype = next(iter(parts.values()))[2]
    keys = {suffix: key for suffix, (key, _, _) in parts.items()}
    shapes = {suffix: shape for suffix, (_, shape, _) in parts.items()}
    rank = in_f = out_f = 0
    key_a = key_b = ""
    kernel: tuple[int, ...] | None = None
    if kind in ("lora", "dora", "lora_tucker") and "lora_down.weight" in parts:
        key_a, key_b = keys["lora_down.weight"], keys["lora_up.weight"]
        down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
        rank, out_f = down[0], up[0]
        if kind == "lora_tucker" and "lora_mid.weight" in shapes:
            # Tucker: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]
            mid = shapes["lora_mid.weight"]
            in_f = down[1] * math.prod(mid[2:])
            kernel = (rank, down[1], *mid[2:])
        else:
            in_f = math.prod(down[1:])
            kernel = down if len(down) > 2 else None
    elif kind == "loha":
        key_a, key_b = keys.get("hada_w1_b", ""), keys.get("hada_w1_a", "")
        rank = shapes["hada_w1_b"][0] if "hada_w1_b" in shapes else 0
        out_f = shapes["hada_w1_a"][0] if "hada_w1_a" in shapes else 0
        in_f = math.prod(shapes["hada_w1_b"][1:]) if "hada_w1_b" in shapes else 0
    elif kind == "lokr":
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], *shapes["lokr_w2_b"][1:])
        out_f, in_f = w1[0] * w2[0], w1[1] * math.prod(w2[1:])
        rank = shapes["lokr_w2_a"][1] if "lokr_w2_a" in shapes else min(w2[0], math.prod(w2[1:]))
    elif kind == "full":
        out_f, in_f = _dims(shapes["diff"]) if "diff" in shapes else (0, 0)
        rank = min(out_f, in_f)
        kernel = shapes["diff"] if len(shapes.get("diff", ())) > 2 else None
    elif kind == "ia3":
        # a vector scaling the output (or the input when on_input is set): one number per feature
        rank, out_f = 1, shapes["weight"][0] if "weight" in shapes else 0
    elif kind == "glora":
        # ΔW = s·(W·a1·a2 + b1·b2): a2 [r, in], a1 [in, r] act through W; b2 [r, in] and b1 [out, r]
        # are a LoRA-like down/up pair (LyCORIS glora.py), so they play A and B
        key_a, key_b = keys.get("b2.weight", ""), keys.get("b1.weight", "")
        if "b2.weight" in shapes:
            rank, in_f = shapes["b2.weight"][0], math.prod(shapes["b2.weight"][1:])
        if "b1.weight" in shapes:
            out_f = shapes["b1.weight"][0]
    elif kind in ("oft", "boft"):
        blocks = shapes.get("oft_blocks") or shapes.get("oft_diag") or ()
        if len(blocks) >= 3:
            rank, out_f = blocks[-1], blocks[-3] * blocks[-1]
            in_f = out_f
    used = {key_a, key_b}
    alpha_key = keys.get("alpha")
    extra = tuple(sorted(k for k in keys.values() if k not in used and k != alpha_key))
    if not (key_a or key_b or extra):
        raise InvalidAdapterError(f"{path}: module {name} has no weights", path=path, module=name)
    return ModuleSpec(
        name=name,
        rank=max(rank, 1),
        alpha=float(max(rank, 1)),
        in_features=in_f,
        out_features=out_f,
        key_a=key_a,
        key_b=key_b,
        dtype=dtype,
        kind="conv" if kernel else "linear",
        kernel=kernel,
        key_alpha=alpha_key,
        extra_keys=extra,
    )
