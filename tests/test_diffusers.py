"""diffusers-saved files: PEFT-style keys under unet./text_encoder. and lora_adapter_metadata."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_kohya import TinyPipeline, TinyUNet, kohya_delta

from loramgr.adapter import LoraAdapter
from loramgr.errors import UnsupportedAdapterError
from loramgr.formats.convert import to_diffusers_file, to_kohya_file
from loramgr.formats.detect import read_adapter_file


def save_like_diffusers(tmp_path: Path, *, use_dora: bool = False) -> tuple[Path, dict[str, torch.Tensor], object]:
    """What diffusers' save_lora_weights writes: PEFT state dict under "unet.", config packed per component."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=["conv_in", "conv1", "proj_in", "to_q", "to_k"],
        rank_pattern={"to_k": 8},
        alpha_pattern={"proj_in": 12},
        use_dora=use_dora,
        init_lora_weights=False,  # random B: non-zero ΔW
    )
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(TinyUNet()), config)
    # diffusers models carry the adapter themselves: no PeftModel "base_model.model." in the keys
    state = {
        f"unet.{k.removeprefix('base_model.model.')}": v.detach().contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }
    packed = {f"unet.{k}": v for k, v in json.loads(json.dumps(config.to_dict(), default=list)).items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed)})
    return path, state, model


def test_reads_diffusers_file_with_metadata_and_true_scales(tmp_path: Path) -> None:
    path, _, model = save_like_diffusers(tmp_path)
    info = read_adapter_file(path)
    assert (info.format, info.adapter_type) == ("diffusers", "lora")
    assert info.module("unet.down_blocks.0.attentions.0.proj_in").alpha == 12
    assert info.module("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k").rank == 8
    conv = info.module("unet.down_blocks.0.resnets.0.conv1")
    assert (conv.kind, conv.kernel) == ("conv", (4, 8, 3, 3))
    # ΔW from loramgr's description equals PEFT's own delta_weight
    adapter = LoraAdapter(info, tmp_path)
    peft_modules = dict(model.base_model.model.named_modules())
    for spec in info.modules:
        layer = peft_modules[spec.name.removeprefix("unet.")]
        want = layer.get_delta_weight("default").detach().double().reshape(spec.out_features, -1)
        assert torch.allclose(adapter.delta(spec.name, torch.float64), want, atol=1e-6), spec.name


