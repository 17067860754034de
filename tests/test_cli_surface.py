"""The CLI's surface: global flags, JSON errors, colour, settings named in errors, exit statuses,
examples in every help, and the console script's exit (complete output, right status)."""

from __future__ import annotations

import json
import os
import pty
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from factories import run_cli, write_peft_adapter

from loramgr import errors
from loramgr.cli.docgen import all_commands
from loramgr.cli.examples import EXAMPLES
from loramgr.cli.main import BROKEN_PIPE_EXIT, cli

Q = "model.layers.0.self_attn.q_proj"


def invoke(*args: str, code: int) -> str:
    result = CliRunner().invoke(cli, list(args), prog_name="loramgr")
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def _command() -> list[str]:
    """The ``loramgr`` console script (the entry point users run), or ``python -m`` its module."""
    script = Path(sys.executable).with_name("loramgr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loramgr.cli.main"]


def console(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_command(), *args], capture_output=True, text=True, timeout=120)


# -- loramgr alone, --version, env ------------------------------------------------------------------

def test_loramgr_alone_prints_the_help_and_succeeds() -> None:
    out = invoke(code=0)
    assert out.startswith("Usage: loramgr") and "Commands:" in out and " env " in out
    out = invoke("base", code=0)
    assert out.startswith("Usage: loramgr base") and "Commands:" in out and "Error" not in out


