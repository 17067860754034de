"""A seeded fuzzer over the inputs loramgr reads: safetensors headers, kohya / diffusers metadata and
adapter_config.json fields. Every mutated adapter either installs or is refused with one "Error: " line,
never a traceback, and a refused one leaves the store's blobs, tmp/ and the version list unchanged."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from factories import write_peft_adapter
from safetensors.torch import save_file

from loramgr.cli.main import cli

MODULES = {"layers.0.q": (8, 8, 2), "layers.0.v": (8, 4, 2)}
CASES = 300

#: values a mutated field may take: wrong types, out-of-range numbers, odd strings
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 8.5, 1e20, 1e400, -1e400, float("nan"), "", "x", "\ud800", "(", "[",
    "*", [], [1], ["(", "a"], {}, {"a": 1}, {"(": 2}, {"a": "b"}, [[[[]]]], "F32", -0.0, 2**70,
]


def nested(depth: int) -> Any:
    """Lists nested ``depth`` deep; past 100 a placeholder that :func:`join` expands (json.dumps recurses)."""
    if depth > 100:
        return f"@nest{depth}@"
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(path: Path, header: Any, data: bytes, rng: random.Random) -> None:
    text = json.dumps(header, allow_nan=True) if not isinstance(header, str) else header
    for depth in (200, 5000):
        text = text.replace(f'"@nest{depth}@"', "[" * depth + "1" + "]" * depth)
    encoded = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.05:
        encoded = encoded.replace(b'"F32"', b'"F\xff2"', 1)  # invalid UTF-8
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def mutate_header(path: Path, rng: random.Random) -> None:
    header, data = split(path)
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(10)
    name = rng.choice(names)
    if choice == 0:
        header[name]["shape"] = rng.choice(ODD_VALUES + [[0, 8], [-2, 4], ["2", 8], [2.0, 8]])
    elif choice == 1:
        header[name]["data_offsets"] = rng.choice(ODD_VALUES + [[0, -4], [-8, 0], ["0", "8"], [0.0, 64.0], [0, 10**9]])
    elif choice == 2:
        header[name]["dtype"] = rng.choice(ODD_VALUES + ["F16", "Q4", "f32"])
    elif choice == 3:
        header["__metadata__"] = rng.choice(ODD_VALUES + [{"format": 1}, {"format": ["pt"]}])
    elif choice == 4:
        header[name] = rng.choice(ODD_VALUES)
    elif choice == 5:
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = nested(rng.choice([5, 200, 5000]))
    elif choice == 6:
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 7:
        header[name]["extra"] = rng.choice(ODD_VALUES)
    elif choice == 8:
        header = rng.choice(ODD_VALUES + [nested(5000)])
    else:
        header["__metadata__"] = {**header.get("__metadata__", {}), rng.choice(["format", "\ud800"]): rng.choice(
            ["pt", "\ud800", "x"])}
    join(path, header, data, rng)


def mutate_config(folder: Path, rng: random.Random) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora",
                          "use_dora", "peft_type", "base_model_name_or_path", "layers_to_transform",
                          "fan_in_fan_out", "modules_to_save", "bias", "task_type", "exclude_modules",
                          "layers_pattern", "lora_bias", "revision"])
        config[key] = rng.choice(ODD_VALUES + [{"layers.0.q": rng.choice(ODD_VALUES)}, nested(3)])
    text = json.dumps(config, allow_nan=True)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


def write_kohya(path: Path, metadata: dict[str, str]) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key in ("lora_unet_down_blocks_0_attn_to_q", "lora_unet_down_blocks_0_attn_to_k"):
        tensors[key + ".lora_down.weight"] = torch.randn(2, 8, generator=gen)
        tensors[key + ".lora_up.weight"] = torch.randn(8, 2, generator=gen)
        tensors[key + ".alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path), metadata=metadata)


def write_diffusers(path: Path, metadata: dict[str, str]) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key in ("unet.down_blocks.0.attentions.0.to_q", "unet.down_blocks.0.attentions.0.to_k"):
        tensors[key + ".lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[key + ".lora_B.weight"] = torch.randn(8, 2, generator=gen)
    save_file(tensors, str(path), metadata=metadata)


def mutate_metadata(path: Path, kind: str, rng: random.Random) -> None:
    meta: dict[str, str] = {"format": "pt"}
    if kind == "kohya":
        meta |= {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "2"}
        key = rng.choice(["ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_base_model_version",
                          "modelspec.tags", "ss_sd_model_name", "modelspec.architecture", "ss_network_args"])
        meta[key] = rng.choice(["nan", "inf", "-1", "1e400", "", "Dynamic", "{", "[1]", "\x00", "0"])
        write_kohya(path, meta)
        header, data = split(path)
        if rng.random() < 0.5:
            alpha_key = rng.choice([k for k in header if k.endswith(".alpha")])
            value = rng.choice([float("nan"), float("inf"), -1.0, 0.0])
            start = header[alpha_key]["data_offsets"][0]
            data = data[:start] + struct.pack("<f", value) + data[start + 4 :]
        if rng.random() < 0.3:
            header["__metadata__"][key] = rng.choice(ODD_VALUES)
        join(path, header, data, rng)
    else:
        config = {"r": 2, "lora_alpha": 2, "target_modules": ["to_q", "to_k"]}
        config[rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_dora"])] = (
            rng.choice(ODD_VALUES))
        config = rng.choice([config, {"unet": config}, rng.choice(ODD_VALUES)])
        meta["lora_adapter_metadata"] = json.dumps(config, allow_nan=True)
        write_diffusers(path, meta)


def make_case(tmp_path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    root = tmp_path / f"case{seed}"
    kind = rng.choice(["header", "config", "config", "kohya", "diffusers", "kohya-header"])
    if kind in ("header", "config"):
        folder = write_peft_adapter(root, MODULES, seed=seed)
        if kind == "header":
            mutate_header(folder / "adapter_model.safetensors", rng)
        else:
            mutate_config(folder, rng)
        return folder
    root.mkdir()
    path = root / "lora.safetensors"
    if kind == "kohya-header":
        write_kohya(path, {"ss_network_module": "networks.lora"})
        mutate_header(path, rng)
    else:
        mutate_metadata(path, kind, rng)
    return path


def state(home: Path) -> tuple[list[str], list[str], str]:
    blobs = sorted(str(p.relative_to(home)) for p in (home / "blobs").rglob("*")) if (home / "blobs").exists() else []
    tmp = sorted(str(p) for p in (home / "tmp").rglob("*")) if (home / "tmp").exists() else []
    listing = CliRunner().invoke(cli, ["list"])
    assert listing.exit_code == 0, listing.output
    return blobs, tmp, listing.output


def assert_clean(result: Any, where: str) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), (where, result.exc_info)
    assert "Traceback" not in result.output, (where, result.output)
    if result.exit_code != 0:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (where, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (where, result.output)


@pytest.mark.parametrize("block", range(6))
def test_fuzz_install_and_check(loramgr_home, tmp_path, block):
    runner = CliRunner()
    outcomes = {0: 0, 1: 0}
    per_block = CASES // 6
    for seed in range(block * per_block, (block + 1) * per_block):
        target = make_case(tmp_path, seed)
        checked = runner.invoke(cli, ["check", str(target)])
        assert_clean(checked, f"check seed {seed}")
        before = state(loramgr_home)
        result = runner.invoke(cli, ["install", str(target), "--name", f"fuzz{seed}", "--version", "1.0.0"])
        assert_clean(result, f"install seed {seed}")
        outcomes[result.exit_code] += 1
        if result.exit_code != 0:
            assert state(loramgr_home) == before, f"install seed {seed} changed the store"
    # the mutator reaches both outcomes: it is not testing only files that were fine or only hopeless ones
    assert outcomes[0] and outcomes[1], outcomes


# ---------------------------------------------------------------------------------------------------
# diffusion-transformer files (formats/diffusion/read.py) and one model's diffusers save_lora_adapter file

#: convention -> (tensor key of a module without its part suffix, the module's (out, in)), two modules each
DIFFUSION_MODULES: dict[str, list[tuple[str, tuple[int, int]]]] = {
    "kohya": [("lora_unet_double_blocks_0_img_attn_qkv", (24, 8)), ("lora_unet_single_blocks_0_linear2", (8, 40))],
    "comfyui": [("diffusion_model.double_blocks.0.img_attn.qkv", (24, 8)),
                ("diffusion_model.double_blocks.0.txt_attn.proj", (8, 8))],
    "wan": [("diffusion_model.blocks.0.self_attn.q", (8, 8)), ("diffusion_model.blocks.0.ffn.0", (32, 8))],
    "xlabs": [("double_blocks.0.processor.qkv_lora1", (24, 8)), ("single_blocks.0.processor.proj_lora", (8, 40))],
    "diffusers-flux": [("transformer.transformer_blocks.0.attn.to_q", (8, 8)),
                       ("transformer.single_transformer_blocks.0.proj_out", (8, 40))],
    "save_lora_adapter": [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (8, 8)),
                          ("mid_block.attentions.0.proj_in", (16, 16))],
}
_DIFFUSION_PARTS = {  # convention -> (A suffix, B suffix, alpha suffix or None)
    "kohya": (".lora_down.weight", ".lora_up.weight", ".alpha"),
    "comfyui": (".lora_A.weight", ".lora_B.weight", ".alpha"),
    "wan": (".lora_down.weight", ".lora_up.weight", ".alpha"),
    "xlabs": (".down.weight", ".up.weight", None),
    "diffusers-flux": (".lora_A.weight", ".lora_B.weight", None),
    "save_lora_adapter": (".lora_A.weight", ".lora_B.weight", None),
}
DIFFUSION_METADATA = ["flux-1-dev/lora", "stable-diffusion-3-medium/lora", "wan2.1", "hunyuan-video", "flux1",
                      "sdxl_base_v1-0", "", "{", "qwen-image"]


def write_diffusion(path: Path, convention: str, rng: random.Random) -> None:
    """A small file in ``convention`` with one mutation of what the diffusion readers look at."""
    gen = torch.Generator().manual_seed(rng.randrange(1000))
    a_part, b_part, alpha_part = _DIFFUSION_PARTS[convention]
    tensors: dict[str, torch.Tensor] = {}
    for key, (out_features, in_features) in DIFFUSION_MODULES[convention]:
        tensors[key + a_part] = torch.randn(2, in_features, generator=gen)
        tensors[key + b_part] = torch.randn(out_features, 2, generator=gen)
        if alpha_part:
            tensors[key + alpha_part] = torch.tensor(2.0)
    metadata = {"format": "pt", "modelspec.architecture": rng.choice(DIFFUSION_METADATA),
                "ss_base_model_version": rng.choice(DIFFUSION_METADATA)}
    if convention == "save_lora_adapter":
        config: Any = {"r": 2, "lora_alpha": 4, "target_modules": ["to_q", "proj_in"]}
        config[rng.choice(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora"])] = rng.choice(ODD_VALUES)
        metadata["lora_adapter_metadata"] = json.dumps(rng.choice([config, rng.choice(ODD_VALUES)]), allow_nan=True)
    first = DIFFUSION_MODULES[convention][0][0]
    choice = rng.randrange(8)
    if choice == 0:  # one factor without its partner
        del tensors[first + b_part]
    elif choice == 1 and alpha_part:  # alpha not a scalar, or not finite
        tensors[first + alpha_part] = rng.choice([torch.ones(2), torch.tensor(float("nan")), torch.tensor(True)])
    elif choice == 2:  # factors that do not fit
        tensors[first + b_part] = torch.randn(8, rng.choice([1, 3]))
    elif choice == 3:  # full-weight deltas and DoRA scales beside the factors, any shape
        tensors[first + rng.choice([".diff", ".diff_b", ".dora_scale"])] = torch.randn(rng.choice([(3,), (8, 8), ()]))
    elif choice == 4:  # PEFT's adapter name kept in the keys
        tensors = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                   for k, v in tensors.items()}
    elif choice == 5:  # a module of another family, or of none, mixed in
        tensors[rng.choice(["lora_unet_blocks_0_self_attn_q", "diffusion_model.img_in", "transformer.x_embedder",
                            "lora_te1_text_model_encoder_layers_0_mlp_fc1"]) + a_part] = torch.randn(2, 8)
    elif choice == 6:  # zero-size factors
        tensors[first + a_part] = torch.zeros(0, tensors[first + a_part].shape[1])
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("block", range(2))
def test_fuzz_diffusion_files(loramgr_home, tmp_path, block):
    """The diffusion-transformer conventions (kohya, ComfyUI, Wan, XLabs, diffusers Flux) and diffusers'
    save_lora_adapter layout, mutated: install and check either succeed or refuse in one line, leaving
    nothing stored for a refused file."""
    runner = CliRunner()
    outcomes = {0: 0, 1: 0}
    for seed in range(block * 60, (block + 1) * 60):
        rng = random.Random(10_000 + seed)
        path = tmp_path / f"diffusion{seed}.safetensors"
        write_diffusion(path, rng.choice(sorted(DIFFUSION_MODULES)), rng)
        if rng.random() < 0.2:
            mutate_header(path, rng)
        assert_clean(runner.invoke(cli, ["check", str(path)]), f"check seed {seed}")
        before = state(loramgr_home)
        result = runner.invoke(cli, ["install", str(path), "--name", f"fuzz{seed}", "--version", "1.0.0"])
        assert_clean(result, f"install seed {seed}")
        outcomes[result.exit_code] += 1
        if result.exit_code != 0:
            assert state(loramgr_home) == before, f"install seed {seed} changed the store"
    assert outcomes[0] and outcomes[1], outcomes
