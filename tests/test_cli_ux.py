"""What a user meets around the registry's logic (issue 13): untag forms, export destinations and modes,
formats that do not fit an adapter, folders that are not adapters, the demo on an existing registry, progress."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from factories import one_line_error, write_peft_adapter

from loramgr.cli.main import cli

Q_PROJ = "model.layers.0.self_attn.q_proj"


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.output


def install_llm(tmp_path: Path, name: str = "ad", **kwargs) -> Path:
    folder = write_peft_adapter(tmp_path / f"src-{name}", {Q_PROJ: (32, 32, 4)}, **kwargs)
    run("install", str(folder), "--name", name, "--version", "1.0.0")
    return folder


def tags_of(name: str) -> dict[str, str]:
    """tag -> version, read from list --json (independently of what untag prints)."""
    rows = json.loads(run("list", name, "--json"))
    return {tag: row["version"] for row in rows for tag in row["tags"]}


def safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return [k for k in json.loads(handle.read(size)) if k != "__metadata__"]


# -- untag -------------------------------------------------------------------------------------------------

@pytest.fixture
def two_tagged(tmp_path: Path) -> None:
    """ad 1.0.0 tagged stable, ad 1.1.0 tagged beta."""
    for i, version in enumerate(("1.0.0", "1.1.0")):
        folder = write_peft_adapter(tmp_path / f"v{i}", {Q_PROJ: (32, 32, 4)}, seed=i)
        run("install", str(folder), "--name", "ad", "--version", version)
    run("tag", "ad==1.0.0", "stable")
    run("tag", "ad==1.1.0", "beta")


@pytest.mark.parametrize("args", [["ad", "stable"], ["ad@stable"], ["ad@stable", "stable"], ["ad==1.0.0", "stable"],
                                  ["AD", "stable"]])
def test_untag_takes_every_form_a_user_types(two_tagged, args):
    out = run("untag", *args)
    assert out.strip().endswith("(was on ad==1.0.0)") and "stable" in out and "@stable@" not in out
    assert tags_of("ad") == {"beta": "1.1.0"}


@pytest.mark.parametrize("args, words, code", [
    (["ad@stable", "beta"], "names tag 'stable' but the command also names 'beta'", 1),
    (["ad==1.1.0", "stable"], "tag 'stable' of ad is on 1.0.0, not on 1.1.0", 1),
    (["ad", "latest"], "'latest' is reserved for the newest version", 1),
    (["ad"], "name the tag to remove", 2),
    (["ad", "nope"], "ad has no tag 'nope'", 1),
])
def test_untag_refuses_what_names_two_things_and_removes_nothing(two_tagged, args, words, code):
    out = run("untag", *args, code=code)
    assert words in out and "Traceback" not in out
    assert tags_of("ad") == {"stable": "1.0.0", "beta": "1.1.0"}


# -- export: formats that do not fit the adapter ------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_llm_adapter_is_refused_in_diffusion_formats(tmp_path, fmt):
    install_llm(tmp_path)
    error = one_line_error("export", "ad", str(tmp_path / "out.safetensors"), "--format", fmt)
    assert error.startswith(f"Error: {fmt} files hold LoRAs of diffusion models, and ad==1.0.0 is made for a "
                            "CAUSAL_LM model")
    assert "--format peft" in error and "--format gguf" in error
    assert not (tmp_path / "out.safetensors").exists()


def test_gpt2_conv1d_adapter_is_refused_in_kohya_even_without_a_task(tmp_path):
    """A GPT-2 adapter (Conv1D, fan_in_fan_out) has no kohya form that installs back: refused up front."""
    from factories import peft_adapter_from_model, tiny_gpt2

    folder = peft_adapter_from_model(tiny_gpt2(), tmp_path / "gpt2", target_modules=["c_attn"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    config["task_type"] = None  # the refusal must not depend on the task alone
    (folder / "adapter_config.json").write_text(json.dumps(config))
    run("install", str(folder), "--name", "gpt2-lora")
    error = one_line_error("export", "gpt2-lora", str(tmp_path / "g.safetensors"), "--format", "kohya")
    assert "made for Conv1D layers (GPT-2 style, fan_in_fan_out)" in error
    assert not (tmp_path / "g.safetensors").exists()


def test_card_of_an_llm_adapter_says_its_task_whatever_the_file_format(tmp_path):
    """The pipeline tag and the snippet follow what the adapter is for, not the file format uploaded."""
    import loramgr.api
    from loramgr.hub.modelcard import render_model_card

    install_llm(tmp_path)
    details = loramgr.api.registry().show("ad")
    for fmt in ("peft", "kohya", "diffusers"):
        card = render_model_card(dataclasses.replace(details, format=fmt), repo_id="me/ad")
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["pipeline_tag"] == "text-generation", fmt
        assert "DiffusionPipeline" not in card and "PeftModel.from_pretrained" in card


def test_card_of_a_kohya_file_adapter_is_text_to_image(tmp_path):
    import torch
    from safetensors.torch import save_file

    import loramgr.api
    from loramgr.hub.modelcard import render_model_card

    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 32), f"{key}.lora_up.weight": torch.randn(32, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(tmp_path / "style.safetensors"))
    run("install", str(tmp_path / "style.safetensors"))
    card = render_model_card(loramgr.api.registry().show("style"), repo_id="me/style")
    assert yaml.safe_load(card.split("---")[1])["pipeline_tag"] == "text-to-image"
    assert "DiffusionPipeline" in card


# -- export: destinations and file modes --------------------------------------------------------------------

def _modes(path: Path) -> set[tuple[str, int]]:
    found = {("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode))}
    if path.is_dir():
        for child in path.rglob("*"):
            found.add(("dir" if child.is_dir() else "file", stat.S_IMODE(child.stat().st_mode)))
    return found


@pytest.fixture
def llm_and_diffusion(tmp_path: Path) -> None:
    """'chat' (a PEFT adapter linked to a registered tiny Llama) and 'flux' (a kohya Flux.1 file)."""
    import torch
    import transformers
    from diffusion_files import flux_model, flux_original_shapes, random_factors, write_kohya
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    run("base", "add", str(tmp_path / "base"), "--name", "tiny-llama")
    folder = write_peft_adapter(tmp_path / "chat", {Q_PROJ: (32, 32, 4)}, base_model="tiny-llama")
    run("install", str(folder), "--name", "chat", "--base", "tiny-llama")
    factors = random_factors(flux_original_shapes(flux_model()))
    write_kohya(tmp_path / "flux.safetensors", factors)
    run("install", str(tmp_path / "flux.safetensors"), "--name", "flux")
    leaves = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1",
              "txt_attn.proj": "proj_lora2"}
    xlabs = {}
    for leaf, xlabs_leaf in leaves.items():
        a, b, _ = factors[f"double_blocks.0.{leaf}"]
        xlabs |= {f"double_blocks.0.processor.{xlabs_leaf}.down.weight": a,
                  f"double_blocks.0.processor.{xlabs_leaf}.up.weight": b}
    save_file(xlabs, str(tmp_path / "xl.safetensors"))
    run("install", str(tmp_path / "xl.safetensors"), "--name", "xl")


FILE_FORMATS = [("kohya", "flux", ".safetensors"), ("diffusers", "flux", ".safetensors"),
                ("comfyui", "flux", ".safetensors"), ("xlabs", "xl", ".safetensors"), ("gguf", "chat", ".gguf")]


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_format_writes_the_same_modes_under_the_umask(tmp_path, llm_and_diffusion, umask):
    previous = os.umask(umask)
    try:
        file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
        for fmt, name, extension in FILE_FORMATS:
            out = tmp_path / f"out-{fmt}{extension}"
            run("export", name, str(out), "--format", fmt)
            assert _modes(out) == {("file", file_mode)}, fmt
        for fmt in ("peft", "ollama"):
            out = tmp_path / f"out-{fmt}"
            run("export", "chat", str(out), "--format", fmt)
            assert _modes(out) == {("dir", dir_mode), ("file", file_mode)}, fmt
    finally:
        os.umask(previous)


@pytest.mark.slow
def test_file_formats_write_inside_an_existing_folder_and_add_their_extension(tmp_path, llm_and_diffusion):
    for fmt, name, extension in FILE_FORMATS:
        into = tmp_path / f"into-{fmt}"
        into.mkdir()
        out = run("export", name, str(into), "--format", fmt)
        written = into / f"{name}{extension}"
        assert [p.name for p in into.iterdir()] == [written.name] and f"to {written}" in out
        bare = tmp_path / f"bare-{fmt}"
        out = run("export", name, str(bare), "--format", fmt)
        assert not bare.exists() and bare.with_name(bare.name + extension).is_file() and extension in out
        # the same destination again is refused, not overwritten
        assert "exists" in one_line_error("export", name, str(into), "--format", fmt)
    assert safetensors_keys(tmp_path / "into-kohya" / "flux.safetensors")[0].startswith("lora_unet_double_blocks_0")
    # folder formats: a new or empty folder, filled in place
    empty = tmp_path / "empty"
    empty.mkdir()
    run("export", "chat", str(empty))
    assert (empty / "adapter_config.json").is_file()
    error = one_line_error("export", "chat", str(empty))
    assert "exists and is not empty" in error


# -- folders that are not what the command takes ------------------------------------------------------------

def registered_names() -> list[str]:
    return [row["name"] for row in json.loads(run("list", "--json"))]


def test_a_whole_model_given_to_install_is_named_and_pointed_at_base_add(tmp_path):
    from factories import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    error = one_line_error("install", str(tmp_path / "llama"))
    assert error == (f"Error: {tmp_path / 'llama'} is a whole model (config.json + model.safetensors), not an adapter: "
                     f"register it as a base model with 'loramgr base add {tmp_path / 'llama'}'")
    assert registered_names() == []
    run("base", "add", str(tmp_path / "llama"), "--name", "tiny-llama")  # what the hint says works


def test_an_adapter_given_to_base_add_is_named_and_pointed_at_install(tmp_path):
    folder = write_peft_adapter(tmp_path / "ad", {Q_PROJ: (32, 32, 4)}, extra_config={"task_type": None})
    error = one_line_error("base", "add", str(folder))
    assert "is a LoRA adapter (adapter_config.json), not a base model" in error
    assert f"install it with 'loramgr install {folder}'" in error
    run("install", str(folder), "--name", "ad")
    kohya = tmp_path / "ad.safetensors"
    run("export", "ad", str(kohya), "--format", "kohya")
    for path in (kohya, tmp_path):  # the file, and a folder holding it beside the PEFT folder
        error = one_line_error("base", "add", str(path))
        assert "is a LoRA adapter (kohya tensor names), not a base model" in error, path
        assert f"'loramgr install {kohya}'" in error
    assert "no base models registered" in run("base", "list")


def _training_run(root: Path, steps: tuple[int, ...]) -> Path:
    for i, step in enumerate(steps):
        write_peft_adapter(root / f"checkpoint-{step}", {Q_PROJ: (32, 32, 4)}, seed=i)
    (root / "trainer_state.json").write_text("{}")
    return root


def test_a_training_run_offers_its_checkpoints_in_step_order(tmp_path):
    runs = _training_run(tmp_path / "run", (500, 1500, 1000))
    error = one_line_error("install", str(runs))
    assert error == (f"Error: {runs} is a training run: its adapters are the checkpoints checkpoint-500, "
                     f"checkpoint-1000, checkpoint-1500: install one, e.g. the last: "
                     f"'loramgr install {runs / 'checkpoint-1500'}'")
    assert registered_names() == []
    run("install", str(runs / "checkpoint-1500"), "--name", "last")
    assert registered_names() == ["last"]
    assert "is a training run whose checkpoints are adapters" in one_line_error("base", "add", str(runs))


def test_a_training_run_with_a_final_adapter_installs_it_and_mentions_the_checkpoints(tmp_path):
    runs = _training_run(tmp_path / "run", (500, 1000))
    write_peft_adapter(runs, {Q_PROJ: (32, 32, 4)}, seed=9)
    out = run("install", str(runs), "--name", "final")
    assert f"note: {runs} also holds training checkpoints (checkpoint-500, checkpoint-1000)" in out
    final = json.loads(run("show", "final", "--json"))
    ckpt = json.loads(run("install", str(runs / "checkpoint-1000"), "--name", "ckpt", "--json"))
    assert final["digest"] != ckpt["digest"]  # the top-level adapter was stored, not a checkpoint


def test_base_remove_refuses_while_versions_are_linked_unless_forced(tmp_path):
    from factories import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    run("base", "add", str(tmp_path / "llama"), "--name", "tiny-llama")
    run("base", "add", str(tmp_path / "llama"), "--name", "spare")
    folder = write_peft_adapter(tmp_path / "ad", {Q_PROJ: (32, 32, 4)}, base_model="tiny-llama")
    run("install", str(folder), "--name", "ad", "--base", "tiny-llama")
    assert run("base", "remove", "spare").strip() == "removed base spare"
    error = one_line_error("base", "remove", "tiny-llama")
    assert error == ("Error: base model 'tiny-llama' is linked to 1 installed version(s): ad==0.1.0: remove those "
                     "versions first, or pass --force to unlink them")
    assert [b["name"] for b in json.loads(run("base", "list", "--json"))] == ["tiny-llama"]
    assert run("base", "remove", "tiny-llama", "--force").strip() == "removed base tiny-llama; unlinked ad==0.1.0"
    assert "no base models registered" in run("base", "list")
    # the version keeps its files and the base name it declares
    shown = json.loads(run("show", "ad", "--json"))
    assert shown["base_model"] == "tiny-llama"
    run("export", "ad", str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (folder / "adapter_model.safetensors").read_bytes()
    assert "no base model named 'tiny-llama'" in one_line_error("base", "remove", "tiny-llama")


# -- progress -----------------------------------------------------------------------------------------------

def _check_progress(calls: list[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """Per label: done never goes back and never passes total; returns label -> (last done, total)."""
    last: dict[str, tuple[int, int]] = {}
    for label, done, total in calls:
        previous = last.get(label, (0, total))
        assert previous[1] == total and previous[0] <= done <= total, (label, previous, done, total)
        last[label] = (done, total)
    return last


def test_install_reports_monotone_progress_that_sums_to_the_files(tmp_path):
    import loramgr.api
    from loramgr.installer import install_source

    folder = write_peft_adapter(tmp_path / "ad", {Q_PROJ: (32, 32, 4), "model.layers.0.self_attn.v_proj": (32, 64, 8)},
                                readme="# ad\n")
    calls: list[tuple[str, int, int]] = []
    install_source(loramgr.api.registry(), folder, progress=lambda *call: calls.append(call))
    last = _check_progress(calls)
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    for verb in ("storing", "hashing"):  # every file copied into the store, then hashed from the copy
        assert {label.split(" ", 1)[1]: done for label, (done, _) in last.items() if label.startswith(verb)} == sizes


@pytest.mark.slow
def test_oci_push_and_pull_report_monotone_progress_to_the_artifact_size(tmp_path, monkeypatch):
    from ociregistry import OciRegistry

    from loramgr.installer import install_source
    from loramgr.oci.push import plan_push, run_push
    from loramgr.registry import Registry

    folder = install_llm(tmp_path)
    with OciRegistry(tmp_path / "oci") as reg:
        plan = plan_push(Registry.open(), "ad", reg.url("team/ad"))
        pushed: list[tuple[str, int, int]] = []
        run_push(plan, progress=lambda *call: pushed.append(call))
        last = _check_progress(pushed)
        assert max(done for done, _ in last.values()) == plan.size == sum(layer.size for layer in plan.layers)
        assert {label.removeprefix("pushing ") for label in last} == {layer.path for layer in plan.layers}
        monkeypatch.setenv("LORAMGR_HOME", str(tmp_path / "other-machine"))
        pulled: list[tuple[str, int, int]] = []
        install_source(Registry.open(), f"{reg.url('team/ad')}:1.0.0", progress=lambda *call: pulled.append(call))
    last = _check_progress(pulled)
    pulls = {label.removeprefix("pulling "): done for label, (done, _) in last.items() if label.startswith("pulling")}
    assert max(pulls.values()) == plan.size and set(pulls) == {layer.path for layer in plan.layers}
    weights = (folder / "adapter_model.safetensors").stat().st_size
    assert last["hashing adapter_model.safetensors"] == (weights, weights)  # stored, then hashed


# -- rank -------------------------------------------------------------------------------------------------

def test_a_combination_is_listed_with_its_largest_module_rank(tmp_path):
    """The rule holds for what combine registers too, not only for installs."""
    modules = {f"model.layers.0.self_attn.{leaf}": (16, 16, rank) for leaf, rank in
               (("q_proj", 2), ("k_proj", 4), ("v_proj", 2))}  # combined: 4, 8, 4 (PEFT r 4)
    run("install", str(write_peft_adapter(tmp_path / "a", modules, rank=4, seed=1)), "--name", "a")
    run("install", str(write_peft_adapter(tmp_path / "b", modules, rank=4, seed=2)), "--name", "b")
    run("combine", "a", "b", "--method", "linear", "--name", "ab")
    shown = json.loads(run("show", "ab", "--json"))
    assert shown["ranks_found"] == [4, 8] and shown["rank"] == 8 and shown["config"]["r"] == 4
    assert {row["name"]: row["rank"] for row in json.loads(run("list", "--json"))}["ab"] == 8


def test_list_and_show_give_the_largest_module_rank(tmp_path):
    """vLLM's --max-lora-rank must be at least the largest module rank, not PEFT's r (4 here)."""
    from safetensors import safe_open

    modules = {Q_PROJ: (32, 32, 4), "model.layers.0.self_attn.k_proj": (32, 32, 8),
               "model.layers.0.self_attn.v_proj": (32, 32, 12)}
    folder = write_peft_adapter(tmp_path / "mixed", modules, rank=4)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        largest = max(f.get_slice(k).get_shape()[0] for k in names if k.endswith("lora_A.weight"))
    assert largest == 12 and json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    run("install", str(folder), "--name", "mixed")
    header, _, row = run("list").splitlines()
    assert row.split()[header.split().index("RANK")] == str(largest)
    assert json.loads(run("list", "--json"))[0]["rank"] == largest
    shown = json.loads(run("show", "mixed", "--json"))
    assert shown["rank"] == largest and shown["config"]["r"] == 4 and shown["ranks_found"] == [4, 8, 12]
    assert "rank / alpha  12 (found 4, 8, 12; config r 4) / 16.0" in run("show", "mixed")
    card = run("push", "mixed", "--repo", "me/mixed", "--dry-run")
    assert "largest rank 12" in card
    for leaf, rank in (("q_proj", 4), ("k_proj", 8), ("v_proj", 12)):
        assert f"| `{leaf}` | {rank} | 16.0 |" in card
    # the stored files are untouched: PEFT's config still says r = 4
    run("export", "mixed", str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4


# -- merges that would only copy --------------------------------------------------------------------------

def test_a_merge_that_would_only_copy_its_source_is_refused_and_registers_nothing(tmp_path):
    modules = {Q_PROJ: (32, 32, 4), "model.layers.0.self_attn.v_proj": (32, 32, 8)}
    run("install", str(write_peft_adapter(tmp_path / "mixed", modules, rank=4)), "--name", "mixed")
    before = registered_names()
    refused = [
        (["combine", "mixed", "--name", "copy"], "combining mixed==0.1.0 alone with weight 1 would only copy it"),
        (["compress", "mixed", "--rank", "8", "--name", "copy"],
         "every module of mixed==0.1.0 has rank 8 or less: compressing it to rank 8 would only copy it"),
        (["compress", "mixed", "--rank", "32", "--name", "copy"], "compressing it to rank 32 would only copy it"),
    ]
    for args, words in refused:
        error = one_line_error(*args)
        assert words in error, (args, error)
    assert registered_names() == before
    # a rank below the largest module rank changes the adapter: that is a compression
    run("compress", "mixed", "--rank", "4", "--name", "small")
    assert json.loads(run("show", "small", "--json"))["ranks_found"] == [4]


def test_gc_names_the_first_files_and_counts_the_rest(tmp_path):
    """100,000 orphans must not print 100,000 lines: the first GC_SHOWN, a count, and --verbose for all."""
    from loramgr.cli.registry_cmds import GC_SHOWN

    for i in range(GC_SHOWN):
        folder = write_peft_adapter(tmp_path / f"ad{i}", {Q_PROJ: (8, 8, 2)}, seed=i)
        run("install", str(folder), "--name", f"ad{i}")
        run("remove", f"ad{i}")
    dry = run("gc", "--dry-run").splitlines()
    total = int(dry[-1].split(" in ")[1].split()[0])
    assert total > GC_SHOWN and len(dry) == GC_SHOWN + 2
    assert all(line.startswith("would free blob sha256:") for line in dry[:GC_SHOWN])
    assert dry[-2] == f"... and {total - GC_SHOWN} more (--verbose names them all)"
    everything = run("gc", "--verbose").splitlines()
    assert len(everything) == total + 1 and everything[-1].startswith("freed ")
    assert run("gc").splitlines() == ["freed 0 B in 0 file(s)"]
