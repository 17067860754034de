"""Which base model an adapter is for, from its shapes (and what its metadata claims), without the base.

:data:`PUBLISHED` holds the dimensions of the published configs (hidden width ``dim``, feed-forward width
``ffn``, cross-attention context width ``context``); an adapter's module names give the family (the module
tables of :mod:`loramgr.formats.diffusion.families`, or the UNet names of Stable Diffusion) and its
factors' shapes the dimensions, which pick the variant. The same function reads a base model's
fingerprint, so ``check`` can say "a Wan 1.3B LoRA, a Wan 14B base" instead of listing shape errors.
What the metadata claims (``ss_base_model_version``, ``modelspec.architecture``, the model card's
``base_model``, PEFT's ``base_model_name_or_path``) is kept next to what the shapes say; a claim that
names another family, or another published size of the same family, is a warning.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapter import AdapterInfo

if TYPE_CHECKING:
    from ..registry import Registry, VersionRow

#: the family names :func:`identify_shapes` gives (``loramgr list --base-family``)
FAMILY_NAMES = ("sd1", "sd2", "sdxl", "sd3", "flux1", "flux2", "hunyuan-video", "wan", "qwen-image", "llama",
                "mistral", "qwen2", "llm")


@dataclass(frozen=True)
class Published:
    """One published model: family, variant, size and the dimensions that tell it apart."""

    family: str
    variant: str
    size: str
    dims: dict[str, int]


PUBLISHED: tuple[Published, ...] = (
    Published("sd1", "Stable Diffusion 1.x", "0.9B", {"context": 768}),
    Published("sd2", "Stable Diffusion 2.x", "0.9B", {"context": 1024}),
    Published("sdxl", "Stable Diffusion XL", "2.6B", {"context": 2048}),
    Published("flux1", "Flux.1 [dev] / [schnell]", "12B", {"dim": 3072, "ffn": 12288}),
    Published("flux2", "Flux.2 [dev]", "32B", {"dim": 6144, "ffn": 36864}),
    Published("wan", "Wan 2.1 / 2.2 1.3B", "1.3B", {"dim": 1536, "ffn": 8960}),
    Published("wan", "Wan 2.2 TI2V 5B", "5B", {"dim": 3072, "ffn": 14336}),
    Published("wan", "Wan 2.1 / 2.2 14B", "14B", {"dim": 5120, "ffn": 13824}),
    Published("hunyuan-video", "HunyuanVideo", "13B", {"dim": 3072, "ffn": 12288}),
    Published("qwen-image", "Qwen-Image", "20B", {"dim": 3072, "ffn": 12288}),
    Published("sd3", "Stable Diffusion 3 / 3.5 Medium", "2B", {"dim": 1536, "ffn": 6144}),
    Published("sd3", "Stable Diffusion 3.5 Large", "8B", {"dim": 2432, "ffn": 9728}),
    # decoder LLMs: hidden size, k_proj width (kv heads x head dim), MLP width, layers
    Published("llama", "Llama 2 7B", "7B", {"dim": 4096, "kv": 4096, "ffn": 11008, "layers": 32}),
    Published("llama", "Llama 3 / 3.1 8B", "8B", {"dim": 4096, "kv": 1024, "ffn": 14336, "layers": 32}),
    Published("llama", "Llama 3.2 1B", "1B", {"dim": 2048, "kv": 512, "ffn": 8192, "layers": 16}),
    Published("llama", "Llama 3.2 3B", "3B", {"dim": 3072, "kv": 1024, "ffn": 8192, "layers": 28}),
    Published("mistral", "Mistral 7B", "7B", {"dim": 4096, "kv": 1024, "ffn": 14336, "layers": 32}),
    Published("qwen2", "Qwen2.5 0.5B", "0.5B", {"dim": 896, "kv": 128, "ffn": 4864, "layers": 24}),
    Published("qwen2", "Qwen2.5 1.5B", "1.5B", {"dim": 1536, "kv": 256, "ffn": 8960, "layers": 28}),
    Published("qwen2", "Qwen2.5 7B", "7B", {"dim": 3584, "kv": 512, "ffn": 18944, "layers": 28}),
)
#: families whose published rows are decoder LLMs (identified by the ``llm`` probes)
_LLM_FAMILIES = ("llama", "mistral", "qwen2")

#: the words of a claim (ss_base_model_version, modelspec.architecture, a Hub repo id) -> family; first wins
_DECLARED = (("flux2", "flux2"), ("flux-2", "flux2"), ("flux.2", "flux2"), ("flux_2", "flux2"), ("flux", "flux1"),
             ("hunyuan", "hunyuan-video"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"),
             ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("wan", "wan"),
             ("qwen-image", "qwen-image"), ("qwen_image", "qwen-image"), ("qwen2", "qwen2"),
             ("qwen", "qwen-image"), ("llama", "llama"), ("mistral", "mistral"), ("sd_v2", "sd2"),
             ("stable-diffusion-v2", "sd2"), ("stable-diffusion-2", "sd2"), ("sd_v1", "sd1"),
             ("stable-diffusion-v1", "sd1"))
#: where claims come from, as shown: file metadata keys, then the model card, then the PEFT config
CLAIM_SOURCES = ("ss_base_model_version", "modelspec.architecture", "card base_model", "base_model_name_or_path")
#: module-path patterns whose (out, in) give each dimension: family -> dim name -> (regex, which side)
_PROBES: dict[str, dict[str, tuple[str, str]]] = {
    "flux1": {"dim": (r"(double_blocks\.\d+\.img_attn\.qkv|transformer_blocks\.\d+\.attn\.to_q)$", "in"),
              "ffn": (r"(double_blocks\.\d+\.img_mlp\.0|transformer_blocks\.\d+\.ff\.net\.0\.proj)$", "out")},
    "flux2": {"dim": (r"(double_blocks\.\d+\.img_attn\.qkv|transformer_blocks\.\d+\.attn\.to_q)$", "in"),
              "ffn": (r"(double_blocks\.\d+\.img_mlp\.0|transformer_blocks\.\d+\.ff\.linear_in)$", "out")},
    "hunyuan-video": {
        "dim": (r"(double_blocks\.\d+\.img_attn_qkv|^transformer_blocks\.\d+\.attn\.to_q)$", "in"),
        "ffn": (r"(double_blocks\.\d+\.img_mlp\.fc1|^transformer_blocks\.\d+\.ff\.net\.0\.proj)$", "out")},
    "wan": {"dim": (r"blocks\.\d+\.(self_attn\.q|attn1\.to_q)$", "in"),
            "ffn": (r"blocks\.\d+\.(ffn\.0|ffn\.net\.0\.proj)$", "out")},
    "qwen-image": {"dim": (r"transformer_blocks\.\d+\.attn\.to_q$", "in"),
                   "ffn": (r"transformer_blocks\.\d+\.img_mlp\.net\.0\.proj$", "out")},
    "sd3": {"dim": (r"(joint_blocks\.\d+\.x_block\.attn\.qkv|transformer_blocks\.\d+\.attn\.to_q)$", "in"),
            "ffn": (r"(joint_blocks\.\d+\.x_block\.mlp\.fc1|transformer_blocks\.\d+\.ff\.net\.0\.proj)$", "out")},
    "llm": {"dim": (r"layers\.\d+\.self_attn\.q_proj$", "in"), "kv": (r"layers\.\d+\.self_attn\.k_proj$", "out"),
            "ffn": (r"layers\.\d+\.mlp\.(up_proj|gate_proj)$", "out")},
    "sd": {"context": (r"attentions[._]\d+[._]transformer_blocks[._]\d+[._]attn2[._]to_k$", "in")},
}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")


@dataclass
class Identification:
    """What the shapes say (family, variant, size, task) and what the metadata claims."""

    family: str
    dims: dict[str, int]
    variant: str | None = None
    size: str | None = None
    task: str | None = None  # "I2V" when image-conditioning modules are adapted
    claims: list[dict[str, str]] = field(default_factory=list)  # {"source": ..., "text": ...}, as written
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Identification:
        data = dict(data)
        declared = data.pop("declared", None)  # stored before claims had sources
        if declared and not data.get("claims"):
            data["claims"] = [{"source": "metadata", "text": declared}]
        return cls(**data)

    def describe(self) -> str:
        dims = ", ".join(f"{k} {v}" for k, v in sorted(self.dims.items()))
        name = self.variant or f"{self.family} (no published size with {dims})"
        return name + (f" {self.task}" if self.task else "") + (f" ({dims})" if dims and self.variant else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strip(path: str) -> str:
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _family(paths: list[str]) -> str | None:
    from ..formats.diffusion.families import FAMILIES

    if any(re.search(_PROBES["sd"]["context"][0], p) for p in paths):
        return "sd"
    if any(re.search(r"layers\.\d+\.(self_attn|mlp)\.", p) for p in paths):
        return "llm"
    scores: Counter[str] = Counter()
    for family in FAMILIES:
        scores[family.name] = sum(1 for p in paths if family.rule_for_original(p) or family.rule_for_part(p))
    best: list[tuple[str, int]] = scores.most_common()
    if not best or best[0][1] == 0:
        return None
    # Flux and Qwen-Image share diffusers' attention names; Flux's own modules decide
    if len(best) > 1 and best[0][1] == best[1][1]:
        return "flux1" if any("single_" in p or "double_blocks" in p for p in paths) else str(best[0][0])
    return str(best[0][0])


def identify_shapes(
    shapes: Mapping[str, tuple[int, int]], *, is_sdxl: bool = False, family: str | None = None
) -> Identification | None:
    """Identify a model family (unless given) and variant from module path -> (out_features, in_features)."""
    stripped = {_strip(k): v for k, v in shapes.items()}
    family = family or _family(list(stripped))
    if family is None:
        return None
    dims: dict[str, int] = {}
    for dim, (pattern, side) in _PROBES[family].items():
        found = Counter(v[1] if side == "in" else v[0] for p, v in stripped.items() if re.search(pattern, p))
        if found:
            dims[dim] = found.most_common(1)[0][0]
    if family == "llm":  # the highest layer index seen is a lower bound of the model's layers
        layers = [int(m.group(1)) for p in stripped if (m := re.search(r"layers\.(\d+)\.", p))]
        seen_layers = max(layers) + 1 if layers else 0

    def fits(p: Published) -> bool:
        if family == "llm":
            return (p.family in _LLM_FAMILIES and p.dims["layers"] >= seen_layers
                    and all(p.dims.get(k) == v for k, v in dims.items()))
        related = p.family == family or (family == "sd" and p.family.startswith("sd") and p.family != "sd3")
        return related and all(p.dims.get(k) == v for k, v in dims.items() if k in p.dims)

    candidates = [p for p in PUBLISHED if dims and fits(p)]
    if family == "sd" and is_sdxl:
        candidates = [p for p in candidates if p.family == "sdxl"]
    families = sorted({p.family for p in candidates})
    ident = Identification(family=families[0] if len(families) == 1 else family, dims=dims)
    if len(candidates) == 1:
        ident.variant, ident.size = candidates[0].variant, candidates[0].size
    elif len(candidates) > 1 and all(p.dims == candidates[0].dims for p in candidates):  # same shapes, several models
        ident.variant = " or ".join(p.variant for p in candidates)
        ident.size = " / ".join(dict.fromkeys(p.size for p in candidates))
    if family == "wan" and any(re.search(r"(k_img|add_k_proj)$", p) for p in stripped):
        ident.task = "I2V"
    if family == "flux1" and any("guidance" in p for p in stripped):
        ident.variant = "Flux.1 [dev]"
    return ident


def claim_family(text: str) -> str:
    """The family a claim names ("" when it names none loramgr knows)."""
    lowered = text.lower()
    return next((family for word, family in _DECLARED if word in lowered), "")


def claims_of(info: AdapterInfo) -> list[dict[str, str]]:
    """What the adapter says its base is: file metadata, the model card's base_model, PEFT's base model."""
    found = {key: info.file_metadata.get(key) for key in CLAIM_SOURCES[:2]}
    card = info.card.get("base_model")
    found["card base_model"] = str(card) if card else None
    # kohya's base_model is a local checkpoint file name, not a claim about the model's identity
    found["base_model_name_or_path"] = info.base_model if info.format in ("peft", "diffusers") else None
    return [{"source": source, "text": text} for source, text in found.items() if text]


def _disagreement(claim: Mapping[str, str], ident: Identification) -> str | None:
    family = claim_family(claim["text"])
    if not family:
        return None
    said = f"{claim['source']} says {claim['text']!r}, the shapes say {ident.describe()}"
    if family != ident.family:
        unresolved_sd = ident.family == "sd" and family.startswith("sd") and family != "sd3"
        unresolved_llm = ident.family == "llm" and family in _LLM_FAMILIES
        return None if unresolved_sd or unresolved_llm else said
    # the same family: a size the claim names ("...-14B") that is another published model's
    sizes = {p.size.lower() for p in PUBLISHED if p.family == family}
    named = {size for size in sizes if re.search(rf"(?<![\d.]){re.escape(size)}(?![\w])", claim["text"].lower())}
    if ident.size and named and ident.size.lower() not in named:
        return said
    return None


def identify_adapter(info: AdapterInfo) -> Identification | None:
    """Identify the base an adapter was made for, from its modules' shapes, with what it claims."""
    names: Iterable[str] = (m.name for m in info.modules)
    shapes = {n: (m.out_features, m.in_features) for n, m in zip(names, info.modules, strict=True)}
    sdxl = any(m.name.startswith(("lora_te2_", "text_encoder_2.")) for m in info.modules)
    family = info.config.get("family")
    candidates = info.config.get("families") or []
    if not family and len(candidates) > 1:  # shared module names: the published widths may still decide
        found = [i for i in (identify_shapes(shapes, family=c) for c in candidates) if i and i.variant]
        if len(found) == 1:
            family = found[0].family
    ident = identify_shapes(shapes, is_sdxl=sdxl, family=family)
    if ident is None:
        return None
    ident.claims = claims_of(info)
    ident.warnings = [w for w in (_disagreement(c, ident) for c in ident.claims) if w]
    return ident


