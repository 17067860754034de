"""check_adapters: base-model fit, shared bases, engine rules, tensor values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import one_line_error, peft_adapter_from_model, run_cli, tiny_llama, write_peft_adapter
from test_kohya import TARGETS, TinyPipeline, write_kohya_file

from loramgr.compat.basemodel import fingerprint_from_state_dict, fingerprint_from_tensors
from loramgr.compat.check import check_adapters, parse_engine, safetensors_reader
from loramgr.errors import LoramgrError
from loramgr.formats.detect import read_adapter_file
from loramgr.formats.peft import read_peft_folder

GOOD = {
    "model.layers.0.self_attn.q_proj": (32, 32, 8),
    "model.layers.0.self_attn.v_proj": (32, 16, 8),
    "model.layers.1.mlp.down_proj": (64, 32, 8),
}


@pytest.fixture(scope="module")
def llama_base():
    return fingerprint_from_state_dict(tiny_llama(), name="tiny-base")


def errors(findings):
    return [f for f in findings if f.severity == "error"]


def test_good_adapter_passes_base_and_vllm(tmp_path: Path, llama_base) -> None:
    info = read_peft_folder(write_peft_adapter(tmp_path / "a", GOOD))
    findings = check_adapters([info], base=llama_base, engine="vllm")
    assert errors(findings) == [] and not [f for f in findings if f.severity == "warning"]


def test_peft_made_adapter_passes_every_engine(tmp_path: Path, llama_base) -> None:
    model = tiny_llama()
    info = read_peft_folder(peft_adapter_from_model(model, tmp_path / "a", base_model="tiny-base"))
    for engine in ("vllm", "lorax", "tgi", "llama.cpp", "peft"):
        assert errors(check_adapters([info], base=llama_base, engine=engine)) == [], engine


def test_wrong_base_is_a_shape_mismatch_naming_the_module(tmp_path: Path) -> None:
    info = read_peft_folder(write_peft_adapter(tmp_path / "a", GOOD))
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    wider = fingerprint_from_state_dict(LlamaForCausalLM(config))
    found = errors(check_adapters([info], base=wider))
    assert {f.module for f in found} == set(GOOD)
    assert "32 x 32" in next(f.message for f in found if f.module.endswith("q_proj"))


def test_missing_module(tmp_path: Path, llama_base) -> None:
    info = read_peft_folder(write_peft_adapter(tmp_path / "a", {**GOOD, "model.layers.0.self_attn.qkv": (32, 96, 8)}))
    found = errors(check_adapters([info], base=llama_base))
    assert [f.module for f in found] == ["model.layers.0.self_attn.qkv"] and "no such module" in found[0].message


def test_rank_above_vllm_limit_and_the_flag_that_fixes_it(tmp_path: Path, llama_base) -> None:
    big = {**GOOD, "model.layers.0.self_attn.q_proj": (32, 32, 24)}
    info = read_peft_folder(write_peft_adapter(tmp_path / "a", big))
    found = errors(check_adapters([info], base=llama_base, engine="vllm"))
    assert len(found) == 1 and "max_lora_rank 16" in found[0].message and "--max-lora-rank 32" in found[0].message
    assert found[0].module == "model.layers.0.self_attn.q_proj"
    assert errors(check_adapters([info], base=llama_base, engine="vllm:max-rank=32")) == []
    # rank 24 > min(32, 32)? no; but a rank above min(d_in, d_out) is flagged
    tall = read_peft_folder(write_peft_adapter(tmp_path / "b", {"model.layers.0.self_attn.v_proj": (32, 16, 20)}))
    warnings = [f for f in check_adapters([tall], base=llama_base) if f.severity == "warning"]
    assert any("exceeds min(d_in, d_out) = 16" in f.message for f in warnings)


def test_dora_is_refused_for_vllm_but_fine_for_peft(tmp_path: Path, llama_base) -> None:
    folder = peft_adapter_from_model(tiny_llama(), tmp_path / "d", use_dora=True, base_model="tiny-base")
    info = read_peft_folder(folder)
    assert info.use_dora
    found = errors(check_adapters([info], base=llama_base, engine="vllm"))
    assert any("DoRA" in f.message for f in found)
    assert errors(check_adapters([info], base=llama_base, engine="peft")) == []


def test_vllm_config_rules(tmp_path: Path, llama_base) -> None:
    info = read_peft_folder(write_peft_adapter(
        tmp_path / "a", GOOD, extra_config={"modules_to_save": ["lm_head"], "bias": "lora_only"}))
    messages = " ".join(f.message for f in errors(check_adapters([info], base=llama_base, engine="vllm")))
    assert "modules_to_save" in messages and "bias" in messages


def test_engine_spec_parsing() -> None:
    assert parse_engine("vllm").options == {"max-rank": 16}
    assert parse_engine("vLLM:max-rank=64").options == {"max-rank": 64}
    for bad, text in (("vllm:max-rank=17", "max_lora_rank choices"), ("trt", "unknown engine"),
                      ("vllm:rank=8", "bad option"), ("lorax:max-rank=8", "bad option"),
                      ("vllm:max-rank=x", "must be a number")):
        with pytest.raises(LoramgrError, match=text):
            parse_engine(bad)


def test_kohya_file_checked_against_a_pipeline(tmp_path: Path) -> None:
    pipe = TinyPipeline()
    info = read_adapter_file(write_kohya_file(tmp_path / "k.safetensors", pipe))
    base = fingerprint_from_state_dict(pipe, name="sdxl-tiny")
    assert errors(check_adapters([info], base=base)) == []
    other = TinyPipeline()
    other.unet.conv_in = torch.nn.Conv2d(4, 8, 5)  # another kernel: the conv LoRA no longer fits
    found = errors(check_adapters([info], base=fingerprint_from_state_dict(other)))
    assert [f.module for f in found] == ["lora_unet_conv_in"] and "kernel" in found[0].message
    assert any("PEFT adapter folders" in f.message for f in errors(check_adapters([info], engine="vllm")))
    assert len(TARGETS) == len(info.modules)


def test_shared_base_levels(tmp_path: Path) -> None:
    a = read_peft_folder(write_peft_adapter(tmp_path / "a", GOOD, base_model="org/one"))
    b = read_peft_folder(write_peft_adapter(tmp_path / "b", GOOD, base_model="org/two"))
    shapes = {"model.layers.0.self_attn.q_proj.weight": ((32, 32), "F32")}
    fp1 = fingerprint_from_tensors(shapes, name="org/one", content_digests={"m": "sha256:1"})
    fp2 = fingerprint_from_tensors(shapes, name="org/two", content_digests={"m": "sha256:2"})
    fp3 = fingerprint_from_tensors({"x.weight": ((4, 4), "F32")}, name="org/three")
    same_arch = check_adapters([a, b], labels=["a", "b"], adapter_bases=[fp1, fp2])
    assert errors(same_arch) == []
    warnings = [f.message for f in same_arch if f.severity == "warning"]
    assert any("content digests differ" in w for w in warnings) and any("different base models" in w for w in warnings)
    other = check_adapters([a, b], labels=["a", "b"], adapter_bases=[fp1, fp3])
    assert [f.adapter for f in errors(other)] == ["b"] and "another structure" in errors(other)[0].message


def test_values_nan_and_zero_delta(tmp_path: Path, llama_base) -> None:
    bad = torch.full((8, 32), float("nan"))
    folder = write_peft_adapter(
        tmp_path / "a", GOOD, tensors_override={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": bad}
    )
    info = read_peft_folder(folder)
    reader = safetensors_reader([str(folder / "adapter_model.safetensors")])
    found = errors(check_adapters([info], base=llama_base, tensor_reader=reader))
    assert [f.module for f in found] == ["model.layers.0.self_attn.q_proj"] and "NaN" in found[0].message
    zeros = {f"base_model.model.{m}.lora_B.weight": torch.zeros(o, r) for m, (_, o, r) in GOOD.items()}
    folder = write_peft_adapter(tmp_path / "z", GOOD, tensors_override=zeros)
    reader = safetensors_reader([str(folder / "adapter_model.safetensors")])
    findings = check_adapters([read_peft_folder(folder)], base=llama_base, tensor_reader=reader)
    assert any("ΔW = 0" in f.message for f in findings)


def test_empty_adapter_is_an_error(tmp_path: Path) -> None:
    info = read_peft_folder(write_peft_adapter(tmp_path / "a", GOOD))
    info.modules = []
    assert "empty" in errors(check_adapters([info]))[0].message


def test_check_command_on_paths(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from loramgr.cli.main import cli

    model_dir = tmp_path / "base"
    model_dir.mkdir()
    save_file({k: v.clone().contiguous() for k, v in tiny_llama().state_dict().items()},
              str(model_dir / "model.safetensors"))
    good = write_peft_adapter(tmp_path / "good", GOOD)
    big = write_peft_adapter(tmp_path / "big", {**GOOD, "model.layers.0.self_attn.q_proj": (32, 32, 24)})
    runner = CliRunner()
    ok = runner.invoke(cli, ["check", str(good), "--base", str(model_dir), "--engine", "vllm"])
    assert ok.exit_code == 0, ok.output
    assert "ok: 1 adapter(s), engine vllm:max-rank=16" in ok.output
    bad = runner.invoke(cli, ["check", str(big), "--base", str(model_dir), "--engine", "vllm"])
    assert bad.exit_code == 1 and "--max-lora-rank 32" in bad.output
    usage = runner.invoke(cli, ["check", str(good), "--engine", "vllm:max-rank=17"])
    assert usage.exit_code == 2 and "max_lora_rank choices" in usage.output


def test_kohya_base_hash_compared_with_a_single_file_base(tmp_path: Path) -> None:
    import hashlib

    from safetensors.torch import save_file

    from loramgr.compat.basemodel import fingerprint_base_model

    pipe = TinyPipeline()
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.state_dict().items()}, str(base_file))
    digest = hashlib.sha256(base_file.read_bytes()).hexdigest()
    base = fingerprint_base_model(base_file, content=True)
    from test_kohya import KOHYA_METADATA

    same = read_adapter_file(write_kohya_file(tmp_path / "a.safetensors", pipe,
                                              metadata={**KOHYA_METADATA, "ss_new_sd_model_hash": digest}))
    other = read_adapter_file(write_kohya_file(tmp_path / "b.safetensors", pipe))
    assert not [f for f in check_adapters([same], base=base) if "another fine-tune" in f.message]
    assert [f for f in check_adapters([other], base=base) if "another fine-tune" in f.message]
    assert any("different base files" in f.message for f in check_adapters([same, other]))


# ---------------------------------------------------------------------------------------------------
# machine-readable codes, the override that filters on them, and one check for the CLI and Python


def test_findings_carry_codes_and_json_prints_them(tmp_path: Path, llama_base) -> None:
    from click.testing import CliRunner

    from loramgr.cli.main import cli
    from loramgr.compat.findings import CODES

    big = {**GOOD, "model.layers.0.self_attn.q_proj": (32, 32, 24), "model.layers.0.self_attn.qkv": (32, 96, 8)}
    info = read_peft_folder(write_peft_adapter(tmp_path / "a", big))
    findings = check_adapters([info], base=llama_base, engine="vllm")
    assert {(f.code, f.module) for f in findings if f.severity == "error"} == {
        ("missing-module", "model.layers.0.self_attn.qkv"),
        ("engine-rank", "model.layers.0.self_attn.q_proj"),
    }
    assert all(f.code in CODES for f in findings)
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "a"), "--engine", "vllm", "--json"])
    assert result.exit_code == 1
    printed = json.loads(result.output)
    assert [(f["severity"], f["code"]) for f in printed] == [
        ("error", "engine-rank"), ("info", "engine-modules-unchecked"), ("info", "no-base")]


def test_allow_different_bases_drops_base_mismatches_only(tmp_path: Path, llama_base) -> None:
    """'no such module in base' mentions a base but is no base mismatch: the override keeps it."""
    from loramgr.adapter import LoraAdapter
    from loramgr.errors import MergeError
    from loramgr.merge import MergeOptions
    from loramgr.merge.operations import run_checks

    def adapter(name: str, modules: dict) -> LoraAdapter:
        folder = write_peft_adapter(tmp_path / name, modules)
        return LoraAdapter(read_peft_folder(folder), folder, label=name)

    good, odd = adapter("good", GOOD), adapter("odd", {**GOOD, "model.layers.0.self_attn.qkv": (32, 96, 8)})
    lenient = MergeOptions(allow_different_bases=True)
    with pytest.raises(MergeError, match="odd: no such module in base tiny-base"):
        run_checks([good, odd], lenient, bases=[llama_base, llama_base])
    other = fingerprint_from_tensors({"x.weight": ((4, 4), "F32")}, name="other")
    with pytest.raises(MergeError, match="another structure"):
        run_checks([good, good], MergeOptions(), bases=[llama_base, other])
    assert run_checks([good, good], lenient, bases=[llama_base, other]) == []


def test_plain_lora_guard_comes_before_every_other_check(tmp_path: Path, llama_base) -> None:
    from test_lycoris import write as write_lycoris

    from loramgr.adapter import LoraAdapter
    from loramgr.errors import UnsupportedAdapterError
    from loramgr.merge import MergeOptions
    from loramgr.merge.operations import combine

    good = write_peft_adapter(tmp_path / "good", GOOD)
    loha = write_lycoris(tmp_path, "loha")  # its module is not in the base either
    adapters = [LoraAdapter(read_peft_folder(good), good, label="good"),
                LoraAdapter(read_adapter_file(loha), tmp_path, label="loha", weights_path=loha)]
    with pytest.raises(UnsupportedAdapterError, match="combine is not possible for loha: a LoHa adapter"):
        combine(adapters, MergeOptions())


@pytest.fixture()
def check_inputs(tmp_path: Path) -> dict[str, str]:
    """A base model folder, adapters on disk, and one adapter installed for a registered base."""
    from safetensors.torch import save_file

    model_dir = tmp_path / "base"
    model_dir.mkdir()
    save_file({k: v.clone().contiguous() for k, v in tiny_llama().state_dict().items()},
              str(model_dir / "model.safetensors"))
    paths = {
        "base": str(model_dir),
        "good": str(write_peft_adapter(tmp_path / "good", GOOD)),
        "big": str(write_peft_adapter(tmp_path / "big", {**GOOD, "model.layers.0.self_attn.q_proj": (32, 32, 24)})),
        "kohya": str(write_kohya_file(tmp_path / "k.safetensors", TinyPipeline())),
    }
    run_cli("base", "add", paths["base"], "--name", "tiny-base")
    run_cli("install", paths["big"], "--name", "big", "--base", "tiny-base")
    return paths


CHECK_CASES = {  # adapters ("@name": a registry reference), options, the codes of the errors expected
    "folder-for-vllm": (["good"], {"base": "base", "engine": "vllm"}, set()),
    "rank-above-vllm": (["big"], {"base": "base", "engine": "vllm:max-rank=16"}, {"engine-rank"}),
    "two-with-values": (["good", "big"], {"values": True}, set()),
    "registered-base-by-name": (["good"], {"base": "tiny-base", "engine": "llama.cpp"}, set()),
    "linked-at-install": (["@big"], {"engine": "vllm"}, {"engine-rank"}),
    "kohya-on-a-llama": (["kohya"], {"base": "base", "engine": "peft"}, {"engine-format", "missing-module"}),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_cli_and_python_api_give_the_same_findings(check_inputs: dict[str, str], case: str) -> None:
    import dataclasses

    import loramgr

    names, options, expected = CHECK_CASES[case]
    sources = [n[1:] if n.startswith("@") else check_inputs[n] for n in names]  # "@x": registry reference
    base = options.get("base")
    base = check_inputs.get(base, base)
    args = ["check", *sources, "--json"] + (["--base", base] if base else [])
    args += ["--engine", options["engine"]] if "engine" in options else []
    args += ["--values"] if "values" in options else []
    report = loramgr.check(sources, base=base, engine=options.get("engine"), values=options.get("values", False))
    result = run_cli(*args, code=1 if report.errors else 0)
    assert json.loads(result.output) == [dataclasses.asdict(f) for f in report.findings]
    assert {f.code for f in report.errors} == expected


def test_cli_and_python_api_give_the_same_error(check_inputs: dict[str, str]) -> None:
    import loramgr
    from loramgr.errors import EngineSpecError, LoramgrError

    with pytest.raises(LoramgrError) as caught:
        loramgr.check(["no-such-adapter"])
    assert one_line_error("check", "no-such-adapter") == f"Error: {caught.value}"
    with pytest.raises(EngineSpecError) as bad_engine:
        loramgr.check([check_inputs["good"]], engine="vllm:max-rank=17")
    usage = run_cli("check", check_inputs["good"], "--engine", "vllm:max-rank=17", code=2)
    assert str(bad_engine.value) in usage.output.replace("\n", " ")


# vLLM's PEFTHelper (vllm/lora/peft_helper.py: _validate_features, validate_legal, __post_init__), restated here
# from its source as an independent table: vLLM needs a GPU and cannot be installed where these tests run
def peft_helper_errors(config: dict, max_lora_rank: int) -> list[str]:
    r = config["r"]
    if r <= 0:
        return ["rank must be a positive integer"]
    found = []
    if [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        found.append("modules_to_save")
    if config.get("use_dora"):
        found.append("DoRA")
    if config.get("lora_bias"):
        found.append("lora_bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        found.append("init")
    for key in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if config.get(key):
            found.append(key)
    if max([r, *(config.get("rank_pattern") or {}).values()]) > max_lora_rank:
        found.append("rank")
    if config.get("bias", "none") != "none":
        found.append("bias")
    return found


PEFT_HELPER_CASES = {
    "plain": {},
    "rank-above": {"r": 32},  # the tensors get the ranks the config declares (see _ranked)
    "rank-pattern-above": {"rank_pattern": {"model.layers.0.self_attn.q_proj": 32}},
    "rank-pattern-within": {"rank_pattern": {"model.layers.0.self_attn.q_proj": 16}},
    "dora": {"use_dora": True},
    "modules-to-save-lm-head": {"modules_to_save": ["lm_head"]},
    "modules-to-save-score": {"modules_to_save": ["score"]},
    "modules-to-save-classifier-and-score": {"modules_to_save": ["classifier", "score"]},
    "lora-bias": {"lora_bias": True},
    "bias-all": {"bias": "all"},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa-niter": {"init_lora_weights": "pissa_niter_4"},
    "olora": {"init_lora_weights": "olora"},
    "corda": {"init_lora_weights": "corda"},
    "loftq": {"init_lora_weights": "loftq"},
    "unknown-init": {"init_lora_weights": "future_init"},
    "gaussian": {"init_lora_weights": "gaussian"},
    "eva": {"init_lora_weights": "eva"},
    "init-false": {"init_lora_weights": False},
    "alora": {"alora_invocation_tokens": [1, 2]},
    "layer-replication": {"layer_replication": [[0, 2]]},
    "bdlora": {"use_bdlora": {"nblocks": 2}},
    "qalora": {"use_qalora": True},
    "rslora": {"use_rslora": True},
}


@pytest.mark.parametrize("case", list(PEFT_HELPER_CASES))
def test_check_vllm_agrees_with_vllm_peft_helper(tmp_path: Path, llama_base, case: str) -> None:
    change = PEFT_HELPER_CASES[case]
    pattern = change.get("rank_pattern", {})
    ranked = {name: (d_in, d_out, pattern.get(name, change.get("r", r))) for name, (d_in, d_out, r) in GOOD.items()}
    folder = write_peft_adapter(tmp_path / "a", ranked, rank=change.get("r", 8))
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    info = read_peft_folder(folder)
    if config.get("use_dora"):
        info.use_dora = True  # the DoRA flag alone, as vLLM reads it (the magnitudes do not matter to the rule)
    expected = peft_helper_errors(config, 16)
    found = errors(check_adapters([info], base=llama_base, engine="vllm:max-rank=16"))
    assert bool(found) == bool(expected), (expected, [str(f) for f in found])
    assert len(found) >= len(expected)


@pytest.mark.parametrize("rank", [0, -8])
def test_non_positive_rank_is_refused_on_read_as_vllm_refuses_it(tmp_path: Path, rank: int) -> None:
    folder = write_peft_adapter(tmp_path / "a", GOOD, extra_config={"r": rank})
    assert peft_helper_errors(json.loads((folder / "adapter_config.json").read_text()), 16)
    with pytest.raises(LoramgrError, match="r must be a positive number"):
        read_peft_folder(folder)


def test_check_llama_cpp_warns_where_its_converter_scales_wrongly(tmp_path: Path, llama_base) -> None:
    def warnings(**options) -> list:
        info = read_peft_folder(write_peft_adapter(tmp_path / str(len(list(tmp_path.iterdir()))), **options))
        found = check_adapters([info], base=llama_base, engine="llama.cpp")
        return [f for f in found if f.code == "engine-converter-scale"]

    assert warnings(modules=GOOD, alpha=16.0) == []  # one rank, one alpha: alpha / rank is right
    mixed = {**GOOD, "model.layers.1.mlp.down_proj": (64, 32, 4)}
    # rank_pattern with the one alpha is alpha / r_m in PEFT and in llama.cpp alike
    assert warnings(modules=mixed, alpha=16.0, rank=8) == []
    (rs,) = warnings(modules=GOOD, alpha=16.0, use_rslora=True)
    assert "x0.354" in rs.message and "export --format gguf" in rs.message  # (16 / 8) / (16 / sqrt(8))
    (pattern,) = warnings(modules=GOOD, alpha=16.0, alpha_pattern={"v_proj": 64.0})
    assert pattern.module == "model.layers.0.self_attn.v_proj" and "x0.25" in pattern.message
    assert pattern.severity == "warning"
    saved_folder = write_peft_adapter(tmp_path / "saved", GOOD, extra_config={"modules_to_save": ["lm_head"]})
    saved = read_peft_folder(saved_folder)
    assert [f.code for f in errors(check_adapters([saved], base=llama_base, engine="llama.cpp"))] == [
        "engine-modules-to-save"]


def peft_loads(model: torch.nn.Module, folder: Path) -> bool:
    import copy

    from peft import PeftModel

    try:
        PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    except (ValueError, RuntimeError, KeyError):  # PEFT's own refusals (NoMatchingPeftModuleError is a ValueError)
        return False
    return True


def legacy_vit_adapter(made: Path, folder: Path) -> Path:
    """The same adapter under the names transformers 4 gave ViT's modules (the names its checkpoints keep)."""
    from safetensors.torch import load_file, save_file

    renames = {"layers.": "encoder.layer.", "attention.q_proj": "attention.attention.query",
               "attention.v_proj": "attention.attention.value"}
    tensors = {}
    for key, value in load_file(str(made / "adapter_model.safetensors")).items():
        for old, new in renames.items():
            key = key.replace(old, new)
        tensors[key] = value
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((made / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["query", "value"]}))
    return folder


