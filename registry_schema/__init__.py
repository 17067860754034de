"""The registry's database schema (SQLAlchemy 2.0 typed models) and its alembic migrations.

Shipped in the wheel: the migrations upgrade older databases on users' machines; a new SQLite
database is created from ``sqlite_head`` (what the migrations produce). ``HEAD_REVISION`` is the
newest migration and ``KNOWN_REVISIONS`` all of them; tests check both against alembic, so opening
an up-to-date database imports neither alembic nor SQLAlchemy. ``version_key`` is the encoding
stored in ``versions.version_key``.
"""

from pathlib import Path

HEAD_REVISION = "0003_version_key"
#: every revision of the migrations (a test checks it against alembic), so a newer database is told
#: apart without importing alembic
KNOWN_REVISIONS = frozenset({"0001_initial", "0002_registry_meta", HEAD_REVISION})
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
