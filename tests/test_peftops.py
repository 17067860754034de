"""apply / hotswap against PEFT's own loader on tiny Llama, GPT-2 and BERT models.

The reference is always ``PeftModel.from_pretrained`` of an adapter folder on a fresh copy of the
base model: loramgr's result must compute the same outputs.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from factories import peft_adapter_from_model, sample_input, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from loramgr.adapter import LoraAdapter
from loramgr.errors import ConflictError, IncompatibleError, LoramgrError
from loramgr.formats.peft import read_peft_folder, write_peft_folder
from loramgr.model.weights import ModelMismatchError

peft = pytest.importorskip("peft")
from loramgr.model.peftmodel import apply, hotswap  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama": (tiny_llama, {"target_modules": LLAMA_TARGETS, "use_rslora": True, "rank_pattern": {"up_proj": 2}}),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "bert": (tiny_bert, {"target_modules": ["query", "value"], "alpha_pattern": {"value": 3.0}}),
}


def load(folder: Path) -> LoraAdapter:
    return LoraAdapter(read_peft_folder(folder), folder)


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def fresh(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()


class Merged:
    """The shape of a merge result: a PEFT config, a state dict and save_pretrained."""

    def __init__(self, folder: Path) -> None:
        self.config = json.loads((folder / "adapter_config.json").read_text())
        self.tensors = load_file(str(folder / "adapter_model.safetensors"))

    def save_pretrained(self, folder: Path) -> Path:
        return write_peft_folder(folder, self.config, self.tensors)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    factory, options = CASES[request.param]
    model = factory()
    root = tmp_path_factory.mktemp(request.param)
    first = peft_adapter_from_model(model, root / "first", r=4, alpha=8, seed=1, **options)
    second = peft_adapter_from_model(model, root / "second", r=2, alpha=6, seed=2, **options)
    return model, first, second


def test_apply_matches_from_pretrained(case):
    model, first, _ = case
    x = sample_input()
    expected = outputs(fresh(model, first), x)
    assert not torch.allclose(expected, outputs(model, x), atol=1e-4), "the adapter must change the output"
    applied = apply(copy.deepcopy(model), load(first)).eval()
    assert isinstance(applied, peft.PeftModel)
    torch.testing.assert_close(outputs(applied, x), expected, atol=1e-6, rtol=1e-6)


def test_apply_in_memory_adapter_matches_its_exported_folder(case, tmp_path):
    # a merge result is built from config + tensors, not from a folder: same outputs as its export
    model, first, _ = case
    merged = Merged(first)
    exported = merged.save_pretrained(tmp_path / "exported")
    applied = apply(copy.deepcopy(model), merged).eval()
    x = sample_input()
    torch.testing.assert_close(outputs(applied, x), outputs(fresh(model, exported), x), atol=1e-6, rtol=1e-6)


def test_apply_adds_a_second_adapter_and_set_adapter_switches(case):
    model, first, second = case
    x = sample_input()
    both = apply(apply(copy.deepcopy(model), load(first)), load(second), adapter_name="other").eval()
    assert set(both.peft_config) == {"default", "other"}
    torch.testing.assert_close(outputs(both, x), outputs(fresh(model, first), x), atol=1e-6, rtol=1e-6)
    both.set_adapter("other")
    torch.testing.assert_close(outputs(both, x), outputs(fresh(model, second), x), atol=1e-6, rtol=1e-6)
    with pytest.raises(ConflictError, match="other"):
        apply(both, load(second), adapter_name="other")


def test_hotswap_matches_a_fresh_load(case):
    # second has a smaller rank (zero-padded into the loaded rank 4) and another alpha (scaling)
    model, first, second = case
    x = sample_input()
    swapped = apply(copy.deepcopy(model), load(first)).eval()
    n_modules = len(list(swapped.modules()))
    hotswap(swapped, "default", load(second))
    assert len(list(swapped.modules())) == n_modules
    torch.testing.assert_close(outputs(swapped, x), outputs(fresh(model, second), x), atol=1e-6, rtol=1e-6)
    hotswap(swapped, "default", Merged(first))  # and back, from an in-memory adapter
    torch.testing.assert_close(outputs(swapped, x), outputs(fresh(model, first), x), atol=1e-6, rtol=1e-6)


def test_apply_resolves_an_adapter_trained_on_the_bare_model(tmp_path):
    # keys without the LlamaForCausalLM "model." level, as saved from a LlamaModel
    model = tiny_llama()
    folder = peft_adapter_from_model(model, tmp_path / "a", use_rslora=True, rank_pattern={"v_proj": 2})
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.model.", "base_model.model."): v for k, v in tensors.items()}
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(renamed, str(bare / "adapter_model.safetensors"))

    applied = apply(copy.deepcopy(model), load(bare)).eval()
    x = sample_input()
    torch.testing.assert_close(outputs(applied, x), outputs(fresh(model, folder), x), atol=1e-6, rtol=1e-6)


def test_apply_refuses_a_wrong_base_listing_every_module(tmp_path):
    llama = tiny_llama()
    folder = peft_adapter_from_model(llama, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    with pytest.raises(ModelMismatchError) as caught:
        apply(tiny_bert(), load(folder))
    assert len(caught.value.mismatches) == 4  # 2 layers x (q_proj, v_proj), all missing from BERT
    for mismatch in caught.value.mismatches:
        assert mismatch.module in str(caught.value)


def test_hotswap_refuses_larger_rank_and_new_targets_without_changing_the_model(tmp_path):
    model = tiny_llama()
    small = peft_adapter_from_model(model, tmp_path / "small", r=2, target_modules=["q_proj"])
    large = peft_adapter_from_model(model, tmp_path / "large", r=4, target_modules=["q_proj", "v_proj"])
    swapped = apply(copy.deepcopy(model), load(small)).eval()
    x = sample_input()
    before = outputs(swapped, x)
    with pytest.raises(IncompatibleError) as caught:
        hotswap(swapped, "default", load(large))
    problems = {(m.module.rsplit(".", 1)[-1], m.problem) for m in caught.value.mismatches}
    assert problems == {("q_proj", "rank"), ("v_proj", "not loaded")}
    assert len(caught.value.mismatches) == 4
    torch.testing.assert_close(outputs(swapped, x), before, atol=0, rtol=0)


def test_hotswap_to_fewer_targets_zeroes_the_rest(tmp_path):
    model = tiny_llama()
    wide = peft_adapter_from_model(model, tmp_path / "wide", target_modules=["q_proj", "v_proj"])
    narrow = peft_adapter_from_model(model, tmp_path / "narrow", r=2, target_modules=["v_proj"], seed=5)
    swapped = apply(copy.deepcopy(model), load(wide)).eval()
    hotswap(swapped, "default", load(narrow))
    x = sample_input()
    torch.testing.assert_close(outputs(swapped, x), outputs(fresh(model, narrow), x), atol=1e-6, rtol=1e-6)


def test_hotswap_needs_a_loaded_adapter_name(tmp_path):
    model = tiny_llama()
    folder = peft_adapter_from_model(model, tmp_path / "a")
    with pytest.raises(LoramgrError, match="nope"):
        hotswap(apply(copy.deepcopy(model), load(folder)), "nope", load(folder))


def test_missing_peft_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(LoramgrError, match=r"pip install 'loramgr\[peft\]'"):
        apply(torch.nn.Linear(2, 2), Merged.__new__(Merged))


def test_hotswap_into_a_model_prepared_for_compiled_hotswap(tmp_path):
    # PEFT pads loaded factors to a target rank and turns scalings into tensors; hotswap keeps both
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = tiny_llama()
    small = peft_adapter_from_model(model, tmp_path / "small", r=2, alpha=4, seed=1)
    large = peft_adapter_from_model(model, tmp_path / "large", r=8, alpha=4, seed=2)
    swapped = apply(copy.deepcopy(model), load(small)).eval()
    prepare_model_for_compiled_hotswap(swapped, target_rank=8)
    layer = swapped.base_model.model.model.layers[0].self_attn.q_proj
    scaling = layer.scaling["default"]
    assert isinstance(scaling, torch.Tensor)
    hotswap(swapped, "default", load(large))
    assert layer.scaling["default"] is scaling and float(scaling) == 0.5  # the same tensor, refilled
    x = sample_input()
    torch.testing.assert_close(outputs(swapped, x), outputs(fresh(model, large), x), atol=1e-6, rtol=1e-6)


def test_apply_a_merge_result_matches_its_saved_folder(tmp_path):
    # the real MergedAdapter of loramgr.merge, applied without being written out
    from loramgr.merge import MergeOptions, combine

    model = tiny_llama()
    a = peft_adapter_from_model(model, tmp_path / "a", r=4, seed=1, rank_pattern={"v_proj": 2})
    b = peft_adapter_from_model(model, tmp_path / "b", r=4, seed=2, use_rslora=True)
    merged = combine([load(a), load(b)], MergeOptions(method="linear", weights=(0.7, 0.3)))
    saved = tmp_path / "merged"
    merged.save_pretrained(saved)
    applied = apply(copy.deepcopy(model), merged).eval()
    x = sample_input()
    torch.testing.assert_close(outputs(applied, x), outputs(fresh(model, saved), x), atol=1e-6, rtol=1e-6)
