"""SD3 / SD3.5 LoRA files (diffusers' names, the only convention diffusers loads for SD3): ΔW and diffusers'
loader agree; modules shared with Flux are told apart by the published widths, or conversions are refused."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from diffusion_files import close, dense, peft_deltas, random_factors
from safetensors.torch import save_file

import loramgr
from loramgr.cli.main import cli
from loramgr.formats.diffusion.write import deltas

pytestmark = pytest.mark.slow

SD3_CONFIG = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4)
ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out")


def sd3_model():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**SD3_CONFIG).eval()


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
    refused = CliRunner().invoke(cli, ["export", "medium", str(tmp_path / "k.safetensors"), "--format", "comfyui"])
    assert refused.exit_code == 1 and "no table of the original checkpoint's module names" in refused.output
