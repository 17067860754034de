"""Where loramgr keeps things: LORAMGR_HOME (default: the platform's per-user data directory).

A setting that cannot work (a home that is a file, a database URL that is not a URL) is refused here,
where it is read, with a :class:`~loramgr.errors.SettingError` that names the setting and the fix.
This module imports neither SQLAlchemy nor anything heavy: ``loramgr --version`` and ``env`` use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# SQLAlchemy's own URL shape: a dialect[+driver] name, then "://"
_URL = re.compile(r"^[\w+]+://")


def home() -> Path:
    """The loramgr home: ``$LORAMGR_HOME`` or e.g. ``~/.local/share/loramgr`` on Linux."""
    configured = os.environ.get("LORAMGR_HOME")
    if configured:
        path = Path(configured).expanduser()
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("loramgr", appauthor=False))
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        from .errors import SettingError

        setting = "LORAMGR_HOME" if configured else "the default home (LORAMGR_HOME unset)"
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise SettingError(f"{setting} {path} {where}, not a folder", setting="LORAMGR_HOME", value=str(path),
                           hint="point LORAMGR_HOME at a folder (created if missing), or move the file away")
    return path


def database_url(root: Path | None = None) -> str:
    """``$LORAMGR_DATABASE_URL`` or a SQLite file in the home."""
    configured = os.environ.get("LORAMGR_DATABASE_URL")
    if configured:
        if not _URL.match(configured):
            from .errors import SettingError

            shown = display_url(configured)
            raise SettingError(
                f"LORAMGR_DATABASE_URL {shown!r} is not a database URL", setting="LORAMGR_DATABASE_URL", value=shown,
                hint="give e.g. sqlite:////srv/loramgr/registry.db or postgresql+psycopg://user@host/db, "
                "or unset it to use registry.db in LORAMGR_HOME",
            )
        return configured
    return f"sqlite:///{(root or home()) / 'registry.db'}"


def display_url(url: str) -> str:
    """A database URL as it may be shown: its password replaced by ``***`` (as SQLAlchemy renders it)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        password = None
    if not password:  # not a URL urllib understands: mask what looks like user:password@
        return re.sub(r":[^:@/]*@", ":***@", url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[1]}"))
