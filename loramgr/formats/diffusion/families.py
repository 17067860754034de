"""Module tables of the diffusion transformers: original checkpoint names <-> diffusers names.

Each :class:`Rule` ties one module of the original checkpoint (``{i}`` = a block index) to the
diffusers module(s) that hold the same weights, and says how the rows of the weight are laid out:

- ``rename``: the same matrix under another name;
- ``split``: a fused projection whose rows are equal parts (Flux ``img_attn.qkv`` = to_q, to_k, to_v);
- ``split_mlp``: Flux ``single_blocks.{i}.linear1`` = to_q, to_k, to_v (dim rows each) + proj_mlp (the rest);
- ``swap``: the same matrix with its two row halves exchanged (Flux ``final_layer.adaLN_modulation.1``
  is (shift, scale), diffusers' ``norm_out.linear`` is (scale, shift));
- ``swap_last``: ``swap`` where the matrix has 2 x in rows, else ``rename`` (SD3's last joint block
  modulates its context with (shift, scale) only, and diffusers swaps that block's halves, no other's).

The tables are diffusers' own (``loaders/lora_conversion_utils.py``), written as data so that a
conversion can run both ways and a kohya name (``lora_unet_double_blocks_0_img_attn_qkv``) resolves to
a module path without the base model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

#: the pipeline component diffusers keeps these models under
COMPONENT = "transformer"


def _pattern(template: str, sep: str) -> re.Pattern[str]:
    text = re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(\d+)")
    return re.compile(text)


@dataclass(frozen=True)
class Rule:
    """One original module and the diffusers module(s) that hold its rows."""

    original: str
    parts: tuple[str, ...]
    layout: str = "rename"  # "rename" | "split" | "split_mlp" | "swap" | "swap_last"
    _dotted: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _kohya: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _parts: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_dotted", _pattern(self.original, "."))
        object.__setattr__(self, "_kohya", _pattern(self.original, "_"))
        object.__setattr__(self, "_parts", tuple(_pattern(p, ".") for p in self.parts))

    @property
    def fused(self) -> bool:
        return self.layout in ("split", "split_mlp")

    def match_original(self, path: str) -> str | None:
        """The block index ("" for a module outside the blocks) when ``path`` is this rule's original module."""
        match = self._dotted.fullmatch(path)
        return None if match is None else (match.group(1) if match.groups() else "")

    def match_kohya(self, body: str) -> str | None:
        match = self._kohya.fullmatch(body)
        return None if match is None else (match.group(1) if match.groups() else "")

    def match_part(self, path: str) -> tuple[int, str] | None:
        """(which part, block index) when ``path`` is one of this rule's diffusers modules."""
        for number, pattern in enumerate(self._parts):
            match = pattern.fullmatch(path)
            if match is not None:
                return number, (match.group(1) if match.groups() else "")
        return None

    def original_path(self, index: str) -> str:
        return self.original.replace("{i}", index)

    def part_paths(self, index: str) -> list[str]:
        return [p.replace("{i}", index) for p in self.parts]


@dataclass(frozen=True)
class Family:
    """A model family: its name and the rules of its modules."""

    name: str
    title: str
    rules: tuple[Rule, ...]

    @property
    def same_names(self) -> bool:
        """True when the original checkpoint already uses diffusers' module names (Qwen-Image)."""
        return all(r.layout == "rename" and r.parts == (r.original,) for r in self.rules)

    def rule_for_original(self, path: str) -> tuple[Rule, str] | None:
        for rule in self.rules:
            index = rule.match_original(path)
            if index is not None:
                return rule, index
        return None

    def rule_for_part(self, path: str) -> tuple[Rule, int, str] | None:
        for rule in self.rules:
            found = rule.match_part(path)
            if found is not None:
                return rule, found[0], found[1]
        return None

    def resolve_kohya(self, body: str) -> str | None:
        """The original module path of a kohya name without its ``lora_unet_`` prefix, or None."""
        for rule in self.rules:
            index = rule.match_kohya(body)
            if index is not None:
                return rule.original_path(index)
        return None


