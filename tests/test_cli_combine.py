"""combine and compress through the CLI and the Python API: results, recipes, lineage, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from factories import run_cli, write_peft_adapter
from safetensors.torch import load_file, save_file
from test_kohya import TARGETS, TinyPipeline, kohya_delta, kohya_key, write_kohya_file
from test_lycoris import write as write_lycoris

import loramgr
from loramgr.registry import Registry

Q, V, K = (f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj", "k_proj"))


def run(*args: str, code: int = 0) -> str:
    return run_cli(*args, code=code).output


def dense(folder: Path, module: str) -> torch.Tensor:
    """ΔW of one module straight from a PEFT folder's files (independent of loramgr's readers)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double().flatten(1)  # conv: r x in*kh*kw
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double().flatten(1)
    rank = a.shape[0]
    alpha = next((v for k, v in (config.get("alpha_pattern") or {}).items() if module.endswith(k.strip("^$\\"))
                  or k.lstrip("^").replace("\\", "") == module), config["lora_alpha"])
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    return scale * b @ a


def test_combine_output_is_the_weighted_sum_and_reports_partial_targets(sources, tmp_path: Path) -> None:
    a, b = sources
    out = run("combine", "sql", "style", "--weights", "0.7,-0.3", "--output", str(tmp_path / "out"))
    assert "exact" in out
    assert "1 module(s) (v_proj) not in style==1.0.0: counted as zero there" in out
    for module in (Q, V, K):
        expected = torch.zeros(16, 16, dtype=torch.float64)
        if module in (Q, V):
            expected += 0.7 * dense(a, module)
        if module in (Q, K):
            expected -= 0.3 * dense(b, module)
        assert torch.allclose(dense(tmp_path / "out", module), expected, atol=1e-5)
    assert Registry.open().list_versions("sql-style") == []  # --output registers nothing


def test_recipe_reproduces_the_digest_and_python_compose_agrees(sources, tmp_path: Path) -> None:
    run("combine", "sql", "style", "--weights", "0.5,0.5", "--method", "dare_ties", "--density", "0.5",
        "--seed", "7", "--rank", "4", "--name", "mix", "--version", "1.0.0")
    registry = Registry.open()
    shown = registry.show("mix")
    assert [(p.name, p.weight) for p in shown.parents] == [("sql", 0.5), ("style", 0.5)]
    assert (shown.recipe or {})["options"]["seed"] == 7
    recipe = tmp_path / "mix.toml"
    recipe.write_text(run("show", "mix", "--recipe"))
    assert "already registered as mix==1.0.0" in run("combine", "--recipe", str(recipe))
    run("combine", "--recipe", str(recipe), "--name", "mix-again")
    assert registry.show("mix-again").digest == shown.digest
    # the same merge from Python gives the same bytes, hence the same digest
    mix = loramgr.compose([("sql", 0.5), ("style", 0.5)], method="dare_ties", density=0.5, seed=7, rank=4)
    assert loramgr.register(mix, name="mix-py").digest == shown.digest
    # another seed is another merge
    other = loramgr.compose([("sql", 0.5), ("style", 0.5)], method="dare_ties", density=0.5, seed=8, rank=4)
    assert loramgr.register(other, name="mix-seed8").digest != shown.digest


def test_recipe_refuses_sources_that_changed(sources, tmp_path: Path) -> None:
    run("combine", "sql", "style", "--name", "mix", "--version", "1.0.0")
    recipe = tmp_path / "mix.toml"
    recipe.write_text(run("show", "mix", "--recipe").replace('ref = "sql==1.0.0"', 'ref = "style==1.0.0"', 1))
    out = run("combine", "--recipe", str(recipe), "--name", "other", code=1)
    assert out.startswith("Error: style==1.0.0 is now sha256:") and out.count("\n") == 1


def test_compress_by_energy_gives_per_module_ranks(tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "big", {Q: (32, 32, 16), V: (32, 32, 16)}, alpha=16)
    run("install", str(folder), "--name", "big")
    out = run("compress", "big", "--energy", "0.8", "--name", "small")
    assert "lowest kept energy" in out
    registry = Registry.open()
    small = registry.show("small")
    assert max(m.rank for m in small.modules) < 16
    for module in (Q, V):
        exact = dense(folder, module)
        s = torch.linalg.svdvals(exact)
        kept = registry.open_adapter("small").delta(module).double()
        energy = float((kept.norm() / exact.norm()) ** 2)
        rank = next(m.rank for m in small.modules if m.name == module)
        assert energy >= 0.8 - 1e-6
        # the recorded per-module report states the energy actually kept
        report = {r["module"]: r["kept_energy"] for r in (small.recipe or {})["report"]}
        assert abs(report[module] - energy) < 1e-4
        # the smallest such rank: one less would not reach 80%
        assert float((s[: rank - 1] ** 2).sum() / (s**2).sum()) < 0.8


def test_bad_parameters_are_one_line_errors(sources) -> None:
    # a wrong option value is a usage error: exit 2, as click's own (a rank too large for the adapters too)
    for args, fragment in [
        (("--method", "ties", "--density", "1.5"), "density 1.5 is outside (0, 1]"),
        (("--method", "svd", "--rank", "100"), "rank 100 exceeds min(d_in, d_out) = 16"),
        (("--method", "mean"), "mean"),
        (("--weights", "nan,1"), "non-finite"),
    ]:
        out = run("combine", "sql", "style", *args, "--name", "x", code=2)
        assert out.startswith("Error: ") and fragment in out and out.count("\n") == 1, out
    assert "2 adapter(s)" in run("combine", "sql", "style", "--weights", "1", "--name", "x", code=2)
    assert "needs a --name" in run("combine", "sql", "style", code=2)
    assert Registry.open().list_versions("x") == []


def test_lycoris_sources_are_refused_by_type_name(tmp_path: Path) -> None:
    run("install", str(write_lycoris(tmp_path, "loha")), "--name", "hada")
    out = run("combine", "hada", "hada", "--name", "x", code=1)
    assert "LoHa" in out and out.count("\n") == 1


def test_kohya_sources_combine_once_their_names_resolve(tmp_path: Path) -> None:
    pipeline = TinyPipeline()
    targets = {k: v for k, v in TARGETS.items() if k.startswith("unet.")}
    first = write_kohya_file(tmp_path / "one.safetensors", pipeline, targets, seed=1)
    second = write_kohya_file(tmp_path / "two.safetensors", pipeline, targets, seed=2)
    run("install", str(first), "--name", "one")
    assert "kohya names" in run("combine", "one", "one", "--name", "x", code=1)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline.state_dict().items()}, str(base))
    run("base", "add", str(base), "--name", "tiny-sdxl")
    run("install", str(first), "--name", "one-resolved", "--base", "tiny-sdxl")
    run("install", str(second), "--name", "two-resolved", "--base", "tiny-sdxl")
    run("combine", "one-resolved", "two-resolved", "--weights", "0.5,0.5", "--output", str(tmp_path / "out"))
    one, two = load_file(str(first)), load_file(str(second))
    for path in targets:
        expected = 0.5 * kohya_delta(one, kohya_key(path)) + 0.5 * kohya_delta(two, kohya_key(path))
        got = dense(tmp_path / "out", path.removeprefix("unet."))  # a PEFT folder names the UNet's own paths
        expected = expected.reshape(got.shape)
        # the sources are fp16, so the output is too
        assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max().item())
