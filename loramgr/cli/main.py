"""The ``loramgr`` command: a click group whose commands are thin layers over the library.

Errors are translated to messages here, in one place (:meth:`LoramgrGroup.invoke`): a LoramgrError
(something the user can act on) prints one line and exits 1 (2 for a wrong option value, as click's
usage errors);
LORAMGR_DEBUG=1 shows the traceback. With ``--json`` (global, or the command's own) a failure is one
JSON object on stdout instead, ``{"error", "hint", "type", <the error's facts>}``, with the same exit
status, so a script reads one document from stdout whatever happened.

The global flags ``--json`` and ``-q/--quiet`` are kept in the context's ``meta`` (see render.py);
:func:`_prepare` gives every command its example (cli/examples.py), a ``--json`` that also follows the
global flag, and case-insensitive choices, so the command modules need no code for any of it.

Command modules import the library inside their functions, so ``loramgr --help`` and ``loramgr list``
never import torch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from .render import JSON_FLAG, QUIET_FLAG, echo_error, echo_json

#: the exit status of a run whose reader closed the pipe (as for a process ended by SIGPIPE, e.g. git)
BROKEN_PIPE_EXIT = 128 + 13


def _json_wanted(ctx: click.Context, args: list[str]) -> bool:
    """The global flag, a command's own --json, or --json among arguments not parsed yet (a usage error)."""
    if ctx.meta.get(JSON_FLAG):
        return True
    return "--json" in (args[: args.index("--")] if "--" in args else args)


class LoramgrGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from ..errors import LoramgrError

        as_json = _json_wanted(ctx, [*ctx._protected_args, *ctx.args])
        debug = bool(os.environ.get("LORAMGR_DEBUG"))
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.exceptions.Abort:
            raise
        except click.ClickException as exc:
            _report_click_error(exc, as_json or bool(ctx.meta.get(JSON_FLAG)))
            raise click.exceptions.Exit(exc.exit_code) from None
        except LoramgrError as exc:
            if debug:
                raise
            _report(exc.to_dict(), str(exc), as_json or bool(ctx.meta.get(JSON_FLAG)))
            raise click.exceptions.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # the reader went away (``loramgr list | head``): stop quietly, as git and cat do
            _silence_stdout()
            raise click.exceptions.Exit(BROKEN_PIPE_EXIT) from None
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted: nothing was registered; 'loramgr gc' removes any leftover files", err=True)
            raise click.exceptions.Exit(130) from None
        except OSError as exc:
            if debug:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            message = f"{exc.strerror or exc}{where}"
            _report({"error": exc.strerror or str(exc), "hint": None, "type": type(exc).__name__,
                     "path": exc.filename}, message, as_json or bool(ctx.meta.get(JSON_FLAG)))
            raise click.exceptions.Exit(1) from None


def _report(data: dict[str, Any], line: str, as_json: bool) -> None:
    if as_json:
        echo_json(data)
    else:
        echo_error(line)


