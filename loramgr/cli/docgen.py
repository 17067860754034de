"""Generate docs/cli.md from the click commands themselves: ``python -m loramgr.cli.docgen > docs/cli.md``.

A test regenerates it and fails when the file is stale or a command has no help text.
"""

from __future__ import annotations

import click

from .main import cli


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name in sorted(group.commands):
        command = group.commands[name]
        found.append((f"{prefix} {name}", command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, f"{prefix} {name}"))
    return found


def all_commands() -> list[tuple[str, click.Command]]:
    return _commands(cli, "loramgr")


def render() -> str:
    parts = [
        "# CLI reference",
        "",
        "Generated from the commands by `python -m loramgr.cli.docgen > docs/cli.md`; do not edit by hand.",
        "",
        "The global flags go before the command (`loramgr --json list`); every command also takes its own",
        "`--json`. With `--json`, a failure prints one JSON object on stdout, `{\"error\", \"hint\", \"type\", ...}`",
        "with the facts of the error, and exits with the same status as without it: 0 success, 1 a failure",
        "you can act on, 2 a usage error (an unknown option, a wrong option value).",
        "",
    ]
    for path, command in [("loramgr", cli), *all_commands()]:
        with click.Context(command, info_name=path, max_content_width=100, terminal_width=100,
                           help_option_names=["-h", "--help"], show_default=True) as ctx:
            help_text = command.get_help(ctx)
        parts += [f"## `{path}`", "", "```", help_text.rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    click.echo(render(), nl=False)
