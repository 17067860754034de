"""Flux.2 LoRA files (ComfyUI / ai-toolkit original names, kohya, diffusers): ΔW, export and back, and
diffusers' own Flux.2 loaders agree; Flux.1 and Flux.2 share block names and are told apart by the rest."""

from __future__ import annotations

import pytest
import torch
from diffusion_files import close, dense, peft_deltas, random_factors, write_kohya
from safetensors.torch import save_file

import loramgr
from loramgr.formats.diffusion.write import deltas

pytestmark = pytest.mark.slow

CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2))
#: original Flux.2 module -> diffusers module(s), the test's own table
TABLE = {
    "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
    "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.linear_in"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.linear_out"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.linear_in"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.attn.to_out"],
    "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
    "img_in": ["x_embedder"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}


def model():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**CONFIG).eval()


def factors_for(names):
    mods = dict(model().named_modules())
    return random_factors({n: (sum(mods[t].out_features for t in TABLE[n]), mods[TABLE[n][0]].in_features)
                           for n in names})


def expected(factors):
    result = {}
    for name, delta in dense(factors).items():
        targets = TABLE[name]
        if name == "final_layer.adaLN_modulation.1":  # (shift, scale) -> diffusers' (scale, shift)
            half = delta.shape[0] // 2
            result[targets[0]] = torch.cat([delta[half:], delta[:half]])
            continue
        size = delta.shape[0] // len(targets)
        for n, t in enumerate(targets):
            result[t] = delta[n * size:(n + 1) * size]
    return result


def diffusers_load(path):
    from diffusers.loaders import Flux2LoraLoaderMixin

    state_dict, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    loaded = model()
    loaded.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t", metadata=metadata)
    return peft_deltas(loaded, "t")


def test_flux2_conventions(tmp_path):
    factors = factors_for(TABLE)
    path = tmp_path / "flux2.safetensors"
    write_kohya(path, factors)
    loramgr.install(path, name="f2")
    adapter = loramgr.get("f2")
    assert adapter.info.config["family"] == "flux2"
    close(deltas(adapter, "original"), dense(factors))
    close(deltas(adapter, "diffusers"), expected(factors))
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"out-{fmt}.safetensors"
        loramgr.export("f2", out, format=fmt)
        loramgr.install(out, name=f"f2-{fmt}")
        close(deltas(loramgr.get(f"f2-{fmt}"), "original"), dense(factors))
        close(deltas(loramgr.get(f"f2-{fmt}"), "diffusers"), expected(factors))
        if fmt == "diffusers":
            close(diffusers_load(out), expected(factors))
    # diffusers' ai-toolkit Flux.2 path reads no alpha, and 0.42 maps final_layer.adaLN_modulation.1 without the
    # (shift, scale) swap its own weight conversion makes; compare the rest on a file without alpha
    unit = {k: (a, b, float(a.shape[0])) for k, (a, b, _) in factors.items() if "adaLN" not in k}
    plain = tmp_path / "plain.safetensors"
    save_file({f"diffusion_model.{k}.lora_{x}.weight": t for k, (a, b, _) in unit.items()
               for x, t in (("A", a), ("B", b))}, str(plain))
    loramgr.install(plain, name="f2-plain")
    close(deltas(loramgr.get("f2-plain"), "diffusers"), expected(unit))
    close(diffusers_load(plain), expected(unit))


def test_metadata_tells_flux2_from_flux1(tmp_path):
    blocks = factors_for(["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"])
    path = tmp_path / "blocks.safetensors"
    write_kohya(path, blocks)  # these names exist in Flux.1 and Flux.2 alike
    loramgr.install(path, name="unsure")
    assert loramgr.get("unsure").info.config["family"] is None
    write_kohya(path, blocks, metadata={"ss_base_model_version": "flux2", "ss_network_module": "networks.lora"})
    loramgr.install(path, name="sure")
    sure = loramgr.get("sure")
    assert sure.info.config["family"] == "flux2"
    close(deltas(sure, "diffusers"), expected(blocks))