def identify_base_shapes(shapes: Mapping[str, Any]) -> Identification | None:
    """Identify a base model from its module shapes (``compat.basemodel.module_shapes``)."""
    return identify_shapes({k: (s.out_features, s.in_features) for k, s in shapes.items()},
                           is_sdxl=any(k.startswith("text_encoder_2.") for k in shapes))


def mismatch(adapter: Identification | None, base: Identification | None) -> str | None:
    """A sentence when adapter and base are the same family but another variant (a Wan 1.3B LoRA, a 14B base)."""
    # only between published models: for anything else the per-module shape check says more
    if adapter is None or base is None or adapter.family != base.family or not (adapter.variant and base.variant):
        return None
    if adapter.dims and base.dims and any(base.dims.get(k, v) != v for k, v in adapter.dims.items()):
        return f"this LoRA is for {adapter.describe()}, the base is {base.describe()}: its modules do not fit"
    return None


def show_lines(config: Mapping[str, Any]) -> list[str]:
    """The lines ``loramgr show`` prints for a version's base identification and file hashes."""
    lines = []
    ident = config.get("base_identity")
    if ident:
        found = Identification.from_dict(ident)
        claims = ", ".join(f"{c['text']} ({c['source']})" for c in found.claims)
        # a disagreement is among the version's notes, shown with them
        lines.append(f"  base (shapes) {found.describe()}" + (f"; metadata: {claims}" if claims else ""))
    hashes = config.get("hashes")
    if hashes:
        lines.append(f"  hashes        AutoV2 {hashes['autov2']}  AutoV3 {hashes['autov3']}  CRC32 {hashes['crc32']}")
        lines.append(f"  tensors       sha256:{hashes['tensors_sha256']}")
    return lines


def versions_for_family(registry: Registry, family: str, name: str | None = None) -> list[VersionRow]:
    """The installed versions whose shapes identify base family ``family`` (``list --base-family``)."""
    if family not in FAMILY_NAMES:
        from ..errors import InvalidReferenceError

        raise InvalidReferenceError(f"unknown base family {family!r}", reference=family,
                                    hint=f"use one of {', '.join(FAMILY_NAMES)}")
    rows = []
    for row in registry.list_versions(name):
        ident = registry.show(f"{row.name}=={row.version}").config.get("base_identity") or {}
        if ident.get("family") == family:
            rows.append(row)
    return rows
