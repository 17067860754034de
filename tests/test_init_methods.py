"""Adapters of PEFT's base-changing init methods (PiSSA, OLoRA, ...): recognised, refused unconverted, converted.

The reference for a trained PiSSA / OLoRA adapter is the model PEFT trained: the base PEFT changed at
initialisation (W - s·B0·A0) plus the trained factors. Adapters are made by PEFT itself on a tiny Llama,
with seeded non-zero perturbations of the factors standing in for training; PEFT's own conversion
(``save_pretrained(path_initial_model_for_weight_conversion=...)``) is the reference for convert-init.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from factories import one_line_error, run_cli, sample_input, tiny_llama, write_peft_adapter
from safetensors.torch import load_file

import loramgr
from loramgr.errors import UnsupportedAdapterError
from loramgr.formats.initmethods import init_method
from loramgr.formats.peft import read_peft_folder

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
PATTERNS = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}}


def _train(base: torch.nn.Module, root: Path, method: str, **options) -> dict[str, object]:
    """Initialise with ``method``, save the initial adapter (as PEFT's docs say: init_lora_weights reset to
    true first), perturb the factors, save the trained adapter and PEFT's converted one."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=method, **options)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(root / "initial"))
    model.peft_config["default"].init_lora_weights = method
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(str(root / "trained"))
    with torch.no_grad():
        logits = model(sample_input()).logits
    model.save_pretrained(str(root / "peft-converted"), path_initial_model_for_weight_conversion=str(root / "initial"))
    return {"trained": root / "trained", "initial": root / "initial", "converted": root / "peft-converted",
            "logits": logits}


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(seed=3)


@pytest.fixture(scope="module", params=["pissa", "olora"])
def trained(request, base, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp(request.param)
    return {"method": request.param, **_train(base, root, request.param, **PATTERNS)}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_init_method_is_recognised_from_the_config(tmp_path):
    names = {"pissa": "PiSSA", "pissa_niter_4": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ",
             "lora_ga": "LoRA-GA", "eva": None, "gaussian": None, True: None}
    module = {"model.layers.0.self_attn.q_proj": (32, 32, 4)}
    for value, shown in names.items():
        extra = {"init_lora_weights": value}
        if value == "loftq":
            extra["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
        folder = write_peft_adapter(tmp_path / str(value), module, extra_config=extra)
        info = read_peft_folder(folder)
        assert info.init_method == (value if isinstance(value, str) else None)
        notes = [n for n in info.notes if "initialised with" in n]
        assert (shown in notes[0]) if shown else not notes, (value, info.notes)


def test_install_records_the_method_and_show_names_it(trained):
    run_cli("install", str(trained["trained"]), "--name", "tuned")
    assert loramgr.get("tuned").info.init_method == trained["method"]
    shown = run_cli("show", "tuned").output
    assert "initialised with" in shown and "convert-init" in shown
    details = json.loads(run_cli("show", "tuned", "--json").output)
    assert details["config"]["init_lora_weights"] == trained["method"]
    assert details["init_method"] == trained["method"]


def test_apply_fuse_and_combine_refuse_it_unconverted(trained, base):
    from loramgr.model.peftmodel import apply

    adapter = loramgr.load(Path(trained["trained"]))
    name = {"pissa": "PiSSA", "olora": "OLoRA"}[trained["method"]]
    for operation in (lambda: apply(copy.deepcopy(base), adapter), lambda: loramgr.fuse(copy.deepcopy(base), adapter)):
        with pytest.raises(UnsupportedAdapterError) as refused:
            operation()
        assert name in str(refused.value) and "loramgr convert-init" in str(refused.value)
        assert "\n" not in str(refused.value)
    # PeftModel.from_pretrained re-runs the init on the original base, so the refusal is not for want of a
    # reference: the adapter alone, added to the original weights, is another model
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for module in adapter.module_names:
            plain.get_submodule(module).weight += adapter.delta(module)
    assert not _close(_logits(plain), trained["logits"])
    run_cli("install", str(trained["trained"]), "--name", "tuned")
    run_cli("install", str(trained["converted"]), "--name", "plain")
    error = one_line_error("combine", "tuned", "plain", "--name", "both")
    assert name in error and "convert-init" in error
    assert name in one_line_error("compress", "tuned", "--rank", "2", "--name", "small")


def test_conversions_refuse_it_unconverted(trained, tmp_path):
    """GGUF (and the Ollama folder around it) holds plain deltas: an unconverted adapter would load as another model."""
    run_cli("install", str(trained["trained"]), "--name", "tuned")
    name = {"pissa": "PiSSA", "olora": "OLoRA"}[trained["method"]]
    for fmt in ("gguf", "ollama"):
        error = one_line_error("export", "tuned", str(tmp_path / f"out-{fmt}"), "--format", fmt)
        assert name in error and "convert-init" in error, error
    assert not list(tmp_path.glob("out-*"))


def test_convert_init_writes_what_peft_writes(trained, tmp_path):
    out = tmp_path / "converted"
    run_cli("convert-init", str(trained["trained"]), "--initial", str(trained["initial"]), "--output", str(out))
    mine = load_file(out / "adapter_model.safetensors")
    theirs = load_file(trained["converted"] / "adapter_model.safetensors")
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    mine_config = json.loads((out / "adapter_config.json").read_text())
    theirs_config = json.loads((trained["converted"] / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "target_modules"):
        assert mine_config[key] == theirs_config[key], key
    assert mine_config["r"] == 8 and mine_config["rank_pattern"] == {"v_proj": 4}


def test_converted_adapter_applies_and_fuses_as_peft_loads_it(trained, base, tmp_path):
    from loramgr.model.peftmodel import apply

    out = tmp_path / "converted"
    run_cli("convert-init", str(trained["trained"]), "--initial", str(trained["initial"]), "-o", str(out))
    reference = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(trained["converted"])))
    assert _close(reference, trained["logits"])  # PEFT's conversion is the trained model on the original base
    run_cli("install", str(out), "--name", "converted")
    for adapter in (loramgr.load(out), loramgr.get("converted")):
        assert _close(_logits(apply(copy.deepcopy(base), adapter)), reference)
        fused = copy.deepcopy(base)
        loramgr.fuse(fused, adapter)
        assert _close(_logits(fused), reference)


def test_converted_adapter_reports_its_true_per_module_ranks(trained, base):
    run_cli("install", str(trained["converted"]), "--name", "converted")
    details = json.loads(run_cli("show", "converted", "--json").output)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(trained["converted"]))
    peft_ranks = {name.removeprefix("base_model.model."): layer.r["default"]
                  for name, layer in loaded.named_modules() if hasattr(layer, "r") and "default" in layer.r}
    assert {m["name"]: m["rank"] for m in details["modules"]} == peft_ranks
    assert details["ranks_found"] == [4, 8] and loramgr.get("converted").info.init_method is None
    assert "found 4, 8" in run_cli("show", "converted").output


