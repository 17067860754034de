"""``loramgr check``: does an adapter fit a base model and a serving engine?

Parses arguments, makes the library calls (:func:`loramgr.compat.check.check_adapters`) and prints the
findings; exit 1 when any is an error, 2 for a malformed ``--engine``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import click

from .render import echo_json


def _load_adapter(source: str, registry: Any) -> tuple[Any, Any]:
    """(LoraAdapter, its recorded base fingerprint or None) for a path or a registry reference."""
    if os.path.exists(source):
        from ..api import load

        return load(Path(source)), None
    adapter = registry().open_adapter(source)
    base_of = getattr(registry(), "base_of", None)  # registry API for linked base models, when present
    return adapter, base_of(source) if base_of else None


def _load_base(spec: str, registry: Any) -> Any:
    """A base fingerprint from a path (read now, headers only) or a registered base model's name."""
    if os.path.exists(spec):
        from ..compat.basemodel import fingerprint_base_model

        return fingerprint_base_model(spec)
    get_base = getattr(registry(), "get_base", None)
    if get_base is None:
        from ..errors import LoramgrError

        raise LoramgrError(f"no file or folder {spec!r}, and this registry has no base models",
                           hint="pass the base model's path")
    return get_base(spec)


@click.command(name="check")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--base", "base", help="Base model: a registered name (see 'loramgr base list') or a path.")
@click.option("--engine", help="Serving engine rules: vllm[:max-rank=N], lorax, tgi, llama.cpp or peft.")
@click.option("--values", is_flag=True, help="Also read the tensors: NaN / Inf and all-zero ΔW.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(adapters: tuple[str, ...], base: str | None, engine: str | None, values: bool, as_json: bool) -> None:
    """Check adapters (references or paths) against a base model, each other and an engine."""
    from ..compat.check import check_adapters, parse_engine, safetensors_reader
    from ..errors import LoramgrError

    try:
        engine_spec = parse_engine(engine) if engine else None
    except LoramgrError as exc:
        raise click.BadParameter(str(exc), param_hint="--engine") from None

    opened: dict[str, Any] = {}

    def registry() -> Any:
        if "registry" not in opened:
            from ..registry import Registry

            opened["registry"] = Registry.open()
        return opened["registry"]

    loaded = [_load_adapter(source, registry) for source in adapters]
    base_fp = _load_base(base, registry) if base else None
    linked = [b for _, b in loaded]
    if base_fp is None and linked and all(b is not None for b in linked) and len({b.structural for b in linked}) == 1:
        base_fp = linked[0]  # every adapter was installed for the same registered base: check against it
    reader = safetensors_reader([str(a.weights_path) for a, _ in loaded]) if values else None
    findings = check_adapters(
        [a.info for a, _ in loaded],
        base=base_fp,
        engine=engine_spec,
        labels=list(adapters),
        adapter_bases=[b for _, b in loaded],
        tensor_reader=reader,
    )
    n_errors = sum(f.severity == "error" for f in findings)
    if as_json:
        echo_json([dataclasses.asdict(f) for f in findings])
    else:
        for finding in findings:
            click.echo(str(finding))
        verdict = f"{n_errors} error(s)" if n_errors else "ok"
        click.echo(f"{verdict}: {len(adapters)} adapter(s)" + (f", engine {engine_spec}" if engine_spec else ""))
    if n_errors:
        raise SystemExit(1)


COMMANDS = [check]