@pytest.mark.parametrize("model_name", ["vit", "gemma2", "bert"])
def test_check_agrees_with_peft_on_checkpoints_transformers_renames_or_ties(tmp_path: Path, model_name: str) -> None:
    """transformers 5 builds ViT with other module names than its checkpoint keys (it renames them on loading),
    and saves Gemma 2's tied lm_head only as model.embed_tokens: check goes by the model transformers builds
    from the checkpoint, so it accepts what PEFT loads into that model and refuses what PEFT refuses."""
    from zoo import CASES, MODELS, make_adapter

    from loramgr.compat.check import check

    model = MODELS[model_name]()
    model.save_pretrained(str(tmp_path / "base"))
    for case in (c for c in CASES if c.model == model_name):
        folder = make_adapter(case, model, tmp_path / case.name)
        assert peft_loads(model, folder), case.id
        report = check([folder], base=tmp_path / "base")
        assert report.ok, (case.id, [str(f) for f in report.errors])
    if model_name == "vit":  # names PEFT finds no module for, although the checkpoint has tensors of those names
        legacy = legacy_vit_adapter(tmp_path / "attention", tmp_path / "legacy")
        assert not peft_loads(model, legacy)
        report = check([legacy], base=tmp_path / "base")
        assert {f.code for f in report.errors} == {"missing-module"} and len(report.errors) == 6


