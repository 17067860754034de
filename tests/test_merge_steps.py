"""combine and compress as one step each: the CLI and the Python API reach the same library function,
so they give the same bytes and the same errors; the checks run in a fixed order; a running combine's
scratch folder survives a concurrent gc; the result carries its typed recipe; a merge that would only
copy its source is refused; a new method is one registered entry."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import write_peft_adapter
from safetensors.torch import save_file
from test_cli_combine import Q, V, dense, run
from test_lycoris import M as KOHYA_MODULE
from test_lycoris import write as write_lycoris

import loramgr
from loramgr.adapter import LoraAdapter
from loramgr.errors import (
    InvalidRecipeError,
    MergeError,
    MergeOptionError,
    MissingDependencyError,
    NothingToMergeError,
    UnsupportedAdapterError,
)
from loramgr.formats.peft import read_peft_folder
from loramgr.merge import METHODS, MergeOptions, Recipe
from loramgr.merge import compress as compress_open_adapter
from loramgr.merge.methods import Elementwise, ExactSum, ModuleJob
from loramgr.merge.options import option_help
from loramgr.merge.recipes import RecipeOutput, load_recipe
from loramgr.registry import Registry, execute_gc, verify


def flags(options: dict[str, object]) -> list[str]:
    return [item for key, value in options.items() for item in ("--" + key.replace("_", "-"), str(value))]


COMBINES = [
    ("linear", {}),
    ("svd", {"rank": 2}),
    ("ties", {"density": 0.5, "rank": 3}),
    ("dare_ties", {"density": 0.5, "seed": 7}),
    ("magnitude_prune", {"density": 0.3, "energy": 0.9}),
]


@pytest.mark.parametrize(("method", "options"), COMBINES, ids=[m for m, _ in COMBINES])
def test_cli_and_python_combine_register_the_same_bytes(sources, method: str, options: dict[str, object]) -> None:
    run("combine", "sql", "style", "--weights", "0.7,-0.3", "--method", method, *flags(options), "--name", "by-cli")
    merged = loramgr.combine(["sql", "style"], weights=[0.7, -0.3], method=method, **options)
    registry = Registry.open()
    assert loramgr.register(merged, name="by-python").digest == registry.show("by-cli").digest
    assert (registry.show("by-python").recipe or {})["options"] == (registry.show("by-cli").recipe or {})["options"]


@pytest.mark.parametrize("options", [{"rank": 2}, {"energy": 0.8}, {"rank": 3, "energy": 0.95}])
def test_cli_and_python_compress_register_the_same_bytes(sources, options: dict[str, float]) -> None:
    run("compress", "sql", *flags(options), "--name", "by-cli")
    merged = loramgr.compress("sql", **options)  # type: ignore[arg-type]
    assert loramgr.register(merged, name="by-python").digest == Registry.open().show("by-cli").digest


BAD_INPUT = [
    (("combine", "sql", "style", "--method", "slerp"), lambda: loramgr.combine(["sql", "style"], method="slerp"),
     "--method 'slerp' is not a merge method"),
    (("combine", "sql", "style", "--method", "ties", "--density", "1.5"),
     lambda: loramgr.combine(["sql", "style"], method="ties", density=1.5), "--density 1.5 is outside (0, 1]"),
    (("combine", "sql", "style", "--method", "svd", "--rank", "0"),
     lambda: loramgr.combine(["sql", "style"], method="svd", rank=0), "--rank 0 is not a positive integer"),
    (("combine", "sql", "style", "--method", "ties"), lambda: loramgr.combine(["sql", "style"], method="ties"),
     "method ties needs --density"),
    (("combine", "sql", "style", "--seed", "3"), lambda: loramgr.combine(["sql", "style"], seed=3),
     "method linear does not use --seed"),
    (("compress", "sql"), lambda: loramgr.compress("sql"), "compress needs --rank or --energy"),
    (("compress", "sql", "--rank", "0"), lambda: loramgr.compress("sql", rank=0), "--rank 0 is not a positive"),
    (("combine", "sql"), lambda: loramgr.combine(["sql"]), "combining sql==1.0.0 alone with weight 1"),
    (("compress", "sql", "--rank", "4"), lambda: loramgr.compress("sql", rank=4), "would only copy it"),
]


@pytest.mark.parametrize(("args", "call", "fragment"), BAD_INPUT, ids=[" ".join(a) for a, _, _ in BAD_INPUT])
def test_cli_and_python_refuse_bad_input_with_the_same_error(sources, args, call, fragment: str) -> None:
    with pytest.raises(MergeError) as caught:
        call()
    out = run(*args, "--name", "x", code=caught.value.exit_code)
    assert out == f"Error: {caught.value}\n"
    assert fragment in out
    assert Registry.open().list_versions("x") == []


def test_compress_without_rank_or_energy_is_one_error_everywhere(sources) -> None:
    """The CLI, the Python API and the merge library on an open adapter: one check, one message."""
    messages = {run("compress", "sql", "--name", "x", code=2).removeprefix("Error: ").strip()}
    for call in (lambda: loramgr.compress("sql"), lambda: compress_open_adapter(loramgr.get("sql"))):
        with pytest.raises(MergeOptionError) as caught:
            call()
        assert caught.value.option == "rank"
        messages.add(str(caught.value))
    assert len(messages) == 1 and next(iter(messages)).startswith("compress needs --rank or --energy")


@pytest.mark.slow
def test_option_errors_come_before_torch_is_imported(sources) -> None:
    """A mistyped option is refused before the tensor libraries load (the step checks options first)."""
    script = (
        "import sys\nfrom loramgr.cli.main import cli\n"
        "try:\n    cli(sys.argv[1:])\nexcept SystemExit as exit:\n    print('exit', exit.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    for args in (["combine", "sql", "style", "--method", "ties", "--density", "1.5", "--name", "x"],
                 ["compress", "sql", "--name", "x"]):
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
        assert "exit 2" in done.stdout and "torch imported: False" in done.stdout, (done.stdout, done.stderr)
        assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr


def test_a_loha_source_is_refused_as_loha_before_the_name_check(tmp_path: Path) -> None:
    # a plain LoRA and a LoHa, both kohya-named: the first one's names alone would be refused too, but the
    # user must learn first that the LoHa cannot be combined at all (installing with --base does not help)
    plain = tmp_path / "plain.safetensors"
    save_file({f"{KOHYA_MODULE}.lora_down.weight": torch.randn(2, 8),
               f"{KOHYA_MODULE}.lora_up.weight": torch.randn(16, 2)}, str(plain))
    run("install", str(plain), "--name", "plain")
    run("install", str(write_lycoris(tmp_path, "loha")), "--name", "hada")
    out = run("combine", "plain", "hada", "--name", "x", code=1)
    assert "LoHa" in out and "hada" in out and "kohya names" not in out and out.count("\n") == 1
    with pytest.raises(UnsupportedAdapterError) as caught:
        loramgr.combine(["plain", "hada"])
    assert out == f"Error: {caught.value}\n" and caught.value.adapter_type == "loha"


def test_gc_waits_for_a_running_combine(sources, monkeypatch) -> None:
    """A gc started while a combine is registering waits for it, instead of emptying its scratch folder."""
    seen: dict[str, object] = {}
    register = Registry.add

    def add_while_gc_runs(self, info, files, **kwargs):  # type: ignore[no-untyped-def]
        gc = threading.Thread(target=lambda: seen.setdefault("gc", execute_gc(Registry.open())))
        gc.start()
        gc.join(timeout=2.0)  # long enough for a gc of this registry to finish, had it not waited
        seen["gc waiting"] = gc.is_alive()
        seen["scratch files kept"] = all(Path(f).is_file() for f in files.values())
        seen["thread"] = gc
        return register(self, info, files, **kwargs)

    monkeypatch.setattr(Registry, "add", add_while_gc_runs)
    out = run("combine", "sql", "style", "--weights", "0.5,0.5", "--name", "mix")
    seen.pop("thread").join(timeout=60)  # type: ignore[attr-defined]
    assert "registered mix==" in out
    assert seen["gc waiting"] is True and seen["scratch files kept"] is True
    assert "gc" in seen  # the gc ran once the combine was done, and kept what the combine registered
    report = verify(Registry.open(), "mix")
    assert report.problems == [] and report.checked == 2


def test_the_merge_result_carries_its_typed_recipe(sources, tmp_path: Path) -> None:
    merged = loramgr.combine(["sql", "style"], weights=[0.7, 0.3], method="svd", rank=2)
    recipe = merged.recipe
    registry = Registry.open()
    assert isinstance(recipe, Recipe) and recipe.options == merged.options
    assert [(s.ref, s.weight, s.digest) for s in recipe.sources] == [
        ("sql==1.0.0", 0.7, registry.show("sql").digest), ("style==1.0.0", 0.3, registry.show("style").digest)]
    loramgr.register(merged, name="mix", version="1.0.0")
    stored = Recipe.from_record(registry.show("mix").recipe or {})
    assert stored == replace(recipe, output=RecipeOutput("mix", "1.0.0"))
    shown = tmp_path / "mix.toml"
    shown.write_text(run("show", "mix", "--recipe"))
    assert load_recipe(shown) == replace(stored, loramgr_version=None)  # the TOML has no version field
    with pytest.raises(InvalidRecipeError, match="no such recipe file") as caught:
        load_recipe(tmp_path / "missing.toml")
    assert caught.value.path == str(tmp_path / "missing.toml")


def test_one_source_is_refused_unless_something_changes(sources, tmp_path: Path) -> None:
    a, _ = sources
    out = run("combine", "sql", "--name", "copy", code=1)
    assert "combine needs at least two adapters; use compress to re-rank one" in out
    assert "would only copy" in run("combine", "sql", "--method", "svd", "--name", "copy", code=1)
    assert "every module of sql==1.0.0 has rank 4 or less" in run("compress", "sql", "--rank", "8", "--name", "c",
                                                                      code=1)
    assert Registry.open().list_versions("copy") == [] and Registry.open().list_versions("c") == []
    # a weight other than 1 is a real change: the delta scaled
    run("combine", "sql", "--weights", "0.5", "--output", str(tmp_path / "half"))
    for module in (Q, V):
        assert torch.allclose(dense(tmp_path / "half", module), 0.5 * dense(a, module), atol=1e-6)
    # so is another dtype: the same delta, rounded to float16
    run("combine", "sql", "--dtype", "float16", "--output", str(tmp_path / "fp16"))
    assert torch.allclose(dense(tmp_path / "fp16", Q), dense(a, Q), atol=1e-2)
    # so is a rank below the adapter's: the optimal rank-3 approximation
    run("compress", "sql", "--rank", "3", "--output", str(tmp_path / "r3"))
    u, s, vh = torch.linalg.svd(dense(a, Q))
    assert torch.allclose(dense(tmp_path / "r3", Q), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5)


def test_the_element_wise_methods_are_one_class_with_declared_parameters() -> None:
    declared = {name: METHODS[name] for name in ("ties", "dare_linear", "dare_ties", "magnitude_prune")}
    assert {type(method) for method in declared.values()} == {Elementwise}
    assert {name: set(method.parameters) for name, method in declared.items()} == {
        "ties": {"density", "majority_sign", "space"},
        "dare_linear": {"density", "seed", "space"},
        "dare_ties": {"density", "seed", "majority_sign", "space"},
        "magnitude_prune": {"density", "space"},
    }
    assert option_help("method") == ("merge method: linear, svd, ties, dare_linear, dare_ties, magnitude_prune, tsv, "
                                     "iso_c, iso_cts, knots_ties or knots_dare")
    assert option_help("seed").startswith("random seed of the drop masks of dare_linear, dare_ties, knots_dare")


class Mean(ExactSum):
    """The exact mean (1/n) Σ w_i ΔW_i: a method written for this test only."""

    def merge_module(self, job: ModuleJob, options: MergeOptions):  # type: ignore[no-untyped-def]
        n = len(options.weights or ())
        return super().merge_module(replace(job, coefs=[c / n for c in job.coefs]), options)


def test_adding_a_method_is_one_registered_entry(sources, tmp_path: Path, monkeypatch) -> None:
    a, b = sources
    monkeypatch.setitem(METHODS, "mean", Mean("mean", "the exact mean of the deltas"))
    assert option_help("method").endswith("knots_dare or mean")
    run("combine", "sql", "style", "--method", "mean", "--output", str(tmp_path / "mean"))
    assert torch.allclose(dense(tmp_path / "mean", Q), (dense(a, Q) + dense(b, Q)) / 2, atol=1e-6)
    out = run("combine", "sql", "style", "--method", "mean", "--density", "0.5", "--name", "x", code=2)
    assert "method mean does not use --density" in out
    assert "use a method that does: ties, dare_linear, dare_ties, magnitude_prune, knots_ties, knots_dare" in out
    run("combine", "sql", "style", "--method", "mean", "--name", "avg")
    assert (Registry.open().show("avg").recipe or {})["method"] == "mean"


def test_the_demo_names_the_extra_it_needs(tmp_path: Path, monkeypatch) -> None:
    from loramgr.demo import run as run_demo

    monkeypatch.setitem(sys.modules, "peft", None)  # as if PEFT were not installed
    with pytest.raises(MissingDependencyError) as caught:
        run_demo(tmp_path / "home", echo=lambda line: None)
    assert caught.value.package == "peft" and "pip install 'loramgr[peft]'" in str(caught.value)
    assert not (tmp_path / "home").exists()


def test_nothing_to_merge_names_the_operation(tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "a", {Q: (16, 16, 4)}, alpha=8)
    adapter = LoraAdapter(read_peft_folder(folder), folder, label="a")
    with pytest.raises(NothingToMergeError) as caught:
        loramgr.combine([adapter])
    assert caught.value.operation == "combine" and caught.value.reference == "a"
    with pytest.raises(NothingToMergeError) as caught:
        compress_open_adapter(adapter, rank=4)
    assert caught.value.operation == "compress"
