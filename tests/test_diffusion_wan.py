"""Wan 2.x LoRA files in the ComfyUI/original, musubi-tuner (kohya) and diffusers conventions, and base
identification: a 1.3B LoRA is refused against a 14B base with a message that says so."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusion_files import close, dense, peft_deltas, random_factors, wan_model, write_comfyui, write_kohya

import loramgr
import loramgr.api
from loramgr.cli.main import cli
from loramgr.formats.diffusion.write import deltas

pytestmark = pytest.mark.slow

#: original Wan module -> diffusers module (the test's own table, from the two models' layouts)
_TO_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                 "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                 "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
                 "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}


def wan_original_shapes(model, *, i2v: bool = False) -> dict[str, tuple[int, int]]:
    """(out, in) of the original Wan checkpoint's block linears, read off the diffusers model's layers."""
    mods = dict(model.named_modules())
    shapes = {}
    for i in range(model.config.num_layers):
        for orig, ours in _TO_DIFFUSERS.items():
            if "img" in orig and not i2v:
                continue
            layer = mods[f"blocks.{i}.{ours}"]
            shapes[f"blocks.{i}.{orig}"] = (layer.out_features, layer.in_features)
    return shapes


def to_diffusers(factors_dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    result = {}
    for name, delta in factors_dense.items():
        _, i, rest = name.split(".", 2)
        result[f"blocks.{i}.{_TO_DIFFUSERS[rest]}"] = delta
    return result


def diffusers_load(path, **config) -> dict[str, torch.Tensor]:
    from diffusers.loaders import WanLoraLoaderMixin

    state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    model = wan_model(**config)
    model.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t", metadata=metadata)
    return peft_deltas(model, "t")


@pytest.mark.parametrize("convention", ["comfyui", "comfyui-down-up", "musubi"])
def test_wan_conventions_agree_with_diffusers(tmp_path, convention):
    model = wan_model()
    factors = random_factors(wan_original_shapes(model))
    path = tmp_path / "wan.safetensors"
    if convention == "musubi":
        write_kohya(path, factors)
    else:
        write_comfyui(path, factors, down_up=convention.endswith("down-up"))
    loramgr.install(path, name="wan")
    result = CliRunner().invoke(cli, ["show", "wan", "--json"])
    details = json.loads(result.output)
    assert details["format"] == ("kohya" if convention == "musubi" else "comfyui")
    assert details["config"]["family"] == "wan"
    adapter = loramgr.get("wan")
    expected = to_diffusers(dense(factors))
    close(deltas(adapter, "original"), dense(factors))
    close(deltas(adapter, "diffusers"), expected)
    close(diffusers_load(path), expected)
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        loramgr.export("wan", out, format=fmt)
        loramgr.install(out, name=f"wan-{fmt}")
        close(deltas(loramgr.get(f"wan-{fmt}"), "diffusers"), expected)
        close(diffusers_load(out), expected)


def test_i2v_modules_identified(tmp_path):
    model = wan_model(added_kv_proj_dim=16, image_dim=16)
    factors = random_factors(wan_original_shapes(model, i2v=True))
    path = tmp_path / "i2v.safetensors"
    write_comfyui(path, factors)
    loramgr.install(path, name="i2v")
    identity = loramgr.get("i2v").info.config["base_identity"]
    assert identity["family"] == "wan" and identity["task"] == "I2V"
    close(diffusers_load(path, added_kv_proj_dim=16, image_dim=16), to_diffusers(dense(factors)))


def _published_wan_lora(path, dim: int, ffn: int) -> None:
    """A rank-1 LoRA with the shapes of a published Wan size on block 0's attention and feed-forward."""
    factors = {"blocks.0.self_attn.q": (torch.zeros(1, dim), torch.zeros(dim, 1), 1.0),
               "blocks.0.ffn.0": (torch.zeros(1, dim), torch.zeros(ffn, 1), 1.0),
               "blocks.0.ffn.2": (torch.zeros(1, ffn), torch.zeros(dim, 1), 1.0)}
    write_kohya(path, factors, metadata={"ss_base_model_version": "wan21_t2v_1.3b"})


def test_wan_13b_lora_refused_on_14b_base(tmp_path):
    from loramgr.compat.basemodel import fingerprint_from_tensors

    dim, ffn = 5120, 13824  # the published Wan 14B config: dim 5120, ffn_dim 13824
    tensors = {}
    for i in range(2):
        for leaf in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"):
            tensors[f"blocks.{i}.{leaf}.weight"] = ((dim, dim), "BF16")
        tensors[f"blocks.{i}.ffn.0.weight"] = ((ffn, dim), "BF16")
        tensors[f"blocks.{i}.ffn.2.weight"] = ((dim, ffn), "BF16")
    loramgr.api.registry().add_base(fingerprint_from_tensors(tensors, name="wan-14b"))
    path = tmp_path / "small.safetensors"
    _published_wan_lora(path, 1536, 8960)
    result = CliRunner().invoke(cli, ["install", str(path), "--base", "wan-14b"])
    assert result.exit_code == 1
    assert "Wan 2.1 / 2.2 1.3B" in result.output and "Wan 2.1 / 2.2 14B" in result.output
    assert CliRunner().invoke(cli, ["list", "--json"]).output.strip() == "[]"
    loramgr.install(path, name="small")
    shown = CliRunner().invoke(cli, ["show", "small"]).output
    assert "base (shapes) Wan 2.1 / 2.2 1.3B" in shown and "metadata: wan21_t2v_1.3b" in shown
    checked = CliRunner().invoke(cli, ["check", "small", "--base", "wan-14b"])
    assert checked.exit_code == 1 and "the base is Wan 2.1 / 2.2 14B" in checked.output
    # a 14B-shaped LoRA fits the same base
    big = tmp_path / "big.safetensors"
    _published_wan_lora(big, dim, ffn)
    assert CliRunner().invoke(cli, ["install", str(big), "--base", "wan-14b"]).exit_code == 0


def test_diff_parts_recognised_carried_to_comfyui_and_refused_elsewhere(tmp_path):
    from safetensors.torch import load_file, save_file

    model = wan_model()
    factors = random_factors(wan_original_shapes(model))
    path = tmp_path / "with-diff.safetensors"
    write_comfyui(path, factors)
    tensors = load_file(str(path))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    extra = {"diffusion_model.blocks.0.norm3.diff": torch.randn(dim),
             "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(dim)}
    save_file(tensors | extra, str(path))
    loramgr.install(path, name="wan-diff")
    adapter = loramgr.get("wan-diff")
    assert adapter.info.config["other_keys"] == sorted(extra)
    assert any("2 full-weight (diff / diff_b)" in note for note in adapter.info.notes)
    close(deltas(adapter, "original"), dense(factors))
    out = tmp_path / "comfy.safetensors"
    loramgr.export("wan-diff", out, format="comfyui")
    written = load_file(str(out))
    for key, value in extra.items():
        assert torch.equal(written[key], value)
    refused = CliRunner().invoke(cli, ["export", "wan-diff", str(tmp_path / "k.safetensors"), "--format", "kohya"])
    assert refused.exit_code == 1 and "blocks.0.norm3.diff" in refused.output
