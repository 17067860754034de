"""kohya single files: reading, name resolution, export to kohya / PEFT and back with ΔW preserved.

The builders here (a tiny SD-like pipeline with Conv2d and Linear modules, and a kohya file writer that
names keys the way sd-scripts does) are shared with the other format and check tests.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from loramgr.adapter import LoraAdapter
from loramgr.errors import UnsupportedAdapterError
from loramgr.formats.convert import to_diffusers_file, to_kohya_file, to_peft_folder
from loramgr.formats.detect import read_adapter_file
from loramgr.formats.kohya import resolve_kohya_info, resolve_kohya_names
from loramgr.formats.peft import read_peft_folder

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([nn.Module()])
        self.resnets[0].conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.resnets[0].conv_shortcut = nn.Conv2d(8, 8, 1)
        self.attentions = nn.ModuleList([nn.Module()])
        attn = self.attentions[0]
        attn.proj_in = nn.Linear(8, 16)
        attn.transformer_blocks = nn.ModuleList([nn.Module()])
        attn.transformer_blocks[0].attn1 = nn.Module()
        attn.transformer_blocks[0].attn1.to_q = nn.Linear(16, 16)
        attn.transformer_blocks[0].attn1.to_k = nn.Linear(16, 12)


class TinyUNet(nn.Module):
    """Diffusers-like module names with "_" inside them (down_blocks, to_q, conv_in)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, width, 3, padding=1)
        self.down_blocks = nn.ModuleList([TinyBlock()])
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(width, 32)


class TinyTextEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(50, 8)
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(8, 8)
        layer.mlp = nn.Module()
        layer.mlp.fc1 = nn.Linear(8, 24)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([layer])


class TinyPipeline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unet = TinyUNet()
        self.text_encoder = TinyTextEncoder()
        self.text_encoder_2 = TinyTextEncoder()


TARGETS = {  # module path -> (rank, alpha); alpha != rank on purpose
    "unet.conv_in": (4, 2.0),
    "unet.down_blocks.0.resnets.0.conv1": (4, 8.0),
    "unet.down_blocks.0.resnets.0.conv_shortcut": (2, 1.0),
    "unet.down_blocks.0.attentions.0.proj_in": (4, 4.0),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 1.5),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": (8, 16.0),
    "unet.time_embedding.linear_1": (4, 0.0),  # 0 means alpha = rank
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (4, 3.0),
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": (2, 2.0),
}

KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_new_sd_model_hash": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.title": "tiny style",
    "modelspec.trigger_phrase": "tnystyle",
    "modelspec.sai_model_spec": "1.0.0",
}


def kohya_key(path: str) -> str:
    component, _, rest = path.partition(".")
    return KOHYA_PREFIX[component] + rest.replace(".", "_")


def lora_factors(module: nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in kohya's layout: conv down [r, in, kh, kw], up [out, r, 1, 1]."""
    if isinstance(module, nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen)
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen)
    else:
        down = torch.randn(rank, module.in_features, generator=gen)
        up = torch.randn(module.out_features, rank, generator=gen)
    return down, up


