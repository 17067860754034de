"""The head schema of a SQLite registry as SQL statements: a new database is created from them directly.

Exactly what the migrations produce on SQLite (``sqlite_master`` of a database migrated from empty
to head); a test checks that, and ``python -m registry_schema.sqlite_head`` rewrites this file after
a new migration. Creating a registry this way takes milliseconds, where running every migration
through alembic took a second or two; alembic still upgrades every older database.
"""

from __future__ import annotations


def render_statements() -> list[str]:
    """The DDL that running every migration leaves in a new SQLite database, in creation order."""
    import sqlite3
    import tempfile
    from pathlib import Path

    from loramgr.registry.engines import make_engine, upgrade

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "head.db"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        engine.dispose()
        connection = sqlite3.connect(path)
        statements = [row[0] for row in connection.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")]
        connection.close()
    return statements


def _literal(statement: str) -> str:
    """One statement as adjacent string literals, a line of SQL each (the file stays readable)."""
    lines = statement.splitlines(keepends=True)
    return "    " + "\n    ".join(repr(line) for line in lines) + ","


_START = "# -- generated: python -m registry_schema.sqlite_head --\n"


def _rewrite() -> None:
    from pathlib import Path

    source = Path(__file__).read_text().partition(_START)[0]
    body = "\n\n".join(_literal(statement) for statement in render_statements())
    Path(__file__).write_text(f"{source}{_START}STATEMENTS: tuple[str, ...] = (\n{body}\n)\n")


if __name__ == "__main__":
    _rewrite()

# -- generated: python -m registry_schema.sqlite_head --
STATEMENTS: tuple[str, ...] = (
    'CREATE TABLE alembic_version (\n'
    '\tversion_num VARCHAR(32) NOT NULL, \n'
    '\tCONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)\n'
    ')',

    'CREATE TABLE adapters (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tname VARCHAR(200) NOT NULL, \n'
    '\tdisplay_name VARCHAR(200) NOT NULL, \n'
    '\tcreated_at DATETIME NOT NULL, \n'
    '\tPRIMARY KEY (id), \n'
    '\tUNIQUE (name)\n'
    ')',

    'CREATE TABLE base_models (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tname VARCHAR(300) NOT NULL, \n'
    '\trevision VARCHAR(100), \n'
    '\tsource TEXT, \n'
    '\tarchitecture VARCHAR(200), \n'
    '\tstructural_fingerprint VARCHAR(80) NOT NULL, \n'
    '\tstructural_dtype_fingerprint VARCHAR(80), \n'
    '\tcontent_digest VARCHAR(80), \n'
    '\tdetails JSON NOT NULL, \n'
    '\tadded_at DATETIME NOT NULL, \n'
    '\tPRIMARY KEY (id), \n'
    '\tUNIQUE (name)\n'
    ')',

    'CREATE INDEX ix_base_models_structural_fingerprint ON base_models (structural_fingerprint)',

    'CREATE TABLE versions (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tadapter_id INTEGER NOT NULL, \n'
    '\tversion VARCHAR(100) NOT NULL, \n'
    '\tdigest VARCHAR(80) NOT NULL, \n'
    '\tformat VARCHAR(40) NOT NULL, \n'
    '\tadapter_type VARCHAR(40) NOT NULL, \n'
    '\trank INTEGER, \n'
    '\talpha FLOAT, \n'
    '\tuse_rslora BOOLEAN NOT NULL, \n'
    '\tuse_dora BOOLEAN NOT NULL, \n'
    '\tbase_model_name VARCHAR(300), \n'
    '\tbase_model_revision VARCHAR(100), \n'
    '\tbase_model_id INTEGER, \n'
    '\ttask_type VARCHAR(60), \n'
    '\tn_modules INTEGER NOT NULL, \n'
    '\tn_params BIGINT NOT NULL, \n'
    '\tsize BIGINT NOT NULL, \n'
    '\tsource TEXT, \n'
    '\tsource_details JSON NOT NULL, \n'
    '\tinfo JSON NOT NULL, \n'
    '\trecipe JSON, \n'
    '\tinstalled_at DATETIME NOT NULL, version_key VARCHAR(400), \n'
    '\tPRIMARY KEY (id), \n'
    '\tFOREIGN KEY(adapter_id) REFERENCES adapters (id) ON DELETE CASCADE, \n'
    '\tFOREIGN KEY(base_model_id) REFERENCES base_models (id) ON DELETE SET NULL, \n'
    '\tCONSTRAINT uq_versions_adapter_version UNIQUE (adapter_id, version)\n'
    ')',

    'CREATE INDEX ix_versions_adapter_id ON versions (adapter_id)',

    'CREATE INDEX ix_versions_digest ON versions (digest)',

    'CREATE TABLE files (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tversion_id INTEGER NOT NULL, \n'
    '\tpath VARCHAR(500) NOT NULL, \n'
    '\tdigest VARCHAR(80) NOT NULL, \n'
    '\tsize BIGINT NOT NULL, \n'
    '\tPRIMARY KEY (id), \n'
    '\tFOREIGN KEY(version_id) REFERENCES versions (id) ON DELETE CASCADE, \n'
    '\tCONSTRAINT uq_files_version_path UNIQUE (version_id, path)\n'
    ')',

    'CREATE INDEX ix_files_digest ON files (digest)',

    'CREATE INDEX ix_files_version_id ON files (version_id)',

    'CREATE TABLE lineage (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tchild_id INTEGER NOT NULL, \n'
    '\tposition INTEGER NOT NULL, \n'
    '\tparent_digest VARCHAR(80) NOT NULL, \n'
    '\tparent_name VARCHAR(200) NOT NULL, \n'
    '\tparent_version VARCHAR(100) NOT NULL, \n'
    '\tweight FLOAT NOT NULL, \n'
    '\tPRIMARY KEY (id), \n'
    '\tFOREIGN KEY(child_id) REFERENCES versions (id) ON DELETE CASCADE, \n'
    '\tCONSTRAINT uq_lineage_child_position UNIQUE (child_id, position)\n'
    ')',

    'CREATE INDEX ix_lineage_child_id ON lineage (child_id)',

    'CREATE INDEX ix_lineage_parent_digest ON lineage (parent_digest)',

    'CREATE TABLE modules (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tversion_id INTEGER NOT NULL, \n'
    '\tname VARCHAR(500) NOT NULL, \n'
    '\tkind VARCHAR(20) NOT NULL, \n'
    '\trank INTEGER NOT NULL, \n'
    '\talpha FLOAT NOT NULL, \n'
    '\tin_features INTEGER NOT NULL, \n'
    '\tout_features INTEGER NOT NULL, \n'
    '\tdtype VARCHAR(20) NOT NULL, \n'
    '\tPRIMARY KEY (id), \n'
    '\tFOREIGN KEY(version_id) REFERENCES versions (id) ON DELETE CASCADE\n'
    ')',

    'CREATE INDEX ix_modules_version_name ON modules (version_id, name)',

    'CREATE TABLE tags (\n'
    '\tid INTEGER NOT NULL, \n'
    '\tadapter_id INTEGER NOT NULL, \n'
    '\ttag VARCHAR(100) NOT NULL, \n'
    '\tversion_id INTEGER NOT NULL, \n'
    '\tPRIMARY KEY (id), \n'
    '\tFOREIGN KEY(adapter_id) REFERENCES adapters (id) ON DELETE CASCADE, \n'
    '\tFOREIGN KEY(version_id) REFERENCES versions (id) ON DELETE CASCADE, \n'
    '\tCONSTRAINT uq_tags_adapter_tag UNIQUE (adapter_id, tag)\n'
    ')',

    'CREATE INDEX ix_tags_adapter_id ON tags (adapter_id)',

    'CREATE INDEX ix_tags_version_id ON tags (version_id)',

    'CREATE TABLE registry_meta (\n'
    '\t"key" VARCHAR(40) NOT NULL, \n'
    '\tvalue TEXT NOT NULL, \n'
    '\tPRIMARY KEY ("key")\n'
    ')',

    'CREATE INDEX ix_versions_adapter_key ON versions (adapter_id, version_key)',
)
