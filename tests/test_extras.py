"""PEFT adapters with parts besides their LoRA factors: modules_to_save (an lm_head, a BERT or ViT
classifier), trained biases (bias="lora_only" / "all"), lora_bias and trainable tokens, and DoRA from
the registry.

Every adapter is made by PEFT itself on a tiny model, every trainable parameter moved off its initial
value, installed through the CLI; apply and fuse are compared with PEFT's own loader
(``PeftModel.from_pretrained``, and its ``merge_and_unload`` for fuse) on the same input.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import loramgr
from tests.factories import one_line_error, run_cli, sample_input, tiny_llama

RTOL = 1e-5


def tiny_bert_classifier(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tiny_vit_classifier(seed: int = 0) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=5)
    return ViTForImageClassification(config).eval()


def make_adapter(model: torch.nn.Module, folder: Path, *, seed: int = 0, **lora_kwargs: Any) -> Path:
    """An adapter saved by PEFT, every trainable parameter (factors, saved modules, biases, token rows)
    moved as training would, so that each part changes the output."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(str(folder))
    return folder


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """The logits for a fixed input (given by position: PeftModel passes it on as is)."""
    config = getattr(model, "config", None)
    vision = getattr(config, "model_type", "") == "vit"
    with torch.no_grad():
        if vision:
            return model(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))).logits
        return model(sample_input(1)).logits


def peft_outputs(base: torch.nn.Module, folder: Path, *, merged: bool = False) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    return outputs(model.merge_and_unload() if merged else model)


def assert_close(found: torch.Tensor, expected: torch.Tensor) -> None:
    error = (found - expected).abs().max() / expected.abs().max()
    assert error <= RTOL, f"relative error {error:.2e}"


def install(folder: Path, name: str) -> loramgr.LoraAdapter:
    run_cli("install", str(folder), "--name", name)
    return loramgr.get(name)


CASES = {
    "lm_head": (lambda: tiny_llama(), {"modules_to_save": ["lm_head"]}),
    "bert-seq-cls": (tiny_bert_classifier, {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}),
    "vit-classifier": (tiny_vit_classifier, {"modules_to_save": ["classifier"]}),
    "bias-lora-only": (lambda: tiny_llama(attention_bias=True), {"bias": "lora_only"}),
    "bias-all": (lambda: tiny_llama(attention_bias=True), {"bias": "all"}),
    "bert-bias-all-lora-bias": (tiny_bert_classifier, {"task_type": "SEQ_CLS", "target_modules": ["query", "value"],
                                                       "bias": "all", "lora_bias": True}),
    "lora-bias": (lambda: tiny_llama(attention_bias=True), {"lora_bias": True}),
    "tokens": (lambda: tiny_llama(), {"trainable_token_indices": [1, 5, 7, 100]}),
    "tokens-by-name": (lambda: tiny_llama(), {"trainable_token_indices": {"embed_tokens": [0, 3, 9]}}),
}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, torch.nn.Module, Path]:
    build, kwargs = CASES[request.param]
    base = build()
    return request.param, base, make_adapter(base, tmp_path / request.param, **kwargs)


def test_apply_from_the_registry_is_peft(case: tuple[str, torch.nn.Module, Path]) -> None:
    name, base, folder = case
    expected = peft_outputs(base, folder)
    without = outputs(base)
    assert (expected - without).abs().max() > 1e-2  # the adapter changes the output
    adapter = install(folder, name)
    assert adapter.info.extras or any(m.key_bias for m in adapter.info.modules)
    assert_close(outputs(loramgr.apply(copy.deepcopy(base), adapter)), expected)
    assert_close(outputs(loramgr.apply(copy.deepcopy(base), loramgr.load(folder))), expected)


class FactorsOnly:
    """The same adapter with only its LoRA factors: what loramgr computed when it ignored the rest."""

    def __init__(self, folder: Path) -> None:
        import json

        from safetensors.torch import load_file

        self.config = json.loads((folder / "adapter_config.json").read_text())
        self.config.update(modules_to_save=None, bias="none", lora_bias=False, trainable_token_indices=None)
        self.tensors = {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
                        if k.endswith((".lora_A.weight", ".lora_B.weight"))}


