"""The CLI reference in docs/ is generated from the commands; every command explains itself."""

from __future__ import annotations

from pathlib import Path

from loramgr.cli.docgen import all_commands, render

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, command in all_commands():
        if not (command.help or "").strip():
            missing.append(path)
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option" and not (param.help or "").strip():
                missing.append(f"{path} {param.opts[0]}")
    assert not missing, f"commands or options without help text: {missing}"


def test_cli_reference_is_up_to_date() -> None:
    assert DOCS.read_text(encoding="utf-8") == render(), "run: python -m loramgr.cli.docgen > docs/cli.md"
