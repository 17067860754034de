"""MoE adapters: LoRA on PEFT ``target_parameters`` (fused expert tensors), made by PEFT on tiny MoE models.

transformers 5 keeps the experts of Qwen3-MoE as 3-D parameters (num_experts x out x in) and those of
gpt-oss transposed (num_experts x in x out, ``is_transposed``); PEFT adapts them with ParamWrapper. The
reference is always PEFT: ``PeftModel.from_pretrained`` for outputs, its loaded layers for ranks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from factories import one_line_error, run_cli, sample_input
from safetensors.torch import save_file

import loramgr
from loramgr.errors import LoramgrError, UnsupportedAdapterError
from loramgr.formats.peft import read_peft_folder

peft = pytest.importorskip("peft")
from loramgr.model.peftmodel import apply  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_qwen3_moe() -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=8,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(config).eval()


def tiny_gpt_oss() -> torch.nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    return GptOssForCausalLM(config).eval()


def peft_moe_adapter(model: torch.nn.Module, folder: Path, *, seed: int = 1, **options) -> Path:
    """An adapter made by PEFT with target_parameters, factors randomised (seeded) so every expert moves."""
    config = peft.LoraConfig(r=4, lora_alpha=8, **options)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def qwen() -> torch.nn.Module:
    return tiny_qwen3_moe()


@pytest.fixture(scope="module")
def moe_adapter(qwen, tmp_path_factory) -> Path:
    """q_proj as a module, both expert tensors as parameters, down_proj at another rank (rank_pattern)."""
    folder = tmp_path_factory.mktemp("moe") / "adapter"
    return peft_moe_adapter(qwen, folder, target_modules=["q_proj"], target_parameters=EXPERTS,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 6})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits


def _peft_layers(model: torch.nn.Module, folder: Path) -> dict[str, tuple[int, int, int, int, float]]:
    """What PEFT loads: per adapted parameter (or module) its rank, experts, in, out features and scale."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    layers = {}
    for name, layer in loaded.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.r:
            continue
        name = name.replace(".base_layer", "")
        if isinstance(layer, ParamWrapper):
            name, experts = f"{name}.{layer.parameter_name}", layer.num_experts
        else:
            experts = 1
        layers[name] = (layer.r["default"], experts, layer.in_features, layer.out_features, layer.scaling["default"])
    return layers


def test_install_reads_the_per_expert_layout_as_peft_loads_it(qwen, moe_adapter):
    run_cli("install", str(moe_adapter), "--name", "moe")
    info = loramgr.get("moe").info
    ours = {m.name: (m.rank, m.kernel[0] if m.kind == "parameter" else 1, m.in_features, m.out_features, m.scale)
            for m in info.modules}
    assert ours == _peft_layers(qwen, moe_adapter)  # scales are exact binary fractions here
    assert {m.kind for m in info.modules} == {"linear", "parameter"}
    details = json.loads(run_cli("show", "moe", "--json").output)
    assert details["ranks_found"] == [2, 4]
    assert set(details["target_modules"]) == {"q_proj", *EXPERTS}
    assert "gate_up_proj" in run_cli("show", "moe").output


@pytest.mark.parametrize("source", ["folder", "registry"])
def test_apply_matches_from_pretrained(qwen, moe_adapter, source):
    reference = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(qwen), str(moe_adapter)))
    assert float((reference - _logits(qwen)).abs().max()) > 1e-3  # the experts' LoRA moves the output
    if source == "registry":
        run_cli("install", str(moe_adapter), "--name", "moe")
    adapter = loramgr.get("moe") if source == "registry" else loramgr.load(moe_adapter)
    got = _logits(apply(copy.deepcopy(qwen), adapter))
    assert float((got - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_transposed_experts_apply_as_peft_loads_them(tmp_path):
    """gpt-oss stores experts as num_experts x in x out; one parameter targeted on its own."""
    model = tiny_gpt_oss()
    folder = peft_moe_adapter(model, tmp_path / "oss", target_modules=[], target_parameters=["mlp.experts.down_proj"])
    info = read_peft_folder(folder)
    (spec,) = info.modules
    assert (spec.name, spec.kind, spec.rank, spec.kernel[0]) == ("model.layers.0.mlp.experts.down_proj",
                                                                 "parameter", 4, 4)
    reference = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)))
    got = _logits(apply(copy.deepcopy(model), loramgr.load(folder)))
    assert float((got - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_apply_to_another_model_lists_the_mismatch(moe_adapter):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    other = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=2, num_experts_per_tok=1,
        decoder_sparse_step=1, mlp_only_layers=[]))
    with pytest.raises(LoramgrError, match="mlp.experts.gate_up_proj.*4 experts"):
        apply(other, loramgr.load(moe_adapter))


def test_fuse_combine_and_compress_refuse_by_name(qwen, moe_adapter):
    with pytest.raises(UnsupportedAdapterError, match="target_parameters") as refused:
        loramgr.fuse(copy.deepcopy(qwen), loramgr.load(moe_adapter))
    assert "mlp.experts" in str(refused.value)
    run_cli("install", str(moe_adapter), "--name", "moe")
    assert "target_parameters" in one_line_error("combine", "moe", "moe", "--name", "twice")
    assert "target_parameters" in one_line_error("compress", "moe", "--rank", "1", "--name", "small")


def test_conversions_refuse_by_name(moe_adapter, tmp_path):
    """Every format but PEFT's own holds plain B·A deltas of modules: the expert parameters have none."""
    run_cli("install", str(moe_adapter), "--name", "moe")
    for fmt in ("gguf", "ollama"):
        error = one_line_error("export", "moe", str(tmp_path / f"out-{fmt}"), "--format", fmt)
        assert "target_parameters" in error, error
    assert not list(tmp_path.glob("out-*"))


def _hand_made(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": []}
    (folder / "adapter_config.json").write_text(json.dumps(base | config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_factors_that_do_not_fit_r_are_refused_naming_the_parameter(tmp_path):
    key = "base_model.model.model.layers.0.mlp.experts"
    folder = _hand_made(tmp_path / "bad", {"r": 3, "target_parameters": ["mlp.experts.down_proj"]},
                        {f"{key}.lora_A.weight": torch.ones(16, 8), f"{key}.lora_B.weight": torch.ones(32, 16)})
    error = one_line_error("install", str(folder))
    assert "model.layers.0.mlp.experts.down_proj" in error and "rank 3" in error


def test_nesting_that_depends_on_an_unknown_declaration_order_is_refused(tmp_path):
    key = "base_model.model.model.layers.0.mlp.experts"
    tensors = {}
    for prefix in (key, f"{key}.base_layer"):
        tensors |= {f"{prefix}.lora_A.weight": torch.ones(16, 8), f"{prefix}.lora_B.weight": torch.ones(8, 16)}
    folder = _hand_made(tmp_path / "nested", {"target_parameters": ["experts.w_in", "experts.w_out"]}, tensors)
    error = one_line_error("install", str(folder))
    assert "w_in" in error and "declaration order" in error
    assert run_cli("list").output.count("nested") == 0
