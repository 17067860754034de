"""The registry at scale and at start-up: narrow queries, gc by set difference, no SQLAlchemy on SQLite.

What is checked is behaviour (rows read, records decoded, modules imported, files deleted), never time:
the timings are in bench/bench_registry.py.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from factories import write_peft_adapter
from packaging.version import Version

import loramgr
from loramgr.registry import Registry, execute_gc, plan_gc, verify
from loramgr.registry import database as database_module
from registry_schema import HEAD_REVISION
from registry_schema.sqlite_head import STATEMENTS
from registry_schema.version_key import version_key

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4)}


def _copies(db: Path, name: str, versions: list[str]) -> None:
    """Add versions of ``name`` as copies of its installed row (2,000 real installs would take minutes)."""
    with sqlite3.connect(db) as connection:
        columns = [r[1] for r in connection.execute("PRAGMA table_info(versions)") if r[1] != "id"]
        copied = ", ".join(":version" if c == "version" else ":key" if c == "version_key" else c for c in columns)
        (source,) = connection.execute("SELECT v.id FROM versions v JOIN adapters a ON a.id = v.adapter_id "
                                       "WHERE a.name = ?", (name,)).fetchone()
        connection.executemany(
            f"INSERT INTO versions ({', '.join(columns)}) SELECT {copied} FROM versions WHERE id = :source",
            [{"version": v, "key": version_key(v), "source": source} for v in versions],
        )
    connection.close()


class Reads:
    """Counts the rows the registry fetches and the JSON records it decodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        self.records = 0
        rows, load_json = database_module.Transaction.rows, database_module.load_json

        def counted_rows(tx, sql, **params):  # type: ignore[no-untyped-def]
            found = rows(tx, sql, **params)
            self.rows += len(found)
            return found

        def counted_json(value):  # type: ignore[no-untyped-def]
            self.records += 1
            return load_json(value)

        monkeypatch.setattr(database_module.Transaction, "rows", counted_rows)
        monkeypatch.setattr("loramgr.registry.core.load_json", counted_json)
        monkeypatch.setattr("loramgr.registry.details.load_json", counted_json)

    def reset(self) -> None:
        self.rows = self.records = 0


def test_resolve_show_and_install_read_only_the_rows_they_need(tmp_path, loramgr_home, monkeypatch):
    registry = Registry.open()
    loramgr.install(write_peft_adapter(tmp_path / "a", MODULES, seed=1), name="many", version="0.0.1",
                    registry_=registry)
    random.seed(3)
    finals = [f"{major}.{minor}.{patch}" for major in range(1, 5) for minor in range(25) for patch in range(20)]
    # 40 pre-releases above the newest final: more than one page of the newest-first scan
    pre = [f"9.{n}.0rc1" for n in range(40)]
    _copies(loramgr_home / "registry.db", "many", random.sample(finals, len(finals)) + pre)
    everything = [Version(v) for v in ["0.0.1", *finals, *pre]]
    newest_final = max(v for v in everything if not v.is_prerelease)
    reads = Reads(monkeypatch)

    assert registry.resolve("many").version == str(newest_final) == "4.24.19"
    assert reads.rows < 100  # of 2,041 versions
    reads.reset()
    shown = registry.show("many==2.7.0")
    assert (shown.name, shown.version, shown.weights_file) == ("many", "2.7.0", "adapter_model.safetensors")
    assert reads.rows < 20 and reads.records == 3  # its info, source details and recipe only
    reads.reset()
    assert registry.show("many==2.07").version == "2.7.0"  # PEP 440 equality, not string equality
    assert registry.resolve("many>=2.24,<3").version == "2.24.19"  # a specifier reads version strings only
    assert reads.records == 3
    reads.reset()
    result = loramgr.install(write_peft_adapter(tmp_path / "b", MODULES, seed=2), name="many", registry_=registry)
    assert result.version == "9.40.0"  # the next minor of the newest version, pre-releases included
    assert reads.rows < 20
    listed = [row.version for row in registry.list_versions("many")]
    assert listed == [str(v) for v in sorted(everything + [Version("9.40.0")])]


def test_version_key_orders_and_equates_as_pep_440():
    random.seed(7)
    parts = ["0", "1", "2", "10", "9", "100"]
    texts = {"1.0", "1.0.0", "1", "1.0.post1", "1.0.dev0", "1.0a1.dev1", "1!0.1", "1.0+abc.5", "1.0+abc.10",
             "1.0+5", "1.0+ab", "1.0rc1", "1.0b2.post3.dev4"}
    for _ in range(2000):
        text = ".".join(random.choice(parts) for _ in range(random.randint(1, 4)))
        text += random.choice(["", "a1", "b2", "rc3", ".post1", ".dev2", "rc1.post2.dev3"])
        text += random.choice(["", "", "+local.7", "+z9.1", "+1.a"])
        texts.add(text)
    versions = [Version(t) for t in texts]
    for a, b in zip(random.choices(versions, k=20000), random.choices(versions, k=20000)):
        assert (a < b, a == b) == (version_key(a) < version_key(b), version_key(a) == version_key(b)), (a, b)
    assert all(key.isdigit() and len(key) <= 400 for key in map(version_key, versions))


