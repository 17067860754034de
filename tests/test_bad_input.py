"""Every kind of bad input gets one line ("Error: ..." naming the file, module or reference), exit 1,
no traceback, and leaves the blob store and the database exactly as they were."""

from __future__ import annotations

import json
import math
import sqlite3
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import PEFT_PREFIX, write_peft_adapter
from safetensors.torch import load_file, save_file

from loramgr.cli.main import cli
from loramgr.errors import InvalidAdapterError

MODULES = {"layers.0.q": (16, 16, 4), "layers.0.v": (16, 8, 4)}
KEY_A = f"{PEFT_PREFIX}layers.0.v.lora_A.weight"
KEY_B = f"{PEFT_PREFIX}layers.0.v.lora_B.weight"


def snapshot(home: Path) -> tuple:
    """Everything install could change: files under the home (but the DB's own), and every table's rows."""
    files = sorted(
        (str(p.relative_to(home)), p.stat().st_size)
        for p in home.rglob("*")
        if p.is_file() and not p.name.startswith("registry.db") and p.name != "store.lock"
    )
    with sqlite3.connect(home / "registry.db") as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        rows = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    return files, rows


@pytest.fixture
def home(loramgr_home, tmp_path) -> Path:
    """A registry holding one good adapter, so 'unchanged' is checked against a non-empty store."""
    good = write_peft_adapter(tmp_path / "good", MODULES)
    result = CliRunner().invoke(cli, ["install", str(good), "--name", "good", "--version", "1.0.0"])
    assert result.exit_code == 0, result.output
    return loramgr_home


def run_failing(args: list[str], home: Path, *expected: str) -> str:
    before = snapshot(home)
    result = CliRunner().invoke(cli, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fact in expected:
        assert fact in lines[0], (fact, lines[0])
    assert snapshot(home) == before
    return lines[0]


def adapter(tmp_path: Path, **kwargs) -> Path:
    return write_peft_adapter(tmp_path / "bad", MODULES, **kwargs)


def test_missing_path(home, tmp_path):
    run_failing(["install", str(tmp_path / "nowhere")], home, str(tmp_path / "nowhere"), "no such file")


def test_folder_without_config(home, tmp_path):
    folder = adapter(tmp_path)
    (folder / "adapter_config.json").unlink()
    run_failing(["install", str(folder)], home, str(folder), "no adapter_config.json", "PEFT adapter folder")


def test_broken_json(home, tmp_path):
    folder = adapter(tmp_path)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,,}')
    run_failing(["install", str(folder)], home, str(folder / "adapter_config.json"), "broken JSON at line 1")


def test_config_that_is_not_a_lora(home, tmp_path):
    folder = adapter(tmp_path, extra_config={"peft_type": "IA3"})
    run_failing(["install", str(folder)], home, str(folder / "adapter_config.json"), "'IA3', not 'LORA'")


def test_config_with_a_bad_rank(home, tmp_path):
    folder = adapter(tmp_path, extra_config={"r": 0})
    run_failing(["install", str(folder)], home, "adapter_config.json", "r must be a positive number")


@pytest.mark.parametrize("keep", [4, 100, -8], ids=["inside-length", "inside-header", "inside-data"])
def test_truncated_safetensors(home, tmp_path, keep):
    folder = adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    run_failing(["install", str(folder)], home, str(weights), "truncated")


def test_corrupt_safetensors_header(home, tmp_path):
    folder = adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b"\xff" * length
    weights.write_bytes(bytes(data))
    run_failing(["install", str(folder)], home, str(weights), "not valid JSON")


def test_lora_a_without_lora_b(home, tmp_path):
    folder = adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[KEY_B]
    save_file(tensors, weights)
    run_failing(["install", str(folder)], home, str(weights), "module layers.0.v has lora_A but no lora_B")


def test_factors_that_disagree_on_the_rank(home, tmp_path):
    folder = adapter(tmp_path, tensors_override={KEY_B: torch.randn(8, 3)})
    run_failing(["install", str(folder)], home, "module layers.0.v", "[4, 16]", "[8, 3]", "disagree on the rank")


def test_rank_that_disagrees_with_the_config(home, tmp_path):
    folder = adapter(tmp_path, extra_config={"r": 8})
    line = run_failing(["install", str(folder)], home, "module layers.0.", "rank 4 but the config says r=8")
    assert "rank_pattern" in line


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_tensor(home, tmp_path, bad):
    a = torch.randn(4, 16)
    a[1, 2] = bad
    folder = adapter(tmp_path, tensors_override={KEY_A: a})
    word = "NaN" if math.isnan(bad) else "Inf"
    run_failing(["install", str(folder)], home, str(folder / "adapter_model.safetensors"), KEY_A, f"contains {word}")


def test_non_finite_half_precision_tensor(home, tmp_path):
    folder = adapter(tmp_path, dtype=torch.float16)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[KEY_B][0, 0] = float("inf")
    save_file(tensors, weights)
    run_failing(["install", str(folder)], home, KEY_B, "contains Inf")