def write_kohya_file(
    path: Path,
    pipeline: nn.Module,
    targets: dict[str, tuple[int, float]] = TARGETS,
    *,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> Path:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(pipeline.named_modules())
    tensors = {}
    for module_path, (rank, alpha) in targets.items():
        down, up = lora_factors(modules[module_path], rank, gen)
        name = kohya_key(module_path)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(tensors, str(path), metadata=dict(KOHYA_METADATA if metadata is None else metadata))
    return path


def kohya_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of one module computed the way kohya's networks/lora.py merges: independent of loramgr."""
    down = tensors[f"{name}.lora_down.weight"].double()
    up = tensors[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
    alpha = alpha or rank
    return (alpha / rank) * (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1))


def peft_delta(folder: Path, module: str) -> torch.Tensor:
    """ΔW from a PEFT folder using only its config and PEFT's own rank/alpha pattern rules."""
    import re

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()

    def pattern(patterns: dict, default: float) -> float:
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    rank = pattern(config["rank_pattern"], config["r"])
    alpha = pattern(config["alpha_pattern"], config["lora_alpha"])
    assert a.shape[0] == rank
    return (alpha / rank) * (b.reshape(b.shape[0], -1) @ a.reshape(rank, -1))


@pytest.fixture(scope="module")
def pipeline() -> TinyPipeline:
    return TinyPipeline()


@pytest.fixture()
def kohya_file(tmp_path: Path, pipeline: TinyPipeline) -> Path:
    return write_kohya_file(tmp_path / "style.safetensors", pipeline)


def module_paths(pipeline: nn.Module) -> list[str]:
    return [name for name, _ in pipeline.named_modules() if name]


def test_reading_gets_metadata_ranks_alphas_and_conv_shapes(kohya_file: Path) -> None:
    info = read_adapter_file(kohya_file)
    assert (info.format, info.adapter_type) == ("kohya", "lora")
    assert info.file_metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert info.config["kohya"]["trigger_phrase"] == "tnystyle"
    assert info.config["kohya"]["base_model_hash"].startswith("31e35c80")
    assert info.card["title"] == "tiny style"
    assert info.base_model == "sd_xl_base_1.0.safetensors"
    assert (info.rank, info.alpha) == (4, 2.0)
    conv = info.module("lora_unet_down_blocks_0_resnets_0_conv1")
    assert (conv.kind, conv.kernel, conv.in_features, conv.out_features) == ("conv", (4, 8, 3, 3), 72, 8)
    assert conv.alpha == 8.0 and conv.scale == 2.0
    assert info.module("lora_unet_time_embedding_linear_1").alpha == 4.0  # stored 0 -> alpha = rank
    assert info.module("lora_te2_text_model_encoder_layers_0_mlp_fc1").rank == 2
    assert info.config["module_names"] == "kohya" and any("kohya names" in n for n in info.notes)


def test_missing_alpha_means_alpha_equals_rank(tmp_path: Path, pipeline: TinyPipeline) -> None:
    path = write_kohya_file(tmp_path / "a.safetensors", pipeline, {"unet.conv_in": (4, 1.0)})
    tensors = load_file(str(path))
    del tensors["lora_unet_conv_in.alpha"]
    save_file(tensors, str(path))
    assert read_adapter_file(path).module("lora_unet_conv_in").alpha == 4.0


def test_resolver_maps_names_with_underscores_and_reports_unresolved(pipeline: TinyPipeline) -> None:
    names = [kohya_key(p) for p in TARGETS] + ["lora_unet_no_such_module"]
    mapping = resolve_kohya_names(names, module_paths(pipeline))
    for path in TARGETS:
        assert mapping[kohya_key(path)] == path
    assert mapping["lora_unet_no_such_module"] is None
    # a bare UNet's module list works too (no component prefix)
    bare = resolve_kohya_names(["lora_unet_down_blocks_0_resnets_0_conv1"], module_paths(pipeline.unet))
    assert bare == {"lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1"}


def test_kohya_roundtrip_is_tensor_identical(tmp_path: Path, kohya_file: Path) -> None:
    adapter = LoraAdapter(read_adapter_file(kohya_file), tmp_path)
    out = to_kohya_file(adapter, tmp_path / "out.safetensors")
    original, written = load_file(str(kohya_file)), load_file(str(out))
    assert original.keys() == written.keys()
    for key in original:
        assert original[key].dtype == written[key].dtype and torch.equal(original[key], written[key]), key
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_alpha"] == "2.0" and meta["modelspec.title"] == "tiny style"


def test_kohya_hashes_follow_sd_scripts_definitions(tmp_path: Path, kohya_file: Path) -> None:
    out = to_kohya_file(LoraAdapter(read_adapter_file(kohya_file), tmp_path), tmp_path / "out.safetensors")
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(out))
    # recompute independently: the file as saved with only its ss_* metadata
    from safetensors.torch import save

    raw = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    # the data section of the written file is the same bytes, whatever metadata it carries
    data = out.read_bytes()
    m = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + m :]).hexdigest() == meta["sshs_model_hash"]
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_kohya_to_peft_needs_a_base_model(tmp_path: Path, kohya_file: Path) -> None:
    adapter = LoraAdapter(read_adapter_file(kohya_file), tmp_path)
    with pytest.raises(UnsupportedAdapterError, match="base model"):
        to_peft_folder(adapter, tmp_path / "peft")


