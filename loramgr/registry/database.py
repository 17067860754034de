"""Opening the registry database: engine settings, and migrations applied on open.

SQLite (the default) runs in WAL mode with a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE``: a writer takes the write lock up front instead of upgrading a read lock later,
which in WAL mode fails at once with "database is locked" when another process committed in between.
So two processes installing at the same time queue for the lock instead of failing.

Migrations are alembic's, kept in ``registry_schema/migrations`` and configured here in code (users
never see an alembic.ini). An up-to-date database is recognised by reading ``alembic_version``
directly, so the common case does not import alembic at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from registry_schema import HEAD_REVISION, MIGRATIONS_DIR

from ..errors import RegistryError

BUSY_TIMEOUT_S = 60


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = make_url(url).database  # None or "" for sqlite:// (in memory)
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


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


def upgrade(engine: Engine) -> None:
    """Apply every migration up to head."""
    from alembic import command

    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str) -> Engine:
    """An engine on a migrated database; refuses one written by a newer loramgr."""
    try:
        engine = make_engine(url)
        revision = current_revision(engine)
        if revision == HEAD_REVISION:
            return engine
        if revision is not None and revision not in known_revisions():
            raise RegistryError(
                f"the registry at {engine.url.render_as_string(hide_password=True)} was written by a newer "
                f"loramgr (schema {revision})",
                hint="upgrade loramgr (pip install -U loramgr) to use it",
            )
        upgrade(engine)
        return engine
    except OperationalError as exc:
        raise RegistryError(
            f"cannot open the registry database ({exc.orig})",
            hint="check LORAMGR_HOME / LORAMGR_DATABASE_URL and that the location is writable",
        ) from exc
    except SQLAlchemyError as exc:
        raise RegistryError(f"registry database error: {exc}") from exc
