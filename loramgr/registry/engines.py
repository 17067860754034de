"""The registry database through SQLAlchemy: PostgreSQL (any ``LORAMGR_DATABASE_URL``) and migrations.

The same plain SQL strings as on sqlite3 run here through ``text()``. Migrations are alembic's,
kept in ``registry_schema/migrations`` and configured here in code (users never see an alembic.ini);
:func:`upgrade` applies them once under a lock, so processes opening an empty database at once wait
while the first one migrates. Imported only when a database needs it: the default SQLite registry
at the head schema never imports SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Connection, DateTime, Engine, bindparam, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from registry_schema import HEAD_REVISION, MIGRATIONS_DIR

from ..errors import RegistryError
from .database import (
    BUSY_TIMEOUT_S,
    MIGRATION_LOCK,
    UNREACHABLE_HINT,
    Database,
    Json,
    Transaction,
    advisory_lock,
    check_revisions,
    database_error,
    sqlite_path,
)

_JSON = JSON(none_as_null=True)
_TIME = DateTime(timezone=True)


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


class _EngineTransaction(Transaction):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name

    def _run(self, sql: str, params: dict[str, Any], *, fetch: bool = True) -> list[tuple[Any, ...]]:
        statement, values = _bind(sql, params)
        result = self.connection.execute(statement, values)
        return [tuple(row) for row in result] if fetch and result.returns_rows else []

    def _run_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        statement, _ = _bind(sql, params[0])
        self.connection.execute(statement, [_bind(sql, p)[1] for p in params])


def _bind(sql: str, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``text(sql)`` with JSON and timestamp parameters typed (PostgreSQL casts an untyped one wrongly)."""
    typed: list[Any] = []
    values = {}
    for key, value in params.items():
        if isinstance(value, Json):
            typed.append(bindparam(key, type_=_JSON))
            value = value.value
        elif isinstance(value, datetime):
            typed.append(bindparam(key, type_=_TIME))
        values[key] = value
    statement = text(sql)
    return (statement.bindparams(*typed) if typed else statement), values


class EngineDatabase(Database):
    def __init__(self, engine: Engine, where: str, *, read_only: bool) -> None:
        super().__init__(where, read_only=read_only)
        self.engine = engine
        self.dialect = engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        try:
            with self.engine.begin() as connection:
                yield _EngineTransaction(connection)
        except SQLAlchemyError as exc:
            raise database_error(exc, self.where) from exc

    def close(self) -> None:
        self.engine.dispose()


def open_engine_database(url: str, where: str, *, read_only: bool = False) -> EngineDatabase:
    """A database SQLAlchemy speaks, migrated to head (or refused with one line)."""
    try:
        engine = make_engine(url, read_only=read_only)
        revisions = current_revisions(engine)
        if revisions == [HEAD_REVISION]:
            return EngineDatabase(engine, where, read_only=read_only)
        if read_only:
            with engine.connect() as connection:
                check_revisions(revisions, inspect(connection).get_table_names(), where)
            raise RegistryError(
                f"registry database {where} needs a schema upgrade, but its home is read-only", database=where,
                hint="open it once with a loramgr that may write there",
            )
        upgrade(engine, where)  # checks the schema again under the migration lock, then migrates
        return EngineDatabase(engine, where, read_only=read_only)
    except SQLAlchemyError as exc:
        raise database_error(exc, where) from exc
    except OSError as exc:
        raise RegistryError(f"registry database {where}: {exc.strerror or exc}", database=where,
                            hint=UNREACHABLE_HINT) from exc


def upgrade_database(url: str, where: str) -> None:
    """Migrate an existing SQLite file to head with alembic (sqlite3 opens it afterwards)."""
    try:
        engine = make_engine(url)
        try:
            upgrade(engine, where)
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        raise database_error(exc, where) from exc


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


def alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _script_directory() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def upgrade(engine: Engine, where: str | None = None) -> None:
    """Apply every migration up to head, once: concurrent openers wait for the lock, then find head.

    With ``where`` (the database as errors name it), the schema is read and checked under that same
    lock first: an opener that looked while another was migrating must not mistake half a schema
    for a foreign one."""
    from alembic import command

    config = alembic_config()
    with engine.begin() as connection:
        advisory_lock(_EngineTransaction(connection), MIGRATION_LOCK)
        if where is not None:
            revisions = _revisions(connection)
            if revisions == [HEAD_REVISION]:
                return
            check_revisions(revisions, inspect(connection).get_table_names(), where)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
