"""The merge step in core space and in full space, as a user runs it (CLI and Python API).

Core space is the default of ties, dare_*, magnitude_prune and the only space of tsv, iso_*,
knots_*: the registered result must be what core_space.merge_module gives on the sources' factors
read here from the files (core_space itself is checked against dense references in
test_core_space.py). Full space must be the element-wise result as before, bit for bit, and a recipe
written before spaces existed must reproduce it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import write_peft_adapter
from safetensors.torch import load_file
from test_cli_combine import dense, run
from test_core_space import dense_reference, relative_error
from test_merge_engine import _scale

import loramgr
from loramgr.errors import MergeOptionError
from loramgr.merge import METHODS, MergeOptions, Recipe, core_space
from loramgr.merge.elementwise import module_seed
from loramgr.merge.lowrank import rerank_dense
from loramgr.merge.methods import ModuleJob
from loramgr.registry import Registry

Q, V, K = (f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj", "k_proj"))
CORE_ONLY = ["tsv", "iso_c", "iso_cts", "knots_ties", "knots_dare"]
BOTH = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
WEIGHTS = (0.7, -0.4, 1.1)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """Three installed adapters of ranks 4, 2 (rsLoRA) and 3 (alpha_pattern): q in all three, v in a and b,
    k in c only."""
    folders = {
        "a": write_peft_adapter(tmp_path / "a", {Q: (40, 36, 4), V: (40, 36, 4)}, alpha=8, seed=1),
        "b": write_peft_adapter(tmp_path / "b", {Q: (40, 36, 2), V: (40, 36, 2)}, alpha=4, use_rslora=True, seed=2),
        "c": write_peft_adapter(tmp_path / "c", {Q: (40, 36, 3), K: (40, 36, 3)}, alpha=6, alpha_pattern={K: 9.0},
                                seed=3),
    }
    for name, folder in folders.items():
        run("install", str(folder), "--name", name, "--version", "1.0.0")
    return folders


def flags(options: dict[str, object]) -> list[str]:
    return [item for key, value in options.items() for item in ("--" + key.replace("_", "-"), str(value))]


def method_options(method: str) -> dict[str, object]:
    """The options a method reads, with values other than the defaults where it has them."""
    used = METHODS[method].parameters
    options: dict[str, object] = {}
    if "density" in used:
        options["density"] = 0.3
    if "seed" in used:
        options["seed"] = 5
    return options


def source_parts(folder: Path, module: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, s) of one module straight from a PEFT folder's files, or None when it lacks the module."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = f"base_model.model.{module}.lora_A.weight"
    if key not in tensors:
        return None
    a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
    return a, b, _scale(config, module, a.shape[0])


def expected_core_merge(folders: dict[str, Path], module: str, method: str, weights: tuple[float, ...],
                        **options: object) -> torch.Tensor:
    """ΔW of core_space.merge_module on the factors of the sources that have ``module``, with the
    engine's convention for DARE's generator (seed and module name)."""
    present = [(parts, w) for folder, w in zip(folders.values(), weights, strict=True)
               if (parts := source_parts(folder, module)) is not None]
    seed = int(options.pop("seed", 0))  # type: ignore[call-overload]
    generator = torch.Generator().manual_seed(module_seed(seed, module))
    factors = core_space.merge_module(method, [p for p, _ in present], [w for _, w in present], generator=generator,
                                      **options)  # type: ignore[arg-type]
    return factors.b.double() @ factors.a.double()


@pytest.mark.parametrize("method", BOTH + CORE_ONLY)
def test_every_core_space_method_end_to_end_equals_merge_module(sources, tmp_path: Path, method: str) -> None:
    options = method_options(method)
    out = run("combine", "a", "b", "c", "--method", method, *flags(options), "--weights", ",".join(map(str, WEIGHTS)),
              "--scale", "0.8", "--output", str(tmp_path / "out"))
    assert out.startswith(f"{method} in core space: 3 module(s)") and "exact" in out, out
    assert "1 module(s) (k_proj) not in a==1.0.0, b==1.0.0: counted as zero there" in out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for module, ranks in ((Q, 4 + 2 + 3), (V, 4 + 2), (K, 3)):
        got = dense(tmp_path / "out", module)
        expected = expected_core_merge(sources, module, method, WEIGHTS, scale=0.8, **options)
        assert float(expected.norm()) > 0
        assert relative_error(got, expected) < 1e-5, module
        rank = config["rank_pattern"].get("^" + module.replace(".", "\\."), config["r"])
        assert rank <= ranks
    if method == "ties":  # and the dense maths of the paper, written independently in test_core_space
        present = [source_parts(f, Q) for f in sources.values()]
        reference = dense_reference("ties", present, list(WEIGHTS), density=0.3, scale=0.8)
        assert relative_error(dense(tmp_path / "out", Q), reference) < 1e-5


@pytest.mark.parametrize("method", ["ties", "dare_ties", "tsv", "knots_dare"])
def test_cli_and_python_register_the_same_digest(sources, method: str) -> None:
    options = method_options(method)
    run("combine", "a", "b", "c", "--method", method, *flags(options), "--name", "by-cli")
    merged = loramgr.combine(["a", "b", "c"], method=method, **options)
    assert merged.options.space == "core" and merged.options.scale == 1.0
    registry = Registry.open()
    assert loramgr.register(merged, name="by-python").digest == registry.show("by-cli").digest
    recorded = (registry.show("by-cli").recipe or {})["options"]
    assert recorded["space"] == "core" and recorded["scale"] == 1.0
    assert recorded == (registry.show("by-python").recipe or {})["options"]


def element_wise_directly(folders: dict[str, Path], method: str, options: MergeOptions) -> dict[str, torch.Tensor]:
    """The full-space result computed by calling the element-wise method's own steps per module (the
    dense merge, then the re-rank with the engine's seed), without the engine."""
    out = {}
    for module in (Q, V, K):
        present = [(parts, w) for folder, w in zip(folders.values(), options.weights or (), strict=True)
                   if (parts := source_parts(folder, module)) is not None]
        job = ModuleJob(name=module, coefs=[w * p[2] for p, w in present], weights=[w for _, w in present],
                        scales=[p[2] for p, _ in present], factors=[(p[0], p[1]) for p, _ in present],
                        max_rank=36)
        merged = METHODS[method].merge_dense(job, options)  # type: ignore[attr-defined]
        rank = options.rank or min(sum(job.ranks()), 36)
        factors = rerank_dense(merged, rank=rank, energy=options.energy, seed=module_seed(0, module, "rerank"))
        out[f"base_model.model.{module}.lora_A.weight"] = factors.a
        out[f"base_model.model.{module}.lora_B.weight"] = factors.b
    return out


