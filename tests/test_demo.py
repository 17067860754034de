"""The README's first command: `loramgr demo` runs the main job end to end."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loramgr.cli.main import cli
from loramgr.demo import run
from loramgr.registry import Registry

pytestmark = pytest.mark.slow  # subprocesses and servers: outside the everyday loop


def test_demo_installs_combines_compresses_and_loads(tmp_path) -> None:
    lines: list[str] = []
    result = run(tmp_path / "home", echo=lines.append)
    # the PEFT-loaded combination equals W + ΔW computed independently by fusing
    assert result.exact_max_error < 1e-5
    # 99% energy per module keeps the compressed adapter's effect close to the exact one
    assert result.compressed_relative_error < 0.15
    registry = Registry.open(tmp_path / "home")
    names = {(v.name, v.version) for v in registry.list_versions()}
    expected = {"sql-skill", "chat-style", "sql-chat", "sql-chat-small", "sql-chat-ties"}
    assert names == {(name, "1.0.0") for name in expected}
    shown = registry.show("sql-chat")
    assert [(p.name, p.weight) for p in shown.parents] == [("sql-skill", 0.7), ("chat-style", 0.3)]
    # the core-space step: recorded as such, an exact LoRA (nothing lost to a re-rank)
    ties = registry.show("sql-chat-ties").recipe or {}
    assert ties["options"]["space"] == "core" and ties["options"]["density"] == 0.3
    assert all(module["kept_energy"] == 1.0 for module in ties["report"])
    assert any(line.startswith("5. combined them with TIES (density 0.3) in core space") for line in lines)
    assert any(line.startswith("6. loaded sql-chat") for line in lines)


def test_demo_command_exits_zero(tmp_path) -> None:
    outcome = CliRunner().invoke(cli, ["demo", "--home", str(tmp_path / "h")])
    assert outcome.exit_code == 0, outcome.output
    assert "combined 0.7 x sql-skill + 0.3 x chat-style exactly" in outcome.output


def test_demo_on_a_registry_that_holds_its_adapters_refuses_before_writing(tmp_path) -> None:
    """A second run on the same --home: one line, before anything is built or stored, the registry as it was."""
    import json
    import os
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join(sys.path)}
    started = time.monotonic()
    first = subprocess.run(["loramgr", "demo", "--home", str(home)], capture_output=True, text=True, env=env)
    wall = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    # the reported times are the demo's steps and the whole process: neither exceeds the wall time seen here
    done = first.stdout.splitlines()[-1]
    steps = float(done.split("the steps took ")[1].split(" s")[0])
    process = float(done.split(", ")[1].split(" s since the process started")[0])
    assert 0 < steps <= process <= wall + 0.1, done
    # the training runs' folders are gone; only the registry the user asked for stays
    assert [p.name for p in temp.iterdir() if p.name.startswith("loramgr")] == []
    listed = subprocess.run(["loramgr", "list", "--json"], capture_output=True, text=True,
                            env={**env, "LORAMGR_HOME": str(home)})
    before = json.loads(listed.stdout)
    again = subprocess.run(["loramgr", "demo", "--home", str(home)], capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"Error: {home} already holds the demo's adapters (chat-style, sql-chat, sql-chat-small, sql-chat-ties, "
        "sql-skill): run 'loramgr demo' without --home (a new temporary registry), or give a new folder"]
    assert "1. built" not in again.stdout
    after = subprocess.run(["loramgr", "list", "--json"], capture_output=True, text=True,
                           env={**env, "LORAMGR_HOME": str(home)})
    assert json.loads(after.stdout) == before
    assert [p.name for p in temp.iterdir() if p.name.startswith("loramgr")] == []