def test_pickle_without_allow_pickle(home, tmp_path):
    folder = adapter(tmp_path)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    run_failing(["install", str(folder)], home, "adapter_model.bin", "--allow-pickle")


def test_single_pickle_file(home, tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, path)
    run_failing(["install", str(path)], home, str(path), "pickled")


@pytest.mark.parametrize("version", ["one", "1.0.0-", "v1..2"])
def test_invalid_version(home, tmp_path, version):
    folder = adapter(tmp_path)
    run_failing(["install", str(folder), "--version", version], home, f"invalid version {version!r}", "PEP 440")


def test_invalid_name(home, tmp_path):
    folder = adapter(tmp_path)
    run_failing(["install", str(folder), "--name", "-bad name"], home, "invalid adapter name '-bad name'")


def test_other_bytes_under_an_existing_version(home, tmp_path):
    folder = adapter(tmp_path, seed=7)
    run_failing(["install", str(folder), "--name", "good", "--version", "1.0"], home,
                "good==1.0 is already installed with other bytes", "new --version")


@pytest.mark.parametrize(
    ("args", "facts"),
    [
        (["show", "nothing"], ["no adapter named 'nothing'", "loramgr list"]),
        (["show", "good==2.0"], ["no version of good matches 'good==2.0'", "installed versions: 1.0.0"]),
        (["show", "good>=3,<4"], ["'good>=3,<4'"]),
        (["show", "good@prod"], ["good has no tag 'prod'"]),
        (["show", "sha256:abcdef"], ["sha256:abcdef"]),
        (["show", "sha256:xyz"], ["invalid digest reference 'sha256:xyz'"]),
        (["show", "good>>1"], ["invalid version specifier '>>1'"]),
        (["tag", "nothing==1.0", "stable"], ["no adapter named 'nothing'"]),
        (["tag", "good", "latest"], ["invalid tag 'latest'", "reserved"]),
        (["export", "good==9", "OUT"], ["good==9"]),
        (["remove", "nothing==1.0"], ["no adapter named 'nothing'"]),
        (["verify", "good@nope"], ["good has no tag 'nope'"]),
        (["untag", "good", "nope"], ["good has no tag 'nope'"]),
    ],
)
def test_references_that_match_nothing(home, tmp_path, args, facts):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    run_failing(args, home, *facts)
    assert not (tmp_path / "out").exists()


def test_export_to_a_non_empty_folder(home, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    run_failing(["export", "good", str(dest)], home, str(dest), "not empty")
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]


def test_debug_shows_the_traceback(home, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMGR_DEBUG", "1")
    folder = adapter(tmp_path)
    (folder / "adapter_config.json").write_text("{")
    result = CliRunner().invoke(cli, ["install", str(folder)])
    assert result.exit_code == 1
    assert isinstance(result.exception, InvalidAdapterError)
    assert result.exception.path == str(folder / "adapter_config.json")


def test_list_json_is_unchanged_by_failures(home, tmp_path):
    before = json.loads(CliRunner().invoke(cli, ["list", "--json"]).output)
    folder = adapter(tmp_path, extra_config={"r": 8})
    assert CliRunner().invoke(cli, ["install", str(folder)]).exit_code == 1
    assert json.loads(CliRunner().invoke(cli, ["list", "--json"]).output) == before
    assert [(r["name"], r["version"]) for r in before] == [("good", "1.0.0")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float8_e5m2],
                         ids=["bf16", "f16", "f64", "f8e5m2"])
@pytest.mark.parametrize("bad", [math.nan, -math.inf], ids=["nan", "-inf"])
def test_non_finite_values_are_found_in_every_float_dtype(tmp_path, dtype, bad):
    from loramgr.formats.peft import check_tensor_values

    path = tmp_path / "t.safetensors"
    x = torch.randn(64, 3)
    x[40, 1] = bad
    save_file({"a_ints": torch.arange(5), "b_empty": torch.zeros(0), "c": torch.randn(7, 2).to(dtype),
               "d": x.to(dtype)}, path)
    with pytest.raises(InvalidAdapterError, match=f"tensor d contains {'NaN' if math.isnan(bad) else 'Inf'}"):
        check_tensor_values(path)
    save_file({"a_ints": torch.arange(5), "d": torch.randn(64, 3).to(dtype)}, path)
    check_tensor_values(path)  # finite values pass


def test_bytes_after_the_last_tensor(home, tmp_path):
    folder = adapter(tmp_path)
    with open(folder / "adapter_model.safetensors", "ab") as handle:
        handle.write(b"\0" * 16)
    run_failing(["install", str(folder)], home, "16 bytes after the last tensor")


def test_overlapping_tensors(home, tmp_path):
    folder = adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    start, end = header[first]["data_offsets"]
    assert header[second]["data_offsets"] == [end, 2 * end - start]  # same size, right after the first
    header[second]["data_offsets"] = header[first]["data_offsets"]  # two tensors on the same bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (length - len(raw))
    assert len(raw) == length
    weights.write_bytes(data[:8] + raw + data[8 + length :])
    run_failing(["install", str(folder)], home, str(weights), "starts at byte")