def test_fuse_is_merge_and_unload_and_unfuse_restores(case: tuple[str, torch.nn.Module, Path]) -> None:
    name, base, folder = case
    adapter = install(folder, name)
    model = copy.deepcopy(base)
    loramgr.fuse(model, adapter)
    expected = peft_outputs(base, folder, merged=True)
    assert_close(outputs(model), expected)
    factors_only = copy.deepcopy(base)
    loramgr.fuse(factors_only, FactorsOnly(folder))
    # the parts besides the factors matter: without them the output is visibly another
    assert (outputs(factors_only) - expected).abs().max() / expected.abs().max() > 1e-3
    loramgr.unfuse(model, adapter)
    lora_weights = {f"{m.name}.weight" for m in adapter.info.modules}
    for key, original in base.state_dict().items():
        if key in lora_weights:  # W + s·B·A - s·B·A rounds once
            torch.testing.assert_close(model.state_dict()[key], original, rtol=0, atol=1e-6)
        else:  # saved modules, biases and token rows come back bit for bit
            assert torch.equal(model.state_dict()[key], original), key


def test_show_reports_the_extras(tmp_path: Path) -> None:
    make_adapter(tiny_bert_classifier(), tmp_path / "cls", task_type="SEQ_CLS", target_modules=["query", "value"])
    make_adapter(tiny_llama(), tmp_path / "tok", trainable_token_indices=[1, 5])
    run_cli("install", str(tmp_path / "cls"), "--name", "cls")
    run_cli("install", str(tmp_path / "tok"), "--name", "tok")
    assert "saves whole modules (modules_to_save): classifier" in run_cli("show", "cls").output
    assert "trainable tokens of model.embed_tokens: 2 row(s) (1, 5)" in run_cli("show", "tok").output
    saved = loramgr.get("cls").info.extras or []
    assert {(e.module, e.param) for e in saved} == {("classifier", "weight"), ("classifier", "bias")}
    shown = json.loads(run_cli("show", "tok", "--json").output)
    assert [(e["feature"], e["module"], e["indices"]) for e in shown["extras"]] == [
        ("trainable_tokens", "model.embed_tokens", [1, 5])]
    assert {e["module"] for e in json.loads(run_cli("show", "cls", "--json").output)["extras"]} == {"classifier"}


def test_a_record_without_extras_still_reads() -> None:
    """Records stored before extras were read have no "extras" key: they load, and the config speaks."""
    from loramgr.adapter import AdapterInfo
    from loramgr.formats.extras import features

    info = AdapterInfo(format="peft", adapter_type="lora", modules=[], weights_file="w",
                       config={"modules_to_save": ["lm_head"]})
    record = info.to_record()
    del record["extras"]
    old = AdapterInfo.from_record(record)
    assert old.extras is None
    assert features(old) == [("modules_to_save", "lm_head")]


def test_dora_applies_from_the_registry_as_from_its_folder(tmp_path: Path) -> None:
    base = tiny_llama()
    folder = make_adapter(base, tmp_path / "dora", use_dora=True)
    adapter = install(folder, "dora")
    assert_close(outputs(loramgr.apply(copy.deepcopy(base), adapter)), peft_outputs(base, folder))


def test_combine_refuses_two_adapters_saving_one_lm_head(tmp_path: Path) -> None:
    base = tiny_llama()
    for seed, name in enumerate(("a", "b")):
        install(make_adapter(base, tmp_path / name, seed=seed, modules_to_save=["lm_head"]), name)
    error = one_line_error("combine", "a", "b", "--name", "ab")
    assert "a==0.1.0 and b==0.1.0 both have modules_to_save lm_head" in error
    assert "ab" not in run_cli("list").output.split()


