"""Tiny diffusion-transformer LoRA files in each key convention, with module names and shapes taken from
tiny diffusers models built from configs (shared by the tests/test_diffusion_*.py files)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_CONFIG).eval()


def wan_model(**overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**WAN_CONFIG, **overrides}).eval()


def flux_original_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of the original Flux checkpoint's linear layers, from the diffusers model's own layers."""
    mods = dict(model.named_modules())
    d = model.config.num_attention_heads * model.config.attention_head_dim
    mlp = mods["transformer_blocks.0.ff.net.0.proj"].out_features
    shapes = {}
    for i in range(model.config.num_layers):
        b = f"double_blocks.{i}."
        shapes |= {b + "img_attn.qkv": (3 * d, d), b + "txt_attn.qkv": (3 * d, d), b + "img_attn.proj": (d, d),
                   b + "txt_attn.proj": (d, d), b + "img_mlp.0": (mlp, d), b + "img_mlp.2": (d, mlp),
                   b + "txt_mlp.0": (mlp, d), b + "txt_mlp.2": (d, mlp), b + "img_mod.lin": (6 * d, d),
                   b + "txt_mod.lin": (6 * d, d)}
    for i in range(model.config.num_single_layers):
        b = f"single_blocks.{i}."
        shapes |= {b + "linear1": (3 * d + mlp, d), b + "linear2": (d, d + mlp), b + "modulation.lin": (3 * d, d)}
    out = mods["proj_out"].out_features
    shapes |= {"final_layer.linear": (out, d), "final_layer.adaLN_modulation.1": (2 * d, d),
               "img_in": (d, mods["x_embedder"].in_features), "txt_in": (d, model.config.joint_attention_dim)}
    return shapes


def flux_to_diffusers_rows(name: str, d: int) -> list[tuple[str, slice]]:
    """The diffusers module(s) each original Flux module's rows belong to (the test's own table)."""
    if name.endswith("img_attn.qkv") or name.endswith("txt_attn.qkv"):
        i = name.split(".")[1]
        parts = ["to_q", "to_k", "to_v"] if "img" in name else ["add_q_proj", "add_k_proj", "add_v_proj"]
        return [(f"transformer_blocks.{i}.attn.{p}", slice(n * d, (n + 1) * d)) for n, p in enumerate(parts)]
    if name.endswith("linear1"):
        i = name.split(".")[1]
        s = f"single_transformer_blocks.{i}."
        return [(s + "attn.to_q", slice(0, d)), (s + "attn.to_k", slice(d, 2 * d)),
                (s + "attn.to_v", slice(2 * d, 3 * d)), (s + "proj_mlp", slice(3 * d, None))]
    simple = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
              "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
              "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}
    parts = name.split(".")
    if parts[0] == "double_blocks":
        return [(f"transformer_blocks.{parts[1]}.{simple['.'.join(parts[2:])]}", slice(None))]
    if parts[0] == "single_blocks":
        leaf = {"linear2": "proj_out", "modulation.lin": "norm.linear"}[".".join(parts[2:])]
        return [(f"single_transformer_blocks.{parts[1]}.{leaf}", slice(None))]
    top = {"final_layer.linear": "proj_out", "img_in": "x_embedder", "txt_in": "context_embedder"}
    return [(top[name], slice(None))]


def random_factors(shapes: dict[str, tuple[int, int]], seed: int = 1) -> dict:
    """name -> (A, B, alpha): rank 4, alphas that differ between modules."""
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for n, (name, (out, inp)) in enumerate(sorted(shapes.items())):
        rank = 4
        result[name] = (torch.randn(rank, inp, generator=gen) * 0.1, torch.randn(out, rank, generator=gen) * 0.1,
                        float([4, 8, 2][n % 3]))
    return result


def write_kohya(path, factors, *, metadata=None) -> None:
    tensors = {}
    for name, (a, b, alpha) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {key + ".lora_down.weight": a, key + ".lora_up.weight": b, key + ".alpha": torch.tensor(alpha)}
    save_file(tensors, str(path), metadata=metadata or {"ss_network_module": "networks.lora"})


def write_comfyui(path, factors, *, down_up: bool = False) -> None:
    tensors = {}
    suffix = (".lora_down.weight", ".lora_up.weight") if down_up else (".lora_A.weight", ".lora_B.weight")
    for name, (a, b, alpha) in factors.items():
        key = "diffusion_model." + name
        tensors |= {key + suffix[0]: a, key + suffix[1]: b, key + ".alpha": torch.tensor(alpha)}
    save_file(tensors, str(path))


def dense(factors) -> dict[str, torch.Tensor]:
    """ΔW = alpha / rank · B · A per module, in float64: the independent computation."""
    return {name: (alpha / a.shape[0]) * (b.double() @ a.double()) for name, (a, b, alpha) in factors.items()}


def peft_deltas(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer diffusers/PEFT injected into ``model``, by module path."""
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight(adapter_name).double() for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def close(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(x) == sorted(y)
    for name in x:
        assert torch.allclose(x[name], y[name].to(x[name].dtype), atol=atol), name
