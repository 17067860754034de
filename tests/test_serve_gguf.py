"""export --format gguf / ollama: the GGUF read back with gguf.GGUFReader gives PEFT's own ΔW under llama.cpp's
scaling rule (alpha / rank of lora_a), with llama.cpp's converter conventions checked independently here."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import transformers
from factories import one_line_error, run_cli, write_peft_adapter

import loramgr.api

# test-side tables, written from llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py, not from loramgr
GGUF_LEAF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up"}
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama": (transformers.LlamaConfig, "llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
    "qwen2": (transformers.Qwen2Config, "qwen2", ("q_proj", "k_proj", "v_proj", "up_proj")),
    "gemma": (transformers.GemmaConfig, "gemma", ("q_proj", "k_proj", "o_proj", "down_proj")),
    "phi3": (transformers.Phi3Config, "phi3", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}


def _base(tmp: Path, kind: str) -> tuple[Path, torch.nn.Module]:
    config_cls, _, _ = MODELS[kind]
    extra = {"head_dim": 8} if kind == "gemma" else {}
    config = config_cls(**SMALL, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    folder = tmp / f"base-{kind}"
    model.save_pretrained(folder)
    run_cli("base", "add", str(folder), "--name", f"tiny-{kind}")
    return folder, model


def _modules(model: torch.nn.Module, leaves: tuple[str, ...], ranks: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves and ".layers." in name:
            found[name] = (module.in_features, module.out_features, ranks.get(name.rsplit(".", 1)[-1], 4))
    return found


def _peft_deltas(base_folder: Path, adapter_folder: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT computes it when it loads the adapter (the independent reference)."""
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = PeftModel.from_pretrained(model, str(adapter_folder))
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name] = module.get_delta_weight("default").detach()
    return deltas


