"""Opening the registry database: engine settings, migrations applied once under a lock, one-line errors.

SQLite (the default) runs in WAL mode with a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE``: a writer takes the write lock up front instead of upgrading a read lock later,
which in WAL mode fails at once with "database is locked" when another process committed in between.
So two processes installing at the same time queue for the lock instead of failing. A home that
cannot be written (read-only media, another user's registry) is opened read-only: ``mode=ro``, or
``immutable=1`` when no write-ahead log is pending, so reading creates no ``-wal`` / ``-shm`` file.

PostgreSQL serialises what SQLite's single writer lock serialises with advisory locks held until
commit: one per adapter name (:func:`lock_names`) for installs, removals and tags, and one for the
migrations, so processes opening an empty database at once wait while the first one migrates.

Migrations are alembic's, kept in ``registry_schema/migrations`` and configured here in code (users
never see an alembic.ini). An up-to-date database is recognised by reading ``alembic_version``
directly, so the common case does not import alembic at all.

Every database failure becomes one :class:`RegistryError` line that names the database file (or the
URL without its password) and says what to do (:func:`database_error`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from registry_schema import HEAD_REVISION, MIGRATIONS_DIR

from ..errors import RegistryError

BUSY_TIMEOUT_S = 60
_MIGRATION_LOCK = "loramgr:migrations"
REBUILD_HINT = "restore it from a backup, or move it aside and run 'loramgr doctor --rebuild'"


def describe_url(url: str) -> str:
    """What an error calls the database: its file for SQLite, else the URL without its password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if read_only and path is not None:
            pending_log = Path(f"{path}-wal").exists()
            url = f"sqlite:///file:{path}?mode=ro{'' if pending_log else '&immutable=1'}&uri=true"
        elif path is not None and not str(path).startswith("file:"):
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            if not read_only:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def current_revisions(engine: Engine) -> list[str] | None:
    """The rows of ``alembic_version`` (None when the table is missing)."""
    with engine.connect() as connection:
        return _revisions(connection)


def _revisions(connection: Connection) -> list[str] | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return [str(r) for r in connection.execute(text("SELECT version_num FROM alembic_version")).scalars()]


def current_revision(engine: Engine) -> str | None:
    revisions = current_revisions(engine)
    return revisions[0] if revisions else None


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script_directory().walk_revisions()}


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _script_directory() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config())


def advisory_key(label: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big", signed=True)


def _advisory_lock(connection: Connection | Session, label: str) -> None:
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(label)})


def lock_names(session: Session, names: Iterable[str]) -> None:
    """Hold each adapter name until the transaction ends (PostgreSQL; SQLite's writer lock already does).

    Taken in sorted order, so two transactions locking several names cannot deadlock.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    for name in sorted(set(names)):
        _advisory_lock(session, f"loramgr:adapter:{name}")


def upgrade(engine: Engine, where: str | None = None) -> None:
    """Apply every migration up to head, once: concurrent openers wait for the lock, then find head.

    With ``where`` (the database as errors name it), the schema is read and checked under that same
    lock first: an opener that looked while another was migrating must not mistake half a schema
    for a foreign one."""
    from alembic import command

    config = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            _advisory_lock(connection, _MIGRATION_LOCK)
        if where is not None:
            revisions = _revisions(connection)
            if revisions == [HEAD_REVISION]:
                return
            _check_revisions(connection, revisions, where)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _check_revisions(connection: Connection, revisions: list[str] | None, where: str) -> None:
    """Refuse a database whose ``alembic_version`` loramgr did not write (or a newer loramgr did)."""
    if revisions is None:
        tables = sorted(inspect(connection).get_table_names())
        if tables:
            raise RegistryError(
                f"registry database {where} has tables ({', '.join(tables[:4])}) but no alembic_version, so its "
                "schema is unknown", database=where, hint=REBUILD_HINT,
            )
        return
    if len(revisions) != 1:
        raise RegistryError(
            f"registry database {where} records {len(revisions)} schema revisions ({', '.join(revisions)}) "
            "where there must be exactly one", database=where, hint=REBUILD_HINT,
        )
    if revisions[0] not in known_revisions():
        raise RegistryError(
            f"registry database {where} was written by a newer loramgr (schema {revisions[0]})",
            database=where, hint="upgrade loramgr (pip install -U loramgr) to use it",
        )


def open_database(url: str, *, read_only: bool = False) -> Engine:
    """An engine on a migrated database; refuses one written by a newer loramgr or not by loramgr."""
    where = describe_url(url)
    try:
        engine = make_engine(url, read_only=read_only)
        revisions = current_revisions(engine)
        if revisions == [HEAD_REVISION]:
            return engine
        if read_only:
            with engine.connect() as connection:
                _check_revisions(connection, revisions, where)
            raise RegistryError(
                f"registry database {where} needs a schema upgrade, but its home is read-only", database=where,
                hint="open it once with a loramgr that may write there",
            )
        upgrade(engine, where)  # checks the schema again under the migration lock, then migrates
        return engine
    except SQLAlchemyError as exc:
        raise database_error(exc, where) from exc


def is_retryable(exc: BaseException) -> bool:
    """A serialisation failure or deadlock: the transaction may simply be run again."""
    code = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(getattr(exc, "orig", None), "pgcode", None)
    return code in ("40001", "40P01")


def database_error(exc: SQLAlchemyError, where: str) -> RegistryError:
    """One line for any database failure: the database, what went wrong, what to do."""
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    detail = " ".join(str(original).split("\n")[0].split()) or type(original).__name__
    lowered = detail.lower()
    if "readonly" in lowered or "read-only" in lowered or "read only" in lowered:
        hint = "the registry is read-only here: run commands that change it where it can be written"
    elif "locked" in lowered or "timeout" in lowered:
        hint = "another loramgr process holds the database; retry when it is done"
    elif any(s in lowered for s in ("malformed", "not a database", "no such table", "no such column",
                                    "does not exist", "corrupt")):
        hint = REBUILD_HINT
    elif "unable to open" in lowered or "could not connect" in lowered or "connection" in lowered:
        hint = "check LORAMGR_HOME / LORAMGR_DATABASE_URL, and that the database can be reached"
    else:
        hint = "check LORAMGR_HOME / LORAMGR_DATABASE_URL; LORAMGR_DEBUG=1 shows the full error"
    error = RegistryError(f"registry database {where}: {detail}", database=where, hint=hint)
    error.retryable = is_retryable(exc)
    return error


def home_is_writable(root: Path, url: str) -> bool:
    """Whether loramgr may write in ``root`` (and in the SQLite file, where the database is one)."""
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return False
    path = sqlite_path(url)
    return path is None or not path.exists() or os.access(path, os.W_OK)
