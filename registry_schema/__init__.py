"""The registry's database schema (SQLAlchemy 2.0 typed models) and its alembic migrations.

Shipped in the wheel: the migrations run on users' machines when loramgr opens a registry.
``HEAD_REVISION`` is the newest migration; a test checks it equals alembic's head, so opening an
up-to-date database needs no alembic import.
"""

from pathlib import Path

HEAD_REVISION = "0003_version_key"
#: every revision of the migrations (a test checks it against alembic), so a newer database is told
#: apart without importing alembic
KNOWN_REVISIONS = frozenset({"0001_initial", "0002_registry_meta", HEAD_REVISION})
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
