"""The registry commands end to end through click, as the issue describes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import write_peft_adapter

from loramgr.cli.main import cli
from loramgr.registry import Registry


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result.output


def blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs").rglob("*") if p.is_file()}


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    """./runs/sql-lora (ranks 8 and 4) and ./runs/sql-lora-2 (rank 16), relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    write_peft_adapter(
        tmp_path / "runs" / "sql-lora",
        {"model.layers.0.self_attn.q_proj": (32, 32, 8), "model.layers.0.self_attn.v_proj": (32, 16, 4),
         "model.layers.1.self_attn.q_proj": (32, 32, 8)},
        alpha=16.0, base_model="tiny-llama", readme="---\nlicense: apache-2.0\n---\n\nTurns questions into SQL.\n",
    )
    write_peft_adapter(
        tmp_path / "runs" / "sql-lora-2", {"model.layers.0.self_attn.q_proj": (32, 32, 16)}, alpha=32.0, seed=1,
        base_model="tiny-llama", readme="---\nlicense: apache-2.0\n---\n\nTurns questions into SQL.\n",
    )
    return tmp_path / "runs"


def test_issue_walkthrough(runs, loramgr_home, tmp_path):
    out = invoke("install", "./runs/sql-lora", "--name", "sql-assistant", "--version", "1.0.0")
    assert out.startswith("installed sql-assistant==1.0.0 (")
    out = invoke("install", "./runs/sql-lora-2", "--name", "sql-assistant", "--version", "1.1.0")
    assert out.startswith("installed sql-assistant==1.1.0 (")
    # README.md and adapter_config.json differ only in r/alpha..., so 2 configs, 2 weights, 1 shared card
    assert len(blobs(loramgr_home)) == 5

    lines = invoke("list").splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "TYPE", "RANK", "MODULES", "SIZE", "BASE", "MODEL", "TAGS",
                                "DIGEST"]
    assert [line.split()[:5] for line in lines[2:]] == [
        ["sql-assistant", "1.0.0", "lora", "8", "3"],
        ["sql-assistant", "1.1.0", "lora", "16", "1"],
    ]
    rows = json.loads(invoke("list", "--json"))
    assert [(r["version"], r["rank"], r["alpha"], r["n_modules"], r["base_model"]) for r in rows] == [
        ("1.0.0", 8, 16.0, 3, "tiny-llama"), ("1.1.0", 16, 32.0, 1, "tiny-llama"),
    ]

    show = invoke("show", "sql-assistant")
    assert show.splitlines()[0] == "sql-assistant 1.1.0"
    assert "rank / alpha  16 / 32.0" in show and "license       apache-2.0" in show
    old = invoke("show", "sql-assistant>=1,<1.1")
    assert old.splitlines()[0] == "sql-assistant 1.0.0"
    assert "rank / alpha  8 (found 4, 8) / 16.0" in old
    assert "modules       3 (" in old and "q_proj, v_proj" in old
    data = json.loads(invoke("show", "sql-assistant==1.0.0", "--json"))
    assert data["version"] == "1.0.0" and data["ranks_found"] == [4, 8]
    assert {m["name"]: m["rank"] for m in data["modules"]}["model.layers.0.self_attn.v_proj"] == 4
    assert data["card"]["description"] == "Turns questions into SQL."
    assert data["source"] == str((runs / "sql-lora").resolve())

    assert invoke("tag", "sql-assistant==1.0.0", "stable") == "tagged 1.0.0 as stable\n"
    assert invoke("list").splitlines()[2].split()[-2] == "stable"
    assert invoke("show", "sql-assistant@stable").splitlines()[0] == "sql-assistant 1.0.0  [stable]"
    assert invoke("show", "sql-assistant@latest").splitlines()[0] == "sql-assistant 1.1.0"
    assert invoke("show", data["digest"][:14]).splitlines()[0] == "sql-assistant 1.0.0  [stable]"

    assert invoke("export", "sql-assistant@stable", "./out") == "exported sql-assistant@stable to out\n"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (tmp_path / "out" / name).read_bytes() == (runs / "sql-lora" / name).read_bytes()
    refused = invoke("export", "sql-assistant@stable", "./out", code=1)
    assert refused.strip() == "Error: out exists and is not empty: choose a new or empty folder"

    assert "'sql-assistant' matches 2 versions" in invoke("remove", "sql-assistant", code=1)
    removed = invoke("remove", "sql-assistant==1.0.0").splitlines()[0]
    assert removed == "removed sql-assistant==1.0.0 and its tag(s) stable"
    assert [r["version"] for r in json.loads(invoke("list", "--json"))] == ["1.1.0"]
    assert len(blobs(loramgr_home)) == 5  # remove touches rows only

    dry = invoke("gc", "--dry-run").splitlines()
    assert len(dry) == 3 and all(line.startswith("would free blob sha256:") for line in dry[:2])
    assert dry[-1].startswith("would free ") and dry[-1].endswith(" in 2 file(s)")
    assert len(blobs(loramgr_home)) == 5
    done = invoke("gc").splitlines()
    assert [line.replace("would free", "freed") for line in dry] == done
    assert len(blobs(loramgr_home)) == 3  # the shared README.md stays: 1.1.0 uses it
    assert invoke("verify") == "verified 3 blob(s): all intact\n"
    assert invoke("gc").strip() == "freed 0 B in 0 file(s)"


