"""What ``loramgr env`` reports: the registry in use and the optional packages installed.

Reads, never writes: a home that does not exist is not created, and a database is only looked at.
The default SQLite database is read through the registry's own sqlite3 layer (read-only), so the report
needs neither SQLAlchemy nor torch; another database URL is asked through its SQLAlchemy helpers.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__, paths
from .store import BlobStore

#: optional packages and what each one enables (distribution name -> use)
PACKAGES = {
    "torch": "apply, fuse, hot-swap (required)",
    "peft": "apply, hotswap, PEFT checks (loramgr[peft])",
    "transformers": "apply to transformers models (loramgr[peft])",
    "diffusers": "diffusion pipelines' LoRA loading",
    "gguf": "export --format gguf / ollama",
    "psycopg": "a PostgreSQL registry (loramgr[postgres])",
    "oras": "OCI interoperability checks",
    "huggingface-hub": "hf:// installs, push to the Hub",
}


@dataclass
class Environment:
    version: str
    home: str
    home_exists: bool
    database: str  # the URL, password hidden
    schema: str | None  # the database's schema revision, None when there is no database yet
    schema_status: str  # current | needs upgrade | newer loramgr | no database yet | unreadable: ...
    blobs: int
    store_size: int
    packages: dict[str, str | None] = field(default_factory=dict)  # distribution -> version (None: absent)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"uses": dict(PACKAGES)}


def environment() -> Environment:
    """The registry at LORAMGR_HOME / LORAMGR_DATABASE_URL and the packages installed, read-only."""
    home = paths.home()
    url = paths.database_url(home)
    schema, status = _schema(url)
    blobs = list(BlobStore(home).iter_blobs()) if home.is_dir() else []
    return Environment(
        version=__version__, home=str(home), home_exists=home.is_dir(), database=paths.display_url(url),
        schema=schema, schema_status=status, blobs=len(blobs), store_size=sum(b.size for b in blobs),
        packages={name: _installed(name) for name in PACKAGES},
    )


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _schema(url: str) -> tuple[str | None, str]:
    from registry_schema import HEAD_REVISION, KNOWN_REVISIONS

    revision = _sqlite_revision(url) if url.startswith("sqlite:///") else _revision_of(url)
    if isinstance(revision, tuple):  # (None, why)
        return revision
    if revision is None:
        return None, "no database yet"
    if revision == HEAD_REVISION:
        return revision, "current"
    return revision, "needs upgrade" if revision in KNOWN_REVISIONS else "newer loramgr"


def _sqlite_revision(url: str) -> str | None | tuple[None, str]:
    from .errors import LoramgrError
    from .registry.database import SqliteDatabase, sqlite_revisions

    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        return None
    try:
        database = SqliteDatabase(path, str(path), read_only=True)
        try:
            with database.transaction() as tx:
                revisions = sqlite_revisions(tx)
        finally:
            database.close()
    except sqlite3.Error as exc:
        return None, f"unreadable: {exc}"
    except LoramgrError as exc:  # the registry's one-line database error
        return None, f"unreadable: {exc.message}"
    return revisions[0] if revisions else None


def _revision_of(url: str) -> str | None | tuple[None, str]:
    from sqlalchemy.exc import SQLAlchemyError

    from .registry.database import current_revision, database_error, make_engine

    try:
        engine = make_engine(url, read_only=True)
        try:
            revision: str | None = current_revision(engine)
            return revision
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        return None, f"unreadable: {database_error(exc, paths.display_url(url)).message}"
    except ImportError as exc:  # the database's driver is not installed
        return None, f"unreadable: {exc}"
