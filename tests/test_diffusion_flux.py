"""Flux.1 LoRA files in the kohya, ComfyUI/BFL, XLabs and diffusers conventions: install, show, ΔW,
export to each convention and back, and diffusers' own loader, all agree."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusion_files import (
    close,
    dense,
    flux_model,
    flux_original_shapes,
    flux_to_diffusers_rows,
    peft_deltas,
    random_factors,
    write_comfyui,
    write_kohya,
)
from safetensors.torch import load_file, save_file

import loramgr
from loramgr.cli.main import cli
from loramgr.formats.diffusion.write import deltas

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return flux_model()


@pytest.fixture(scope="module")
def factors(model):
    return random_factors(flux_original_shapes(model))


def expected_diffusers(model, factors) -> dict[str, torch.Tensor]:
    """The dense ΔW of each original module, its rows given to the diffusers modules that hold them."""
    d = model.config.num_attention_heads * model.config.attention_head_dim
    result = {}
    for name, delta in dense(factors).items():
        if name == "final_layer.adaLN_modulation.1":  # (shift, scale) -> (scale, shift)
            result["norm_out.linear"] = torch.cat([delta[d:], delta[:d]])
            continue
        for target, rows in flux_to_diffusers_rows(name, d):
            result[target] = delta[rows]
    return result


def diffusers_load(model, path) -> dict[str, torch.Tensor]:
    """Load a file with diffusers' Flux pipeline conversion and PEFT injection; ΔW per module."""
    from diffusers.loaders import FluxLoraLoaderMixin

    state_dict, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True,
                                                                        return_lora_metadata=True)
    model = flux_model()
    model.load_lora_adapter(state_dict, network_alphas=alphas, prefix="transformer", adapter_name="t",
                            metadata=metadata)
    return peft_deltas(model, "t")


