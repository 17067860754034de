"""HunyuanVideo (fused img_attn_qkv, token refiner, swapped final modulation) and Qwen-Image LoRA files:
install, ΔW, export to each convention and back, and diffusers' own loaders agree."""

from __future__ import annotations

import pytest
import torch
from diffusion_files import close, dense, peft_deltas, random_factors, write_comfyui, write_kohya
from safetensors.torch import save_file

import loramgr
from loramgr.formats.diffusion.write import deltas

pytestmark = pytest.mark.slow

HY_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                 pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4))


def hunyuan_model():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**HY_CONFIG).eval()


def qwen_model():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**QWEN_CONFIG).eval()


#: original HunyuanVideo module -> (diffusers module(s), row layout), the test's own table
_HY = {
    "double_blocks.0.img_attn_qkv": (["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                      "transformer_blocks.0.attn.to_v"], "thirds"),
    "double_blocks.0.txt_attn_qkv": (["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                      "transformer_blocks.0.attn.add_v_proj"], "thirds"),
    "double_blocks.0.img_attn_proj": (["transformer_blocks.0.attn.to_out.0"], ""),
    "double_blocks.0.txt_attn_proj": (["transformer_blocks.0.attn.to_add_out"], ""),
    "double_blocks.0.img_mlp.fc1": (["transformer_blocks.0.ff.net.0.proj"], ""),
    "double_blocks.0.img_mlp.fc2": (["transformer_blocks.0.ff.net.2"], ""),
    "double_blocks.0.txt_mod.linear": (["transformer_blocks.0.norm1_context.linear"], ""),
    "single_blocks.0.linear1": ([f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
                                + ["single_transformer_blocks.0.proj_mlp"], "mlp"),
    "single_blocks.0.linear2": (["single_transformer_blocks.0.proj_out"], ""),
    "single_blocks.0.modulation.linear": (["single_transformer_blocks.0.norm.linear"], ""),
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": (
        [f"context_embedder.token_refiner.refiner_blocks.0.attn.to_{x}" for x in "qkv"], "thirds"),
    "txt_in.individual_token_refiner.blocks.0.mlp.fc1": (
        ["context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj"], ""),
    "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1": (
        ["context_embedder.token_refiner.refiner_blocks.0.norm_out.linear"], ""),
    "final_layer.adaLN_modulation.1": (["norm_out.linear"], "swap"),
    "final_layer.linear": (["proj_out"], ""),
}


def hunyuan_factors(model, *, with_linear1: bool = True):
    mods = dict(model.named_modules())
    shapes = {}
    for orig, (targets, _layout) in _HY.items():
        if orig.endswith("linear1") and not with_linear1:
            continue
        outs = [mods[t].out_features for t in targets]
        shapes[orig] = (sum(outs), mods[targets[0]].in_features)
    return random_factors(shapes)


def hunyuan_expected(model, factors):
    mods = dict(model.named_modules())
    result = {}
    for orig, delta in dense(factors).items():
        targets, layout = _HY[orig]
        if layout == "swap":
            half = delta.shape[0] // 2
            result[targets[0]] = torch.cat([delta[half:], delta[:half]])
            continue
        row = 0
        for t in targets:
            n = mods[t].out_features
            result[t] = delta[row:row + n]
            row += n
    return result


def test_hunyuan_video(tmp_path):
    model = hunyuan_model()
    factors = hunyuan_factors(model)
    expected = hunyuan_expected(model, factors)
    for convention in ("comfyui", "musubi"):
        path = tmp_path / f"hy-{convention}.safetensors"
        # musubi-tuner's HunyuanVideo files name modules like sd-scripts; the metadata tells them from Flux
        if convention == "musubi":
            write_kohya(path, factors, metadata={"ss_base_model_version": "hunyuan_video"})
        else:
            write_comfyui(path, factors)
        loramgr.install(path, name=f"hy-{convention}")
        adapter = loramgr.get(f"hy-{convention}")
        assert adapter.info.config["family"] == "hunyuan-video"
        close(deltas(adapter, "original"), dense(factors))
        close(deltas(adapter, "diffusers"), expected)
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"out-{fmt}.safetensors"
        loramgr.export("hy-comfyui", out, format=fmt)
        loramgr.install(out, name=f"hy-out-{fmt}")
        back = loramgr.get(f"hy-out-{fmt}")
        close(deltas(back, "diffusers"), expected)
        close(deltas(back, "original"), dense(factors))
    # diffusers' loader: original names without alpha (its conversion reads none); 0.42 hard-codes the
    # linear1 split at width 3072, and chunks lora_A by rows as if it were a weight for the token refiner's
    # self_attn_qkv and the final modulation's (shift, scale) swap: those three are compared above only
    from diffusers.loaders import HunyuanVideoLoraLoaderMixin

    subset = {k: v for k, v in hunyuan_factors(model, with_linear1=False).items()
              if "self_attn_qkv" not in k and k != "final_layer.adaLN_modulation.1"}
    unit = {k: (a, b, float(a.shape[0])) for k, (a, b, _) in subset.items()}
    plain = tmp_path / "plain.safetensors"
    save_file({f"diffusion_model.{k}.lora_{x}.weight": t for k, (a, b, _) in unit.items()
               for x, t in (("A", a), ("B", b))}, str(plain))
    loramgr.install(plain, name="hy-plain")
    state_dict = HunyuanVideoLoraLoaderMixin.lora_state_dict(str(plain))
    loaded = hunyuan_model()
    loaded.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t")
    close(peft_deltas(loaded, "t"), deltas(loramgr.get("hy-plain"), "diffusers"))
    close(peft_deltas(loaded, "t"), hunyuan_expected(model, unit))


def qwen_shapes(model) -> dict[str, tuple[int, int]]:
    leaves = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out",
              "img_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1")
    return {f"transformer_blocks.{i}.{leaf}": (m.out_features, m.in_features)
            for i in range(model.config.num_layers) for leaf in leaves
            for m in [dict(model.named_modules())[f"transformer_blocks.{i}.{leaf}"]]}


@pytest.mark.parametrize("convention", ["kohya", "comfyui", "default"])
def test_qwen_image(tmp_path, convention):
    from diffusers.loaders import QwenImageLoraLoaderMixin

    model = qwen_model()
    factors = random_factors(qwen_shapes(model))
    path = tmp_path / "qwen.safetensors"
    if convention == "kohya":
        write_kohya(path, factors)
    elif convention == "comfyui":
        write_comfyui(path, factors)
    else:  # a PEFT state dict saved with its adapter name, alpha = rank
        factors = {k: (a, b, float(a.shape[0])) for k, (a, b, _) in factors.items()}
        save_file({f"{k}.lora_{x}.default.weight": t for k, (a, b, _) in factors.items()
                   for x, t in (("A", a), ("B", b))}, str(path))
    loramgr.install(path, name="qwen")
    adapter = loramgr.get("qwen")
    assert adapter.info.config["family"] == "qwen-image"
    assert adapter.info.config["base_identity"]["family"] == "qwen-image"
    expected = dense(factors)
    close(deltas(adapter, "diffusers"), expected)
    state_dict = QwenImageLoraLoaderMixin.lora_state_dict(str(path))
    loaded = qwen_model()
    loaded.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t")
    close(peft_deltas(loaded, "t"), expected)
    for fmt in ("comfyui", "kohya", "diffusers"):
        out = tmp_path / f"out-{fmt}.safetensors"
        loramgr.export("qwen", out, format=fmt)
        state_dict = QwenImageLoraLoaderMixin.lora_state_dict(str(out))
        again = qwen_model()
        again.load_lora_adapter(state_dict, prefix="transformer", adapter_name="t",
                                metadata=QwenImageLoraLoaderMixin.lora_state_dict(
                                    str(out), return_lora_metadata=True)[1])
        close(peft_deltas(again, "t"), expected)