def test_rslora_converts_with_the_scale_kept(base, tmp_path):
    """PEFT refuses rsLoRA with alpha_pattern; without one its conversion multiplies alpha by sqrt(2)."""
    made = _train(base, tmp_path, "olora", use_rslora=True)
    out = tmp_path / "converted"
    run_cli("convert-init", str(made["trained"]), "--initial", str(made["initial"]), "-o", str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    peft_config = json.loads((made["converted"] / "adapter_config.json").read_text())
    assert config["lora_alpha"] == pytest.approx(peft_config["lora_alpha"]) == pytest.approx(8 * 2**0.5)
    fused = copy.deepcopy(base)
    loramgr.fuse(fused, loramgr.load(out))
    assert _close(_logits(fused), made["logits"])


def test_eva_adapters_are_plain_deltas(base, tmp_path):
    """EVA only chooses the starting A (B starts at zero) and leaves the base alone: nothing to refuse."""
    from factories import peft_adapter_from_model

    folder = peft_adapter_from_model(base, tmp_path / "eva", init_lora_weights="eva")
    assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] == "eva"
    adapter = loramgr.load(folder)
    assert adapter.info.init_method == "eva"
    fused = copy.deepcopy(base)
    loramgr.fuse(fused, adapter)
    assert _close(_logits(fused), _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))))


def test_convert_init_refuses_what_it_cannot_convert(trained, tmp_path, base):
    module = {"model.layers.0.self_attn.q_proj": (32, 32, 4)}
    loftq = write_peft_adapter(tmp_path / "loftq", module, extra_config={
        "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}})
    assert "LoftQ" in one_line_error("convert-init", str(loftq), "--initial", str(loftq), "-o", str(tmp_path / "o"))
    with pytest.raises(UnsupportedAdapterError, match="LoftQ"):
        loramgr.fuse(tiny_llama(), loramgr.load(loftq))
    plain = write_peft_adapter(tmp_path / "plain", module)
    assert "nothing to convert" in one_line_error("convert-init", str(plain), "--initial", str(plain), "-o",
                                                  str(tmp_path / "o"))
    other = _train(base, tmp_path / "other", trained["method"])  # no rank_pattern: v_proj has rank 4, not 2
    error = one_line_error("convert-init", str(trained["trained"]), "--initial", str(other["initial"]), "-o",
                           str(tmp_path / "o"))
    assert "v_proj" in error and "rank" in error
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "not empty" in one_line_error("convert-init", str(trained["trained"]), "--initial",
                                         str(trained["initial"]), "-o", str(tmp_path / "taken"))


def test_init_method_ignores_default_values():
    assert init_method({"init_lora_weights": True}) is None
    assert init_method({"init_lora_weights": False}) is None
    assert init_method({"init_lora_weights": "PiSSA_niter_4"}) == "pissa_niter_4"
