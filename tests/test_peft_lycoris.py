"""PEFT's own LoHa and LoKr folders (peft_type LOHA / LOKR): read as PEFT loads them, installed, shown,
checked for engine peft, applied through PEFT exactly, and refused by name by every operation that
needs a plain LoRA delta."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import one_line_error, run_cli, sample_input, tiny_llama

import loramgr
from loramgr.errors import InvalidAdapterError
from loramgr.formats.peft import read_peft_folder


def peft_lycoris_adapter(model: torch.nn.Module, folder: Path, kind: str, seed: int = 0, **config: Any) -> Any:
    """A PEFT-made LoHa / LoKr adapter with random factors (PEFT initialises one factor to zero); returns the
    live PeftModel, whose layers say what PEFT loads."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    make = {"loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    peft_model = get_peft_model(copy.deepcopy(model), make(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = "tiny-llama"
    peft_model.save_pretrained(str(folder))
    return peft_model


CASES = {
    "loha": dict(kind="loha", r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                 alpha_pattern={"q_proj": 3}),
    "lokr": dict(kind="lokr", r=2, alpha=6, target_modules=["q_proj", "down_proj"]),
    "lokr-both": dict(kind="lokr", r=1, alpha=2, target_modules=["o_proj"], decompose_both=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_as_peft_loads_it(tmp_path: Path, case: str) -> None:
    settings = dict(CASES[case])
    kind = settings.pop("kind")
    peft_model = peft_lycoris_adapter(tiny_llama(), tmp_path / "a", kind, **settings)
    info = read_peft_folder(tmp_path / "a")
    assert (info.format, info.adapter_type) == ("peft", kind)
    layers = {name.removeprefix("base_model.model."): layer for name, layer in peft_model.named_modules()
              if hasattr(layer, "scaling") and "default" in getattr(layer, "r", {})}
    assert {m.name for m in info.modules} == set(layers)
    keys = set(_keys(tmp_path / "a"))
    for spec in info.modules:
        layer = layers[spec.name]
        assert (spec.rank, spec.alpha) == (layer.r["default"], layer.alpha["default"]), spec.name
        assert spec.scale == pytest.approx(layer.scaling["default"])  # PEFT scales by alpha / r
        weight = layer.get_base_layer().weight
        assert (spec.out_features, spec.in_features) == tuple(weight.shape), spec.name
        own = {k for k in (spec.key_a, spec.key_b, *spec.extra_keys) if k}
        assert own == {k for k in keys if k.startswith(f"base_model.model.{spec.name}.")}  # every tensor kept


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


def test_install_show_and_check_with_engine_peft(tmp_path: Path) -> None:
    peft_lycoris_adapter(tiny_llama(), tmp_path / "h", "loha", r=4, alpha=8, target_modules=["q_proj"])
    run_cli("install", str(tmp_path / "h"), "--name", "hada", "--version", "1.0.0")
    assert "loha (peft)" in run_cli("show", "hada==1.0.0").output
    assert "ok: 1 adapter(s), engine peft" in run_cli("check", "hada==1.0.0", "--engine", "peft").output
    refused = run_cli("check", "hada==1.0.0", "--engine", "vllm", code=1).output
    assert "vllm: LoHa adapters are not supported" in refused


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_apply_from_the_registry_is_what_peft_loads_from_the_folder(tmp_path: Path, kind: str) -> None:
    from peft import PeftModel

    settings = dict(CASES["loha" if kind == "loha" else "lokr"])
    settings.pop("kind")
    peft_lycoris_adapter(tiny_llama(), tmp_path / "a", kind, **settings)
    run_cli("install", str(tmp_path / "a"), "--name", "ly", "--version", "1.0.0")
    applied = loramgr.apply(tiny_llama(), loramgr.get("ly==1.0.0"))
    expected = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    with torch.no_grad():
        ours, theirs, bare = (m(sample_input()).logits for m in (applied, expected, tiny_llama()))
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, bare, atol=1e-4)  # the adapter changes the model


def test_operations_needing_a_plain_lora_refuse_by_name(tmp_path: Path) -> None:
    model = tiny_llama()
    peft_lycoris_adapter(model, tmp_path / "k", "lokr", r=2, alpha=4, target_modules=["q_proj"])
    run_cli("install", str(tmp_path / "k"), "--name", "kron", "--version", "1.0.0")
    run_cli("install", str(tmp_path / "k"), "--name", "kron2", "--version", "1.0.0")
    line = one_line_error("combine", "kron==1.0.0", "kron2==1.0.0", "--name", "both")
    assert "combine is not possible" in line and "LoKr adapter (peft format)" in line
    for fmt in ("kohya", "diffusers"):
        line = one_line_error("export", "kron==1.0.0", str(tmp_path / f"out-{fmt}"), "--format", fmt)
        assert f"conversion from peft to {fmt} is not possible" in line and "LoKr" in line
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    run_cli("base", "add", str(base), "--name", "tiny-llama")
    for extra in ((), ("--base", "tiny-llama")):  # the guard speaks first, whether a base is known or not
        line = one_line_error("export", "kron==1.0.0", str(tmp_path / "out.gguf"), "--format", "gguf", *extra)
        assert "export to gguf is not possible" in line and "LoKr" in line and not (tmp_path / "out.gguf").exists()
    from loramgr.errors import UnsupportedAdapterError

    with pytest.raises(UnsupportedAdapterError, match="fuse is not possible for kron==1.0.0: a LoKr adapter"):
        loramgr.fuse(tiny_llama(), loramgr.get("kron==1.0.0"))


def test_broken_peft_loha_folders_are_refused_naming_the_module(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    peft_lycoris_adapter(tiny_llama(), tmp_path / "h", "loha", r=4, alpha=8, target_modules=["q_proj"])
    weights = tmp_path / "h" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.endswith("layers.1.self_attn.q_proj.hada_w2_b")}, str(weights))
    with pytest.raises(InvalidAdapterError, match="module model.layers.1.self_attn.q_proj has no hada_w2_b"):
        read_peft_folder(tmp_path / "h")
    save_file(tensors, str(weights))
    config_path = tmp_path / "h" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"r": 8}))
    line = one_line_error("install", str(tmp_path / "h"), "--name", "bad", "--version", "1.0.0")
    assert "hada_w1_b of rank 4 but the config says r=8" in line