def test_old_lora_down_up_keys_without_metadata_mean_alpha_equals_rank(tmp_path: Path) -> None:
    tensors = {
        "unet.conv_in.lora.down.weight": torch.randn(2, 4, 3, 3),
        "unet.conv_in.lora.up.weight": torch.randn(8, 2, 1, 1),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": torch.randn(2, 8),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": torch.randn(8, 2),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"))
    info = read_adapter_file(tmp_path / "old.safetensors")
    assert info.format == "diffusers" and {m.alpha for m in info.modules} == {2.0}
    assert any("alpha taken equal to rank" in n for n in info.notes)


def test_dora_is_recognised_and_refused_for_conversion(tmp_path: Path) -> None:
    path, state, _ = save_like_diffusers(tmp_path, use_dora=True)
    assert any("lora_magnitude_vector" in k for k in state)
    info = read_adapter_file(path)
    assert info.adapter_type == "dora" and info.use_dora
    assert any(m.extra_keys for m in info.modules)  # the magnitudes are kept, not dropped
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        to_kohya_file(LoraAdapter(info, tmp_path), tmp_path / "k.safetensors")


def test_diffusers_to_kohya_keeps_delta_and_back(tmp_path: Path) -> None:
    path, _, _ = save_like_diffusers(tmp_path)
    info = read_adapter_file(path)
    adapter = LoraAdapter(info, tmp_path)
    kohya = to_kohya_file(adapter, tmp_path / "k.safetensors")
    written = load_file(str(kohya))
    for spec in info.modules:
        name = "lora_unet_" + spec.name.removeprefix("unet.").replace(".", "_")
        assert torch.allclose(kohya_delta(written, name), adapter.delta(spec.name, torch.float64), atol=1e-6)
    again = to_diffusers_file(LoraAdapter(read_adapter_file(kohya), tmp_path), tmp_path / "d.safetensors",
                              module_paths=[f"unet.{n}" for n, _ in TinyPipeline().unet.named_modules() if n])
    back = read_adapter_file(again)
    for spec in info.modules:
        assert torch.allclose(LoraAdapter(back, tmp_path).delta(spec.name, torch.float64),
                              adapter.delta(spec.name, torch.float64), atol=1e-6)


def test_unet_lora_saved_by_diffusers_save_lora_adapter_installs_and_fuses_as_diffusers_loads_it(
    tmp_path: Path,
) -> None:
    """diffusers' own ``save_lora_adapter`` writes the UNet's module paths without a component prefix and the
    config in ``lora_adapter_metadata``: loramgr reads it (ranks and alpha from that config), check finds it fits
    the UNet, and fuse gives the output diffusers gets from ``load_lora_adapter(path, prefix=None)``."""
    from factories import run_cli
    from peft import LoraConfig
    from zoo import output_of, sample_inputs, tiny_unet

    from loramgr.api import get
    from loramgr.compat.check import check
    from loramgr.model.weights import fuse

    unet = tiny_unet()
    unet.save_pretrained(str(tmp_path / "base"))
    trained = tiny_unet()
    trained.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                   rank_pattern={"up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": 4}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    trained.save_lora_adapter(str(tmp_path / "saved"))
    path = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    assert not any(key.startswith("unet.") for key in load_file(str(path)))

    run_cli("install", str(path), "--name", "unet-style", "--version", "1.0.0")
    shown = json.loads(run_cli("show", "unet-style==1.0.0", "--json").output)
    assert (shown["format"], shown["rank"], shown["alpha"]) == ("diffusers", 4, 6.0)  # rank: the largest module's
    assert sorted(shown["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    ranks = {m["name"]: (m["rank"], m["alpha"]) for m in shown["modules"]}
    assert ranks["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"] == (4, 6.0)
    assert ranks["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (2, 6.0)
    assert check(["unet-style==1.0.0"], base=tmp_path / "base").ok

    inputs = sample_inputs("unet", unet)
    reference = tiny_unet()
    # with the weight name given, diffusers reads the config from the metadata (a bare file path loses it)
    reference.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None, adapter_name="style")
    expected = output_of(reference, inputs)
    assert not torch.allclose(expected, output_of(unet, inputs), atol=1e-3), "the adapter moves the output"
    fused = tiny_unet()
    fuse(fused, get("unet-style==1.0.0"))
    torch.testing.assert_close(output_of(fused, inputs), expected, rtol=1e-5, atol=1e-6)


def test_combined_unet_loras_from_diffusers_and_kohya_files_load_in_peft_onto_the_unet(tmp_path: Path) -> None:
    """A UNet LoRA read from a diffusers file (``unet.`` keys) and one from a kohya file (``lora_unet_``, installed
    for a pipeline base) combine into a PEFT folder of the UNet: ``PeftModel.from_pretrained(unet, folder)`` loads it
    and ``merge_and_unload`` changes exactly the targeted weights, each by the weighted sum of the sources' ΔW."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from factories import run_cli
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from zoo import tiny_unet

    from loramgr.formats.kohya import kohya_name

    def trained(seed: int, targets: list[str], r: int, alpha: float) -> torch.nn.Module:
        unet = tiny_unet()
        unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        return unet

    def deltas(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: m.get_delta_weight("default") for n, m in unet.named_modules() if isinstance(m, LoraLayer)}

    first = trained(1, ["to_q", "to_v", "to_out.0"], 2, 6.0)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path / "first", unet_lora_layers=get_peft_model_state_dict(first),
        unet_lora_adapter_metadata=first.peft_config["default"].to_dict())
    second = trained(2, ["to_q", "to_k", "proj_in"], 4, 2.0)
    kohya = {}
    for path, module in second.named_modules():
        if isinstance(module, LoraLayer):
            name = kohya_name("unet." + path)
            kohya[f"{name}.lora_down.weight"] = module.lora_A["default"].weight.detach().clone()
            kohya[f"{name}.lora_up.weight"] = module.lora_B["default"].weight.detach().clone()
            kohya[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(tmp_path / "second.safetensors"))
    pipeline = tmp_path / "pipeline"
    tiny_unet().save_pretrained(str(pipeline / "unet"))
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    run_cli("base", "add", str(pipeline), "--name", "tiny-sd")
    run_cli("install", str(tmp_path / "first" / "pytorch_lora_weights.safetensors"), "--name", "first",
            "--version", "1.0.0")
    run_cli("install", str(tmp_path / "second.safetensors"), "--name", "second", "--version", "1.0.0",
            "--base", "tiny-sd")
    run_cli("combine", "first", "second", "--weights", "0.5,0.25", "--output", str(tmp_path / "combined"))

    base = tiny_unet()
    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "combined")).merge_and_unload()
    expected = {path: 0.5 * delta for path, delta in deltas(first).items()}
    for path, delta in deltas(second).items():
        expected[path] = expected.get(path, 0) + 0.25 * delta
    weights = dict(loaded.named_parameters())
    changed = {n.removesuffix(".weight") for n, p in base.named_parameters() if not torch.equal(p, weights[n])}
    assert changed == set(expected)
    for path, delta in expected.items():
        got = weights[path + ".weight"] - base.get_submodule(path).weight
        torch.testing.assert_close(got, delta.reshape(got.shape), rtol=1e-5, atol=1e-6)
    # compress writes its folder the same way: the kohya-installed adapter at rank 2 (from 4) loads onto the UNet
    run_cli("compress", "second", "--rank", "2", "--output", str(tmp_path / "compressed"))
    compressed = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "compressed")).merge_and_unload()
    weights = dict(compressed.named_parameters())
    changed = {n.removesuffix(".weight") for n, p in base.named_parameters() if not torch.equal(p, weights[n])}
    assert changed == set(deltas(second))
    for path, delta in deltas(second).items():  # each the best rank-2 approximation of the source's ΔW
        matrix = delta.reshape(delta.shape[0], -1).double()
        u, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
        best = (u[:, :2] * sv[:2]) @ vh[:2]
        got = (weights[path + ".weight"] - base.get_submodule(path).weight).reshape(best.shape).double()
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)


def test_a_peft_folder_of_several_pipeline_components_is_refused_and_model_paths_stay(tmp_path: Path) -> None:
    """A diffusers file spanning the UNet and a text encoder cannot become one PEFT folder (two models): combine
    refuses it in one line and writes nothing. A PEFT adapter's own ``transformer.`` (GPT-2's top module) is a
    module path, not a pipeline component, and is kept."""
    from factories import one_line_error, peft_adapter_from_model, run_cli, tiny_gpt2

    from loramgr.formats.peft import read_peft_folder
    from loramgr.formats.peftconfig import one_model_names

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("unet.down.to_q", "text_encoder.layers.0.q_proj"):
        tensors[f"{name}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"{name}.lora_B.weight"] = torch.randn(8, 2, generator=gen)
    save_file(tensors, str(tmp_path / "both.safetensors"))
    run_cli("install", str(tmp_path / "both.safetensors"), "--name", "both", "--version", "1.0.0")
    message = one_line_error("combine", "both", "--weights", "0.5", "--output", str(tmp_path / "out"))
    assert "a PEFT folder holds one model" in message and "text_encoder, unet" in message
    assert not (tmp_path / "out").exists()

    folder = peft_adapter_from_model(tiny_gpt2(), tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    info = read_peft_folder(folder)
    names = [m.name for m in info.modules]
    assert names[0].startswith("transformer.h.") and one_model_names([info], names) == {n: n for n in names}
