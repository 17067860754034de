"""SD3 / SD3.5 LoRA files: diffusers' names (the only convention diffusers loads for SD3) and the original
checkpoint's names (sd-scripts ``lora_unet_joint_blocks_*``, ComfyUI ``diffusion_model.joint_blocks.*``, fused
qkv). ΔW, diffusers' own checkpoint conversion and diffusers' loader agree; modules shared with Flux are told
apart by the published widths, or conversions are refused."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusion_files import close, dense, peft_deltas, random_factors, write_comfyui, write_kohya
from safetensors.torch import save_file

import loramgr
from loramgr.cli.main import cli
from loramgr.formats.diffusion.write import deltas

pytestmark = pytest.mark.slow

SD3_CONFIG = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4)
ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out")


def sd3_model(**overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**{**SD3_CONFIG, **overrides}).eval()


def sd3_original_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of the original SD3 checkpoint's linear layers (MMDiT-X when attn2 is there), read off the
    diffusers model's layers: the test's own table of which layers make each original one."""
    mods = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = {}
    for i in range(model.config.num_layers):
        d, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for side, query in (("x_block", "attn.to_q"), ("context_block", "attn.add_q_proj")):
            q = mods[d + query]
            shapes[f"{j}{side}.attn.qkv"] = (3 * q[0], q[1])
        shapes[f"{j}x_block.attn.proj"] = mods[d + "attn.to_out.0"]
        shapes[f"{j}x_block.mlp.fc1"], shapes[f"{j}x_block.mlp.fc2"] = mods[d + "ff.net.0.proj"], mods[d + "ff.net.2"]
        shapes[f"{j}x_block.adaLN_modulation.1"] = mods[d + "norm1.linear"]
        shapes[f"{j}context_block.adaLN_modulation.1"] = mods[d + "norm1_context.linear"]
        if d + "attn.to_add_out" in mods:  # the last block's context is pre-only: no output, no MLP
            shapes[f"{j}context_block.attn.proj"] = mods[d + "attn.to_add_out"]
            shapes[f"{j}context_block.mlp.fc1"] = mods[d + "ff_context.net.0.proj"]
            shapes[f"{j}context_block.mlp.fc2"] = mods[d + "ff_context.net.2"]
        if d + "attn2.to_q" in mods:
            q = mods[d + "attn2.to_q"]
            shapes[f"{j}x_block.attn2.qkv"] = (3 * q[0], q[1])
            shapes[f"{j}x_block.attn2.proj"] = mods[d + "attn2.to_out.0"]
    top = {"context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
           "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
    return shapes | {original: mods[ours] for original, ours in top.items()}


def converted_by_diffusers(factors) -> dict[str, torch.Tensor]:
    """The dense ΔW of each original module put through diffusers' own SD3 checkpoint conversion."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    checkpoint = {"pos_embed": torch.zeros(1, 1), "x_embedder.proj.weight": torch.zeros(1),
                  "x_embedder.proj.bias": torch.zeros(1)}
    for name, delta in dense(factors).items():
        checkpoint[name + ".weight"], checkpoint[name + ".bias"] = delta, torch.zeros(delta.shape[0])
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    return {k.removesuffix(".weight"): v for k, v in converted.items()
            if k.endswith(".weight") and not k.startswith("pos_embed.")}


def write_diffusers(path, factors) -> None:
    save_file({f"transformer.{k}.lora_{x}.weight": t
               for k, (a, b, _) in factors.items() for x, t in (("A", a), ("B", b))}, str(path))


def test_sd3_diffusers_file(tmp_path):
    from diffusers.loaders import SD3LoraLoaderMixin

    model = sd3_model()
    mods = dict(model.named_modules())
    shapes = {f"transformer_blocks.{i}.{leaf}": (mods[f"transformer_blocks.{i}.{leaf}"].out_features,
                                                 mods[f"transformer_blocks.{i}.{leaf}"].in_features)
              for i in range(2) for leaf in ATTN if f"transformer_blocks.{i}.{leaf}" in mods}  # last: context pre-only
    # no metadata: alpha = rank, as diffusers loads it
    factors = {k: (a, b, float(a.shape[0])) for k, (a, b, _) in random_factors(shapes).items()}
    path = tmp_path / "sd3.safetensors"
    write_diffusers(path, factors)
    loramgr.install(path, name="sd3")
    adapter = loramgr.get("sd3")
    assert "sd3" in adapter.info.config["families"] and adapter.info.config["family"] is None
    close(deltas(adapter, "diffusers"), dense(factors))
    state_dict = SD3LoraLoaderMixin.lora_state_dict(str(path))
    loaded = sd3_model()
    loaded.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t")
    close(peft_deltas(loaded, "t"), dense(factors))
    out = tmp_path / "again.safetensors"
    loramgr.export("sd3", out, format="diffusers")
    again = sd3_model()
    sd, meta = SD3LoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
    again.load_lora_adapter(sd, prefix="transformer", adapter_name="t", metadata=meta)
    close(peft_deltas(again, "t"), dense(factors))
    refused = CliRunner().invoke(cli, ["export", "sd3", str(tmp_path / "k.safetensors"), "--format", "kohya"])
    assert refused.exit_code == 1 and "exist in several model families" in refused.output


def test_published_width_decides_sd3(tmp_path):
    dim = 1536  # SD3 / SD3.5 Medium: 24 heads of 64
    factors = {"transformer_blocks.0.attn.to_q": (torch.zeros(1, dim), torch.zeros(dim, 1), 1.0)}
    path = tmp_path / "sd3-medium.safetensors"
    write_diffusers(path, factors)
    loramgr.install(path, name="medium")
    details = json.loads(CliRunner().invoke(cli, ["show", "medium", "--json"]).output)
    assert details["config"]["family"] == "sd3"
    assert details["config"]["base_identity"]["variant"] == "Stable Diffusion 3 / 3.5 Medium"
    # the original names: the query of the published SD3 Medium checkpoint, in rows 0..dim of its fused qkv
    out = tmp_path / "k.safetensors"
    assert CliRunner().invoke(cli, ["export", "medium", str(out), "--format", "comfyui"]).exit_code == 0
    loramgr.install(out, name="medium-comfyui")
    back = loramgr.get("medium-comfyui")
    assert back.info.module("joint_blocks.0.x_block.attn.qkv").out_features == 3 * dim
    assert back.info.config["family"] == "sd3"


@pytest.fixture(scope="module")
def mmdit_x():
    return sd3_model(dual_attention_layers=(0,))


@pytest.mark.parametrize("convention", ["kohya", "comfyui"])
def test_sd3_original_names(tmp_path, mmdit_x, convention):
    factors = random_factors(sd3_original_shapes(mmdit_x))
    path = tmp_path / f"sd3-{convention}.safetensors"
    (write_kohya if convention == "kohya" else write_comfyui)(path, factors)
    result = CliRunner().invoke(cli, ["install", str(path), "--name", "sd3"])
    assert result.exit_code == 0, result.output
    details = json.loads(CliRunner().invoke(cli, ["show", "sd3", "--json"]).output)
    assert details["format"] == convention
    assert details["config"]["family"] == "sd3" and details["config"]["namespace"] == "original"
    assert details["config"]["base_identity"]["family"] == "sd3"
    adapter = loramgr.get("sd3")
    reference = converted_by_diffusers(factors)
    close(deltas(adapter, "original"), dense(factors))
    close(deltas(adapter, "diffusers"), reference)
    # the diffusers export loads through diffusers' SD3 loader with the same ΔW
    from diffusers.loaders import SD3LoraLoaderMixin

    out = tmp_path / "diffusers.safetensors"
    assert CliRunner().invoke(cli, ["export", "sd3", str(out), "--format", "diffusers"]).exit_code == 0
    state_dict, metadata = SD3LoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
    loaded = sd3_model(dual_attention_layers=(0,))
    loaded.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t", metadata=metadata)
    close(peft_deltas(loaded, "t"), reference)
    # every other convention and back; the diffusers file back to the original names (qkv fused, rank 12)
    loramgr.install(out, name="sd3-diffusers")
    assert loramgr.get("sd3-diffusers").info.config["family"] == "sd3"
    for source in ("sd3", "sd3-diffusers"):
        for fmt in ("kohya", "comfyui"):
            again = tmp_path / f"out-{source}-{fmt}.safetensors"
            result = CliRunner().invoke(cli, ["export", source, str(again), "--format", fmt])
            assert result.exit_code == 0, result.output
            loramgr.install(again, name=f"{source}-{fmt}")
            back = loramgr.get(f"{source}-{fmt}")
            assert back.info.format == fmt and back.info.config["family"] == "sd3"
            close(deltas(back, "original"), dense(factors))
            close(deltas(back, "diffusers"), reference)
    fused = loramgr.get("sd3-diffusers-kohya").info.module("joint_blocks.0.x_block.attn.qkv")
    assert fused.rank == 12
    refused = CliRunner().invoke(cli, ["export", "sd3", str(tmp_path / "x.safetensors"), "--format", "xlabs"])
    assert refused.exit_code == 1 and "XLabs" in refused.output