def test_version_names_the_registry_in_use(loramgr_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = invoke("--version", code=0)
    assert out == f"loramgr 0.1.0 (home {loramgr_home}, database sqlite:///{loramgr_home / 'registry.db'})\n"
    monkeypatch.setenv("LORAMGR_DATABASE_URL", "postgresql+psycopg://me:secret@db.internal/loramgr")
    out = invoke("--version", code=0)
    assert "database postgresql+psycopg://me:***@db.internal/loramgr" in out and "secret" not in out


@pytest.mark.slow
def test_version_and_env_import_neither_sqlalchemy_nor_torch() -> None:
    for args in (["--version"], ["env", "--json"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "loramgr.cli.main", *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
        assert "loramgr" in imported and not imported & {"sqlalchemy", "torch", "alembic"}, args


def test_env_reports_home_database_schema_store_and_packages(sources, loramgr_home: Path) -> None:
    from importlib.metadata import version

    from registry_schema import HEAD_REVISION

    report = json.loads(invoke("env", "--json", code=0))
    blobs = [p for p in (loramgr_home / "blobs").rglob("*") if p.is_file()]
    assert report["home"] == str(loramgr_home) and report["home_exists"]
    assert report["database"] == f"sqlite:///{loramgr_home / 'registry.db'}"
    assert (report["schema"], report["schema_status"]) == (HEAD_REVISION, "current")
    assert report["blobs"] == len(blobs) > 0 and report["store_size"] == sum(p.stat().st_size for p in blobs)
    assert report["packages"]["peft"] == version("peft") and report["packages"]["torch"] == version("torch")
    text = invoke("env", code=0)
    assert f"home      {loramgr_home}\n" in text and f"schema    {HEAD_REVISION} (current)" in text
    assert "peft" in text and version("peft") in text


def test_env_on_a_new_home_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAMGR_HOME", str(tmp_path / "new"))
    report = json.loads(invoke("--json", "env", code=0))
    assert report["home_exists"] is False and report["schema"] is None and report["schema_status"] == "no database yet"
    assert not (tmp_path / "new").exists()


# -- --json, errors included --------------------------------------------------------------------------

def test_every_command_takes_json() -> None:
    lacking = [path for path, command in all_commands() if not isinstance(command, click.Group)
               and not any("--json" in getattr(p, "opts", []) for p in command.params)]
    assert not lacking


def test_a_failure_with_json_is_one_object_with_the_facts() -> None:
    for args in (["--json", "show", "nothing"], ["show", "nothing", "--json"], ["--json", "tag", "nothing", "x"]):
        data = json.loads(invoke(*args, code=1))
        assert data == {"error": "no adapter named 'nothing'", "hint": "run 'loramgr list' to see installed adapters",
                        "type": "NotFoundError", "reference": "nothing"}, args
    # a click usage error keeps click's status, 2
    data = json.loads(invoke("--json", "show", "--bogus", code=2))
    assert data["type"] == "NoSuchOption" and "--bogus" in data["error"] and data["hint"] == "see 'loramgr show -h'"


def test_json_without_a_json_form_of_its_own_gives_the_lines(sources) -> None:
    said = invoke("tag", "sql", "one", code=0).splitlines()
    assert said and "one" in said[0]
    data = json.loads(invoke("--json", "tag", "sql", "two", code=0))
    assert data == {"output": [line.replace("one", "two") for line in said]}
    said = invoke("untag", "sql", "one", code=0).splitlines()
    data = json.loads(invoke("untag", "sql", "two", "--json", code=0))
    assert data == {"output": [line.replace("one", "two") for line in said]}


def test_combine_json_and_quiet(sources, tmp_path: Path) -> None:
    data = json.loads(invoke("combine", "sql", "style", "--method", "svd", "--rank", "2", "--name", "mix", "--json",
                             code=0))
    assert data["installed"]["name"] == "mix" and data["method"] == "svd" and data["output"] is None
    assert {m["rank"] for m in data["modules"]} == {2} and all(0 < m["kept_energy"] <= 1 for m in data["modules"])
    assert any("not in" in note for note in data["notes"])  # style lacks v_proj, sql lacks k_proj
    loud = invoke("combine", "sql", "style", "--output", str(tmp_path / "loud"), code=0)
    quiet = invoke("-q", "combine", "sql", "style", "--output", str(tmp_path / "quiet"), code=0)
    assert "note:" in loud and "note:" not in quiet and f"wrote {tmp_path / 'quiet'}" in quiet


def test_every_error_becomes_a_json_able_dict(tmp_path: Path) -> None:
    error = errors.DestinationExistsError("there already", path=tmp_path, hint="choose another")  # type: ignore[arg-type]
    assert error.to_dict() == {"error": "there already", "hint": "choose another", "type": "DestinationExistsError",
                               "path": str(tmp_path)}
    option = errors.MergeOptionError("bad", option="weights", value=(1.0, float("inf")))
    assert json.loads(json.dumps(option.to_dict(), allow_nan=False))["value"] == [1.0, "inf"]
    ambiguous = errors.AmbiguousReferenceError("two", reference="sha256:ab", candidates=["a==1", "b==1"])
    assert ambiguous.to_dict()["candidates"] == ["a==1", "b==1"]


# -- exit statuses of option values ----------------------------------------------------------------------

def test_option_value_mistakes_are_usage_errors(sources) -> None:
    for args in (["combine", "sql", "style", "--method", "slerp", "--name", "x"],
                 ["combine", "sql", "style", "--method", "ties", "--density", "1.5", "--name", "x"],
                 ["compress", "sql", "--rank", "0", "--name", "x"],
                 ["compress", "sql", "--rank", "2", "--dtype", "fp16", "--name", "x"],
                 ["combine", "sql", "style", "--weights", "1", "--name", "x"]):
        out = invoke(*args, code=2)
        assert "Error: " in out, args
    data = json.loads(invoke("--json", "compress", "sql", "--rank", "2", "--dtype", "fp16", "--name", "x", code=2))
    assert data["type"] == "MergeOptionError" and (data["option"], data["value"]) == ("dtype", "fp16")
    assert "float16" in data["hint"]
    run_cli("list", "x", code=1)  # nothing was registered


def test_options_are_shown_as_flags() -> None:
    from loramgr.merge.options import MergeOptions, as_flags

    recorded = MergeOptions(method="ties", density=0.5, strict=True, weights=(0.7, 0.3)).to_dict()
    assert as_flags(recorded) == ("--method ties --weights 0.7,0.3 --scale 1 --density 0.5 --majority-sign total "
                                  "--strict")
    words = shlex.split("loramgr combine a b " + as_flags(recorded) + " --name x")
    assert _parse(words[1:]).params["density"] == 0.5  # the line parses as the combine it describes


def test_choices_are_case_insensitive(sources, tmp_path: Path) -> None:
    invoke("combine", "sql", "style", "--method", "SVD", "--rank", "2", "--dtype", "Float16", "--name", "mix",
           code=0)
    invoke("export", "mix", str(tmp_path / "out"), "--format", "PEFT", code=0)
    assert (tmp_path / "out" / "adapter_config.json").is_file()


# -- settings named in errors ------------------------------------------------------------------------------

def _one_line(out: str) -> str:
    assert out.startswith("Error: ") and out.count("\n") == 1, out
    return out


def test_a_home_that_is_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "home").write_text("")
    monkeypatch.setenv("LORAMGR_HOME", str(tmp_path / "home"))
    for args in (["list"], ["show", "x"], ["env"]):
        out = _one_line(invoke(*args, code=1))
        assert f"LORAMGR_HOME {tmp_path / 'home'} is a file" in out and "point LORAMGR_HOME at a folder" in out
    monkeypatch.setenv("LORAMGR_HOME", str(tmp_path / "home" / "loramgr"))
    out = _one_line(invoke("install", str(tmp_path), code=1))
    assert f"LORAMGR_HOME {tmp_path / 'home' / 'loramgr'} is inside {tmp_path / 'home'}, which is a file" in out


def test_a_database_url_that_is_not_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAMGR_DATABASE_URL", "postgres:/me:secret@db")
    for args in (["list"], ["show", "x"], ["install", "."]):
        out = _one_line(invoke(*args, code=1))
        assert "LORAMGR_DATABASE_URL 'postgres:/me:***@db' is not a database URL" in out and "secret" not in out
    data = json.loads(invoke("--json", "list", code=1))
    assert (data["type"], data["setting"]) == ("SettingError", "LORAMGR_DATABASE_URL")


def test_a_registry_file_that_is_not_a_database_is_named(loramgr_home: Path) -> None:
    (loramgr_home / "registry.db").write_bytes(b"not a database, just text\n" * 200)
    for args in (["list"], ["show", "x"]):
        out = _one_line(invoke(*args, code=1))
        assert str(loramgr_home / "registry.db") in out and "loramgr doctor --rebuild" in out
    assert json.loads(invoke("env", "--json", code=0))["schema_status"].startswith("unreadable: ")


# -- examples and defaults in every help ------------------------------------------------------------------

def test_every_command_has_an_example_in_its_help() -> None:
    for path, _command in all_commands():
        assert EXAMPLES.get(path), f"{path} has no example in loramgr/cli/examples.py"
        help_text = invoke(*path.split()[1:], "-h", code=0)
        assert "Examples:" in help_text and EXAMPLES[path][0] in help_text, path


def _parse(words: list[str]) -> click.Context:
    """Parse a command line as click would, down to the leaf command, without running it."""
    ctx = cli.make_context("loramgr", list(words))
    group: click.Command = cli
    while isinstance(group, click.Group):
        name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert command is not None
        ctx = command.make_context(name, rest, parent=ctx)
        group = command
    return ctx


def test_every_example_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for path, _command in all_commands():
        for line in EXAMPLES.get(path, []):
            words = shlex.split(line.split(" > ")[0])
            assert words[0] == "loramgr", line
            for word in words:  # the examples' relative paths exist, for the options that require it
                if word.startswith("./"):
                    Path(word).mkdir(parents=True, exist_ok=True)
            ctx = _parse(words[1:])
            assert ctx.command.callback is not None and f" {ctx.info_name} " in f" {line} ", line


def test_defaults_are_shown() -> None:
    shown = 0
    for path, command in all_commands():
        help_text = " ".join(invoke(*path.split()[1:], "-h", code=0).split())
        for param in command.params:
            default = param.get_default(click.Context(command), call=False)
            if isinstance(param, click.Option) and isinstance(default, str | int | float | Path) \
                    and not isinstance(default, bool):
                assert f"[default: {default}]" in help_text, (path, param.name)
                shown += 1
    assert shown >= 4


# -- colour, broken pipes and the console script's exit ---------------------------------------------------

def _stderr_on_a_terminal(*args: str, env: dict[str, str]) -> str:
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*_command(), *args], stdout=subprocess.DEVNULL, stderr=follower, timeout=120,
                              env=env)
        assert done.returncode == 1
        return os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.slow