@pytest.mark.parametrize(("method", "options"), [("ties", {"density": 0.5, "rank": 3}),
                                                 ("dare_ties", {"density": 0.5, "seed": 7}),
                                                 ("magnitude_prune", {"density": 0.3, "energy": 0.9})])
def test_space_full_is_the_element_wise_result_bit_for_bit(sources, tmp_path: Path, method: str,
                                                           options: dict[str, object]) -> None:
    out = run("combine", "a", "b", "c", "--method", method, *flags(options), "--space", "full",
              "--weights", ",".join(map(str, WEIGHTS)), "--output", str(tmp_path / "full"))
    assert out.startswith(f"{method} in full space")
    written = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    applied = MergeOptions(method=method, weights=WEIGHTS, space="full", **options)  # type: ignore[arg-type]
    expected = element_wise_directly(sources, method, applied)
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    # and core space is another operator: its result differs
    run("combine", "a", "b", "c", "--method", method, *flags(options), "--weights", ",".join(map(str, WEIGHTS)),
        "--output", str(tmp_path / "core"))
    assert relative_error(dense(tmp_path / "core", Q), dense(tmp_path / "full", Q)) > 0.05


def test_a_recipe_written_before_spaces_reproduces_the_full_space_result(sources, tmp_path: Path) -> None:
    run("combine", "a", "b", "c", "--method", "ties", "--density", "0.5", "--rank", "3", "--space", "full",
        "--name", "full")
    run("combine", "a", "b", "c", "--method", "ties", "--density", "0.5", "--rank", "3", "--name", "core")
    registry = Registry.open()
    digests = {name: registry.show(f"{name}==1.0.0").digest for name in "abc"}
    # the [merge] table as recipes were written before this option existed: no space, no scale
    old = tmp_path / "old.toml"
    entries = "".join(f'[[sources]]\nref = "{n}==1.0.0"\ndigest = "{digests[n]}"\nweight = 1.0\n\n' for n in "abc")
    old.write_text('[merge]\nmethod = "ties"\ndensity = 0.5\nmajority_sign = "total"\nrank = 3\n'
                   'strict = false\nallow_different_bases = false\n\n'
                   + entries + '[output]\nname = "again"\nversion = "1.0.0"\n')
    run("combine", "--recipe", str(old))
    assert registry.show("again").digest == registry.show("full").digest != registry.show("core").digest
    assert 'space = "full"' in run("show", "again", "--recipe")
    # a stored record without the field reads the same way; a new one records its space
    legacy = {"method": "ties", "options": {"method": "ties", "density": 0.5}, "sources": []}
    assert Recipe.from_record(legacy).options.space == "full"
    shown = run("show", "core", "--recipe")
    assert 'space = "core"' in shown and "scale = 1.0" in shown
    (tmp_path / "core.toml").write_text(shown)
    run("combine", "--recipe", str(tmp_path / "core.toml"), "--name", "core-again")
    assert registry.show("core-again").digest == registry.show("core").digest


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "knots_dare"])
def test_seeds_reproduce_in_core_space(sources, method: str) -> None:
    for name, seed in (("one", 7), ("two", 7), ("other", 8)):
        run("combine", "a", "b", "--method", method, "--density", "0.5", "--seed", str(seed), "--name", name)
    registry = Registry.open()
    assert registry.show("one").digest == registry.show("two").digest != registry.show("other").digest


