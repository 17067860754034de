"""The database schema: migrations produce exactly the models, ship in the wheel, and newer databases are refused."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect

import registry_schema
from loramgr.cli.main import cli
from loramgr.errors import RegistryError
from loramgr.registry import Registry
from loramgr.registry.engines import alembic_config, current_revision, known_revisions, make_engine, upgrade
from registry_schema.models import Base

REPO = Path(__file__).resolve().parents[1]


def _script_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(registry_schema.MIGRATIONS_DIR))
    heads = ScriptDirectory.from_config(config).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


def test_head_revision_constant_is_the_script_directory_head():
    assert _script_head() == registry_schema.HEAD_REVISION
    assert known_revisions() == registry_schema.KNOWN_REVISIONS


def test_migrations_produce_exactly_the_models_schema(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    upgrade(engine)
    assert current_revision(engine) == registry_schema.HEAD_REVISION
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(context, Base.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert diff == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_compare_metadata_would_notice_a_drift(tmp_path):
    """The check above is not vacuous: a column the migrations lack shows up in the diff."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import Column, Integer, MetaData, Table

    engine = make_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    upgrade(engine)
    drifted = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    Table("adapters", drifted, Column("stars", Integer), extend_existing=True)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), drifted)
    engine.dispose()
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "adapters", "stars")]


def test_downgrade_to_base_and_upgrade_again(tmp_path):
    from alembic import command

    engine = make_engine(f"sqlite:///{tmp_path / 'cycle.db'}")
    upgrade(engine)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"alembic_version"}
    upgrade(engine)
    assert current_revision(engine) == registry_schema.HEAD_REVISION
    engine.dispose()


def test_opening_applies_migrations_and_sqlite_runs_in_wal_mode(loramgr_home):
    registry = Registry.open()
    registry.close()
    db = loramgr_home / "registry.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(registry_schema.HEAD_REVISION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def _stamp(db: Path, revision: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_a_database_from_a_newer_loramgr_is_refused(loramgr_home):
    Registry.open().close()
    db = loramgr_home / "registry.db"
    _stamp(db, "0099_from_the_future")
    with pytest.raises(RegistryError, match="written by a newer loramgr .schema 0099_from_the_future.") as err:
        Registry.open()
    assert "upgrade loramgr" in str(err.value)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: registry database {db} ") and "newer loramgr" in lines[0]
    # refused, not migrated or rewritten
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099_from_the_future",)]


def test_an_unreachable_database_url_is_a_one_line_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LORAMGR_DATABASE_URL", f"sqlite:///{blocker}/sub/registry.db")
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: ")


def test_database_url_takes_any_sqlalchemy_url(tmp_path, monkeypatch, loramgr_home):
    db = tmp_path / "shared" / "team.db"
    monkeypatch.setenv("LORAMGR_DATABASE_URL", f"sqlite+pysqlite:///{db}")
    assert CliRunner().invoke(cli, ["list"]).exit_code == 0
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as connection:
        assert "versions" in inspect(connection).get_table_names()
    engine.dispose()
    assert not (loramgr_home / "registry.db").exists()


@pytest.mark.slow
def test_wheel_ships_the_migrations(tmp_path):
    """Build the wheel from a copy of the sources (the shared tree stays clean) and look inside."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("loramgr", "registry_schema"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("loramgr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {
        f"registry_schema/{p.relative_to(REPO / 'registry_schema').as_posix()}"
        for p in (REPO / "registry_schema").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert "registry_schema/migrations/env.py" in migrations
    assert "registry_schema/migrations/versions/0001_initial.py" in migrations
    assert migrations <= names, migrations - names
    assert "loramgr/py.typed" in names


def test_in_memory_sqlite_url_creates_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAMGR_DATABASE_URL", "sqlite://")
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0 and result.output.startswith("no adapters installed")
    assert list(tmp_path.iterdir()) == []


def test_the_sqlite_head_script_is_what_the_migrations_produce(loramgr_home):
    """A new registry is created from registry_schema.sqlite_head, not by running every migration: the two
    must give the same database (regenerate with ``python -m registry_schema.sqlite_head``)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from registry_schema.sqlite_head import STATEMENTS, render_statements

    assert list(STATEMENTS) == render_statements()
    Registry.open().close()  # a new home: created from the script
    engine = make_engine(f"sqlite:///{loramgr_home / 'registry.db'}")
    assert current_revision(engine) == registry_schema.HEAD_REVISION
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_the_column_limits_are_the_models_string_lengths():
    from sqlalchemy import String

    from loramgr.registry.limits import LIMITS

    lengths = {
        table.name: {c.name: c.type.length for c in table.columns if isinstance(c.type, String) and c.type.length}
        for table in Base.metadata.tables.values()
    }
    assert lengths == LIMITS
