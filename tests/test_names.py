"""One module-name resolver: ``loramgr check`` and fuse / apply reach the same verdict for every name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import tiny_llama, write_peft_adapter
from safetensors.torch import save_file
from test_kohya import TinyPipeline, lora_factors

from loramgr.adapter import LoraAdapter
from loramgr.compat.basemodel import fingerprint_from_state_dict
from loramgr.compat.check import check_adapters
from loramgr.compat.names import ModuleIndex
from loramgr.formats.detect import read_adapter_file
from loramgr.formats.kohya import resolve_kohya_names
from loramgr.formats.peft import read_peft_folder
from loramgr.model.weights import ModelMismatchError, check_against_model

LLAMA_SHAPES = {"q_proj": (32, 32), "lm_head": (32, 128)}  # (in, out) of the modules the names point at

# (model, adapter module name, does it fit?) -- PEFT loads a module only under its own path; loramgr
# also accepts a wrapper level that one side lacks, never a level replaced by another
PEFT_NAMES = [
    ("causal", "model.layers.0.self_attn.q_proj", True),
    ("causal", "layers.0.self_attn.q_proj", True),  # made on LlamaModel, used in LlamaForCausalLM
    ("causal", "lm_head", True),
    ("causal", "decoder.layers.0.self_attn.q_proj", False),  # another model's level, not a wrapper
    ("causal", "self_attn.q_proj", False),  # two layers end with it: ambiguous
    ("causal", "model.layers.7.self_attn.q_proj", False),  # no such layer: never moved to another
    ("causal", "model.layers.0.self_attn.qkv_proj", False),
    ("bare", "model.layers.0.self_attn.q_proj", True),  # made on LlamaForCausalLM, used in LlamaModel
    ("bare", "layers.1.self_attn.q_proj", True),
    ("bare", "decoder.model.layers.0.self_attn.q_proj", True),  # wrapper levels the model lacks
    ("bare", "model.layers.0.mlp.q_proj", False),
]

# kohya names against a pipeline holding unet, text_encoder and text_encoder_2
KOHYA_NAMES = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in"),
    ("lora_unet_conv_in", "unet.conv_in"),
    # both text encoders have this path: the prefix says which one
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"),
    ("lora_unet_down_blocks_0_attentions_0_to_q", None),
    ("lora_te1_conv_in", None),  # a unet module under a text-encoder prefix
]


def verdicts(info, model: torch.nn.Module, folder: Path) -> tuple[bool, bool]:
    """(loramgr check says it fits, the check behind fuse / apply says it fits)."""
    base = fingerprint_from_state_dict(model)
    by_check = not [f for f in check_adapters([info], base=base) if f.severity == "error"]
    try:
        check_against_model(model, LoraAdapter(info, folder))
        by_model = True
    except ModelMismatchError:
        by_model = False
    return by_check, by_model


@pytest.fixture(scope="module")
def llamas() -> dict[str, torch.nn.Module]:
    causal = tiny_llama()
    return {"causal": causal, "bare": causal.model}


@pytest.mark.parametrize(("which", "name", "fits"), PEFT_NAMES, ids=[f"{w}:{n}" for w, n, _ in PEFT_NAMES])
def test_check_and_fuse_agree_on_peft_names(tmp_path: Path, llamas, which: str, name: str, fits: bool) -> None:
    d_in, d_out = LLAMA_SHAPES.get(name.rsplit(".", 1)[-1], (32, 32))
    folder = write_peft_adapter(tmp_path / "a", {name: (d_in, d_out, 4)})
    assert verdicts(read_peft_folder(folder), llamas[which], folder) == (fits, fits)


@pytest.mark.parametrize(("name", "path"), KOHYA_NAMES, ids=[n for n, _ in KOHYA_NAMES])
def test_check_fuse_and_kohya_resolution_agree_on_kohya_names(tmp_path: Path, name: str, path: str | None) -> None:
    pipeline = TinyPipeline()
    modules = dict(pipeline.named_modules())
    target = modules[path] if path else torch.nn.Linear(8, 8)
    down, up = lora_factors(target, 2, torch.Generator().manual_seed(0))
    file = tmp_path / "k.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, str(file))
    info = read_adapter_file(file)
    assert verdicts(info, pipeline, tmp_path) == (path is not None, path is not None)
    assert resolve_kohya_names([name], list(modules)) == {name: path}


def test_resolver_on_path_strings() -> None:
    peft_wrapped = ["base_model.model.down_blocks.0.to_q", "base_model.model.down_blocks.1.to_q",
                    "base_model.model.conv_in"]  # fmt: skip
    index = ModuleIndex(peft_wrapped)
    assert index.candidates("lora_unet_down_blocks_1_to_q") == ["base_model.model.down_blocks.1.to_q"]
    assert index.candidates("conv_in") == ["base_model.model.conv_in"]
    assert index.candidates("base_model.model.conv_in") == ["base_model.model.conv_in"]
    # "_" inside names: two paths with the same kohya form are ambiguous, not a guess
    clash = ModuleIndex(["a_b.c", "a.b_c"])
    assert clash.candidates("lora_a_b_c") == ["a.b_c", "a_b.c"]
    mapping, problems = ModuleIndex(["model.layers.0.q"]).resolve(["layers.0.q", "model.layers.0.q", "x.q"])
    assert mapping == {"layers.0.q": "model.layers.0.q", "model.layers.0.q": "model.layers.0.q"}
    assert [(p.module, p.problem) for p in problems] == [("x.q", "missing"), ("model.layers.0.q", "duplicate")]
