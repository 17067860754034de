"""The registry database: opening it once, and running plain SQL on it in transactions.

Every query of the registry is a plain SQL string with ``:name`` parameters, run through a
:class:`Transaction`. The default SQLite registry at the current schema is spoken to with the
standard library's ``sqlite3``, so everyday commands do not import SQLAlchemy (about half a second
of start-up); any other database URL (PostgreSQL), and any SQLite database that must be migrated,
goes through SQLAlchemy and alembic (:mod:`loramgr.registry.engines`), which accept the same
strings. A list or tuple parameter is expanded for ``IN (:ids)``.

SQLite runs in WAL mode with a busy timeout, and every transaction starts with ``BEGIN IMMEDIATE``:
a writer takes the write lock up front instead of upgrading a read lock later, which in WAL mode
fails at once with "database is locked" when another process committed in between. So two
processes installing at the same time queue for the lock instead of failing. A home that cannot be
written (read-only media, another user's registry) is opened read-only: ``mode=ro``, or
``immutable=1`` when no write-ahead log is pending, so reading creates no ``-wal`` / ``-shm`` file.

A new SQLite database gets the head schema in one transaction from
:mod:`registry_schema.sqlite_head` (what the migrations produce, checked by a test); alembic runs
only to upgrade an older database. PostgreSQL serialises what SQLite's single writer lock
serialises with advisory locks held until commit: one per adapter name (:func:`lock_names`) for
installs, removals and tags, and one for the migrations.

Every database failure becomes one :class:`RegistryError` line that names the database file (or the
URL without its password) and says what to do (:func:`database_error`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from registry_schema import HEAD_REVISION

from ..errors import RegistryError

BUSY_TIMEOUT_S = 60
MIGRATION_LOCK = "loramgr:migrations"
UNREACHABLE_HINT = "check LORAMGR_HOME / LORAMGR_DATABASE_URL, and that the database can be reached"
REBUILD_HINT = "restore it from a backup, or move it aside and run 'loramgr doctor --rebuild'"

#: sqlite:///relative.db, sqlite:////absolute.db, sqlite:// (in memory); a query string (driver options)
#: is left to SQLAlchemy
_SQLITE_URL = re.compile(r"^sqlite(?:\+pysqlite)?://(?:/(?P<path>[^?]*))?$")
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores a DateTime in SQLite, kept for old rows


class Json:
    """A parameter bound to a JSON column (None is SQL NULL)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def load_json(value: Any) -> Any:
    """A JSON column as read: SQLite gives its text, PostgreSQL the decoded value."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def load_time(value: Any) -> datetime:
    """A DateTime column as read: SQLite gives its text, PostgreSQL a datetime."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def time_to_seconds(value: Any) -> str:
    """A DateTime column as ISO 8601 to the second (``list`` prints 100,000 of them)."""
    if isinstance(value, str) and len(value) >= 19:
        return value[:10] + "T" + value[11:19]  # SQLite's text is 'YYYY-MM-DD HH:MM:SS.ffffff', no zone
    return load_time(value).isoformat(timespec="seconds")


def is_plain_sqlite(url: str) -> bool:
    """A SQLite URL that the standard library's sqlite3 opens as is."""
    return _SQLITE_URL.match(url) is not None


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database or one in memory)."""
    if url.startswith("sqlite") and "?" in url:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
            return None
        return Path(parsed.database)
    match = _SQLITE_URL.match(url)
    path = match.group("path") if match else None
    return Path(path) if path and path != ":memory:" else None


def describe_url(url: str) -> str:
    """What an error calls the database: its file for SQLite, else the URL without its password."""
    if is_plain_sqlite(url):
        return str(sqlite_path(url) or ":memory:")
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return parsed.render_as_string(hide_password=True)


# -- running SQL -----------------------------------------------------------------------------------


def expand(sql: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Spell out list parameters (``IN (:ids)``) as one parameter per item, for both drivers."""
    lists = [key for key, value in params.items() if isinstance(value, list | tuple | set | frozenset)]
    if not lists:
        return sql, params
    params = dict(params)
    for key in lists:
        items = list(params.pop(key))
        names = [f"{key}_{i}" for i in range(len(items))]
        params.update(zip(names, items))
        # an empty list matches nothing (and NOT IN matches everything), as SQLAlchemy renders it
        spelled = ", ".join(f":{n}" for n in names) if names else "SELECT NULL WHERE 1 = 0"
        sql = re.sub(rf":{key}\b", spelled, sql)
    return sql, params


