"""Where loramgr keeps things: LORAMGR_HOME (default: the platform's per-user data directory)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The loramgr home: ``$LORAMGR_HOME`` or e.g. ``~/.local/share/loramgr`` on Linux."""
    configured = os.environ.get("LORAMGR_HOME")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("loramgr", appauthor=False))


def database_url(root: Path | None = None) -> str:
    """``$LORAMGR_DATABASE_URL`` or a SQLite file in the home."""
    configured = os.environ.get("LORAMGR_DATABASE_URL")
    if configured:
        return configured
    return f"sqlite:///{(root or home()) / 'registry.db'}"