def test_rank_and_energy_truncate_the_core_result_exactly(sources, tmp_path: Path) -> None:
    run("combine", "a", "b", "c", "--method", "ties", "--density", "0.3", "--output", str(tmp_path / "exact"))
    out = run("combine", "a", "b", "c", "--method", "ties", "--density", "0.3", "--rank", "2", "--name", "r2")
    assert "lowest kept energy" in out
    report = {r["module"]: r for r in (Registry.open().show("r2").recipe or {})["report"]}
    adapter = loramgr.get("r2")
    for module in (Q, V):
        exact = dense(tmp_path / "exact", module)
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(adapter.delta(module).double(), best, rtol=1e-4, atol=1e-6)
        assert report[module]["rank"] == 2
        # the reference is the float32 result written to disk, so agreement to float32 rounding
        assert report[module]["kept_energy"] == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()), rel=1e-6)
    merged = loramgr.combine(["a", "b", "c"], method="tsv", energy=0.8)
    for module in merged.modules:
        s = torch.linalg.svdvals(expected_core_merge(sources, module.name, "tsv", (1.0, 1.0, 1.0)))
        fractions = torch.cumsum(s**2, 0) / (s**2).sum()
        assert module.rank == int((fractions < 0.8 - 1e-12).sum()) + 1  # the smallest rank reaching 80%
        assert module.kept_energy == pytest.approx(float(fractions[module.rank - 1]), rel=1e-6)


def test_core_space_reads_each_module_once_and_forms_no_dense_delta(sources, monkeypatch) -> None:
    from loramgr.adapter import LoraAdapter

    reads: list[tuple[str, str]] = []
    threads: list[int] = []
    factors, merge_module = LoraAdapter.factors, core_space.merge_module

    def counting(self, name, dtype=None):  # type: ignore[no-untyped-def]
        reads.append((self.label, name))
        return factors(self, name, dtype)

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(torch.get_num_threads())
        return merge_module(*args, **kwargs)

    def no_dense(self):  # type: ignore[no-untyped-def]
        raise AssertionError("a dense delta was formed")

    monkeypatch.setattr(LoraAdapter, "factors", counting)
    monkeypatch.setattr(core_space, "merge_module", recording)
    monkeypatch.setattr(ModuleJob, "deltas", no_dense)
    for method in BOTH + CORE_ONLY:
        reads.clear()
        loramgr.combine(["a", "b", "c"], method=method, **method_options(method))  # type: ignore[arg-type]
        assert sorted(reads) == sorted(set(reads)) and len(reads) == 3 + 2 + 1, method
    assert threads and set(threads) == {1}  # the small operations of the factored path run on one thread