class Transaction:
    """One transaction: plain SQL with ``:name`` parameters; rows come back as tuples."""

    dialect = "sqlite"

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return self._run(*expand(sql, params))

    def first(self, sql: str, **params: Any) -> tuple[Any, ...] | None:
        rows = self.rows(sql, **params)
        return rows[0] if rows else None

    def value(self, sql: str, **params: Any) -> Any:
        row = self.first(sql, **params)
        return row[0] if row is not None else None

    def execute(self, sql: str, **params: Any) -> None:
        self._run(*expand(sql, params), fetch=False)

    def execute_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        if params:
            self._run_many(sql, params)

    def _run(self, sql: str, params: dict[str, Any], *, fetch: bool = True) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _run_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        raise NotImplementedError


class Database:
    """An open registry database: :meth:`transaction` runs plain SQL in one transaction."""

    dialect = "sqlite"

    def __init__(self, where: str, *, read_only: bool) -> None:
        self.where = where
        self.read_only = read_only

    def transaction(self) -> Any:  # a context manager yielding a Transaction
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _SqliteTransaction(Transaction):
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor

    def _run(self, sql: str, params: dict[str, Any], *, fetch: bool = True) -> list[tuple[Any, ...]]:
        self.cursor.execute(sql, {k: _sqlite_value(v) for k, v in params.items()})
        return self.cursor.fetchall() if fetch else []

    def _run_many(self, sql: str, params: Sequence[dict[str, Any]]) -> None:
        self.cursor.executemany(sql, [{k: _sqlite_value(v) for k, v in p.items()} for p in params])


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, Json):
        return None if value.value is None else json.dumps(value.value)
    if isinstance(value, datetime):
        return value.strftime(_SQLITE_TIME)
    return value


class SqliteDatabase(Database):
    """A SQLite file (or memory) through the standard library: one connection, one transaction at a time."""

    def __init__(self, path: Path | None, where: str, *, read_only: bool) -> None:
        super().__init__(where, read_only=read_only)
        self.path = path
        if path is None:
            target, uri = ":memory:", False
        elif read_only:
            pending_log = Path(f"{path}-wal").exists()
            target, uri = f"file:{path}?mode=ro{'' if pending_log else '&immutable=1'}", True
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(path), False
        # one connection for the process, its transactions taken in turn (SQLite has one writer anyway)
        self._connection = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
        self._lock = threading.RLock()
        try:
            if not read_only:
                self._connection.execute("PRAGMA journal_mode=WAL")
                self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            self._connection.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error:
            self._connection.close()
            raise

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            cursor = self._connection.cursor()
            try:
                cursor.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
                try:
                    yield _SqliteTransaction(cursor)
                except BaseException:
                    if self._connection.in_transaction:
                        self._connection.rollback()
                    raise
                cursor.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._connection.in_transaction:
                    self._connection.rollback()
                raise database_error(exc, self.where) from exc
            finally:
                cursor.close()

    def close(self) -> None:
        self._connection.close()


# -- opening ---------------------------------------------------------------------------------------