def test_kohya_to_peft_to_kohya_preserves_delta_for_every_module(tmp_path: Path, pipeline: TinyPipeline) -> None:
    unet_only = {k: v for k, v in TARGETS.items() if k.startswith("unet.")}
    src = write_kohya_file(tmp_path / "unet.safetensors", pipeline, unet_only)
    original = load_file(str(src))
    adapter = LoraAdapter(read_adapter_file(src), tmp_path)
    folder = to_peft_folder(adapter, tmp_path / "peft", module_paths=module_paths(pipeline))
    for path in unet_only:
        inner = path.removeprefix("unet.")
        assert torch.allclose(peft_delta(folder, inner), kohya_delta(original, kohya_key(path)), atol=1e-6), path
    peft_info = read_peft_folder(folder)
    back = to_kohya_file(LoraAdapter(peft_info, folder), tmp_path / "back.safetensors")
    written = load_file(str(back))
    assert {k.rsplit(".", 2)[0] for k in written} == {kohya_key(p) for p in unet_only}
    alphas = {float(v) for k, v in written.items() if k.endswith(".alpha")}
    assert len(alphas) == 1  # one alpha for every module: the scale every reader applies alike
    for path in unet_only:
        name = kohya_key(path)
        expected = kohya_delta(original, name)
        if float(original[f"{name}.alpha"]) in alphas:  # untouched
            assert torch.allclose(kohya_delta(written, name), expected, atol=1e-6), path
        else:  # the scale ratio folded into lora_up: one float16 rounding of lora_up
            assert (kohya_delta(written, name) - expected).abs().max() <= 2e-3 * expected.abs().max(), path
        assert written[f"{name}.lora_down.weight"].shape == original[f"{name}.lora_down.weight"].shape


def test_peft_folder_from_kohya_loads_in_peft_with_the_same_delta(tmp_path: Path, pipeline: TinyPipeline) -> None:
    """PEFT's own loader agrees: merged UNet weights equal W + ΔW computed from the kohya file."""
    import copy

    from peft import PeftModel

    unet_only = {k: v for k, v in TARGETS.items() if k.startswith("unet.")}
    src = write_kohya_file(tmp_path / "unet.safetensors", pipeline, unet_only, dtype=torch.float32)
    original = load_file(str(src))
    folder = to_peft_folder(
        LoraAdapter(read_adapter_file(src), tmp_path), tmp_path / "peft", module_paths=module_paths(pipeline.unet)
    )
    merged = PeftModel.from_pretrained(copy.deepcopy(pipeline.unet), str(folder)).merge_and_unload()
    merged_modules, base_modules = dict(merged.named_modules()), dict(pipeline.unet.named_modules())
    for path in unet_only:
        inner = path.removeprefix("unet.")
        got = merged_modules[inner].weight.detach().double()
        want = base_modules[inner].weight.detach().double()
        delta = (got - want).reshape(got.shape[0], -1)
        assert torch.allclose(delta, kohya_delta(original, kohya_key(path)), atol=1e-5), path


def test_export_scale_is_right_when_alpha_differs_from_rank(tmp_path: Path, pipeline: TinyPipeline) -> None:
    """diffusers' converter writes alpha = rank; loramgr keeps each module's true scale."""
    src = write_kohya_file(tmp_path / "k.safetensors", pipeline, {"unet.conv_in": (4, 1.0)}, dtype=torch.float32)
    original = load_file(str(src))
    adapter = LoraAdapter(read_adapter_file(src), tmp_path)
    folder = to_peft_folder(adapter, tmp_path / "p", module_paths=module_paths(pipeline))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 1.0)
    want = kohya_delta(original, "lora_unet_conv_in")
    assert torch.allclose(peft_delta(folder, "conv_in"), want)
    for fold in (False, True):
        out = to_diffusers_file(adapter, tmp_path / f"d{fold}.safetensors", module_paths=module_paths(pipeline),
                                fold_scale=fold)
        info = read_adapter_file(out)
        spec = info.module("unet.conv_in")
        got = LoraAdapter(info, tmp_path).delta("unet.conv_in", torch.float64)
        assert torch.allclose(got, want, atol=1e-6)
        assert spec.alpha == (4.0 if fold else 1.0)


