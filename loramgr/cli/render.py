"""Terminal rendering shared by the commands: sizes, tables, JSON, errors and warnings, progress bars.

The global flags ``loramgr --json`` and ``loramgr -q`` are kept in the click context's ``meta`` (shared
by every command's context) and read here, so a command needs no parameter for them. Colour marks
errors (red) and warnings (yellow) only, only on a terminal, and never when NO_COLOR is set.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click


def human_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


JSON_FLAG = "loramgr.json"
QUIET_FLAG = "loramgr.quiet"


def global_flag(key: str) -> bool:
    """Whether a global flag (:data:`JSON_FLAG`, :data:`QUIET_FLAG`) was given to this run."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(key))


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def colour(stream: Any) -> bool:
    """Colour on ``stream``: a terminal, and NO_COLOR unset or empty (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def echo_error(message: str) -> None:
    """``Error: message`` on stderr, the ``Error:`` in red on a terminal."""
    stream = sys.stderr
    click.echo(f"{click.style('Error:', fg='red', bold=True)} {message}", file=stream, color=colour(stream))


def echo_warning(message: str, *, label: str = "warning") -> None:
    """``  label: message`` on stdout, the label in yellow on a terminal; silent with ``loramgr -q``."""
    if global_flag(QUIET_FLAG):
        return
    stream = sys.stdout
    click.echo(f"  {click.style(label + ':', fg='yellow')} {message}", file=stream, color=colour(stream))


#: the colour of a finding's severity (``check``): errors red, warnings yellow, the rest plain
SEVERITY_COLOURS = {"error": "red", "warning": "yellow"}


def echo_finding(severity: str, message: str) -> None:
    """``severity: message`` on stdout (a ``check`` finding), the severity coloured on a terminal."""
    stream = sys.stdout
    fg = SEVERITY_COLOURS.get(severity)
    label = click.style(f"{severity}:", fg=fg) if fg else f"{severity}:"
    click.echo(f"{label} {message}", file=stream, color=colour(stream))


@contextmanager
def progress_bars(
    *, modules: str | None = None, quiet: bool = False
) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress callback drawing tqdm bars on stderr, on a terminal only (never with ``quiet`` or
    ``loramgr -q``).

    By default one bar per label counts bytes, for files large enough to wait on. With ``modules``
    (the bar's title, e.g. "merging"), the calls are a merge's ``(module, done, total)``: one bar
    counts modules, names the module just done and shows the time left.
    """
    if quiet or global_flag(QUIET_FLAG) or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if total < 64 * 1024 * 1024 and label not in bars:
            return
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False)
        bar.update(done - bar.n)

    def update_modules(module: str, done: int, total: int) -> None:
        bar = bars.get("modules")
        if bar is None:
            bar = bars["modules"] = tqdm(total=total, desc=modules, unit="module", leave=False, file=sys.stderr)
        bar.set_postfix_str(module, refresh=False)
        bar.update(done - bar.n)

    try:
        yield update_modules if modules else update
    finally:
        for bar in bars.values():
            bar.close()
