"""``loramgr env``: where the registry is (home, database, schema), how big its store is, and which
optional packages are installed. Read-only; ``doctor`` is the command that repairs a registry."""

from __future__ import annotations

import click

from .render import echo_json, human_size


@click.command(name="env")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def env(as_json: bool) -> None:
    """Show the registry in use (home, database URL, schema version, store size) and the optional packages."""
    from ..environment import PACKAGES, environment

    report = environment()
    if as_json:
        echo_json(report.to_dict())
        return
    home = report.home + ("" if report.home_exists else "  (not created yet)")
    schema = f"{report.schema} ({report.schema_status})" if report.schema else report.schema_status
    lines = [
        f"loramgr   {report.version}",
        f"home      {home}",
        f"database  {report.database}",
        f"schema    {schema}",
        f"store     {report.blobs} blob(s), {human_size(report.store_size)}",
        "packages",
    ]
    width = max(map(len, PACKAGES))
    for name, version in report.packages.items():
        lines.append(f"  {name:<{width}}  {version or 'not installed':<14}  {PACKAGES[name]}")
    click.echo("\n".join(lines))


COMMANDS = [env]
