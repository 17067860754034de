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
