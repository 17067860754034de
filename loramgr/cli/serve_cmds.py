"""Serving commands: ``deploy`` (a cache folder an engine reads) and ``push-to-server`` (runtime loads)."""

from __future__ import annotations

import click

from .registry_cmds import open_registry
from .render import echo_json


@click.command(name="deploy")
@click.argument("engine", type=click.Choice(["vllm", "sglang", "tgi", "lorax"]))
@click.argument("args", nargs=-1)
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="The folder to deploy into (else the first argument is the folder).")
@click.option("--served-model", help="The name the engine serves the base model under (vllm: required); written "
              "as base_model_name_or_path.")
@click.option("--lock", "lock", type=click.Path(exists=True, dir_okay=False),
              help="Deploy exactly the versions of this loramgr.lock.")
@click.option("--keep", is_flag=True, help="Keep adapters deployed earlier that are not in this set.")
@click.option("--base", help="Also check modules and shapes against this base model (registered name or path).")
@click.option("--max-lora-rank", type=int, help="vllm: the server's --max-lora-rank (default: vLLM's largest).")
@click.option("--json", "as_json", is_flag=True, help="Print what was deployed as JSON.")
def deploy_cmd(engine: str, args: tuple[str, ...], directory: str | None, served_model: str | None, lock: str | None,
               keep: bool, base: str | None, max_lora_rank: int | None, as_json: bool) -> None:
    """Deploy adapter versions as name@version folders for a serving engine, after its compatibility check.

    The folder is a cache: unchanged adapters are not rewritten, adapters no longer listed are removed
    (unless --keep). Prints the flags or environment that serve the folder.
    """
    from ..serve.deploy import deploy

    references = list(args)
    if directory is None:
        if not references:
            raise click.UsageError("give the folder to deploy into (first argument or --dir)")
        directory = references.pop(0)
    report = deploy(open_registry(), engine, references, directory, served_model=served_model, lock=lock, keep=keep,
                    base=base, max_lora_rank=max_lora_rank)
    if as_json:
        echo_json({
            "engine": engine, "directory": str(report.directory), "removed": report.removed,
            "adapters": [{"name": a.name, "digest": a.digest, "path": str(a.path), "lora_int_id": a.lora_int_id,
                          "written": a.written} for a in report.adapters],
            "launch": report.launch(),
        })
        return
    for finding in report.warnings:
        click.echo(str(finding))
    unchanged = len(report.adapters) - len(report.written)
    click.echo(f"deployed {len(report.adapters)} adapter(s) to {report.directory} for {engine}: "
               f"{len(report.written)} written, {unchanged} unchanged, {len(report.removed)} removed")
    for line in report.launch():
        click.echo(line)


@click.command(name="push-to-server")
@click.argument("url")
@click.argument("references", nargs=-1, required=True)
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), default="vllm", show_default=True,
              help="The server's engine (its load / unload endpoints).")
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="A folder the server can read, to deploy into first (default: under LORAMGR_HOME).")
@click.option("--served-model", help="The served base model's name (default: asked from vLLM's /v1/models).")
@click.option("--unload", is_flag=True, help="Unload these versions instead.")
def push_cmd(url: str, references: tuple[str, ...], engine: str, directory: str | None, served_model: str | None,
             unload: bool) -> None:
    """Load adapter versions into a running vLLM or SGLang server as name@version (or unload them)."""
    from ..serve.push import push_to_server

    results = push_to_server(open_registry(), url, list(references), engine=engine, directory=directory,
                             served_model=served_model, unload=unload)
    for result in results:
        click.echo(f"{result.action} {result.name}" + (f" from {result.path}" if result.path else ""))


COMMANDS = [deploy_cmd, push_cmd]