def show(ref: str) -> dict:
    result = CliRunner().invoke(cli, ["show", ref, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("convention", ["kohya", "comfyui"])
def test_original_names_read_exactly_and_match_diffusers(tmp_path, model, factors, convention):
    path = tmp_path / f"flux-{convention}.safetensors"
    (write_kohya if convention == "kohya" else write_comfyui)(path, factors)
    result = CliRunner().invoke(cli, ["install", str(path), "--name", f"flux-{convention}"])
    assert result.exit_code == 0, result.output
    details = show(f"flux-{convention}")
    assert details["format"] == convention
    assert details["config"]["family"] == "flux1" and details["config"]["namespace"] == "original"
    assert {m["name"] for m in details["modules"]} == set(factors)
    adapter = loramgr.get(f"flux-{convention}")
    close(deltas(adapter, "original"), dense(factors))
    close(deltas(adapter, "diffusers"), expected_diffusers(model, factors))
    if convention == "kohya":
        # diffusers' kohya Flux conversion hard-codes the 3072-wide linear1 split, and 0.42 leaves the modules
        # outside the blocks (img_in, final_layer, ...) without their "transformer." prefix, so they never
        # load: compare the blocks it does load
        subset = {k: v for k, v in factors.items() if "blocks" in k and "linear1" not in k}
        sub = tmp_path / "subset.safetensors"
        write_kohya(sub, subset)
        close(diffusers_load(model, sub), expected_diffusers(model, subset))


def test_export_to_every_convention_and_back(tmp_path, model, factors):
    path = tmp_path / "flux.safetensors"
    write_kohya(path, factors)
    loramgr.install(path, name="flux")
    reference = expected_diffusers(model, factors)
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"out-{fmt}.safetensors"
        result = CliRunner().invoke(cli, ["export", "flux", str(out), "--format", fmt])
        assert result.exit_code == 0, result.output
        loramgr.install(out, name=f"flux-{fmt}")
        back = loramgr.get(f"flux-{fmt}")
        assert back.info.format == fmt
        close(deltas(back, "diffusers"), reference)
        close(deltas(back, "original"), dense(factors))
        if fmt == "diffusers":
            close(diffusers_load(model, out), reference)
    # the diffusers file exported back to the original names, through the block-diagonal fusion
    again = tmp_path / "again.safetensors"
    loramgr.export("flux-diffusers", again, format="kohya")
    loramgr.install(again, name="flux-again")
    fused = loramgr.get("flux-again")
    assert fused.info.module("double_blocks.0.img_attn.qkv").rank == 12  # q, k, v: rank 4 each
    close(deltas(fused, "original"), dense(factors))
    peft_out = tmp_path / "peft"
    loramgr.export("flux", peft_out, format="peft")
    loramgr.install(peft_out, name="flux-peft")
    peft = loramgr.get("flux-peft")
    close({m: peft.delta(m).double() for m in peft.module_names}, reference, atol=1e-6)
    refused = CliRunner().invoke(cli, ["export", "flux", str(tmp_path / "x.safetensors"), "--format", "xlabs"])
    assert refused.exit_code == 1 and "XLabs files hold only the attention" in refused.output


def test_xlabs_file(tmp_path, model, factors):
    """Double blocks (qkv_lora1/2, proj_lora1/2) and single blocks (qkv_lora: the q, k, v rows of linear1;
    proj_lora: linear2), as diffusers' XLabs conversion reads them."""
    d = model.config.num_attention_heads * model.config.attention_head_dim
    attn = {k: v for k, v in factors.items() if k.startswith("double_blocks") and "attn" in k}
    a, b, _ = factors["single_blocks.0.linear1"]
    single = {"single_blocks.0.linear1": (a, b[: 3 * d], 0.0),
              "single_blocks.0.linear2": factors["single_blocks.0.linear2"]}
    leaf = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1",
            "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}
    tensors = {}
    for name, (a, b, _alpha) in (attn | single).items():
        kind, block, rest = name.split(".")[0], name.split(".")[1], ".".join(name.split(".")[2:])
        tensors[f"{kind}.{block}.processor.{leaf[rest]}.down.weight"] = a
        tensors[f"{kind}.{block}.processor.{leaf[rest]}.up.weight"] = b
    path = tmp_path / "xlabs.safetensors"
    save_file(tensors, str(path))
    loramgr.install(path, name="xl")
    adapter = loramgr.get("xl")
    assert adapter.info.format == "xlabs"
    assert adapter.info.module("single_blocks.0.linear1").out_features == 3 * d
    unit = {k: (a, b, float(a.shape[0])) for k, (a, b, _) in (attn | single).items()}  # XLabs: scale 1
    # linear1's q, k, v rows go to to_q, to_k, to_v; its MLP rows (proj_mlp) are not adapted
    expected = {k: v for k, v in expected_diffusers(model, unit).items() if v.shape[0]}
    assert not any(k.endswith("proj_mlp") for k in expected)
    close(deltas(adapter, "diffusers"), expected)
    close(diffusers_load(model, path), expected)
    out = tmp_path / "back.safetensors"
    loramgr.export("xl", out, format="xlabs")
    loramgr.install(out, name="xl-back")
    close(deltas(loramgr.get("xl-back"), "original"), dense(unit))
    close(diffusers_load(model, out), expected)
    # ComfyUI names the whole linear1: the MLP rows are written as zeros, and come back out to XLabs
    comfy = tmp_path / "comfy.safetensors"
    loramgr.export("xl", comfy, format="comfyui")
    loramgr.install(comfy, name="xl-comfy")
    a, b, alpha = unit["single_blocks.0.linear1"]
    full = unit | {"single_blocks.0.linear1": (a, torch.cat([b, torch.zeros(4 * d, b.shape[1])]), alpha)}
    close(deltas(loramgr.get("xl-comfy"), "original"), dense(full))
    mlp = "single_transformer_blocks.0.proj_mlp"
    close(deltas(loramgr.get("xl-comfy"), "diffusers"), expected | {mlp: torch.zeros(4 * d, d, dtype=torch.float64)})
    again = tmp_path / "again.safetensors"
    loramgr.export("xl-comfy", again, format="xlabs")
    assert set(load_file(str(again))) == set(tensors)
    loramgr.install(again, name="xl-again")
    close(deltas(loramgr.get("xl-again"), "diffusers"), expected)
    # a linear1 LoRA that changes the MLP rows has no XLabs form
    write_kohya(tmp_path / "linear1.safetensors", {"single_blocks.0.linear1": factors["single_blocks.0.linear1"]})
    loramgr.install(tmp_path / "linear1.safetensors", name="flux-linear1")
    refused = CliRunner().invoke(cli, ["export", "flux-linear1", str(tmp_path / "x.safetensors"), "--format", "xlabs"])
    assert refused.exit_code == 1 and "single_blocks.0.linear1" in refused.output

