"""check --engine vllm knows which adapter modules vLLM applies per architecture (vllm#55193: an adapter
none of whose modules vLLM supports is served as the bare base model without a word)."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import one_line_error, peft_adapter_from_model, run_cli, tiny_gpt2, tiny_llama

import loramgr
from loramgr.compat.check import CheckReport
from loramgr.compat.vllm_modules import VLLM_LORA_MODULES

# What vLLM's worker expects in an adapter for each architecture, written out from its model classes
# (packed_modules_mapping, embedding_modules) and get_supported_lora_modules: the LinearBase leaves with
# the fused qkv_proj / gate_up_proj replaced by the modules packed into them, plus embedding modules.
_LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
_NO_EMBEDDING = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_EXPECTED = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Phi3ForCausalLM": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"},
    "Qwen2ForCausalLM": _NO_EMBEDDING,
    "Qwen3ForCausalLM": _LLAMA,
    "GemmaForCausalLM": _NO_EMBEDDING,
    "Gemma2ForCausalLM": _NO_EMBEDDING,
    "Gemma3ForCausalLM": _NO_EMBEDDING,
}


def tiny_qwen2():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = tiny_qwen2()
    folder = tmp_path_factory.mktemp("qwen2-base")
    model.save_pretrained(str(folder))
    return model, folder


def engine_findings(report: CheckReport, code: str) -> list[tuple[str, str | None]]:
    return [(f.severity, f.module) for f in report.findings if f.code == code]


def test_table_gives_what_vllm_expects_per_architecture() -> None:
    assert {arch: set(t.applied) for arch, t in VLLM_LORA_MODULES.items() if t.supports_lora} == VLLM_EXPECTED
    assert not VLLM_LORA_MODULES["GPT2LMHeadModel"].supports_lora  # vLLM's GPT2LMHeadModel is no SupportsLoRA


def test_adapter_vllm_would_not_apply_at_all_is_an_error_naming_it(tmp_path: Path, qwen2) -> None:
    model, base = qwen2
    head_only = peft_adapter_from_model(model, tmp_path / "head", target_modules=["lm_head"])
    report = loramgr.check([head_only], base=str(base), engine="vllm")
    assert engine_findings(report, "engine-modules") == [("error", "lm_head")]
    assert not report.ok
    output = run_cli("check", str(head_only), "--base", str(base), "--engine", "vllm", code=1).output
    assert "none of its modules (lm_head) is one vLLM applies on Qwen2ForCausalLM" in output


def test_some_ignored_modules_are_a_warning_naming_them(tmp_path: Path, qwen2) -> None:
    model, base = qwen2
    mixed = peft_adapter_from_model(model, tmp_path / "mixed", target_modules=["q_proj", "lm_head"])
    report = loramgr.check([mixed], base=str(base), engine="vllm")
    assert report.ok
    found = [f for f in report.findings if f.code == "engine-modules"]
    assert [(f.severity, f.module) for f in found] == [("warning", "lm_head")]
    assert "vLLM ignores 1 of its 3 modules on Qwen2ForCausalLM (lm_head;" in found[0].message
    # the modules vLLM applies raise nothing
    plain = peft_adapter_from_model(model, tmp_path / "plain", target_modules=["q_proj", "v_proj", "gate_proj"])
    assert engine_findings(loramgr.check([plain], base=str(base), engine="vllm"), "engine-modules") == []


def test_llama_applies_lm_head_where_qwen2_does_not(tmp_path: Path) -> None:
    model = tiny_llama(tie_word_embeddings=False)
    base = tmp_path / "llama-base"
    model.save_pretrained(str(base))
    head = peft_adapter_from_model(model, tmp_path / "head", target_modules=["lm_head", "q_proj"])
    report = loramgr.check([head], base=str(base), engine="vllm")
    assert report.ok and engine_findings(report, "engine-modules") == []


def test_architecture_without_lora_in_vllm_is_an_error(tmp_path: Path) -> None:
    model = tiny_gpt2()
    base = tmp_path / "gpt2-base"
    model.save_pretrained(str(base))
    adapter = peft_adapter_from_model(model, tmp_path / "a", target_modules=["c_attn"], fan_in_fan_out=True)
    report = loramgr.check([adapter], base=str(base), engine="vllm")
    assert engine_findings(report, "engine-no-lora") == [("error", None)]


def test_without_a_base_architecture_the_check_says_it_was_not_made(tmp_path: Path, qwen2) -> None:
    model, _ = qwen2
    head_only = peft_adapter_from_model(model, tmp_path / "head", target_modules=["lm_head"])
    report = loramgr.check([head_only], engine="vllm")
    assert engine_findings(report, "engine-modules-unchecked") == [("info", None)]
    assert report.ok  # not checked is no error


def test_deploy_vllm_refuses_an_adapter_vllm_would_serve_as_the_bare_base(tmp_path: Path, qwen2) -> None:
    model, base = qwen2
    run_cli("install", str(peft_adapter_from_model(model, tmp_path / "h", target_modules=["lm_head"])),
            "--name", "head-only", "--version", "1.0.0")
    cache = tmp_path / "cache"
    line = one_line_error("deploy", "vllm", str(cache), "--served-model", "org/qwen", "head-only==1.0.0",
                          "--base", str(base))
    assert "head-only@1.0.0 [lm_head]" in line and "bare base model" in line
    assert not (cache / "head-only@1.0.0").exists()
    # linked at install, the base's architecture is known without --base
    run_cli("base", "add", str(base), "--name", "tiny-qwen2")
    run_cli("install", str(tmp_path / "h"), "--name", "head-linked", "--version", "1.0.0", "--base", "tiny-qwen2")
    line = one_line_error("deploy", "vllm", str(cache), "--served-model", "org/qwen", "head-linked==1.0.0")
    assert "bare base model" in line