def _gguf_name(module: str) -> str:
    layer = module.split(".layers.")[1].split(".")[0]
    leaf = ".".join(module.rsplit(".", 2)[-2:])
    return f"blk.{layer}.{GGUF_LEAF[leaf]}.weight"


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute, applied by the LoRA converter to B (the rows)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key in ("general.type", "general.architecture", "adapter.type"):
        field = reader.fields[key]
        fields[key] = bytes(field.parts[field.data[0]]).decode()
    alpha_field = reader.fields["adapter.lora.alpha"]
    fields["alpha"] = float(alpha_field.parts[alpha_field.data[0]][0])
    tensors = {t.name: torch.from_numpy(t.data.copy()).reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    return fields, tensors


def _assert_same_delta(gguf_file: Path, expected: dict[str, torch.Tensor], arch: str, n_head: int, n_kv: int) -> None:
    fields, tensors = _read_gguf(gguf_file)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch
    assert len(tensors) == 2 * len(expected)
    for module, delta in expected.items():
        name = _gguf_name(module)
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        assert a.shape[0] == b.shape[1]  # llama.cpp: lora_a ne[1] == lora_b ne[0]
        want = delta
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            want = _llama_cpp_permute(delta, n_head if module.endswith("q_proj") else n_kv)
        got = (fields["alpha"] / a.shape[0]) * (b @ a)  # llama.cpp: scale * alpha / rank
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (module, (got - want).abs().max())


CASES = {
    "plain": dict(alpha=8.0),
    "rank-and-alpha-patterns": dict(alpha=8.0, ranks={"q_proj": 2, "down_proj": 6, "qkv_proj": 2},
                                    alpha_pattern={"o_proj": 32.0, "k_proj": 3.0, "down_proj": 1.0}),
    "rslora": dict(alpha=16.0, use_rslora=True, ranks={"v_proj": 8, "up_proj": 8, "gate_up_proj": 8}),
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_gives_peft_delta_under_llama_cpp_scaling(tmp_path: Path, kind: str, case: str) -> None:
    base_folder, model = _base(tmp_path, kind)
    options = dict(CASES[case])
    ranks = options.pop("ranks", {})
    modules = _modules(model, MODELS[kind][2], ranks)
    folder = write_peft_adapter(tmp_path / "adapter", modules, rank=4, **options)
    run_cli("install", str(folder), "--name", "chat", "--version", "1.0.0", "--base", f"tiny-{kind}")
    run_cli("export", "chat==1.0.0", str(tmp_path / "out.gguf"), "--format", "gguf")
    expected = _peft_deltas(base_folder, folder)
    assert set(expected) == set(modules)
    _assert_same_delta(tmp_path / "out.gguf", expected, MODELS[kind][1], 4, 2)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_gguf_of_a_mixed_rank_merge_result(tmp_path: Path, kind: str) -> None:
    base_folder, model = _base(tmp_path, kind)
    leaves = MODELS[kind][2]
    run_cli("install", str(write_peft_adapter(tmp_path / "a", _modules(model, leaves, {}), rank=4, alpha=8.0)),
            "--name", "a", "--base", f"tiny-{kind}")
    big = {leaf: 8 for leaf in leaves}  # b targets only some modules: the result mixes ranks 12 and 4
    run_cli("install", str(write_peft_adapter(tmp_path / "b", _modules(model, leaves[:2], big), rank=8, alpha=4.0,
                                              seed=1)), "--name", "b", "--base", f"tiny-{kind}")
    run_cli("combine", "a", "b", "--weights", "0.7,0.3", "--name", "merged", "--version", "1.0.0")
    run_cli("export", "merged==1.0.0", str(tmp_path / "merged"), "--format", "peft")
    # a merge result has no base linked at install: --base names one (the CLI and the API take the same)
    refused = one_line_error("export", "merged==1.0.0", str(tmp_path / "x.gguf"), "--format", "gguf")
    assert "needs its base model's architecture" in refused and not (tmp_path / "x.gguf").exists()
    run_cli("export", "merged==1.0.0", str(tmp_path / "merged.gguf"), "--format", "gguf", "--base", f"tiny-{kind}")
    loramgr.api.export("merged==1.0.0", tmp_path / "api.gguf", format="gguf", base=f"tiny-{kind}")
    assert (tmp_path / "api.gguf").read_bytes() == (tmp_path / "merged.gguf").read_bytes()
    expected = _peft_deltas(base_folder, tmp_path / "merged")
    # the merge is exact: ΔW = 0.7 ΔW_a + 0.3 ΔW_b, so the GGUF must give that too
    a_deltas, b_deltas = _peft_deltas(base_folder, tmp_path / "a"), _peft_deltas(base_folder, tmp_path / "b")
    for name, delta in expected.items():
        other = b_deltas.get(name, torch.zeros_like(delta))
        assert torch.allclose(delta, 0.7 * a_deltas[name] + 0.3 * other, atol=1e-6)
    ranks = {m.rank for m in loramgr.api.registry().open_adapter("merged==1.0.0").info.modules}
    assert ranks == {12, 4}
    _assert_same_delta(tmp_path / "merged.gguf", expected, MODELS[kind][1], 4, 2)


def test_ollama_folder_names_base_and_adapter(tmp_path: Path) -> None:
    _, model = _base(tmp_path, "qwen2")
    folder = write_peft_adapter(tmp_path / "adapter", _modules(model, ("q_proj",), {}), rank=4)
    run_cli("install", str(folder), "--name", "chat", "--version", "1.0.0", "--base", "tiny-qwen2")
    run_cli("export", "chat==1.0.0", str(tmp_path / "ollama"), "--format", "ollama")
    lines = (tmp_path / "ollama" / "Modelfile").read_text().splitlines()
    assert lines == ["FROM tiny-qwen2", "ADAPTER ./adapter.gguf"]
    fields, tensors = _read_gguf(tmp_path / "ollama" / "adapter.gguf")
    assert fields["general.architecture"] == "qwen2" and "blk.0.attn_q.weight.lora_a" in tensors


def test_gguf_refusals_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    _, model = _base(tmp_path, "llama")
    modules = _modules(model, ("q_proj",), {})
    saved = write_peft_adapter(tmp_path / "saved", modules, extra_config={"modules_to_save": ["lm_head"]})
    run_cli("install", str(saved), "--name", "saved", "--base", "tiny-llama")
    assert "modules_to_save" in one_line_error("export", "saved", str(tmp_path / "s.gguf"), "--format", "gguf")
    run_cli("install", str(write_peft_adapter(tmp_path / "nobase", modules)), "--name", "nobase")
    assert "needs its base model" in one_line_error("export", "nobase", str(tmp_path / "n.gguf"), "--format", "gguf")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    run_cli("base", "add", str(tmp_path / "gpt2"), "--name", "tiny-gpt2")
    run_cli("install", str(write_peft_adapter(tmp_path / "g", {"transformer.h.0.attn.c_attn": (16, 48, 4)},
                                              extra_config={"fan_in_fan_out": True})),
            "--name", "g", "--base", "tiny-gpt2")
    message = one_line_error("export", "g", str(tmp_path / "g.gguf"), "--format", "gguf")
    assert "GPT2LMHeadModel" in message
    assert not any(p.suffix == ".gguf" or p.name.endswith(".tmp") for p in tmp_path.iterdir())