def test_reinstall_same_bytes_says_so(runs, loramgr_home):
    invoke("install", "./runs/sql-lora", "--name", "sql-assistant", "--version", "1.0.0")
    before = blobs(loramgr_home)
    out = invoke("install", "./runs/sql-lora", "--name", "sql-assistant", "--version", "1.0.0")
    assert out.startswith("already installed as sql-assistant==1.0.0 (sha256:") and "nothing new stored" in out
    out = invoke("install", "./runs/sql-lora", "--name", "sql-assistant")
    assert out.startswith("already installed as sql-assistant==1.0.0")
    assert blobs(loramgr_home) == before
    assert len(json.loads(invoke("list", "--json"))) == 1


def test_auto_versions_from_the_cli(runs):
    assert invoke("install", "./runs/sql-lora").startswith("installed sql-lora==0.1.0 ")
    assert invoke("install", "./runs/sql-lora-2", "--name", "sql-lora").startswith("installed sql-lora==0.2.0 ")
    result = json.loads(invoke("install", "./runs/sql-lora-2", "--name", "Other_Name", "--json"))
    assert (result["name"], result["version"], result["created"]) == ("other-name", "0.1.0", True)


def test_verify_finds_a_flipped_byte_and_names_the_adapter(runs, loramgr_home):
    invoke("install", "./runs/sql-lora", "--name", "sql-assistant", "--version", "1.0.0")
    invoke("install", "./runs/sql-lora-2", "--name", "other", "--version", "1.0.0")
    data = json.loads(invoke("show", "sql-assistant", "--json"))
    digest = next(f["digest"] for f in data["files"] if f["path"] == "adapter_model.safetensors")
    blob = loramgr_home / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert blob.stat().st_mode & 0o222 == 0
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))

    result = CliRunner().invoke(cli, ["verify"])
    assert result.exit_code == 1
    assert f"corrupt blob {digest} used by sql-assistant==1.0.0" in result.output
    assert "other" not in result.output
    assert result.output.strip().splitlines()[-1] == "verified 5 blob(s): 1 problem(s)"
    report = json.loads(CliRunner().invoke(cli, ["verify", "--json"]).output)
    assert report["problems"] == [{"digest": digest, "problem": "corrupt", "used_by": ["sql-assistant==1.0.0"]}]
    assert invoke("verify", "other") == "verified 3 blob(s): all intact\n"


def test_interrupted_install_from_the_cli(runs, loramgr_home, monkeypatch):
    invoke("install", "./runs/sql-lora", "--name", "kept", "--version", "1.0.0")
    before_list, before_blobs = invoke("list", "--json"), blobs(loramgr_home)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Registry, "_commit_version", interrupted)
        result = CliRunner().invoke(cli, ["install", "./runs/sql-lora-2", "--name", "new", "--version", "1.0.0"])
    assert result.exit_code == 130
    assert "nothing was registered" in result.output and "Traceback" not in result.output
    assert invoke("list", "--json") == before_list
    orphans = blobs(loramgr_home) - before_blobs
    assert len(orphans) == 2  # new config and weights; the README is shared with 'kept'
    dry = invoke("gc", "--dry-run")
    assert {line.split()[3][7:] for line in dry.splitlines()[:-1]} == orphans
    invoke("gc")
    assert blobs(loramgr_home) == before_blobs
    assert invoke("verify") == "verified 3 blob(s): all intact\n"


def test_list_when_empty():
    assert invoke("list") == "no adapters installed; try 'loramgr install PATH'\n"
    assert json.loads(invoke("list", "--json")) == []


@pytest.mark.slow
def test_help_list_and_install_do_not_import_torch(runs):
    invoke("install", "./runs/sql-lora", "--name", "sql-assistant", "--version", "1.0.0")
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from loramgr.cli.main import cli\n"
        "result = CliRunner().invoke(cli, ['--help'])\n"
        "assert result.exit_code == 0 and 'install' in result.output, result.output\n"
        "print('torch' in sys.modules, 'sqlalchemy' in sys.modules)\n"
        "for args in (['list'], ['list', '--json']):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print('sql-assistant' in result.output, 'torch' in sys.modules, 'safetensors' in sys.modules)\n"
        "result = CliRunner().invoke(cli, ['install', './runs/sql-lora-2'])\n"
        "print(result.output.startswith('installed sql-lora-2==0.1.0'), 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    # --help, list: no torch, no SQLAlchemy for --help; install validates values without torch either
    assert done.stdout.split() == ["False", "False", "True", "False", "False", "True", "False"], done.stderr
