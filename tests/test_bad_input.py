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


# Each cause of a traceback (or of a silent acceptance) the fuzzer in test_fuzz_inputs.py found, by name.

def rewrite_header(path: Path, change) -> None:
    """Apply ``change`` to the parsed JSON header of a safetensors file and write it back (data unchanged)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = change(header)
    encoded = (text if isinstance(text, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def set_entry(field, value):
    def change(header):
        header[KEY_A][field] = value
    return change


def read_all(safe_open, path: Path) -> None:
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a dict
            handle.get_tensor(key)


@pytest.mark.parametrize(
    ("change", "fact"),
    [
        (set_entry("shape", ["4", 16]), "shape ['4', 16] is not a list of non-negative integers"),
        (set_entry("shape", [4.0, 16]), "shape [4.0, 16] is not a list of non-negative integers"),
        (set_entry("shape", [-4, -16]), "is not a list of non-negative integers"),
        (set_entry("shape", [True, 16]), "is not a list of non-negative integers"),
        (set_entry("data_offsets", ["0", "256"]), "data_offsets ['0', '256'] is not a pair"),
        (set_entry("data_offsets", [-8, 0]), "is not a pair of non-negative integers"),
        (set_entry("dtype", ["F32"]), "dtype ['F32'] is not one of"),
        (set_entry("dtype", {"F32": 1}), "dtype {'F32': 1} is not one of"),
        (lambda h: h.update({KEY_A: 3}), "is a int, not an object"),
        (lambda h: h.update({"__metadata__": 1.5}), "__metadata__ is a float, not an object"),
        (lambda h: h.update({"__metadata__": ["format"]}), "__metadata__ is a list"),
        (lambda h: h.update({"__metadata__": {"format": ["pt"]}}), "__metadata__['format'] is a list, not a string"),
        (lambda h: h.update({"__metadata__": {"format": "\ud800"}}), "lone surrogate"),
        (lambda h: json.dumps(h).replace('"F32"', "[" * 5000 + "1" + "]" * 5000, 1), "nests deeper than 128"),
        (lambda h: json.dumps(h).replace('"F32"', "[" * 200 + "1" + "]" * 200, 1), "nests deeper than 128"),
        (lambda h: json.dumps(h).replace("16", "NaN", 1), "NaN, which is not JSON"),
    ],
    ids=["shape-str", "shape-float", "shape-negative", "shape-bool", "offsets-str", "offsets-negative",
         "dtype-list", "dtype-dict", "entry-int", "metadata-float", "metadata-list", "metadata-value-list",
         "metadata-surrogate", "nested-5000", "nested-200", "nan-constant"],
)
def test_safetensors_header_fields_checked_as_the_safetensors_library_does(home, tmp_path, change, fact):
    from safetensors import safe_open

    folder = adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    rewrite_header(weights, change)
    with pytest.raises(Exception):  # noqa: B017 - the library's own verdict: it refuses the same file
        read_all(safe_open, weights)
    run_failing(["install", str(folder)], home, str(weights), fact)
    run_failing(["check", str(folder)], home, str(weights), fact)


@pytest.mark.parametrize(
    ("config", "fact"),
    [
        ({"r": 8.5}, "r must be a positive number (a whole number below 2**31), found 8.5"),
        ({"r": True}, "r must be a positive number"),
        ({"r": 2**70}, "r must be a positive number"),
        ({"r": math.nan}, "r must be a positive number"),
        ({"lora_alpha": math.inf}, "lora_alpha must be a finite number, found inf"),
        ({"lora_alpha": math.nan}, "lora_alpha must be a finite number, found nan"),
        ({"lora_alpha": 1e400}, "lora_alpha must be a finite number"),
        ({"lora_alpha": "16"}, "lora_alpha must be a finite number, found '16'"),
        ({"rank_pattern": {"q": math.nan}}, "rank_pattern['q'] must be a positive number"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key must be a valid regular expression, found '('"),
        ({"alpha_pattern": {"*": 4.0}}, "alpha_pattern key must be a valid regular expression, found '*'"),
        ({"rank_pattern": 8.5}, "rank_pattern must be an object of regex -> number"),
        ({"alpha_pattern": {"q": "x"}}, "alpha_pattern['q'] must be a finite number"),
        ({"target_modules": "(q"}, "target_modules must be a valid regular expression, found '(q'"),
        ({"target_modules": 1.5}, "target_modules must be a regular expression or a list of module names"),
        ({"target_modules": [["q"]]}, "target_modules must be a regular expression or a list"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false, found 'yes'"),
        ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a string"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path must be a string, found 3"),
        ({"base_model_name_or_path": "\ud800"}, "base_model_name_or_path holds a lone surrogate"),
        ({"bias": "some"}, "bias must be 'none', 'all' or 'lora_only'"),
        ({"layers_to_transform": [-1]}, "layers_to_transform must be a layer index or a list of them"),
        ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names"),
    ],
    ids=lambda v: json.dumps(v, allow_nan=True, ensure_ascii=True)[:40] if isinstance(v, dict) else "",
)
def test_config_fields_checked_for_type_and_range(home, tmp_path, config, fact):
    folder = adapter(tmp_path)
    path = folder / "adapter_config.json"
    path.write_bytes(json.dumps({**json.loads(path.read_text()), **config}).encode("utf-8", "surrogatepass"))
    run_failing(["install", str(folder)], home, str(path), fact)
    run_failing(["check", str(folder)], home, str(path), fact)


def test_deeply_nested_config(home, tmp_path):
    folder = adapter(tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(path.read_text().replace('"bias": "none"', '"bias": ' + "[" * 5000 + "]" * 5000))
    run_failing(["install", str(folder)], home, str(path), "nested too deeply")


@pytest.mark.parametrize("shape", [(0, 8), (4, 0)], ids=["rank-0", "in-0"])
def test_zero_size_factor(home, tmp_path, shape):
    folder = adapter(tmp_path, extra_config={"r": 4},
                     tensors_override={KEY_A: torch.zeros(*shape), KEY_B: torch.zeros(8, shape[0])})
    facts = ["layers.0.v"] + (["has shape [4, 0], with no elements"] if shape[0] else ["rank 0"])
    run_failing(["install", str(folder)], home, *facts)


def write_kohya_file(path: Path, metadata: dict[str, str], alpha: float = 2.0) -> Path:
    key = "lora_unet_down_blocks_0_attn_to_q"
    save_file({key + ".lora_down.weight": torch.randn(2, 8), key + ".lora_up.weight": torch.randn(8, 2),
               key + ".alpha": torch.tensor(alpha)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("alpha", [math.nan, math.inf], ids=["nan", "inf"])
def test_kohya_alpha_tensor_not_finite(home, tmp_path, alpha):
    path = write_kohya_file(tmp_path / "k.safetensors", {"ss_network_module": "networks.lora"}, alpha)
    run_failing(["install", str(path)], home, str(path), "lora_unet_down_blocks_0_attn_to_q.alpha",
                "not a finite number")


def test_kohya_metadata_value_not_a_string(home, tmp_path):
    path = write_kohya_file(tmp_path / "k.safetensors", {"modelspec.tags": "x"})
    rewrite_header(path, lambda h: h["__metadata__"].update({"modelspec.tags": None}))
    run_failing(["install", str(path)], home, str(path), "__metadata__['modelspec.tags'] is a NoneType")


@pytest.mark.parametrize("value", ["inf", "nan", "1e400"])
def test_kohya_network_dim_not_finite_reads_as_unknown(home, tmp_path, value):
    """kohya's ss_network_dim is informational: a non-number ("Dynamic", "inf") is ignored, the
    rank comes from the tensors, as it does for "Dynamic"."""
    path = write_kohya_file(tmp_path / "k.safetensors", {"ss_network_dim": value, "ss_network_alpha": value})
    result = CliRunner().invoke(cli, ["install", str(path), "--name", "k", "--version", "1.0.0"])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(cli, ["show", "k", "--json"])
    assert json.loads(shown.output)["rank"] == 2, shown.output


def write_diffusers_file(path: Path, config: object) -> Path:
    key = "unet.down_blocks.0.attentions.0.to_q"
    save_file({key + ".lora_A.weight": torch.randn(2, 8), key + ".lora_B.weight": torch.randn(8, 2)}, str(path),
              metadata={"lora_adapter_metadata": json.dumps(config, allow_nan=True)})
    return path


@pytest.mark.parametrize(
    ("config", "fact"),
    [
        ({"r": 2, "lora_alpha": "*"}, "lora_alpha must be a finite number, found '*'"),
        ({"r": 2, "lora_alpha": math.inf}, "lora_alpha must be a finite number"),
        ({"r": "\ud800"}, "r holds a lone surrogate"),
        ({"r": 2**70}, "r must be a positive number"),
        ({"r": 2, "target_modules": 1.5}, "target_modules must be a regular expression or a list"),
        ({"unet.r": 2, "unet.alpha_pattern": {"(": 1}}, "metadata lora_adapter_metadata unet: alpha_pattern key"),
    ],
    ids=["alpha-str", "alpha-inf", "r-surrogate", "r-huge", "targets-float", "component-regex"],
)
def test_diffusers_metadata_config_checked(home, tmp_path, config, fact):
    path = write_diffusers_file(tmp_path / "d.safetensors", config)
    run_failing(["install", str(path)], home, str(path), "metadata lora_adapter_metadata", fact)