def test_tied_lm_head_is_checked_with_the_shape_of_the_weight_it_shares(tmp_path: Path) -> None:
    from zoo import tiny_gemma2_tied

    from loramgr.compat.basemodel import fingerprint_base_model, module_shapes

    tiny_gemma2_tied().save_pretrained(str(tmp_path / "base"))
    fingerprint = fingerprint_base_model(tmp_path / "base")
    assert "lm_head.weight" not in fingerprint.tensors and fingerprint.tied == {"lm_head": "model.embed_tokens"}
    shapes = module_shapes(fingerprint)
    assert (shapes["lm_head"].kind, shapes["lm_head"].out_features, shapes["lm_head"].in_features) == ("linear", 64, 16)
    wrong = write_peft_adapter(tmp_path / "wrong", {"lm_head": (16, 32, 4)})  # a head for another vocabulary
    report = check_adapters([read_peft_folder(wrong)], base=fingerprint)
    assert [f.code for f in errors(report)] == ["shape"]


def test_moe_target_parameters_are_checked_against_the_fused_experts_transformers_builds(tmp_path: Path) -> None:
    """A Mixtral checkpoint keeps one tensor per expert (``experts.0.w1``); the model transformers builds, which PEFT
    adapts, has fused ``mlp.experts.gate_up_proj`` parameters: check finds them there, and a base with other
    experts is a shape error, as PEFT refuses it."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from zoo import CASES, make_adapter, tiny_mixtral

    from loramgr.compat.check import check

    case = next(c for c in CASES if c.id == "mixtral-target-parameters")
    model = tiny_mixtral()
    model.save_pretrained(str(tmp_path / "base"))
    folder = make_adapter(case, model, tmp_path / "experts")
    assert peft_loads(model, folder)
    assert check([folder], base=tmp_path / "base").ok
    torch.manual_seed(0)
    other = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                             num_experts_per_tok=2, max_position_embeddings=32))
    other.save_pretrained(str(tmp_path / "other"))
    assert not peft_loads(other, folder)
    report = check([folder], base=tmp_path / "other")
    assert {f.code for f in report.errors} == {"shape"}
    assert {f.module for f in report.errors} == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                                 for p in ("gate_up_proj", "down_proj")}