def test_scale_multiplies_the_merged_delta_in_every_space(sources, tmp_path: Path) -> None:
    run("combine", "a", "b", "--output", str(tmp_path / "sum"))
    run("combine", "a", "b", "--scale", "0.5", "--output", str(tmp_path / "half"))
    torch.testing.assert_close(dense(tmp_path / "half", Q), 0.5 * dense(tmp_path / "sum", Q))
    for space in ("core", "full"):
        base = ["combine", "a", "b", "--method", "ties", "--density", "0.5", "--space", space, "--rank", "6"]
        run(*base, "--output", str(tmp_path / space))
        run(*base, "--scale", "-2", "--output", str(tmp_path / f"{space}-scaled"))
        scaled, unscaled = dense(tmp_path / f"{space}-scaled", Q), dense(tmp_path / space, Q)
        assert relative_error(scaled, -2 * unscaled) < 1e-6
    # one source with λ != 1 is a real change, not a copy
    run("combine", "a", "--scale", "0.5", "--output", str(tmp_path / "one"))
    torch.testing.assert_close(dense(tmp_path / "one", V), 0.5 * dense(sources["a"], V))


def test_zero_deltas_merge_to_zero_in_core_space(tmp_path: Path) -> None:
    """PEFT initialises B to zero: such an adapter merges (to a zero delta), it is not an error."""
    zero = {f"base_model.model.{Q}.lora_B.weight": torch.zeros(36, 4),
            f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 40)}
    run("install", str(write_peft_adapter(tmp_path / "z", {Q: (40, 36, 4)}, tensors_override=zero)), "--name", "z")
    for method in BOTH + CORE_ONLY:
        run("combine", "z", "z", "--method", method, *flags(method_options(method)),
            "--output", str(tmp_path / method))
        assert float(dense(tmp_path / method, Q).abs().max()) == 0.0


BAD = [
    (["--method", "tsv", "--space", "full"], "method tsv runs in core space only, not --space full"),
    (["--method", "knots_ties", "--density", "0.3", "--space", "full"], "method knots_ties runs in core space only"),
    (["--space", "core"], "method linear does not use --space (got core)"),
    (["--method", "svd", "--space", "full"], "method svd does not use --space"),
    (["--method", "ties", "--density", "0.3", "--space", "dense"], "--space 'dense' is unknown"),
    (["--method", "tsv", "--density", "0.3"], "method tsv does not use --density"),
    (["--method", "iso_c", "--seed", "1"], "method iso_c does not use --seed"),
    (["--method", "knots_ties"], "method knots_ties needs --density"),
    (["--method", "ties", "--density", "0.3", "--seed", "2"], "method ties does not use --seed"),
    (["--scale", "0"], "--scale 0.0 is not a finite non-zero number"),
    (["--scale", "inf"], "--scale inf is not a finite non-zero number"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_are_one_line_errors(sources, args: list[str], fragment: str) -> None:
    out = run("combine", "a", "b", *args, "--name", "x", code=2)
    assert out.startswith("Error: ") and fragment in out and out.count("\n") == 1, out
    assert Registry.open().list_versions("x") == []


def test_python_refuses_with_the_cli_message_and_the_cli_usage_errors_exit_2(sources) -> None:
    out = run("combine", "a", "b", "--method", "tsv", "--space", "full", "--name", "x", code=2)
    with pytest.raises(MergeOptionError) as caught:
        loramgr.combine(["a", "b"], method="tsv", space="full")
    assert out == f"Error: {caught.value}\n" and caught.value.option == "space"
    assert "use a method that runs in full space: ties, dare_linear, dare_ties, magnitude_prune" in str(
        caught.value.hint)
    assert "--scale" in run("combine", "a", "b", "--scale", "half", "--name", "x", code=2)