def test_gc_deletes_exactly_the_orphans_among_many(tmp_path, loramgr_home):
    registry = Registry.open()
    loramgr.install(write_peft_adapter(tmp_path / "kept", MODULES, seed=1), name="kept", registry_=registry)
    removed = loramgr.install(write_peft_adapter(tmp_path / "gone", MODULES, seed=2), name="gone", registry_=registry)
    from loramgr.registry import execute_remove, plan_remove

    execute_remove(registry, plan_remove(registry, "gone"))
    blob_dir = loramgr_home / "blobs" / "sha256"
    random.seed(5)
    for i in range(3000):
        hexdigest = f"{random.getrandbits(256):064x}"
        (blob_dir / hexdigest[:2]).mkdir(exist_ok=True)
        (blob_dir / hexdigest[:2] / hexdigest).write_bytes(b"x" * (i % 7))
    orphan = next(p for p in (blob_dir / "ab").iterdir())
    (loramgr_home / "verified").mkdir(exist_ok=True)
    (loramgr_home / "verified" / orphan.name).write_text("a stamp of a blob gc deletes")

    with sqlite3.connect(loramgr_home / "registry.db") as connection:
        referenced = {r[0] for r in connection.execute("SELECT digest FROM files")}
    connection.close()
    stored = {"sha256:" + p.name: p.stat().st_size for p in blob_dir.glob("*/*")}
    expected = {digest: size for digest, size in stored.items() if digest not in referenced}
    assert len(expected) > 3000  # the removed version's blobs too
    plan = plan_gc(registry)
    assert {i.label: i.size for i in plan.items if i.what == "blob"} == expected
    assert removed.digest not in referenced
    execute_gc(registry)
    assert {"sha256:" + p.name for p in blob_dir.glob("*/*")} == referenced
    assert not (loramgr_home / "verified" / orphan.name).exists()
    assert verify(registry).ok and plan_gc(registry).items == []


def test_an_older_database_is_migrated_and_its_version_keys_filled(tmp_path, loramgr_home):
    registry = Registry.open()
    for i, version in enumerate(["1.9.0", "1.10.0", "2.0rc1", "1.10.0.post1"]):
        loramgr.install(write_peft_adapter(tmp_path / f"v{i}", MODULES, seed=i), name="old", version=version,
                        registry_=registry)
    registry.close()
    db = loramgr_home / "registry.db"
    with sqlite3.connect(db) as connection:  # the schema as loramgr before version_key left it
        connection.execute("DROP INDEX ix_versions_adapter_key")
        connection.execute("ALTER TABLE versions DROP COLUMN version_key")
        connection.execute("UPDATE alembic_version SET version_num = '0002_registry_meta'")
    connection.close()

    registry = Registry.open()
    assert registry.resolve("old").version == "1.10.0.post1"
    assert [r.version for r in registry.list_versions()] == ["1.9.0", "1.10.0", "1.10.0.post1", "2.0rc1"]
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD_REVISION,)]
        rows = connection.execute("SELECT version, version_key FROM versions").fetchall()
    connection.close()
    assert rows and all(key == version_key(version) for version, key in rows)


def test_a_new_home_gets_the_head_schema_in_one_step(loramgr_home):
    Registry.open().close()
    with sqlite3.connect(loramgr_home / "registry.db") as connection:
        query = "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
        schema = [r[0] for r in connection.execute(query)]
        revisions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        registry_id = connection.execute("SELECT value FROM registry_meta WHERE key = 'registry_id'").fetchone()
    connection.close()
    assert schema == list(STATEMENTS) and revisions == [(HEAD_REVISION,)]
    assert json.loads((loramgr_home / "registry.json").read_text())["registry_id"] == registry_id[0]


_NO_SQLALCHEMY = """
import sys
from click.testing import CliRunner
from loramgr.cli.main import cli

def run(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (args, result.output)
    return result.output

assert run("list").startswith("no adapters installed")  # a new home: the database is created here
run("install", sys.argv[1], "--name", "quick", "--version", "1.0.0")
run("install", sys.argv[2], "--name", "quick")
assert "quick 1.1.0" in run("show", "quick")
run("tag", "quick==1.0.0", "stable")
assert "stable" in run("list")
assert "would remove quick==1.0.0" in run("remove", "quick@stable", "--dry-run")
run("remove", "quick==1.1.0")
assert "would free" in run("gc", "--dry-run")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic", "torch")))
"""


@pytest.mark.slow
def test_everyday_commands_on_sqlite_import_no_sqlalchemy(tmp_path, loramgr_home):
    a = write_peft_adapter(tmp_path / "a", MODULES, seed=1)
    b = write_peft_adapter(tmp_path / "b", MODULES, seed=2)
    done = subprocess.run([sys.executable, "-c", _NO_SQLALCHEMY, str(a), str(b)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (loramgr_home / "registry.db").is_file()


def test_names_are_canonicalised_as_packaging_does():
    from packaging.utils import canonicalize_name

    from loramgr.registry.refs import check_name

    for name in ["Sql.Assistant_V2", "a--b__c..d", "A", "x-_.Y", "Mixed_Case-Name.v1"]:
        assert check_name(name) == canonicalize_name(name)


def test_gc_collects_a_stray_file_in_a_blob_folder_and_nothing_outside(tmp_path, loramgr_home):
    registry = Registry.open()
    loramgr.install(write_peft_adapter(tmp_path / "kept", MODULES, seed=1), name="kept", registry_=registry)
    stray = loramgr_home / "blobs" / "sha256" / "ab" / "not-a-digest"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("left by hand")
    assert [(i.what, i.label) for i in plan_gc(registry).items] == [("blob", "sha256:not-a-digest")]
    execute_gc(registry)
    assert not stray.exists() and verify(registry).ok
    from loramgr.errors import InvalidReferenceError

    outside = tmp_path / "outside"
    outside.write_text("not the store's")
    with pytest.raises(InvalidReferenceError):
        registry.store.delete_blobs([f"sha256:../../../../{outside}"])
    assert outside.exists()


def test_a_listed_row_as_json_has_every_field():
    from dataclasses import asdict, fields

    from loramgr.registry import VersionRow

    row = VersionRow(**{f.name: f.name for f in fields(VersionRow)} | {"tags": ["stable"], "rank": 4})
    assert row.to_dict() == asdict(row)
