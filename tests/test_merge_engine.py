"""combine() / compress() on hand-built PEFT folders, checked against dense maths done here.

The reference deltas are computed from the files with this module's own code (config + tensors,
PEFT's scale rules), not with loramgr's ModuleSpec.scale, so a wrong scale in loramgr shows up.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramgr.adapter import LoraAdapter
from loramgr.errors import (
    IncompatibleError,
    MergeError,
    MergeOptionError,
    NothingToMergeError,
    UnsupportedAdapterError,
)
from loramgr.formats.peft import read_peft_folder
from loramgr.merge import METHODS, MergeOptions, combine, compress
from loramgr.merge.elementwise import module_seed
from tests.factories import write_peft_adapter

Q, V, UP = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"


def _scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scale of one module, from the config as PEFT reads it."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def reference_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW per module in float64, straight from adapter_config.json and the safetensors file."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module] = _scale(config, module, a.shape[0]) * (b.double() @ a.double())
    return out


def load(folder: Path, label: str) -> LoraAdapter:
    return LoraAdapter(read_peft_folder(folder), folder, label=label)


@pytest.fixture
def sources(tmp_path):
    """Three adapters with different ranks, an rsLoRA one, an alpha_pattern one, partly shared targets."""
    a = write_peft_adapter(tmp_path / "a", {Q: (24, 16, 4), V: (24, 32, 6)}, alpha=8.0, seed=1)
    b = write_peft_adapter(tmp_path / "b", {Q: (24, 16, 2), V: (24, 32, 2)}, alpha=4.0, use_rslora=True, seed=2)
    c = write_peft_adapter(
        tmp_path / "c", {Q: (24, 16, 3), UP: (24, 40, 3)}, alpha=6.0, alpha_pattern={UP: 12.0}, seed=3
    )
    return [load(a, "a"), load(b, "b"), load(c, "c")]


def weighted_reference(adapters: list[LoraAdapter], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for module, delta in reference_deltas(adapter.folder).items():
            total[module] = total.get(module, 0) + weight * delta
    return total


def saved_deltas(merged, folder: Path) -> dict[str, torch.Tensor]:
    merged.save_pretrained(folder)
    return reference_deltas(folder)


def test_linear_is_the_exact_weighted_sum(sources, tmp_path):
    weights = [0.7, -0.3, 1.5]
    merged = combine(sources, MergeOptions(method="linear", weights=tuple(weights)))
    expected = weighted_reference(sources, weights)
    got = saved_deltas(merged, tmp_path / "out")
    assert set(got) == set(expected)
    for module in expected:
        torch.testing.assert_close(got[module], expected[module], rtol=1e-5, atol=1e-5)
    reports = {m.name: m for m in merged.modules}
    assert reports[Q].rank == 4 + 2 + 3 and reports[Q].kept_energy == 1.0
    assert reports[V].missing_in == ("c",) and reports[V].sources == ("a", "b")
    assert reports[UP].missing_in == ("a", "b")


def test_adapter_minus_itself_is_zero(sources, tmp_path):
    for method in ("linear", "svd"):
        merged = combine([sources[0], sources[0]], MergeOptions(method=method, weights=(1.0, -1.0)))
        for delta in saved_deltas(merged, tmp_path / method).values():
            assert float(delta.abs().max()) < 1e-6


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_rank_gives_the_optimal_truncation(sources, tmp_path, method):
    weights = [0.5, 1.0, -0.8]
    merged = combine(sources, MergeOptions(method=method, weights=tuple(weights), rank=3))
    got = saved_deltas(merged, tmp_path / "out")
    for module, target in weighted_reference(sources, weights).items():
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(got[module], best, rtol=1e-4, atol=1e-5)
        report = next(m for m in merged.modules if m.name == module)
        assert report.rank == 3
        assert report.kept_energy == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-5)


def test_svd_default_rank_is_the_largest_source_rank(sources):
    merged = combine(sources, MergeOptions(method="svd"))
    assert {m.name: m.rank for m in merged.modules} == {Q: 4, V: 6, UP: 3}


def test_energy_sets_per_module_ranks_and_the_config_reflects_them(sources, tmp_path):
    merged = combine(sources, MergeOptions(method="svd", energy=0.8))
    ranks = {m.name: m.rank for m in merged.modules}
    assert all(m.kept_energy >= 0.8 for m in merged.modules)
    merged.save_pretrained(tmp_path / "out")
    reread = read_peft_folder(tmp_path / "out")  # the lead's reader resolves rank_pattern like PEFT
    assert reread.ranks == ranks
    assert all(spec.scale == 1.0 for spec in reread.modules)
    assert reread.use_rslora is False


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_elementwise_methods_match_peft_merge_utils(sources, tmp_path, method):
    from peft.utils import merge_utils

    weights = [0.9, -0.6, 1.2]
    options = MergeOptions(method=method, weights=tuple(weights), density=0.4, rank=16, seed=5 if "dare" in method
                           else None, space="full")
    merged = combine(sources, options)
    got = saved_deltas(merged, tmp_path / "out")
    for module in got:
        present = [i for i, s in enumerate(sources) if module in s.module_names]
        # the deltas as loramgr forms them in float32, ((s B) @ A), so that the magnitude ranking is
        # the same bit for bit; the merge itself is PEFT's
        deltas = []
        for i in present:
            a, b = sources[i].factors(module, torch.float32)
            deltas.append((_scale(sources[i].info.config, module, a.shape[0]) * b) @ a)
        w = torch.tensor([weights[i] for i in present])
        torch.manual_seed(module_seed(5, module))
        if method == "dare_linear":
            expected = merge_utils.dare_linear(deltas, w, 0.4)
        elif method == "dare_ties":
            expected = merge_utils.dare_ties(deltas, w, 0.4, "total")
        else:
            expected = getattr(merge_utils, method)(deltas, w, 0.4)
        # rank 16 = min(d_in, d_out) for Q, so the re-rank is exact there; otherwise compare energy
        report = next(m for m in merged.modules if m.name == module)
        if min(expected.shape) <= 16:
            torch.testing.assert_close(got[module].float(), expected, rtol=1e-4, atol=1e-5)
            assert report.kept_energy == pytest.approx(1.0, abs=1e-6)
        else:
            s = torch.linalg.svdvals(expected.double())
            exact = float((s[:16] ** 2).sum() / (s**2).sum())
            assert report.kept_energy == pytest.approx(exact, rel=1e-4)


def test_elementwise_default_rank_is_the_sum_of_source_ranks_capped(sources):
    merged = combine(sources, MergeOptions(method="ties", density=0.5))
    assert {m.name: m.rank for m in merged.modules} == {Q: 9, V: 8, UP: 3}
    assert all(0.0 < m.kept_energy <= 1.0 for m in merged.modules)


def test_dare_is_reproducible_and_independent_of_module_order(sources):
    options = MergeOptions(method="dare_linear", density=0.5, seed=3, rank=4)
    first = combine(sources[:2], options)
    again = combine(sources[:2], options)
    shuffled = [s for s in sources[:2]]
    for adapter in shuffled:
        adapter.info.modules.reverse()
        adapter._specs = dict(reversed(adapter._specs.items()))
    reordered = combine(shuffled, options)
    for key, tensor in first.tensors.items():
        assert torch.equal(tensor, again.tensors[key])
        assert torch.equal(tensor, reordered.tensors[key])
    other = combine(sources[:2], replace(options, seed=4))
    assert any(not torch.equal(t, other.tensors[k]) for k, t in first.tensors.items())
    assert combine(sources[:2], replace(options, seed=None)).options.seed == 0  # default recorded


def test_strict_refuses_partly_shared_modules(sources):
    with pytest.raises(IncompatibleError, match=r"^c: no module .*v_proj \(strict\)"):
        combine(sources, MergeOptions(strict=True))


def test_save_is_deterministic(sources, tmp_path):
    options = MergeOptions(method="ties", density=0.5, weights=(1.0, 0.5, 0.25), rank=5)
    combine(sources, options).save_pretrained(tmp_path / "one")
    combine(sources, options).save_pretrained(tmp_path / "two")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_bf16_sources_keep_their_dtype_unless_asked(tmp_path):
    mods = {Q: (24, 16, 4), V: (24, 32, 4)}
    a = load(write_peft_adapter(tmp_path / "a", mods, dtype=torch.bfloat16, seed=1), "a")
    b = load(write_peft_adapter(tmp_path / "b", mods, dtype=torch.bfloat16, seed=2), "b")
    for method in ("linear", "svd", "ties"):
        density = 0.5 if method == "ties" else None
        merged = combine([a, b], MergeOptions(method=method, density=density))
        assert {t.dtype for t in merged.tensors.values()} == {torch.bfloat16}
    merged = combine([a, b], MergeOptions(method="linear", dtype="float32"))
    assert merged.info().dtypes == ["float32"]
    got = saved_deltas(merged, tmp_path / "out")
    expected = weighted_reference([a, b], [1.0, 1.0])
    for module in expected:
        torch.testing.assert_close(got[module], expected[module], rtol=1e-5, atol=1e-5)


def test_compress_bakes_rslora_and_alpha_pattern(sources, tmp_path):
    for adapter in sources[1:]:
        merged = compress(adapter, rank=1)
        got = saved_deltas(merged, tmp_path / adapter.label)
        for module, target in reference_deltas(adapter.folder).items():
            u, s, vh = torch.linalg.svd(target, full_matrices=False)
            torch.testing.assert_close(got[module], u[:, :1] @ torch.diag(s[:1]) @ vh[:1], rtol=1e-4, atol=1e-5)
    assert compress(sources[0], energy=1.0).modules[0].kept_energy == pytest.approx(1.0)
    with pytest.raises(MergeOptionError, match="^compress needs --rank or --energy"):
        compress(sources[0])


def test_info_describes_the_saved_folder(sources, tmp_path):
    merged = combine(sources, MergeOptions(method="svd", rank=2), progress=None)
    merged.save_pretrained(tmp_path / "out")
    reread = read_peft_folder(tmp_path / "out")
    info = merged.info()
    assert [(m.name, m.rank, m.alpha, m.in_features, m.out_features) for m in info.modules] == [
        (m.name, m.rank, m.alpha, m.in_features, m.out_features) for m in reread.modules
    ]
    assert info.base_model == reread.base_model == "tiny-base"
    assert info.n_params == reread.n_params


def test_progress_is_reported_per_module(sources):
    calls = []
    combine(sources, MergeOptions(), progress=lambda name, done, total: calls.append((name, done, total)))
    assert [(d, t) for _, d, t in calls] == [(1, 3), (2, 3), (3, 3)]
    assert {name for name, _, _ in calls} == {Q, V, UP}


def test_options_round_trip_and_help():
    options = MergeOptions(method="dare_ties", weights=(1.0, 0.5), density=0.3, seed=2, rank=8)
    assert MergeOptions.from_dict(options.to_dict()) == options
    assert MergeOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    assert all(f.metadata.get("help") for f in fields(MergeOptions))
    with pytest.raises(MergeError, match="unknown merge option"):
        MergeOptions.from_dict({"methd": "svd"})
    assert set(METHODS) == {"linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "tsv", "iso_c",
                            "iso_cts", "knots_ties", "knots_dare"}


REFUSALS = [
    (MergeOptions(method="average"), MergeOptionError, "^--method 'average' is not a merge method"),
    (MergeOptions(weights=(1.0, 1.0)), MergeError, "2 weight"),
    (MergeOptions(weights=(1.0, float("nan"), 1.0)), MergeError, "non-finite"),
    (MergeOptions(weights=(1.0, float("inf"), 1.0)), MergeError, "non-finite"),
    (MergeOptions(weights=(0.0, 0.0, 0.0)), MergeError, "all weights are zero"),
    (MergeOptions(method="ties", density=0.0), MergeError, "density 0.0 is outside"),
    (MergeOptions(method="ties", density=1.5), MergeError, "density 1.5 is outside"),
    (MergeOptions(method="ties"), MergeOptionError, "^method ties needs --density"),
    (MergeOptions(method="svd", density=0.5), MergeOptionError, "^method svd does not use --density"),
    (MergeOptions(method="svd", seed=1), MergeOptionError, "^method svd does not use --seed"),
    (MergeOptions(method="ties", density=0.5, seed=1), MergeOptionError, "^method ties does not use --seed"),
    (MergeOptions(method="dare_linear", density=0.5, majority_sign="frequency"), MergeOptionError,
     "^method dare_linear does not use --majority-sign"),
    (MergeOptions(method="svd", energy=0.0), MergeError, "energy 0.0 is outside"),
    (MergeOptions(method="svd", energy=1.2), MergeError, "energy 1.2 is outside"),
    (MergeOptions(method="svd", rank=0), MergeError, "rank 0 is not a positive"),
    (MergeOptions(method="svd", rank=17), MergeError, r"rank 17 exceeds min\(d_in, d_out\) = 16 of module"),
    (MergeOptions(method="ties", density=0.5, majority_sign="most"), MergeOptionError, "--majority-sign 'most'"),
    (MergeOptions(dtype="int8"), MergeError, "dtype 'int8'"),
]


@pytest.mark.parametrize(("options", "error", "message"), REFUSALS)
def test_refusals(sources, options, error, message):
    with pytest.raises(error, match=message) as caught:
        combine(sources, options)
    assert "\n" not in str(caught.value)


def _with_info(adapter: LoraAdapter, **changes) -> LoraAdapter:
    info = replace(adapter.info, **changes)
    return LoraAdapter(info, adapter.folder, label=adapter.label)


def test_refuses_adapters_that_cannot_be_summed(sources):
    a, b = sources[0], sources[1]
    with pytest.raises(IncompatibleError, match=r"^b: base model 'other' differs from 'tiny-base' of a"):
        combine([a, _with_info(b, base_model="other")], MergeOptions())
    combine([a, _with_info(b, base_model="other")], MergeOptions(allow_different_bases=True))
    for changes, kind in (({"use_dora": True}, "DoRA"), ({"adapter_type": "dora"}, "DoRA"),
                          ({"adapter_type": "loha"}, "LoHa")):
        with pytest.raises(UnsupportedAdapterError, match=f"combine is not possible for b: .*{kind}"):
            combine([a, _with_info(b, **changes)], MergeOptions())
    with pytest.raises(UnsupportedAdapterError, match="^b: modules_to_save"):
        combine([a, _with_info(b, config={**b.info.config, "modules_to_save": ["lm_head"]})], MergeOptions())
    with pytest.raises(NothingToMergeError, match="no adapters to combine"):
        combine([], MergeOptions())


def test_refuses_shape_mismatch(tmp_path, sources):
    odd = load(write_peft_adapter(tmp_path / "odd", {Q: (24, 20, 4)}, seed=9), "odd")
    with pytest.raises(IncompatibleError, match=r"^odd: module .*q_proj is linear 20x24 but linear 16x24 in a"):
        combine([sources[0], odd], MergeOptions())


def test_pattern_keys_match_only_their_module():
    from peft.utils.other import get_pattern_key

    from loramgr.merge.result import pattern_key

    keys = [pattern_key("model.layers.1.self_attn.q_proj"), pattern_key("layers.1.self_attn.q_proj")]
    assert get_pattern_key(keys, "model.layers.1.self_attn.q_proj") == keys[0]
    assert get_pattern_key(keys, "layers.1.self_attn.q_proj") == keys[1]
    for other in ("vision.model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
                  "modelXlayers.1.self_attn.q_proj"):
        assert get_pattern_key(keys, other) == other  # PEFT's "no key matched"


def test_conv_factors_keep_their_kernel_shape(tmp_path):
    name = "unet.down.0.conv"
    folders = []
    for seed, rank in ((1, 3), (2, 5)):
        gen = torch.Generator().manual_seed(seed)
        override = {
            f"base_model.model.{name}.lora_A.weight": torch.randn(rank, 4, 3, 3, generator=gen),
            f"base_model.model.{name}.lora_B.weight": torch.randn(8, rank, 1, 1, generator=gen),
        }
        folders.append(write_peft_adapter(tmp_path / f"c{seed}", {name: (36, 8, rank)}, tensors_override=override))
    adapters = [load(f, f.name) for f in folders]
    merged = combine(adapters, MergeOptions(method="svd", weights=(1.0, -0.5), rank=4))
    merged.save_pretrained(tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert out[f"base_model.model.{name}.lora_A.weight"].shape == (4, 4, 3, 3)
    assert out[f"base_model.model.{name}.lora_B.weight"].shape == (8, 4, 1, 1)
    target = sum(
        w * (16.0 / a.shape[0]) * (b.reshape(8, -1).double() @ a.reshape(a.shape[0], -1).double())
        for w, (a, b) in zip((1.0, -0.5), (adapter.factors(name) for adapter in adapters), strict=True)
    )
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    a = out[f"base_model.model.{name}.lora_A.weight"].reshape(4, -1).double()
    b = out[f"base_model.model.{name}.lora_B.weight"].reshape(8, 4).double()
    torch.testing.assert_close(b @ a, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
