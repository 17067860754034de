"""The registry on PostgreSQL (LORAMGR_DATABASE_URL): migrations, installs, combine, tags, remove, gc.

A throwaway cluster is started on 127.0.0.1 from Debian's postgresql binaries, which .ci/run installs;
where they are absent (a developer machine without PostgreSQL) these tests are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import run_cli, write_peft_adapter
from pgcluster import cluster_url, reset

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.0.self_attn.v_proj": (16, 16, 4)}


pytestmark = pytest.mark.slow  # a PostgreSQL server per session: outside the everyday loop


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = cluster_url()
    if url is None:
        pytest.skip("PostgreSQL server or psycopg not installed (.ci/run installs both)")
    return url


@pytest.fixture
def on_postgres(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    reset(postgres_url)  # a clean database for each test
    monkeypatch.setenv("LORAMGR_DATABASE_URL", postgres_url)
    yield postgres_url


def test_migrations_give_exactly_the_models_schema_on_postgres(on_postgres: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from loramgr.registry import Registry
    from registry_schema import HEAD_REVISION
    from registry_schema.models import Base

    registry = Registry.open()
    with registry.db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == HEAD_REVISION


def test_the_registry_works_on_postgres(on_postgres: str, tmp_path: Path) -> None:
    a = write_peft_adapter(tmp_path / "a", MODULES, seed=1)
    b = write_peft_adapter(tmp_path / "b", MODULES, seed=2)
    run_cli("install", str(a), "--name", "sql", "--version", "1.0.0")
    run_cli("install", str(b), "--name", "sql")
    assert "already installed as sql==1.0.0" in run_cli("install", str(a), "--name", "sql").output
    run_cli("combine", "sql==1.0.0", "sql==1.1.0", "--weights", "0.5,0.5", "--name", "mix", "--version", "2.0.0")
    run_cli("tag", "mix==2.0.0", "stable")
    listing = run_cli("list").output
    assert "sql " in listing and "1.1.0" in listing and "stable" in listing
    assert "+0.5 x sql==1.0.0" in run_cli("show", "mix@stable").output
    run_cli("remove", "sql==1.1.0")
    assert "1.1.0" not in run_cli("list").output
    run_cli("remove", "mix==2.0.0")
    assert "freed" in run_cli("gc").output
    assert run_cli("verify").output.strip().endswith("all intact")
