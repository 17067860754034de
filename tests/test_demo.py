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