def _same(*paths: str) -> tuple[Rule, ...]:
    return tuple(Rule(p, (p,)) for p in paths)


_FLUX_DOUBLE = "transformer_blocks.{i}."
_FLUX_SINGLE = "single_transformer_blocks.{i}."
FLUX1 = Family("flux1", "Flux.1", (
    Rule("double_blocks.{i}.img_attn.qkv", tuple(_FLUX_DOUBLE + f"attn.to_{x}" for x in "qkv"), "split"),
    Rule("double_blocks.{i}.txt_attn.qkv", tuple(_FLUX_DOUBLE + f"attn.add_{x}_proj" for x in "qkv"), "split"),
    Rule("double_blocks.{i}.img_attn.proj", (_FLUX_DOUBLE + "attn.to_out.0",)),
    Rule("double_blocks.{i}.txt_attn.proj", (_FLUX_DOUBLE + "attn.to_add_out",)),
    Rule("double_blocks.{i}.img_mlp.0", (_FLUX_DOUBLE + "ff.net.0.proj",)),
    Rule("double_blocks.{i}.img_mlp.2", (_FLUX_DOUBLE + "ff.net.2",)),
    Rule("double_blocks.{i}.txt_mlp.0", (_FLUX_DOUBLE + "ff_context.net.0.proj",)),
    Rule("double_blocks.{i}.txt_mlp.2", (_FLUX_DOUBLE + "ff_context.net.2",)),
    Rule("double_blocks.{i}.img_mod.lin", (_FLUX_DOUBLE + "norm1.linear",)),
    Rule("double_blocks.{i}.txt_mod.lin", (_FLUX_DOUBLE + "norm1_context.linear",)),
    Rule("single_blocks.{i}.linear1", (*(_FLUX_SINGLE + f"attn.to_{x}" for x in "qkv"), _FLUX_SINGLE + "proj_mlp"),
         "split_mlp"),
    Rule("single_blocks.{i}.linear2", (_FLUX_SINGLE + "proj_out",)),
    Rule("single_blocks.{i}.modulation.lin", (_FLUX_SINGLE + "norm.linear",)),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
))

