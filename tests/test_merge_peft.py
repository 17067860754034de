"""loramgr's merges against PEFT itself: add_weighted_adapter, merge_utils and PeftModel.from_pretrained."""

from __future__ import annotations

import copy

import pytest
import torch

from loramgr.merge import MergeOptions, combine
from loramgr.merge.elementwise import module_seed
from tests.factories import peft_adapter_from_model, sample_input, tiny_llama
from tests.test_merge_engine import load, reference_deltas

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        # different ranks and alphas; "b" is rsLoRA and also targets k and o (partly shared targets)
        "a": peft_adapter_from_model(base, root / "a", r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], seed=1),
        "b": peft_adapter_from_model(base, root / "b", r=6, alpha=3.0, target_modules=ALL, seed=2, use_rslora=True),
        "c16": peft_adapter_from_model(base, root / "c16", r=16, alpha=16.0, target_modules=ALL, seed=3),
        "d16": peft_adapter_from_model(base, root / "d16", r=16, alpha=8.0, target_modules=ALL, seed=4),
    }


def peft_model(base, folders, names):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model


def lora_layers(model):
    return {name: m for name, m in model.base_model.model.named_modules() if hasattr(m, "get_delta_weight")}


@pytest.mark.parametrize(("combination", "options"), [
    ("cat", MergeOptions(method="linear", weights=(0.7, -0.4))),
    ("svd", MergeOptions(method="svd", weights=(0.7, -0.4), rank=3)),
])
def test_linear_and_svd_agree_with_add_weighted_adapter(base, folders, tmp_path, combination, options):
    model = peft_model(base, folders, ["a", "b"])
    kwargs = {"svd_rank": 3} if combination == "svd" else {}
    model.base_model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "merged", combination_type=combination, **kwargs)
    merged = combine([load(folders["a"], "a"), load(folders["b"], "b")], options)
    merged.save_pretrained(tmp_path / "out")
    ours = reference_deltas(tmp_path / "out")
    layers = lora_layers(model)
    assert set(ours) == {name for name, layer in layers.items() if "merged" in layer.lora_A}
    for name, delta in ours.items():
        theirs = layers[name].get_delta_weight("merged").double()
        torch.testing.assert_close(delta, theirs, rtol=1e-4, atol=1e-5)


def test_saved_output_changes_the_model_exactly_as_w_plus_delta(base, folders, tmp_path):
    weights = (0.8, 1.3)
    adapters = [load(folders["a"], "a"), load(folders["b"], "b")]
    merged = combine(adapters, MergeOptions(method="linear", weights=weights))
    assert merged.config["rank_pattern"]  # q, v have rank 10, k, o rank 6: patterns are exercised
    merged.save_pretrained(tmp_path / "out")

    expected_model = copy.deepcopy(base)
    modules = dict(expected_model.named_modules())
    with torch.no_grad():
        for adapter, weight in zip(adapters, weights, strict=True):
            for name, delta in reference_deltas(adapter.folder).items():
                modules[name].weight += (weight * delta).float()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out"))
    for name, layer in lora_layers(loaded).items():
        assert layer.r["default"] == next(m.rank for m in merged.modules if m.name == name)
        assert layer.scaling["default"] == 1.0
    tokens = sample_input()
    with torch.no_grad():
        want = expected_model(tokens).logits
        got = loaded(tokens).logits
        unchanged = base(tokens).logits
    assert not torch.allclose(want, unchanged, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_elementwise_agree_with_merge_utils_on_peft_deltas(base, folders, tmp_path, method):
    # full space is PEFT's semantics; rank 16 + 16 = 32 by default, capped at min(d_in, d_out): the re-rank
    # is exact on every module
    model = peft_model(base, folders, ["c16", "d16"])
    weights = [0.6, 0.9]
    seed = 11 if method.startswith("dare") else None
    merged = combine(
        [load(folders["c16"], "c16"), load(folders["d16"], "d16")],
        MergeOptions(method=method, weights=tuple(weights), density=0.3, seed=seed, space="full"),
    )
    merged.save_pretrained(tmp_path / "out")
    ours = reference_deltas(tmp_path / "out")
    for name, layer in lora_layers(model).items():
        deltas = [layer.get_delta_weight("c16"), layer.get_delta_weight("d16")]
        torch.manual_seed(module_seed(11, name))  # the generator loramgr derives for this module
        if method in ("ties", "dare_ties"):
            expected = getattr(merge_utils, method)(deltas, torch.tensor(weights), 0.3, "total")
        else:
            expected = getattr(merge_utils, method)(deltas, torch.tensor(weights), 0.3)
        torch.testing.assert_close(ours[name], expected.double(), rtol=1e-4, atol=1e-5)
        assert next(m for m in merged.modules if m.name == name).kept_energy == pytest.approx(1.0, abs=1e-6)
