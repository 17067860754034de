"""Base-model fingerprints: structural (headers only), dtype variant, content digests, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_kohya import TinyPipeline

from loramgr.compat.basemodel import (
    BaseFingerprint,
    add_content_digests,
    fingerprint_base_model,
    fingerprint_from_state_dict,
    module_shapes,
)


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=gen),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=gen),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=gen),
    }


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "hidden_size": 16, "_name_or_path": "org/tiny"}))
    return folder


def test_structural_ignores_order_metadata_values_and_sharding(tmp_path: Path) -> None:
    state = tensors()
    save_file(state, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    reordered = dict(reversed(list(tensors(seed=1).items())))  # other values, other order
    save_file(reordered, str(tmp_path / "b.safetensors"), metadata={"format": "pt", "note": "other metadata"})
    a, b = fingerprint_base_model(tmp_path / "a.safetensors"), fingerprint_base_model(tmp_path / "b.safetensors")
    assert a.structural == b.structural and a.structural_dtypes == b.structural_dtypes
    sharded = fingerprint_base_model(write_sharded(tmp_path / "sharded", state, shards=3))
    assert sharded.structural == a.structural
    assert len(sharded.files) == 3 and sharded.architecture == "LlamaForCausalLM" and sharded.name == "org/tiny"
    assert sharded.sizes == {"hidden_size": 16}


def test_structural_changes_with_a_shape_and_dtype_variant_with_a_dtype(tmp_path: Path) -> None:
    state = tensors()
    save_file(state, str(tmp_path / "a.safetensors"))
    changed = dict(state, **{"model.layers.0.mlp.up_proj.weight": torch.randn(48, 16)})
    save_file(changed, str(tmp_path / "b.safetensors"))
    half = {k: v.half() for k, v in state.items()}
    save_file(half, str(tmp_path / "c.safetensors"))
    a, b, c = (fingerprint_base_model(tmp_path / f"{x}.safetensors") for x in "abc")
    assert a.structural != b.structural
    assert a.structural == c.structural and a.structural_dtypes != c.structural_dtypes


def test_content_digests_are_a_separate_step_and_see_values(tmp_path: Path) -> None:
    save_file(tensors(0), str(tmp_path / "a.safetensors"))
    (tmp_path / "b").mkdir()
    save_file(tensors(1), str(tmp_path / "b" / "a.safetensors"))
    a = fingerprint_base_model(tmp_path / "a.safetensors")
    b = fingerprint_base_model(tmp_path / "b" / "a.safetensors", content=True)
    assert a.content_digests is None and a.content is None
    add_content_digests(a)
    assert a.content and b.content and a.content != b.content and a.structural == b.structural


def test_fingerprint_of_a_live_model_equals_its_saved_file(tmp_path: Path) -> None:
    unet = TinyPipeline().unet
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    assert fingerprint_from_state_dict(unet).structural_dtypes == fingerprint_base_model(
        tmp_path / "unet.safetensors"
    ).structural_dtypes


def test_module_shapes_and_json_roundtrip(tmp_path: Path) -> None:
    fp = fingerprint_base_model(write_sharded(tmp_path / "m", tensors()))
    shapes = module_shapes(fp)
    assert shapes["model.layers.0.mlp.up_proj"].in_features == 16
    assert shapes["model.layers.0.mlp.up_proj"].out_features == 32
    assert shapes["conv"].kind == "conv" and shapes["conv"].in_features == 36
    assert shapes["model.embed_tokens"].kind == "embedding"
    assert "model.layers.0.input_layernorm" not in shapes
    again = BaseFingerprint.from_dict(json.loads(json.dumps(fp.to_dict())))
    assert again == fp


def test_diffusers_pipeline_folder_prefixes_components(tmp_path: Path) -> None:
    pipe = TinyPipeline()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for component in ("unet", "text_encoder"):
        (tmp_path / component).mkdir()
        state = {k: v.contiguous() for k, v in getattr(pipe, component).state_dict().items()}
        name = "diffusion_pytorch_model" if component == "unet" else "model"
        save_file(state, str(tmp_path / component / f"{name}.safetensors"))
        save_file({k: v.half() for k, v in state.items()}, str(tmp_path / component / f"{name}.fp16.safetensors"))
    fp = fingerprint_base_model(tmp_path)
    assert fp.architecture == "StableDiffusionXLPipeline"
    assert "unet.down_blocks.0.resnets.0.conv1" in module_shapes(fp)
    assert len(fp.files) == 2  # the fp16 variants are not counted twice
