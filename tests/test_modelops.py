"""fuse / unfuse / check_against_model / resolve_module_names on tiny transformers models.

Fused outputs are compared with PEFT's own loader (PeftModel.from_pretrained), an independent
implementation of the same algebra; weights after fuse + unfuse with the untouched originals.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from factories import (
    peft_adapter_from_model,
    sample_input,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    write_peft_adapter,
)
from safetensors.torch import load_file

from loramgr.adapter import LoraAdapter
from loramgr.errors import IncompatibleError, UnsupportedAdapterError
from loramgr.formats.peft import read_peft_folder
from loramgr.model.weights import (
    ModelMismatchError,
    check_against_model,
    fuse,
    resolve_module_names,
    resolve_names,
    unfuse,
)

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# per architecture: factory, PEFT LoRA options, input builder
CASES = {
    "llama": (tiny_llama, {"target_modules": LLAMA_TARGETS, "use_rslora": True, "rank_pattern": {"up_proj": 2}}),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "bert": (tiny_bert, {"target_modules": ["query", "value", "dense"], "alpha_pattern": {"value": 3.0}}),
}


def load(folder: Path) -> LoraAdapter:
    return LoraAdapter(read_peft_folder(folder), folder)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    factory, options = CASES[request.param]
    model = factory()
    folder = peft_adapter_from_model(model, tmp_path_factory.mktemp(request.param) / "adapter", **options)
    return model, folder


def test_fused_model_matches_peft_and_unfuse_restores_weights(case):
    model, folder = case
    x = sample_input()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()

    fused = copy.deepcopy(model)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    fuse(fused, load(folder))
    changed = [k for k, v in fused.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "fuse changed no weight"
    torch.testing.assert_close(outputs(fused, x), outputs(reference, x), atol=1e-5, rtol=1e-5)

    unfuse(fused, load(folder))
    for key, value in fused.state_dict().items():
        assert (value - before[key]).abs().max().item() <= 1e-6, key


def test_fuse_adds_exactly_the_scaled_dense_delta(tmp_path):
    # a hand-written adapter: the expected weight is computed here from the file, not by loramgr
    model = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    folder = write_peft_adapter(
        tmp_path / "a", {name: (64, 32, 4), "model.layers.0.self_attn.q_proj": (32, 32, 2)},
        alpha=6.0, alpha_pattern={"down_proj": 3.0}, use_rslora=True,
    )  # fmt: skip
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{name}.lora_A.weight"]
    b = tensors[f"base_model.model.{name}.lora_B.weight"]
    weight = model.get_submodule(name).weight
    expected = weight.detach().clone() + 0.5 * (3.0 / 4**0.5) * (b @ a)

    fuse(model, load(folder), scale=0.5)
    torch.testing.assert_close(weight.detach(), expected, atol=1e-6, rtol=0)


def test_fuse_into_half_precision_computes_in_float32(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj"
    folder = write_peft_adapter(tmp_path / "a", {name: (32, 32, 4)}, dtype=torch.bfloat16)
    adapter = load(folder)
    weight = model.get_submodule(name).weight
    expected = (weight.detach().float() + adapter.delta(name)).to(torch.bfloat16)
    fuse(model, adapter)
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight.detach(), expected)


def test_fuse_embedding_and_conv_layers(tmp_path):
    # embeddings store (B·A)^T and convolutions a flattened kernel; PEFT's loader is the reference
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(16, 6)
            self.conv = torch.nn.Conv2d(6, 5, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x).permute(0, 2, 1).reshape(1, 6, 2, 4)
            return self.conv(h)

    torch.manual_seed(0)
    model = Net().eval()
    folder = peft_adapter_from_model(model, tmp_path / "a", target_modules=["embed", "conv"], r=2)
    x = torch.arange(8).reshape(1, 8)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    adapter = load(folder)
    assert {adapter.spec(n).kind for n in adapter.module_names} == {"embedding", "conv"}
    fuse(model, adapter)
    torch.testing.assert_close(outputs_plain(model, x), outputs_plain(reference, x), atol=1e-5, rtol=1e-5)


def outputs_plain(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_fuse_into_a_peft_model_changes_the_base_layer(tmp_path):
    # resolve_module_names sees through the PeftModel prefix and LoRA wrappers to base_layer
    model = tiny_llama()
    folder = peft_adapter_from_model(model, tmp_path / "a")
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    mapping = resolve_module_names(wrapped, load(folder))
    assert mapping["model.layers.0.self_attn.q_proj"] == "base_model.model.model.layers.0.self_attn.q_proj"
    with wrapped.disable_adapter():
        x = sample_input()
        fuse(wrapped, load(folder))
        fused = outputs(wrapped, x)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    torch.testing.assert_close(fused, outputs(reference, x), atol=1e-5, rtol=1e-5)


def test_wrong_base_lists_every_mismatch_in_one_error(tmp_path):
    # trained on hidden 32; the model has hidden 48; plus modules the model does not have at all
    modules = {
        "model.layers.0.self_attn.q_proj": (32, 32, 4),
        "model.layers.1.mlp.up_proj": (32, 64, 4),
        "model.layers.7.self_attn.q_proj": (32, 32, 4),  # only 2 layers: never remapped to another layer
        "model.layers.0.self_attn.rotary_proj": (32, 32, 4),
    }
    folder = write_peft_adapter(tmp_path / "a", modules)
    model = llama_with_hidden(48)
    with pytest.raises(IncompatibleError) as caught:
        check_against_model(model, load(folder))
    err = caught.value
    assert isinstance(err, ModelMismatchError)
    message = str(err)
    for name in modules:
        assert name in message
    problems = {m.module: m.problem for m in err.mismatches}
    assert problems == {
        "model.layers.0.self_attn.q_proj": "shape",
        "model.layers.1.mlp.up_proj": "shape",
        "model.layers.7.self_attn.q_proj": "missing",
        "model.layers.0.self_attn.rotary_proj": "missing",
    }
    assert "q_proj: the adapter's delta is 32 x 32 (out x in), the model's layer needs 48 x 48" in message
    # fuse refuses before touching anything
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelMismatchError):
        fuse(model, load(folder))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def llama_with_hidden(hidden: int) -> torch.nn.Module:
    # factories.tiny_llama cannot override hidden_size (it passes it too), so build this one here
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_resolves_wrapper_prefixes_both_ways():
    causal = tiny_llama()
    bare = causal.model  # LlamaModel: paths without the "model." prefix
    names = ["layers.0.self_attn.q_proj", "base_model.model.layers.1.mlp.up_proj", "embed_tokens"]
    assert resolve_names(causal, names) == (
        {
            "layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj",
            "base_model.model.layers.1.mlp.up_proj": "model.layers.1.mlp.up_proj",
            "embed_tokens": "model.embed_tokens",
        },
        [],
    )
    mapping, problems = resolve_names(bare, ["model.layers.0.self_attn.q_proj", "model.norm"])
    assert mapping == {"model.layers.0.self_attn.q_proj": "layers.0.self_attn.q_proj", "model.norm": "norm"}
    assert problems == []


def test_resolves_kohya_underscore_names():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = torch.nn.Linear(4, 4)
            self.proj_out = torch.nn.Linear(4, 4)

    model = torch.nn.Module()
    model.down_blocks = torch.nn.ModuleList([Block(), Block()])
    model.text_model = torch.nn.Module()
    model.text_model.q_proj = torch.nn.Linear(4, 4)
    mapping, problems = resolve_names(
        model,
        ["lora_unet_down_blocks_1_proj_out", "lora_te_text_model_q_proj", "lora_unet_down_blocks_0_to_k"],
    )
    assert mapping == {
        "lora_unet_down_blocks_1_proj_out": "down_blocks.1.proj_out",
        "lora_te_text_model_q_proj": "text_model.q_proj",
    }
    assert [(m.module, m.problem) for m in problems] == [("lora_unet_down_blocks_0_to_k", "missing")]


def test_ambiguous_suffix_is_an_error_not_a_guess():
    mapping, problems = resolve_names(tiny_llama(), ["self_attn.q_proj"])
    assert mapping == {}
    assert problems[0].problem == "ambiguous" and "matches 2 modules of the model" in problems[0].detail


def test_dora_cannot_be_fused(tmp_path):
    model = tiny_llama()
    folder = peft_adapter_from_model(model, tmp_path / "a", use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="fuse is not possible .*: a DoRA adapter"):
        fuse(model, load(folder))


def test_in_memory_adapter_fuses_like_its_folder(tmp_path):
    class Merged:  # the shape of a merge result: a PEFT config and a state dict
        def __init__(self, folder: Path) -> None:
            import json

            self.config = json.loads((folder / "adapter_config.json").read_text())
            self.tensors = load_file(str(folder / "adapter_model.safetensors"))

    model = tiny_llama()
    folder = peft_adapter_from_model(model, tmp_path / "a", use_rslora=True)
    from_folder, in_memory = copy.deepcopy(model), copy.deepcopy(model)
    fuse(from_folder, load(folder))
    fuse(in_memory, Merged(folder))
    for key, value in in_memory.state_dict().items():
        assert torch.equal(value, from_folder.state_dict()[key]), key


class UNetLike(torch.nn.Module):
    """Module names with "_" inside (down_blocks, to_q, conv_in), as in diffusers UNets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down_blocks = torch.nn.ModuleList([torch.nn.Module() for _ in range(2)])
        for block in self.down_blocks:
            block.to_q = torch.nn.Linear(8, 8)
            block.proj_out = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x).permute(0, 2, 3, 1)
        for block in self.down_blocks:
            h = block.proj_out(torch.relu(block.to_q(h)))
        return h