def _report_click_error(exc: click.ClickException, as_json: bool) -> None:
    """A usage error as click words it (usage, a pointer to -h, the error), the ``Error:`` coloured."""
    ctx = getattr(exc, "ctx", None)
    help_hint = f"see '{ctx.command_path} -h'" if ctx is not None else None
    if as_json:
        param = getattr(exc, "param", None)
        echo_json({"error": exc.format_message(), "hint": help_hint, "type": type(exc).__name__,
                   "exit_code": exc.exit_code, "param": param.opts[0] if param is not None and param.opts else None})
        return
    if ctx is not None and isinstance(exc, click.UsageError):
        click.echo(f"{ctx.get_usage()}\nTry '{ctx.command_path} -h' for help.\n", err=True)
    echo_error(exc.format_message())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that no later flush (ours or the interpreter's) meets the closed pipe."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``loramgr --version``: the version and the registry in use (no SQLAlchemy, no torch)."""
    if not value or ctx.resilient_parsing:
        return
    from .. import paths
    from ..errors import LoramgrError

    try:
        where = f"home {paths.home()}, database {paths.display_url(paths.database_url())}"
    except LoramgrError as exc:
        where = f"registry not usable: {exc}"
    click.echo(f"loramgr {__version__} ({where})")
    ctx.exit()


def _set_flag(key: str) -> Callable[[click.Context, click.Parameter, bool], bool]:
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.meta[key] = True
        return bool(value or ctx.meta.get(key))

    return callback


@click.group(cls=LoramgrGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--json", "as_json", is_flag=True, is_eager=True, expose_value=False, callback=_set_flag(JSON_FLAG),
              help="Print results and errors as JSON on stdout (same as each command's --json).")
@click.option("-q", "--quiet", is_flag=True, is_eager=True, expose_value=False, callback=_set_flag(QUIET_FLAG),
              help="No progress bars and no warnings; results and errors are still printed.")
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_show_version,
              help="Show the version and the registry in use (home, database), and exit.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """loramgr: a package manager for LoRA adapters.

    Install adapters into a local versioned registry, check them, combine and compress them exactly,
    and load them into models. Data lives in LORAMGR_HOME (default: your user data directory);
    'loramgr env' shows where.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _help_when_bare(callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        if ctx.invoked_subcommand is None:
            click.echo(ctx.get_help())
            return None
        return callback(*args, **kwargs)

    return run


def _json_fallback(callback: Callable[..., Any]) -> Callable[..., Any]:
    """For a command with no JSON form of its own: with --json, what it prints, line by line, under
    ``"output"`` (or the JSON-able value it returns)."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        if not ctx.meta.get(JSON_FLAG):
            return callback(*args, **kwargs)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            value = callback(*args, **kwargs)
        echo_json({"output": captured.getvalue().splitlines()} if value is None else value)
        return None

    return run


def _prepare(command: click.Command, path: str) -> None:
    """Give ``command`` (and each subcommand) its example, a --json, and case-insensitive choices."""
    from .examples import epilog

    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            _prepare(sub, f"{path} {name}")
        command.epilog = command.epilog or epilog(path)
        # a group alone prints its help and succeeds, as loramgr alone does
        command.no_args_is_help = False
        command.invoke_without_command = True
        if command.callback is not None:
            command.callback = _help_when_bare(command.callback)
        return
    command.epilog = command.epilog or epilog(path)
    own_json = False
    for param in command.params:
        if isinstance(param.type, click.Choice):
            param.type.case_sensitive = False  # --format PEFT, --engine VLLM: names, not values
        if isinstance(param, click.Option) and "--json" in param.opts:
            own_json = True
            param.callback = _set_flag(JSON_FLAG)
    if not own_json and command.callback is not None:
        command.params.append(click.Option(
            ["--json"], is_flag=True, is_eager=True, expose_value=False, callback=_set_flag(JSON_FLAG),
            help='Print the result as JSON: the lines this command prints, under "output".'))
        command.callback = _json_fallback(command.callback)


def _register() -> None:
    from . import (
        base_cmd,
        check_cmd,
        convert_cmds,
        demo_cmd,
        diffusion_cmds,
        env_cmd,
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
    for command in env_cmd.COMMANDS:
        cli.add_command(command)
    for name, command in cli.commands.items():
        _prepare(command, f"loramgr {name}")


_register()


def main() -> None:
    """The console script: run one command, then end the process at once.

    A command's writes have committed and its files and locks are closed when it returns. Then, as
    the interpreter would, this waits for other threads, runs the exit handlers, closes the SQLite
    connections and flushes stdout and stderr, and ends the process with ``os._exit`` and the
    command's status: skipping the teardown of torch's and SQLAlchemy's modules saves a fifth to a
    quarter of a short command's CPU. Only here: CliRunner and the Python API never end the process.
    """
    sys.addaudithook(_track_sqlite)
    if not os.environ.get("LORAMGR_DEBUG"):
        # huggingface_hub logs retries and pattern misses to stderr; loramgr reports outcomes itself
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        cli.main(prog_name="loramgr")
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc)
    _end(code)


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    click.echo(str(exc.code), err=True)  # what sys.exit("message") prints
    return 1


def _end(code: int) -> None:
    import atexit
    import threading

    for thread in threading.enumerate():  # the interpreter waits for these too before it exits
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging, temporary folders (weakref.finalize) and other exit handlers
    _close_databases()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            _silence_stdout()
            code = code or BROKEN_PIPE_EXIT
        except (OSError, ValueError):
            code = code or 1
    os._exit(code)


#: SQLite connections opened during this run, closed before the process ends (see _track_sqlite)
_SQLITE_CONNECTIONS: list[Any] = []


def _track_sqlite(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: Python announces every new sqlite3 connection as ``sqlite3.connect/handle``."""
    if event == "sqlite3.connect/handle":
        _SQLITE_CONNECTIONS.append(args[0])


def _close_databases() -> None:
    """Close the SQLite connections still open, as the interpreter's teardown would: the last one to
    close checkpoints the write-ahead log into registry.db. Every transaction has committed by now (a
    command's writes end with their session), and a PostgreSQL server sees its connections end as it
    does for any client that exits."""
    for connection in _SQLITE_CONNECTIONS:
        with contextlib.suppress(Exception):  # closed already, or owned by another thread: nothing to do
            connection.close()
    _SQLITE_CONNECTIONS.clear()


if __name__ == "__main__":
    main()