def open_database(url: str, *, read_only: bool = False) -> Database:
    """The database at ``url``, at the head schema; refuses one written by a newer loramgr or not by loramgr.

    A plain SQLite URL is opened with sqlite3: created at the head schema when it is new, migrated
    through alembic only when it is older. Any other URL is opened through SQLAlchemy."""
    where = describe_url(url)
    if not is_plain_sqlite(url):
        from .engines import open_engine_database

        return open_engine_database(url, where, read_only=read_only)
    path = sqlite_path(url)
    try:
        database = SqliteDatabase(path, where, read_only=read_only)
    except sqlite3.Error as exc:
        raise database_error(exc, where) from exc
    except OSError as exc:  # the folder for the file cannot be made
        raise RegistryError(f"registry database {where}: {exc.strerror or exc}", database=where,
                            hint=UNREACHABLE_HINT) from exc
    try:
        with database.transaction() as tx:
            revisions = sqlite_revisions(tx)
            if revisions == [HEAD_REVISION]:
                return database
            tables = sqlite_tables(tx)
            if revisions is None and not tables and not read_only:
                create_head_schema(tx)
                return database
        check_revisions(revisions, tables, where)
        if read_only:
            raise RegistryError(
                f"registry database {where} needs a schema upgrade, but its home is read-only", database=where,
                hint="open it once with a loramgr that may write there",
            )
    except BaseException:
        database.close()
        raise
    database.close()
    from .engines import upgrade_database

    upgrade_database(url, where)  # an older schema: alembic migrates it, then sqlite3 takes over
    return SqliteDatabase(path, where, read_only=read_only)


def sqlite_revisions(tx: Transaction) -> list[str] | None:
    """The rows of ``alembic_version`` (None when the table is missing)."""
    if tx.value("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'") is None:
        return None
    return [str(r[0]) for r in tx.rows("SELECT version_num FROM alembic_version")]


def sqlite_tables(tx: Transaction) -> list[str]:
    return sorted(r[0] for r in tx.rows("SELECT name FROM sqlite_master WHERE type = 'table' "
                                        "AND name NOT LIKE 'sqlite_%'"))


def create_head_schema(tx: Transaction) -> None:
    """Create every table at the head revision in this transaction, and record the revision."""
    from registry_schema.sqlite_head import STATEMENTS

    for statement in STATEMENTS:
        tx.execute(statement)
    tx.execute("INSERT INTO alembic_version (version_num) VALUES (:revision)", revision=HEAD_REVISION)


def check_revisions(revisions: list[str] | None, tables: Iterable[str], where: str) -> None:
    """Refuse a database whose ``alembic_version`` loramgr did not write (or a newer loramgr did)."""
    tables = sorted(tables)
    if revisions is None:
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
    from registry_schema import KNOWN_REVISIONS

    if revisions[0] not in KNOWN_REVISIONS:
        raise RegistryError(
            f"registry database {where} was written by a newer loramgr (schema {revisions[0]})",
            database=where, hint="upgrade loramgr (pip install -U loramgr) to use it",
        )


# -- locks and errors ------------------------------------------------------------------------------


def advisory_key(label: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big", signed=True)


def advisory_lock(tx: Transaction, label: str) -> None:
    """Hold ``label`` until the transaction ends (PostgreSQL; SQLite's writer lock already serialises)."""
    if tx.dialect == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(:key)", key=advisory_key(label))


def lock_names(tx: Transaction, names: Iterable[str]) -> None:
    """Hold each adapter name until the transaction ends (PostgreSQL; SQLite's writer lock already does).

    Taken in sorted order, so two transactions locking several names cannot deadlock.
    """
    for name in sorted(set(names)):
        advisory_lock(tx, f"loramgr:adapter:{name}")


def is_retryable(exc: BaseException) -> bool:
    """A serialisation failure or deadlock: the transaction may simply be run again."""
    original = getattr(exc, "orig", None)
    code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return code in ("40001", "40P01")


def database_error(exc: BaseException, where: str) -> RegistryError:
    """One line for any database failure (sqlite3's or SQLAlchemy's): the database, what went wrong, what to do."""
    original = getattr(exc, "orig", None) or exc
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
        hint = UNREACHABLE_HINT
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


_ENGINE_HELPERS = ("make_engine", "current_revision", "current_revisions", "known_revisions", "upgrade")


def __getattr__(name: str) -> Any:
    """The SQLAlchemy helpers live in :mod:`loramgr.registry.engines`; importing them from here still works
    (and imports SQLAlchemy only then)."""
    if name in _ENGINE_HELPERS:
        from . import engines

        return getattr(engines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
