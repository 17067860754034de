"""``loramgr check``: does an adapter fit a base model and a serving engine?

Parses arguments, makes one library call (:func:`loramgr.compat.check.check`, also ``loramgr.check``)
and prints the findings; exit 1 when any is an error, 2 for a malformed ``--engine``.
"""

from __future__ import annotations

import dataclasses

import click

from .render import echo_finding, echo_json


@click.command(name="check")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", "base", help="Base model: a registered name (see 'loramgr base list') or a path.")
@click.option("--engine", help="Serving engine rules: vllm[:max-rank=N], lorax, tgi, llama.cpp or peft.")
@click.option("--values", is_flag=True, help="Also read the tensors: NaN / Inf and all-zero ΔW.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(adapters: tuple[str, ...], base: str | None, engine: str | None, values: bool, as_json: bool) -> None:
    """Check adapters (references or paths) against a base model, each other and an engine."""
    from ..compat.check import check as run_check
    from ..errors import EngineSpecError

    try:
        report = run_check(list(adapters), base=base, engine=engine, values=values)
    except EngineSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--engine") from None
    if as_json:
        echo_json([dataclasses.asdict(f) for f in report.findings])
    else:
        for finding in report.findings:
            echo_finding(finding.severity, str(finding).removeprefix(f"{finding.severity}: "))
        n_errors = len(report.errors)
        verdict = f"{n_errors} error(s)" if n_errors else "ok"
        engine_note = f", engine {report.engine}" if report.engine else ""
        click.echo(f"{verdict}: {len(adapters)} adapter(s){engine_note}")
    if report.errors:
        raise SystemExit(1)


COMMANDS = [check]
