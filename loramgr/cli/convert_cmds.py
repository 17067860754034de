"""``loramgr convert-init``: a PiSSA / OLoRA / CorDA / LoRA-GA adapter as the plain LoRA it is on the original base.

Parses arguments, makes one library call (:func:`loramgr.formats.initmethods.convert_init`) and says
what it wrote.
"""

from __future__ import annotations

import click


@click.command(name="convert-init")
@click.argument("adapter")
@click.option("--initial", required=True, metavar="FOLDER|REF",
              help="The adapter PEFT saved before training (peft_model.save_pretrained right after get_peft_model).")
@click.option("--output", "-o", required=True, type=click.Path(), help="New folder for the converted PEFT adapter.")
def convert_init(adapter: str, initial: str, output: str) -> None:
    """Convert an adapter initialised by a method that changed the base (PiSSA, OLoRA, CorDA, LoRA-GA) into
    a plain LoRA of twice the rank that applies to the original base, as PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) does. ADAPTER is a folder or a reference."""
    from ..formats.initmethods import convert_init as run_convert

    folder = run_convert(adapter, initial, output)
    click.echo(f"wrote {folder}: plain LoRA on the original base; install it with 'loramgr install {folder}'")


COMMANDS = [convert_init]
