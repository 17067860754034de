"""The registry's database schema (SQLAlchemy 2.0 typed models) and its alembic migrations.

Shipped in the wheel: the migrations run on users' machines when loramgr opens a registry.
``HEAD_REVISION`` is the newest migration; a test checks it equals alembic's head, so opening an
up-to-date database needs no alembic import.
"""

from pathlib import Path

HEAD_REVISION = "0002_registry_meta"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