def write_kohya_file(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A kohya file (lora_down / lora_up / alpha != rank); returns module path -> (down, up, alpha)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    modules = {
        "conv_in": (torch.randn(2, 3, 3, 3, generator=gen), torch.randn(8, 2, 1, 1, generator=gen), 1.0),
        "down_blocks.1.to_q": (torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen), 2.0),
        "down_blocks.0.proj_out": (torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen), 8.0),
    }
    tensors = {}
    for module, (down, up, alpha) in modules.items():
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return modules


def test_kohya_file_fuses_and_applies_by_resolving_underscore_names(tmp_path):
    from loramgr.formats.detect import read_adapter_file
    from loramgr.model.peftmodel import apply

    expected_deltas = write_kohya_file(tmp_path / "style.safetensors")
    adapter = LoraAdapter(read_adapter_file(tmp_path / "style.safetensors"), tmp_path)
    torch.manual_seed(0)
    model = UNetLike().eval()
    assert sorted(resolve_module_names(model, adapter).values()) == sorted(expected_deltas)

    fused = copy.deepcopy(model)
    fuse(fused, adapter)
    for module, (down, up, alpha) in expected_deltas.items():
        rank = down.shape[0]
        delta = (alpha / rank) * (up.flatten(1) @ down.flatten(1))
        original = model.get_submodule(module).weight.detach()
        got = fused.get_submodule(module).weight.detach()
        torch.testing.assert_close(got, original + delta.reshape(original.shape), atol=1e-5, rtol=1e-5)

    # the same adapter as PEFT layers computes what the fused model computes
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    applied = apply(copy.deepcopy(model), adapter).eval()
    torch.testing.assert_close(outputs_plain(applied, x), outputs_plain(fused, x), atol=1e-5, rtol=1e-5)


def test_fuse_refuses_a_tied_weight_unless_allowed(tmp_path):
    # GPT-2 ties wte and lm_head: fusing an embedding LoRA would change the output layer too
    model = tiny_gpt2()
    folder = peft_adapter_from_model(model, tmp_path / "a", target_modules=["wte", "c_attn"], fan_in_fan_out=True)
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(ModelMismatchError, match="lm_head") as caught:
        fuse(model, load(folder))
    assert [m.problem for m in caught.value.mismatches] == ["tied"]
    assert torch.equal(model.lm_head.weight.detach(), before)
    fuse(model, load(folder), allow_tied=True)
    assert not torch.equal(model.lm_head.weight.detach(), before)