def test_strict_resolution_names_the_unresolved_module(kohya_file: Path) -> None:
    from loramgr.errors import IncompatibleError

    with pytest.raises(IncompatibleError, match="lora_te1_text_model"):
        resolve_kohya_info(read_adapter_file(kohya_file), ["unet.conv_in"])
    partial = resolve_kohya_info(read_adapter_file(kohya_file), ["unet.conv_in"], strict=False)
    assert partial.module("unet.conv_in").rank == 4
    assert partial.config["kohya_names"]["unet.conv_in"] == "lora_unet_conv_in"


def test_peft_export_of_a_multi_component_adapter_is_refused(tmp_path: Path, kohya_file: Path,
                                                             pipeline: TinyPipeline) -> None:
    adapter = LoraAdapter(read_adapter_file(kohya_file), tmp_path)
    with pytest.raises(UnsupportedAdapterError, match="spans text_encoder, text_encoder_2, unet"):
        to_peft_folder(adapter, tmp_path / "p", module_paths=module_paths(pipeline))


def test_detection_refuses_what_it_cannot_read_faithfully(tmp_path: Path) -> None:
    from loramgr.errors import InvalidAdapterError

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "peft.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match="adapter_config.json"):
        read_adapter_file(tmp_path / "peft.safetensors")
    save_file({"model.layers.0.q_proj.weight": torch.zeros(4, 4)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(InvalidAdapterError, match="base add"):
        read_adapter_file(tmp_path / "base.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\x80")
    with pytest.raises(UnsupportedAdapterError, match="pickle"):
        read_adapter_file(tmp_path / "x.ckpt")
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(InvalidAdapterError, match="lora_unet_a"):
        read_adapter_file(tmp_path / "half.safetensors")


def test_converted_kohya_file_is_scaled_alike_by_diffusers_and_sd_scripts(tmp_path: Path) -> None:
    """diffusers 0.42 applies a module whose alpha is not the most common one with the wrong scale (its
    alpha_pattern keys never match); a converted kohya file therefore declares one alpha and folds the rest."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    def unet() -> UNet2DConditionModel:
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, norm_num_groups=4, attention_head_dim=2,
        ).eval()

    modules = dict(unet().named_modules())
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    alphas = {attn + "to_q": 4.0, attn + "to_k": 4.0, attn + "to_v": 32.0, attn + "to_out.0": 4.0}
    gen = torch.Generator().manual_seed(0)
    tensors, expected = {}, {}
    for path, alpha in alphas.items():
        a = torch.randn(4, modules[path].in_features, generator=gen)
        b = torch.randn(modules[path].out_features, 4, generator=gen)
        tensors |= {f"unet.{path}.lora_A.weight": a, f"unet.{path}.lora_B.weight": b,
                    f"unet.{path}.alpha": torch.tensor(alpha)}
        expected[path] = alpha / 4 * (b.double() @ a.double())
    save_file(tensors, str(tmp_path / "src.safetensors"))
    adapter = LoraAdapter(read_adapter_file(tmp_path / "src.safetensors"), tmp_path)
    out = to_kohya_file(adapter, tmp_path / "kohya.safetensors")
    written = load_file(str(out))
    for path in alphas:  # sd-scripts: each module's own alpha
        assert torch.allclose(kohya_delta(written, kohya_key("unet." + path)), expected[path], atol=1e-5), path
    state_dict, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out))
    loaded = unet()
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, network_alphas, loaded, adapter_name="t")
    got = {n: m.get_delta_weight("t").double() for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(got) == sorted(expected)
    for path in alphas:
        assert torch.allclose(got[path], expected[path], atol=1e-5), path


def test_clip_text_encoder_without_text_model_level(tmp_path: Path, pipeline: TinyPipeline) -> None:
    """transformers 5's CLIPTextModel has no ``text_model`` level: sd-scripts names still resolve against it,
    and the diffusers export of the text-encoder part loads in diffusers with the same ΔW."""
    from click.testing import CliRunner
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer
    from transformers import CLIPTextConfig, CLIPTextModel

    import loramgr.api
    from loramgr.cli.main import cli
    from loramgr.compat.basemodel import fingerprint_from_state_dict

    def clip() -> CLIPTextModel:
        torch.manual_seed(0)
        return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1))

    assert not hasattr(clip(), "text_model")
    base = nn.Module()
    base.unet, base.text_encoder = TinyUNet(), clip()
    loramgr.api.registry().add_base(fingerprint_from_state_dict(base, name="sd-tf5"))
    targets = {k: v for k, v in TARGETS.items() if k.startswith("unet.") or k.startswith("text_encoder.")}
    src = write_kohya_file(tmp_path / "sd.safetensors", pipeline, targets, dtype=torch.float32)
    installed = CliRunner().invoke(cli, ["install", str(src), "--name", "sd", "--base", "sd-tf5"])
    assert installed.exit_code == 0, installed.output
    original = load_file(str(src))
    names = loramgr.get("sd").module_names
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in names
    # the same file resolved against a transformers 4 layout keeps text_model. in its names
    loramgr.api.registry().add_base(fingerprint_from_state_dict(pipeline, name="sd-tf4"))
    assert CliRunner().invoke(cli, ["install", str(src), "--name", "sd4", "--base", "sd-tf4"]).exit_code == 0
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in loramgr.get("sd4").module_names
    expected = kohya_delta(original, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    for ref in ("sd", "sd4"):
        out = tmp_path / f"{ref}-diffusers.safetensors"
        loramgr.export(ref, out, format="diffusers")
        state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(out), return_alphas=True, return_lora_metadata=True)
        encoder = clip()
        StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
            state_dict, alphas, encoder, prefix="text_encoder", adapter_name="t", metadata=metadata)
        got = {n: m.get_delta_weight("t").double() for n, m in encoder.named_modules() if isinstance(m, LoraLayer)}
        assert list(got) == ["encoder.layers.0.self_attn.q_proj"], ref
        assert torch.allclose(got["encoder.layers.0.self_attn.q_proj"], expected, atol=1e-5), ref
    back = tmp_path / "back.safetensors"
    loramgr.export("sd", back, format="kohya")
    assert set(load_file(str(back))) == set(original)


def test_check_resolves_clip_names_in_either_transformers_layout(tmp_path: Path, pipeline: TinyPipeline) -> None:
    """``loramgr check`` of a raw sd-scripts file (``lora_te1_text_model_...``) against a base saved by
    transformers 5 (no ``text_model`` level) resolves every name, and still checks the shapes it resolves to."""
    from click.testing import CliRunner
    from transformers import CLIPTextConfig, CLIPTextModel

    import loramgr.api
    from loramgr.cli.main import cli
    from loramgr.compat.basemodel import fingerprint_from_state_dict

    def base(hidden: int) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Module()
        model.unet = TinyUNet()
        model.text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=hidden, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        return model

    loramgr.api.registry().add_base(fingerprint_from_state_dict(base(8), name="sd-tf5"))
    loramgr.api.registry().add_base(fingerprint_from_state_dict(base(16), name="sd-tf5-wide"))
    loramgr.api.registry().add_base(fingerprint_from_state_dict(pipeline, name="sd-tf4"))
    targets = {k: v for k, v in TARGETS.items() if k.startswith(("unet.", "text_encoder."))}
    src = write_kohya_file(tmp_path / "sd.safetensors", pipeline, targets, dtype=torch.float32)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in load_file(str(src)))
    runner = CliRunner()
    for name in ("sd-tf5", "sd-tf4"):
        result = runner.invoke(cli, ["check", str(src), "--base", name])
        assert result.exit_code == 0, (name, result.output)
        assert "missing-module" not in result.output and "no such module" not in result.output
    # the CLIP name resolves in the transformers 5 layout, so a base of another width is a shape error there
    wide = runner.invoke(cli, ["check", str(src), "--base", "sd-tf5-wide"])
    assert wide.exit_code == 1
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in wide.output and "16" in wide.output
    assert "no such module" not in wide.output