FLUX2 = Family("flux2", "Flux.2", (
    Rule("double_blocks.{i}.img_attn.qkv", tuple(_FLUX_DOUBLE + f"attn.to_{x}" for x in "qkv"), "split"),
    Rule("double_blocks.{i}.txt_attn.qkv", tuple(_FLUX_DOUBLE + f"attn.add_{x}_proj" for x in "qkv"), "split"),
    Rule("double_blocks.{i}.img_attn.proj", (_FLUX_DOUBLE + "attn.to_out.0",)),
    Rule("double_blocks.{i}.txt_attn.proj", (_FLUX_DOUBLE + "attn.to_add_out",)),
    Rule("double_blocks.{i}.img_mlp.0", (_FLUX_DOUBLE + "ff.linear_in",)),
    Rule("double_blocks.{i}.img_mlp.2", (_FLUX_DOUBLE + "ff.linear_out",)),
    Rule("double_blocks.{i}.txt_mlp.0", (_FLUX_DOUBLE + "ff_context.linear_in",)),
    Rule("double_blocks.{i}.txt_mlp.2", (_FLUX_DOUBLE + "ff_context.linear_out",)),
    Rule("single_blocks.{i}.linear1", (_FLUX_SINGLE + "attn.to_qkv_mlp_proj",)),
    Rule("single_blocks.{i}.linear2", (_FLUX_SINGLE + "attn.to_out",)),
    Rule("img_in", ("x_embedder",)),
    Rule("txt_in", ("context_embedder",)),
    Rule("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    Rule("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    Rule("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    Rule("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    Rule("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    Rule("final_layer.linear", ("proj_out",)),
    # diffusers' Flux.2 weight conversion swaps (shift, scale) here; its LoRA conversion (0.42) does not
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
))

_HY_REFINER = "txt_in.individual_token_refiner.blocks.{i}."
_HY_REFINER_D = "context_embedder.token_refiner.refiner_blocks.{i}."
HUNYUAN_VIDEO = Family("hunyuan-video", "HunyuanVideo", (
    Rule("double_blocks.{i}.img_attn_qkv", tuple(_FLUX_DOUBLE + f"attn.to_{x}" for x in "qkv"), "split"),
    Rule("double_blocks.{i}.txt_attn_qkv", tuple(_FLUX_DOUBLE + f"attn.add_{x}_proj" for x in "qkv"), "split"),
    Rule("double_blocks.{i}.img_attn_proj", (_FLUX_DOUBLE + "attn.to_out.0",)),
    Rule("double_blocks.{i}.txt_attn_proj", (_FLUX_DOUBLE + "attn.to_add_out",)),
    Rule("double_blocks.{i}.img_mod.linear", (_FLUX_DOUBLE + "norm1.linear",)),
    Rule("double_blocks.{i}.txt_mod.linear", (_FLUX_DOUBLE + "norm1_context.linear",)),
    Rule("double_blocks.{i}.img_mlp.fc1", (_FLUX_DOUBLE + "ff.net.0.proj",)),
    Rule("double_blocks.{i}.img_mlp.fc2", (_FLUX_DOUBLE + "ff.net.2",)),
    Rule("double_blocks.{i}.txt_mlp.fc1", (_FLUX_DOUBLE + "ff_context.net.0.proj",)),
    Rule("double_blocks.{i}.txt_mlp.fc2", (_FLUX_DOUBLE + "ff_context.net.2",)),
    Rule("single_blocks.{i}.linear1", (*(_FLUX_SINGLE + f"attn.to_{x}" for x in "qkv"), _FLUX_SINGLE + "proj_mlp"),
         "split_mlp"),
    Rule("single_blocks.{i}.linear2", (_FLUX_SINGLE + "proj_out",)),
    Rule("single_blocks.{i}.modulation.linear", (_FLUX_SINGLE + "norm.linear",)),
    Rule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
    Rule("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
    Rule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    Rule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
    Rule("txt_in.input_embedder", ("context_embedder.proj_in",)),
    Rule("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    Rule("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    Rule("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    Rule("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    Rule(_HY_REFINER + "self_attn_qkv", tuple(_HY_REFINER_D + f"attn.to_{x}" for x in "qkv"), "split"),
    Rule(_HY_REFINER + "self_attn_proj", (_HY_REFINER_D + "attn.to_out.0",)),
    Rule(_HY_REFINER + "mlp.fc1", (_HY_REFINER_D + "ff.net.0.proj",)),
    Rule(_HY_REFINER + "mlp.fc2", (_HY_REFINER_D + "ff.net.2",)),
    Rule(_HY_REFINER + "adaLN_modulation.1", (_HY_REFINER_D + "norm_out.linear",)),
))

WAN = Family("wan", "Wan 2.x", (
    *(Rule(f"blocks.{{i}}.self_attn.{o}", (f"blocks.{{i}}.attn1.{c}",))
      for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)),
    *(Rule(f"blocks.{{i}}.cross_attn.{o}", (f"blocks.{{i}}.attn2.{c}",))
      for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True)),
    Rule("blocks.{i}.cross_attn.k_img", ("blocks.{i}.attn2.add_k_proj",)),
    Rule("blocks.{i}.cross_attn.v_img", ("blocks.{i}.attn2.add_v_proj",)),
    Rule("blocks.{i}.ffn.0", ("blocks.{i}.ffn.net.0.proj",)),
    Rule("blocks.{i}.ffn.2", ("blocks.{i}.ffn.net.2",)),
    Rule("text_embedding.0", ("condition_embedder.text_embedder.linear_1",)),
    Rule("text_embedding.2", ("condition_embedder.text_embedder.linear_2",)),
    Rule("time_embedding.0", ("condition_embedder.time_embedder.linear_1",)),
    Rule("time_embedding.2", ("condition_embedder.time_embedder.linear_2",)),
    Rule("time_projection.1", ("condition_embedder.time_proj",)),
    Rule("head.head", ("proj_out",)),
))

QWEN_IMAGE = Family("qwen-image", "Qwen-Image", _same(
    *(f"transformer_blocks.{{i}}.attn.{m}" for m in (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
    "transformer_blocks.{i}.img_mlp.net.0.proj", "transformer_blocks.{i}.img_mlp.net.2",
    "transformer_blocks.{i}.txt_mlp.net.0.proj", "transformer_blocks.{i}.txt_mlp.net.2",
    "transformer_blocks.{i}.img_mod.1", "transformer_blocks.{i}.txt_mod.1",
    "img_in", "txt_in", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
))

_SD3 = "transformer_blocks.{i}."
_JOINT = "joint_blocks.{i}."
#: SD3 / SD3.5 (MMDiT, MMDiT-X): diffusers' single-file checkpoint conversion
#: (``convert_sd3_transformer_checkpoint_to_diffusers``) written as rules
SD3 = Family("sd3", "Stable Diffusion 3 / 3.5", (
    Rule(_JOINT + "x_block.attn.qkv", tuple(_SD3 + f"attn.to_{x}" for x in "qkv"), "split"),
    Rule(_JOINT + "context_block.attn.qkv", tuple(_SD3 + f"attn.add_{x}_proj" for x in "qkv"), "split"),
    Rule(_JOINT + "x_block.attn.proj", (_SD3 + "attn.to_out.0",)),
    Rule(_JOINT + "context_block.attn.proj", (_SD3 + "attn.to_add_out",)),
    Rule(_JOINT + "x_block.attn2.qkv", tuple(_SD3 + f"attn2.to_{x}" for x in "qkv"), "split"),
    Rule(_JOINT + "x_block.attn2.proj", (_SD3 + "attn2.to_out.0",)),
    Rule(_JOINT + "x_block.mlp.fc1", (_SD3 + "ff.net.0.proj",)),
    Rule(_JOINT + "x_block.mlp.fc2", (_SD3 + "ff.net.2",)),
    Rule(_JOINT + "context_block.mlp.fc1", (_SD3 + "ff_context.net.0.proj",)),
    Rule(_JOINT + "context_block.mlp.fc2", (_SD3 + "ff_context.net.2",)),
    Rule(_JOINT + "x_block.adaLN_modulation.1", (_SD3 + "norm1.linear",)),
    Rule(_JOINT + "context_block.adaLN_modulation.1", (_SD3 + "norm1_context.linear",), "swap_last"),
    Rule("context_embedder", ("context_embedder",)),
    Rule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    Rule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    Rule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    Rule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    Rule("final_layer.linear", ("proj_out",)),
    Rule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
))

FAMILIES: tuple[Family, ...] = (FLUX1, FLUX2, HUNYUAN_VIDEO, WAN, QWEN_IMAGE, SD3)
def choose(candidates: list[Family], metadata: dict[str, str]) -> Family | None:
    """The one family among ``candidates``: the only one, or the one the metadata names; None if undecided.

    Flux and HunyuanVideo share kohya names (``double_blocks_0_img_attn_qkv``) and diffusers names, and
    Flux and Qwen-Image share diffusers' attention names: a file adapting only those modules is told
    apart by its metadata or not at all.
    """
    if len(candidates) == 1:
        return candidates[0]
    from ...compat.identify import claim_family

    named = {claim_family(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture")}
    chosen = [f for f in candidates if f.name in named]
    return chosen[0] if len(chosen) == 1 else None


def by_name(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def families_of_original(paths: Iterable[str]) -> list[Family]:
    """The families whose original checkpoint has every one of ``paths``."""
    paths = list(paths)
    return [f for f in FAMILIES if paths and all(f.rule_for_original(p) for p in paths)]


def families_of_diffusers(paths: Iterable[str]) -> list[Family]:
    """The families whose diffusers model has every one of ``paths`` (without the component prefix)."""
    paths = list(paths)
    return [f for f in FAMILIES if paths and all(f.rule_for_part(p) for p in paths)]
