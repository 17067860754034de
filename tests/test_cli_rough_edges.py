"""Rough edges of the CLI (issue 13): the messages a user meets after a typo or a habit from another tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from factories import write_peft_adapter

from loramgr.cli.main import cli


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.output


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """sql-assistant 1.0.0 and 1.1.0 (sharing the README), and chat-helper 0.1.0."""
    for i, (name, version) in enumerate([("sql-assistant", "1.0.0"), ("sql-assistant", "1.1.0"),
                                         ("chat-helper", "0.1.0")]):
        folder = tmp_path / f"run{i}"
        write_peft_adapter(folder, {"model.layers.0.self_attn.q_proj": (32, 32, 4)}, seed=i, base_model="tiny",
                           readme="---\nlicense: mit\n---\n\nA test adapter.\n")
        run("install", str(folder), "--name", name, "--version", version)
    return tmp_path


def test_list_of_an_unknown_name_says_so_and_suggests(installed):
    out = run("list", "sql-asistant", code=1)
    assert "no adapter named 'sql-asistant'" in out
    assert "did you mean sql-assistant?" in out
    assert "no adapters installed" not in out


def test_list_of_an_empty_registry_still_says_nothing_is_installed():
    assert "no adapters installed" in run("list")


@pytest.mark.parametrize("command", [["show"], ["tag", "", "stable"], ["remove"], ["export", "", "out"]])
def test_every_reference_gets_a_did_you_mean(installed, command):
    args = [a if a else "chat-helpr" for a in command]
    if command[0] == "show":
        args.append("chat-helpr")
    elif command[0] == "remove":
        args.append("chat-helpr==0.1.0")
    out = run(*args, code=1)
    assert "no adapter named 'chat-helpr'" in out and "did you mean chat-helper?" in out


def test_no_suggestion_for_a_name_unlike_any(installed):
    out = run("show", "zzzz", code=1)
    assert "did you mean" not in out and "loramgr list" in out


def test_ollama_and_huggingface_cli_habits_are_recognised(installed):
    out = run("show", "sql-assistant:1.0.0", code=1)
    assert "sql-assistant==1.0.0" in out
    out = run("show", "someone/sql-lora", code=1)
    assert "hf://someone/sql-lora" in out


@pytest.mark.parametrize("tag", ["1.1.0", "v2", "2", "1.0rc1"])
def test_version_like_tags_are_refused(installed, tag):
    out = run("tag", "sql-assistant==1.0.0", tag, code=1)
    assert "a tag that looks like a version would be ambiguous" in out
    assert all(row["tags"] == [] for row in json.loads(run("list", "--json")))  # nothing tagged


def test_word_tags_still_work(installed):
    run("tag", "sql-assistant==1.0.0", "stable")
    assert "1.0.0" in run("show", "sql-assistant@stable")


def test_remove_names_dropped_tags_and_hints_gc_only_when_it_frees_something(installed):
    run("tag", "sql-assistant==1.0.0", "stable")
    run("tag", "sql-assistant==1.0.0", "prod")
    out = run("remove", "sql-assistant==1.0.0")
    assert "removed sql-assistant==1.0.0 and its tag(s) prod, stable" in out
    assert "run 'loramgr gc' to free" in out  # its weights and config are used by no other version
    run("gc")
    # chat-copy stores the very same files as chat-helper: removing one of them frees nothing
    run("install", str(installed / "run2"), "--name", "chat-copy", "--version", "0.1.0")
    out = run("remove", "chat-helper")
    assert out == "removed chat-helper==0.1.0\n"
    out = run("remove", "chat-copy")
    assert "run 'loramgr gc' to free" in out
    run("gc")
    assert "no adapter named" in run("remove", "chat-helper", code=1)


def test_a_bare_version_in_loramgr_toml_means_that_version(installed, monkeypatch):
    monkeypatch.chdir(installed)
    (installed / "loramgr.toml").write_text('[adapters]\nsql-assistant = "1.0.0"\n')
    run("lock")
    lock = (installed / "loramgr.lock").read_text()
    assert 'name = "sql-assistant"' in lock and 'version = "1.0.0"' in lock  # not the newest, 1.1.0
    assert "1.1.0" not in lock


@pytest.mark.parametrize(("toml", "entry", "words"), [
    ('[adapters]\nsql = "one"\n', "sql", "invalid version specifier 'one'"),
    ('[adapters]\n"sql:1.0.0" = "*"\n', "sql:1.0.0", "sql==1.0.0"),
])
def test_toml_mistakes_name_the_file_and_entry(tmp_path, monkeypatch, toml, entry, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loramgr.toml").write_text(toml)
    out = run("lock", code=1)
    assert out.startswith(f"Error: loramgr.toml: {entry}: ") and words in out, out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "loramgr.lock").exists()


def test_push_without_a_network_is_one_line(installed, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    out = run("push", "chat-helper", "--repo", "me/chat-helper", code=1)
    assert out.startswith(f"Error: push to me/chat-helper failed: cannot reach http://127.0.0.1:{port}")
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


@pytest.mark.parametrize("doc", ["hub.md", "guide.md"])
def test_every_option_the_docs_name_exists(doc):
    import re

    import click

    def options(command: click.Command) -> set[str]:
        found = {o for p in command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        for sub in getattr(command, "commands", {}).values():
            found |= options(sub)
        return found

    known = options(cli)
    text = (Path(__file__).parent.parent / "docs" / doc).read_text()
    named = {m[2] for m in re.finditer(r"(no `)?(--[a-z][a-z-]*[a-z])\b", text) if not m[1]}
    named -= {f"--{part}" for part in re.findall(r"\w+--(\w[\w-]*)", text)}  # models--owner--repo folders
    assert named and named <= known, sorted(named - known)


@pytest.mark.parametrize("base_model", ["", "tiny/base"])
def test_peft_template_readme_is_no_description_and_gives_no_empty_base_model_tag(tmp_path, base_model):
    import yaml
    from factories import peft_adapter_from_model, tiny_llama

    # PEFT's own save_pretrained writes huggingface_hub's template card; a model built from a config has
    # no name_or_path, so PEFT tags it 'base_model:adapter:' with nothing after the colon
    folder = peft_adapter_from_model(tiny_llama(), tmp_path / "peft-run", base_model=base_model)
    written = (folder / "README.md").read_text()
    assert "Users (both direct and downstream) should be made aware" in written
    assert "- 'base_model:adapter:'\n" in written
    run("install", str(folder), "--name", "templated", "--version", "1.0.0")
    card = json.loads(run("show", "templated", "--json"))["card"]
    assert card["description"] is None and "base_model:adapter:" not in card["tags"]

    pushed = run("push", "templated", "--repo", "me/templated", "--dry-run").split("\n\n", 1)[1]
    meta = yaml.safe_load(pushed.split("---")[1])
    linked = [tag for tag in meta["tags"] if tag.startswith("base_model:")]
    assert linked == ([f"base_model:adapter:{base_model}"] if base_model else []), meta["tags"]
    assert "Users (both direct" not in pushed and "A LoRA adapter" in pushed


def test_method_names_are_case_insensitive(installed):
    from loramgr.registry import Registry

    run("combine", "sql-assistant==1.0.0", "chat-helper", "--method", "SVD", "--rank", "4", "--name", "upper")
    run("combine", "sql-assistant==1.0.0", "chat-helper", "--method", "svd", "--rank", "4", "--name", "lower")
    registry = Registry.open()
    assert registry.show("upper").digest == registry.show("lower").digest
    assert "is not a merge method" in run("combine", "sql-assistant", "chat-helper", "--method", "SLERP",
                                          "--name", "x", code=2)


def _stderr_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the loramgr command with stderr on a pseudo-terminal (stdout a pipe); returns (exit code, stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 30 rows, 100 columns
    with subprocess.Popen(["loramgr", *args], stdout=subprocess.PIPE, stderr=follower) as proc:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.communicate()
    os.close(leader)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_merges_draw_a_module_bar_on_a_terminal_unless_quiet(installed):
    code, drawn = _stderr_on_a_terminal("combine", "sql-assistant==1.0.0", "chat-helper", "--name", "bar")
    assert code == 0 and "combining" in drawn and "/1 [" in drawn and "module" in drawn, drawn
    code, drawn = _stderr_on_a_terminal("compress", "bar", "--rank", "2", "--name", "bar-r2")
    assert code == 0 and "compressing" in drawn and "/1 [" in drawn, drawn
    code, drawn = _stderr_on_a_terminal("compress", "bar", "--rank", "1", "--name", "bar-r1", "--quiet")
    assert code == 0 and drawn == ""
    assert "combining" not in run("combine", "bar", "chat-helper", "--name", "piped")  # not a terminal


def test_remove_names_the_versions_that_keep_it_in_their_lineage(installed):
    run("combine", "sql-assistant==1.0.0", "chat-helper", "--weights", "0.5,0.5", "--name", "mix", "--version", "1.0.0")
    out = run("remove", "chat-helper", "--dry-run")
    assert "would remove chat-helper==0.1.0" in out
    assert "mix==1.0.0 keep(s) it as a parent in their lineage" in out
    out = run("remove", "sql-assistant==1.1.0")  # no combined version names this one
    assert "lineage" not in out
    run("remove", "mix")
    assert "lineage" not in run("remove", "chat-helper")  # once the dependent is gone, nothing to say


@pytest.mark.slow
def test_install_draws_byte_bars_on_a_terminal_unless_quiet_or_piped(tmp_path):
    """A weights file over 64 MiB: its copy into the store and its hashing are drawn on stderr when it is a
    terminal; -q/--quiet and a pipe draw nothing."""
    folder = write_peft_adapter(tmp_path / "big", {"model.layers.0.self_attn.q_proj": (4096, 4096, 2100)})
    assert (folder / "adapter_model.safetensors").stat().st_size > 64 * 1024 * 1024
    code, drawn = _stderr_on_a_terminal("install", str(folder), "--name", "big", "--version", "1.0.0")
    assert code == 0 and "storing adapter_model.safetensors" in drawn and "hashing adapter_model" in drawn, drawn
    assert "MB/s" in drawn or "B/s" in drawn
    code, drawn = _stderr_on_a_terminal("install", str(folder), "--name", "big", "--version", "2.0.0", "-q")
    assert code == 0 and drawn == ""
    piped = CliRunner().invoke(cli, ["install", str(folder), "--name", "big", "--version", "3.0.0"])
    assert piped.exit_code == 0 and "storing" not in piped.output and "hashing" not in piped.output
    assert piped.output.startswith("installed big==3.0.0")
