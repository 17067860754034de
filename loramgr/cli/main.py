"""The ``loramgr`` command: a click group whose commands are thin layers over the library.

Errors are translated to messages here, in one place: a LoramgrError (something the user can act on)
prints one line and exits 1; click's usage errors exit 2; LORAMGR_DEBUG=1 shows the traceback.
Command modules import the library inside their functions, so ``loramgr --help`` and ``loramgr list``
never import torch.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .. import __version__


class LoramgrGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from ..errors import LoramgrError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except LoramgrError as exc:
            if os.environ.get("LORAMGR_DEBUG"):
                raise
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            if os.environ.get("LORAMGR_DEBUG"):
                raise
            click.echo("interrupted: nothing was registered; 'loramgr gc' removes any leftover files", err=True)
            sys.exit(130)
        except OSError as exc:
            if os.environ.get("LORAMGR_DEBUG"):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None


@click.group(cls=LoramgrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loramgr")
def cli() -> None:
    """loramgr: a package manager for LoRA adapters.

    Install adapters into a local versioned registry, check them, combine and compress them exactly,
    and load them into models. Data lives in LORAMGR_HOME (default: your user data directory).
    """


def _register() -> None:
    from . import (
        base_cmd,
        check_cmd,
        convert_cmds,
        demo_cmd,
        diffusion_cmds,
        hub_cmds,
        merge_cmds,
        oci_cmds,
        registry_cmds,
        serve_cmds,
    )

    for module in (registry_cmds, merge_cmds, base_cmd, check_cmd, hub_cmds, oci_cmds, serve_cmds, diffusion_cmds,
                   demo_cmd, convert_cmds):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    if not os.environ.get("LORAMGR_DEBUG"):
        # huggingface_hub logs retries and pattern misses to stderr; loramgr reports outcomes itself
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    cli(prog_name="loramgr")


if __name__ == "__main__":
    main()
