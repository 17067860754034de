"""The I/O of merges without torch: the combine and compress commands import no torch, bfloat16 is read and
written bit for bit as torch does it, the written file is the safetensors library's own bytes, each source is
opened and resolved once, the output is written module by module, and --energy is kohya's sv_fro squared."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import run_cli, run_without_torch, write_peft_adapter
from safetensors.torch import load_file, save_file

import loramgr
from loramgr.merge.tensorfile import (
    SpillWriter,
    TensorFile,
    bfloat16_to_float32,
    float32_to_bfloat16,
    write_safetensors,
)
from loramgr.registry import Registry

Q, V, K = (f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj", "k_proj"))


def torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def awkward_float32(n: int = 1 << 16, seed: int = 0) -> np.ndarray:
    """Random float32 bit patterns (every exponent: subnormals, Inf, NaN of both signs), plus values exactly
    half way between two bfloat16 values (ties, both parities) and just either side of them."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    halves = (rng.integers(0, 2**16, size=n // 4, dtype=np.uint32) << 16) | np.uint32(0x8000)
    near = np.concatenate([halves - 1, halves + 1])
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x00000001, 0x807FFFFF,
                        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000],
                       dtype=np.uint32)
    return np.concatenate([bits, halves, near, special]).view(np.float32)


def test_bfloat16_rounding_is_torchs_bit_for_bit() -> None:
    values = awkward_float32()
    ours, theirs = float32_to_bfloat16(values), torch_bf16_bits(values)
    assert np.isnan(values).any() and np.isinf(values).any() and (np.abs(values) < 1.2e-38).any()
    assert np.array_equal(ours, theirs)


def test_bfloat16_reads_exactly() -> None:
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # every bfloat16 value
    ours = bfloat16_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # NaN payloads included


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_the_written_file_is_the_safetensors_librarys_bytes(tmp_path: Path, dtype: str) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {f"base_model.model.m{i}.lora_{ab}.weight": torch.randn(4 + i, 9 - i, generator=gen)
               for i in range(4) for ab in "AB"}
    tensors["base_model.model.conv.lora_A.weight"] = torch.randn(2, 3, 3, 3, generator=gen)
    torch_dtype = getattr(torch, dtype)
    save_file({k: t.to(torch_dtype) for k, t in tensors.items()}, str(tmp_path / "theirs"), metadata={"format": "pt"})
    arrays = {k: t.numpy() for k, t in tensors.items()}
    held = {k: a if dtype == "bfloat16" else a.astype(dtype) for k, a in arrays.items()}
    write_safetensors(tmp_path / "whole", held, dtype, {"format": "pt"})
    spill = SpillWriter(tmp_path / "spill", dtype)
    for key in reversed(list(held)):  # in any order: the file comes out in the library's order
        spill.add(key, held[key])
    spill.finish(tmp_path / "streamed", {"format": "pt"})
    expected = (tmp_path / "theirs").read_bytes()
    assert (tmp_path / "whole").read_bytes() == expected
    assert (tmp_path / "streamed").read_bytes() == expected and not (tmp_path / "spill").exists()
    with TensorFile(tmp_path / "theirs") as opened:  # and reads back as torch's values in float32
        for key, tensor in tensors.items():
            assert np.array_equal(opened.array(key), tensor.to(torch_dtype).float().numpy())




@pytest.mark.slow
def test_combine_and_compress_do_not_import_torch(tmp_path: Path) -> None:
    """Whole commands in a fresh process, bfloat16 and float16 sources included: torch is never imported."""
    a = write_peft_adapter(tmp_path / "a", {Q: (16, 16, 4), V: (16, 16, 4)}, alpha=8, seed=1, dtype=torch.bfloat16)
    b = write_peft_adapter(tmp_path / "b", {Q: (16, 16, 2), K: (16, 16, 2)}, seed=2, dtype=torch.float16)
    run_cli("install", str(a), "--name", "a")
    run_cli("install", str(b), "--name", "b")
    commands = [
        ["combine", "a", "b", "--method", "svd", "--rank", "2", "--name", "svd"],
        ["combine", "a", "b", "--method", "ties", "--density", "0.5", "--name", "ties"],
        ["combine", "a", "b", "--method", "dare_ties", "--density", "0.5", "--seed", "3", "--name", "dare"],
        ["combine", "a", "b", "--method", "knots_dare", "--density", "0.5", "--name", "knots"],
        ["combine", "a", "b", "--method", "magnitude_prune", "--density", "0.5", "--space", "full", "--output",
         str(tmp_path / "full")],
        ["compress", "a", "--energy", "0.9", "--dtype", "bfloat16", "--name", "small"],
    ]
    for command in commands:
        done = run_without_torch(*command)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "NO TORCH", command
    # the bfloat16 result is what torch would have rounded: its factors re-read by torch match ours
    small = loramgr.get("small")
    assert small.info.dtypes == ["bfloat16"] and small.factors(Q)[0].dtype == torch.bfloat16