@pytest.mark.parametrize("kwargs", [{"lora_bias": True}, {"trainable_token_indices": [2, 3]}])
def test_combine_refuses_lora_bias_and_tokens(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    base = tiny_llama(attention_bias=True)
    for seed, name in enumerate(("a", "b")):
        install(make_adapter(base, tmp_path / name, seed=seed, **kwargs), name)
    error = one_line_error("combine", "a", "b", "--name", "ab")
    assert ("lora_bias" in error) or ("trainable_token_indices" in error and "embed_tokens" in error)
    assert "ab" not in run_cli("list").output.split()


@pytest.mark.parametrize("fmt", ["comfyui", "gguf"])  # kohya / diffusers refuse a classifier's adapter before
def test_export_to_a_factors_only_format_refuses(tmp_path: Path, fmt: str) -> None:
    install(make_adapter(tiny_bert_classifier(), tmp_path / "cls", task_type="SEQ_CLS",
                         target_modules=["query", "value"]), "cls")
    out = tmp_path / "out.safetensors"
    error = one_line_error("export", "cls", str(out), "--format", fmt)
    assert "classifier" in error and f"export to {fmt}" in error
    assert not out.exists()


def test_export_peft_carries_the_extras(tmp_path: Path) -> None:
    base = tiny_llama(attention_bias=True)
    folder = make_adapter(base, tmp_path / "all", bias="all", lora_bias=True, modules_to_save=["lm_head"],
                          trainable_token_indices=[4, 6])
    install(folder, "all")
    run_cli("export", "all", str(tmp_path / "exported"), "--format", "peft")
    assert_close(peft_outputs(base, tmp_path / "exported"), peft_outputs(base, folder))


def test_fuse_refuses_a_scale_for_replaced_modules(tmp_path: Path) -> None:
    from loramgr.errors import UnsupportedFeatureError

    base = tiny_llama()
    adapter = install(make_adapter(base, tmp_path / "head", modules_to_save=["lm_head"]), "head")
    model = copy.deepcopy(base)
    with pytest.raises(UnsupportedFeatureError, match="lm_head"):
        loramgr.fuse(model, adapter, scale=0.5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())


def test_unfuse_without_the_originals_refuses(tmp_path: Path) -> None:
    from loramgr.errors import UnsupportedFeatureError

    base = tiny_llama()
    adapter = install(make_adapter(base, tmp_path / "head", modules_to_save=["lm_head"]), "head")
    with pytest.raises(UnsupportedFeatureError, match="lm_head"):
        loramgr.unfuse(copy.deepcopy(base), adapter)


def test_two_adapters_replacing_one_module_cannot_both_be_fused(tmp_path: Path) -> None:
    from loramgr.errors import ConflictError

    base = tiny_llama()
    first = install(make_adapter(base, tmp_path / "a", modules_to_save=["lm_head"]), "a")
    second = install(make_adapter(base, tmp_path / "b", seed=1, modules_to_save=["lm_head"]), "b")
    model = copy.deepcopy(base)
    loramgr.fuse(model, first)
    with pytest.raises(ConflictError, match="lm_head"):
        loramgr.fuse(model, second)
    loramgr.unfuse(model, first)
    loramgr.fuse(model, second)
    assert_close(outputs(model), peft_outputs(base, tmp_path / "b", merged=True))


def test_a_saved_module_of_another_shape_is_a_mismatch(tmp_path: Path) -> None:
    from loramgr.model.weights import ModelMismatchError

    adapter = install(make_adapter(tiny_bert_classifier(), tmp_path / "cls", task_type="SEQ_CLS",
                                   target_modules=["query", "value"]), "cls")
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    with pytest.raises(ModelMismatchError, match="classifier"):
        loramgr.apply(other, adapter)
    with pytest.raises(ModelMismatchError, match="classifier"):
        loramgr.fuse(other, adapter)


def test_compress_refuses_saved_modules(tmp_path: Path) -> None:
    install(make_adapter(tiny_llama(), tmp_path / "head", modules_to_save=["lm_head"]), "head")
    error = one_line_error("compress", "head", "--rank", "2", "--name", "small")
    assert "lm_head" in error and "modules_to_save" in error
    assert "small" not in run_cli("list").output.split()


def test_hotswap_refuses_trainable_tokens(tmp_path: Path) -> None:
    from loramgr.errors import UnsupportedFeatureError

    base = tiny_llama()
    plain = install(make_adapter(base, tmp_path / "plain"), "plain")
    tokens = install(make_adapter(base, tmp_path / "tok", trainable_token_indices=[3]), "tok")
    model = loramgr.apply(copy.deepcopy(base), plain)
    with pytest.raises(UnsupportedFeatureError, match="embed_tokens"):
        loramgr.hotswap(model, "default", tokens)


def test_check_compares_a_saved_classifier_with_the_base(tmp_path: Path) -> None:
    """PEFT cannot load a 3-label classifier into a 2-label model: check says so, naming the module."""
    from transformers import BertConfig, BertForSequenceClassification

    base = tiny_bert_classifier()
    base.save_pretrained(tmp_path / "bert3")
    other = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    other.save_pretrained(tmp_path / "bert2")
    folder = make_adapter(base, tmp_path / "cls", task_type="SEQ_CLS", target_modules=["query", "value"])
    run_cli("check", str(folder), "--base", str(tmp_path / "bert3"))
    output = run_cli("check", str(folder), "--base", str(tmp_path / "bert2"), code=1).output
    assert "modules_to_save classifier.weight is [3, 32], the base has [2, 32]" in output
    with pytest.raises(RuntimeError, match="size mismatch"):  # what PEFT itself says on that base
        peft_outputs(other, folder)


def test_tied_embeddings_take_the_token_rows_as_peft_does(tmp_path: Path) -> None:
    """GPT-2 ties wte and lm_head: PEFT's trainable tokens change both, a saved lm_head replaces lm_head alone."""
    from loramgr.model.weights import ModelMismatchError
    from tests.factories import tiny_gpt2

    base = tiny_gpt2()
    folder = make_adapter(base, tmp_path / "tok", target_modules=["c_attn"], trainable_token_indices=[1, 5])
    model = copy.deepcopy(base)
    loramgr.fuse(model, install(folder, "tok"))
    assert_close(outputs(model), peft_outputs(base, folder, merged=True))
    head = make_adapter(base, tmp_path / "head", target_modules=["c_attn"], modules_to_save=["lm_head"])
    model = copy.deepcopy(base)
    with pytest.raises(ModelMismatchError, match="lm_head.weight: its tensor is shared with transformer.wte"):
        loramgr.fuse(model, install(head, "head"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())


def test_apply_through_resolved_names_refuses_the_extras(tmp_path: Path) -> None:
    """PEFT loads saved modules by their exact names; under a wrapper level loramgr refuses rather than drop them."""
    from loramgr.errors import UnsupportedFeatureError

    base = tiny_llama()
    adapter = install(make_adapter(base, tmp_path / "head", modules_to_save=["lm_head"]), "head")
    wrapped = torch.nn.ModuleDict({"inner": copy.deepcopy(base)})
    with pytest.raises(UnsupportedFeatureError, match="lm_head has modules_to_save") as raised:
        loramgr.apply(wrapped, adapter)
    assert "\n" not in str(raised.value)


def test_a_version_recorded_before_extras_were_read_fuses_them(tmp_path: Path) -> None:
    """A registry record without "extras" (an older loramgr's) is described again from its stored files."""
    from dataclasses import replace

    base = tiny_llama()
    folder = make_adapter(base, tmp_path / "head", modules_to_save=["lm_head"], trainable_token_indices=[2])
    stored = install(folder, "head")
    old = loramgr.LoraAdapter(replace(stored.info, extras=None), stored.folder, label=stored.label,
                              weights_path=stored.weights_path, digest=stored.digest)
    model = copy.deepcopy(base)
    loramgr.fuse(model, old)
    assert_close(outputs(model), peft_outputs(base, folder, merged=True))


def test_lora_bias_fuses_at_a_scale_and_unfuses_at_the_same(tmp_path: Path) -> None:
    from loramgr.errors import ConflictError

    base = tiny_llama(attention_bias=True)
    adapter = install(make_adapter(base, tmp_path / "lb", lora_bias=True), "lb")
    model = copy.deepcopy(base)
    loramgr.fuse(model, adapter, scale=0.5)
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert not torch.equal(bias, base.model.layers[0].self_attn.q_proj.bias)
    with pytest.raises(ConflictError, match="fused at scale 0.5"):
        loramgr.unfuse(model, adapter)
    loramgr.unfuse(model, adapter, scale=0.5)
    assert torch.equal(bias, base.model.layers[0].self_attn.q_proj.bias)