def test_errors_are_red_on_a_terminal_unless_no_color() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    coloured = _stderr_on_a_terminal("show", "nothing", env={**env, "NO_COLOR": ""})  # empty: not set
    assert "\x1b[31m" in coloured and "no adapter named 'nothing'" in coloured
    plain = _stderr_on_a_terminal("show", "nothing", env={**env, "NO_COLOR": "1"})
    assert "\x1b[" not in plain and "Error: no adapter named 'nothing'" in plain
    piped = console("show", "nothing")
    assert piped.returncode == 1 and piped.stderr.startswith("Error: no adapter") and "\x1b[" not in piped.stderr


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    many = {f"model.layers.{i}.self_attn.q_proj": (8, 8, 1) for i in range(200)}
    run_cli("install", str(write_peft_adapter(tmp_path / "many", many)), "--name", "many", "--version", "1.0.0")
    for args in (["env"], ["show", "many", "--json"]):  # flushed at exit; written past the pipe's buffer
        process = subprocess.Popen([*_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader is gone before the first line
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == BROKEN_PIPE_EXIT and stderr == "", (args, stderr)
    assert shutil.which("head") is not None
    head = subprocess.run(f"{shlex.join(_command())} show many --json | head -c 10", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert head.stdout == "{\n  \"adapt" and head.stderr == ""


@pytest.mark.slow
def test_the_console_script_ends_with_complete_output_and_the_right_status(tmp_path: Path, loramgr_home: Path) -> None:
    # only console-script runs touch this registry, so its database connections are theirs alone
    q, v, k = (f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj", "k_proj"))
    for name, modules in (("sql", {q: (16, 16, 4), v: (16, 16, 4)}), ("style", {q: (16, 16, 2), k: (16, 16, 2)})):
        folder = write_peft_adapter(tmp_path / name, modules)
        assert console("install", str(folder), "--name", name, "--version", "1.0.0").returncode == 0
    done = console("combine", "sql", "style", "--method", "svd", "--rank", "2", "--name", "mix", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["installed"]["name"] == "mix", done.stderr
    shown = console("show", "mix", "--json")  # a long output, piped: every byte arrives
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == "mix"
    assert console("show", "nothing").returncode == 1
    assert console("combine", "sql", "style", "--method", "slerp", "--name", "x").returncode == 2
    assert console("verify").returncode == 0
    tagged = console("tag", "mix", "stable")
    assert tagged.returncode == 0 and tagged.stdout == "tagged 0.1.0 as stable\n"
    # the database connections were closed: the write-ahead log was folded into registry.db, whose
    # tag a plain reader sees
    assert not (loramgr_home / "registry.db-wal").exists()
    with sqlite3.connect(loramgr_home / "registry.db") as connection:
        assert connection.execute("SELECT tag FROM tags WHERE tag = 'stable'").fetchone() == ("stable",)


def test_check_colours_warnings_only_where_colour_is_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = {"model.layers.0.self_attn.q_proj": (8, 16, 4)}
    a = write_peft_adapter(tmp_path / "a", module, base_model="base-one")
    b = write_peft_adapter(tmp_path / "b", module, base_model="base-two")
    plain = run_cli("check", str(a), str(b)).output
    assert "warning: " in plain and "adapters declare different base models" in plain and "\x1b[" not in plain
    monkeypatch.setattr("loramgr.cli.render.colour", lambda stream: True)  # a terminal, NO_COLOR unset
    coloured = run_cli("check", str(a), str(b)).output
    assert f"\x1b[33mwarning:\x1b[0m {a}, {b}: adapters declare different base models" in coloured
    assert f"\ninfo: {a}, {b}: no base model given" in coloured  # info stays plain