def test_a_merge_into_a_folder_is_written_module_by_module(sources, tmp_path: Path) -> None:
    """The result written straight to its folder holds no tensor in memory and has the bytes of the
    in-memory result saved afterwards."""
    from loramgr.merge.operations import combine
    from loramgr.merge.options import MergeOptions

    options = MergeOptions(method="svd", rank=3, weights=(0.7, 0.3))
    streamed = combine(["sql", "style"], options, output=tmp_path / "streamed").merged
    held = combine(["sql", "style"], options).merged
    assert streamed.arrays == {} and held.arrays
    held.save_pretrained(tmp_path / "held")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "held" / name).read_bytes()
    assert not any(p.name.endswith((".spill", ".tmp")) for p in (tmp_path / "streamed").iterdir())
    for key, tensor in streamed.tensors.items():  # the torch view of a streamed result reads its file
        assert torch.equal(tensor, held.tensors[key])


def test_each_reference_is_resolved_and_opened_once(sources, monkeypatch) -> None:
    from loramgr.adapter import LoraAdapter

    calls: list[str] = []
    opened: list[str] = []
    open_adapter, open_weights = Registry.open_adapter, LoraAdapter.open_weights

    def counting(self, reference):  # type: ignore[no-untyped-def]
        calls.append(reference)
        return open_adapter(self, reference)

    def opening(self):  # type: ignore[no-untyped-def]
        opened.append(self.label)
        return open_weights(self)

    monkeypatch.setattr(Registry, "open_adapter", counting)
    monkeypatch.setattr(LoraAdapter, "open_weights", opening)
    merged = loramgr.combine(["sql", "style", "sql"], weights=[0.5, 0.3, 0.2], method="linear")
    assert calls == ["sql", "style"] and opened == ["sql==1.0.0", "style==1.0.0"]
    assert [s.ref for s in merged.recipe.sources] == ["sql==1.0.0", "style==1.0.0", "sql==1.0.0"]


def kohya_sv_fro(s: torch.Tensor, target: float) -> int:
    """kohya-ss sd-scripts' ``sv_fro`` rank rule (networks/resize_lora.py ``_sv_fro``), verbatim: the
    target is a fraction of the Frobenius norm, so it is compared with the cumulative squared values."""
    s_squared = s.pow(2)
    s_fro_sq = float(torch.sum(s_squared))
    sum_s_squared = torch.cumsum(s_squared, dim=0) / s_fro_sq
    index = int(torch.searchsorted(sum_s_squared, target**2)) + 1
    return max(1, min(index, len(s) - 1))


def test_energy_is_kohyas_sv_fro_of_its_square_root(tmp_path: Path) -> None:
    """--energy p keeps what kohya's sv_fro sqrt(p) keeps (--energy 0.99 is sv_fro 0.995), not sv_fro p."""
    modules = {f"model.layers.{i}.self_attn.q_proj": (48, 40, 16) for i in range(6)}
    run_cli("install", str(write_peft_adapter(tmp_path / "a", modules, seed=4)), "--name", "a")
    adapter = loramgr.get("a")
    spectra = {name: torch.linalg.svdvals(adapter.delta(name).double()) for name in modules}
    differs = False
    for energy in (0.5, 0.8, 0.9, 0.99):
        merged = loramgr.compress("a", energy=energy)
        for module in merged.modules:
            assert module.rank == kohya_sv_fro(spectra[module.name], math.sqrt(energy)), (energy, module.name)
            differs |= module.rank != kohya_sv_fro(spectra[module.name], energy)
    assert differs  # the two readings of the number disagree on these spectra: the test can tell them apart


def test_recorded_report_matches_the_streamed_result(sources) -> None:
    run_cli("combine", "sql", "style", "--method", "svd", "--energy", "0.9", "--name", "e")
    registry = Registry.open()
    report = {r["module"]: r["rank"] for r in (registry.show("e").recipe or {})["report"]}
    adapter = loramgr.get("e")
    stored = load_file(str(adapter.weights_path))
    for module, rank in report.items():
        assert stored[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank
        assert stored[f"base_model.model.{module}.lora_B.weight"].shape[1] == rank


def test_a_merge_that_fails_half_way_leaves_nothing(sources, tmp_path: Path, monkeypatch) -> None:
    """The output is written module by module, so a failure after the first module must still leave no
    folder, no spill or temporary file and no registered version behind."""
    from loramgr.merge import methods
    from loramgr.merge.operations import combine

    merge_module, calls = methods.OptimalRank.merge_module, []

    def failing(self, job, options):  # type: ignore[no-untyped-def]
        calls.append(job.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C half way through would
        return merge_module(self, job, options)

    monkeypatch.setattr(methods.OptimalRank, "merge_module", failing)
    options = loramgr.MergeOptions(method="svd", rank=2)
    with pytest.raises(KeyboardInterrupt):
        combine(["sql", "style"], options, output=tmp_path / "out")
    assert calls and not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        combine(["sql", "style"], options, name="half")
    registry = Registry.open()
    assert calls and registry.list_versions("half") == []
    assert not registry.store.tmp_dir.exists() or not any(registry.store.tmp_dir.iterdir())
