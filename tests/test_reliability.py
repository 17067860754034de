"""A registry a team can trust: limits, lost and damaged databases, read-only homes, lying files, repair.

Each test reproduces a failure found by trying to break the registry, on SQLite and (where it applies)
on the PostgreSQL cluster tests/pgcluster.py starts; the slow concurrency and kill -9 trials are in
test_reliability_slow.py. docs/storage.md lists what each proves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import one_line_error, run_cli, write_peft_adapter
from pgcluster import reset

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.0.self_attn.v_proj": (16, 16, 4)}


def blobs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs").rglob("*") if p.is_file())


def leftovers(home: Path) -> list[Path]:
    """Blobs and temporary files: what a refused install must not leave."""
    temps = sorted((home / "tmp").iterdir()) if (home / "tmp").is_dir() else []
    return blobs(home) + temps


def listed(*args: str) -> list[tuple[str, str, str]]:
    return [(r["name"], r["version"], r["digest"]) for r in json.loads(run_cli("list", "--json", *args).output)]


def alter(path: Path) -> None:
    """Flip one byte in the middle of a file, keeping its size and its modification time."""
    stat = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(stat.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def weights_blob(home: Path, reference: str) -> Path:
    shown = json.loads(run_cli("show", reference, "--json").output)
    digest = next(f["digest"] for f in shown["files"] if f["path"].endswith(".safetensors"))
    return home / "blobs" / "sha256" / digest[7:9] / digest[7:]


# -- values one database keeps and the other refuses ---------------------------------------------


@pytest.mark.parametrize(
    ("field", "adapter", "install_args"),
    [
        ("adapters.name", {}, ["--name", "n" * 250]),
        ("versions.task_type", {"extra_config": {"task_type": "T" * 100}}, []),
        ("versions.base_model_name", {"base_model": "b" * 400}, []),
        ("modules.name", {"modules": {"model." + "deep." * 120 + "q_proj": (8, 8, 2)}}, []),
        ("versions.base_model_name", {"base_model": "tiny\x00base"}, []),
    ],
    ids=["name-250", "task-type-100", "base-model-400", "module-name-600", "nul"],
)
def test_a_value_a_database_cannot_keep_is_refused_before_anything_is_stored(
    database: str, loramgr_home: Path, tmp_path: Path, field: str, adapter: dict, install_args: list[str]
) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "ok", MODULES, seed=1)), "--name", "ok")
    before = leftovers(loramgr_home)
    adapter = dict(adapter)  # parametrize shares the dict between databases
    modules = adapter.pop("modules", MODULES)
    folder = write_peft_adapter(tmp_path / "bad", modules, seed=2, readme="# card\n", **adapter)
    error = one_line_error("install", str(folder), *install_args)
    assert field in error and ("at most" in error or "NUL" in error)
    assert leftovers(loramgr_home) == before  # not one blob of it
    assert [name for name, _, _ in listed()] == ["ok"]


@pytest.mark.parametrize("version", ["1." * 70 + "0", "1" * 5000])
def test_an_overlong_version_is_one_line(database: str, tmp_path: Path, version: str) -> None:
    folder = write_peft_adapter(tmp_path / "a", MODULES)
    assert "invalid version" in one_line_error("install", str(folder), "--version", version)
    assert "invalid version" in one_line_error("show", f"a=={version}")


# -- a database that does not describe the blobs beside it -----------------------------------------


def _lose_database(database: str, home: Path, how: str) -> None:
    if database.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{home / 'registry.db'}{suffix}").unlink(missing_ok=True)
        if how == "emptied":
            (home / "registry.db").write_bytes(b"")
    else:
        reset(database)


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_database_next_to_blobs_is_refused_and_doctor_rebuilds_it(
    database: str, loramgr_home: Path, tmp_path: Path, how: str
) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES, seed=1, readme="# a\n")), "--version", "1.0")
    run_cli("install", str(write_peft_adapter(tmp_path / "a2", MODULES, seed=2)), "--name", "a")
    run_cli("install", str(write_peft_adapter(tmp_path / "b", MODULES, seed=3)), "--name", "b")
    run_cli("remove", "b")  # removed before the loss: must stay removed
    run_cli("combine", "a==1.0", "a==1.1.0", "--name", "mix")
    expected = listed()
    stored = blobs(loramgr_home)
    _lose_database(database, loramgr_home, how)

    for command in (["list"], ["verify"], ["gc"], ["install", str(tmp_path / "b")], ["list"]):
        error = one_line_error(*command)
        assert "is empty, but" in error and "doctor --rebuild" in error, (command, error)
    assert blobs(loramgr_home) == stored  # gc deleted nothing

    out = run_cli("doctor", "--rebuild").output
    assert "rebuilt 3 version(s)" in out
    assert listed() == expected
    assert json.loads(run_cli("show", "mix", "--json").output)["recipe"] is not None
    assert "all intact" in run_cli("verify").output
    assert "in 1 file(s)" in run_cli("gc").output  # b's weights blob, orphaned by its removal, and nothing else
    assert "all intact" in run_cli("verify").output


def test_a_database_of_another_registry_is_refused(loramgr_home: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES)))
    other_home = tmp_path / "other"
    monkeypatch.setenv("LORAMGR_HOME", str(other_home))
    run_cli("install", str(write_peft_adapter(tmp_path / "b", MODULES, seed=5)))
    monkeypatch.setenv("LORAMGR_HOME", str(loramgr_home))
    monkeypatch.setenv("LORAMGR_DATABASE_URL", f"sqlite:///{other_home / 'registry.db'}")
    error = one_line_error("gc")
    assert "belong to registry" in error and str(other_home / "registry.db") in error


def test_gc_collects_a_manifest_whose_version_never_committed(loramgr_home: Path, tmp_path: Path) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES)))
    manifest = loramgr_home / "manifests" / "a" / "0.1.0.json"
    ghost = manifest.with_name("9.0.0.json")
    ghost.write_text(manifest.read_text().replace('"version": "0.1.0"', '"version": "9.0.0"'))
    assert "manifest manifests/a/9.0.0.json" in run_cli("gc").output
    assert not ghost.exists() and manifest.exists()


# -- damaged databases: one line that names the file ---------------------------------------------


def _sql(database: str, home: Path, statement: str) -> None:
    if database.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(home / "registry.db")) as connection, connection:
            connection.execute(statement)
    else:
        from sqlalchemy import create_engine

        engine = create_engine(database)
        with engine.begin() as connection:
            connection.exec_driver_sql(statement)
        engine.dispose()


def _where(database: str, home: Path) -> str:
    return str(home / "registry.db") if database.startswith("sqlite") else "127.0.0.1"


def test_an_unknown_extra_schema_revision_refuses_writes(database: str, loramgr_home: Path, tmp_path: Path) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES)))
    _sql(database, loramgr_home, "INSERT INTO alembic_version (version_num) VALUES ('0042_someone_else')")
    error = one_line_error("install", str(write_peft_adapter(tmp_path / "b", MODULES, seed=9)))
    assert "2 schema revisions" in error and _where(database, loramgr_home) in error
    _sql(database, loramgr_home, "DELETE FROM alembic_version WHERE version_num = '0042_someone_else'")
    assert [name for name, _, _ in listed()] == ["a"]  # nothing was written meanwhile


def test_a_missing_alembic_version_says_what_is_wrong(database: str, loramgr_home: Path, tmp_path: Path) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES)))
    _sql(database, loramgr_home, "DROP TABLE alembic_version")
    error = one_line_error("show", "a")
    assert "no alembic_version" in error and "writable" not in error and _where(database, loramgr_home) in error


def test_a_dropped_table_is_one_line(database: str, loramgr_home: Path, tmp_path: Path) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES)))
    _sql(database, loramgr_home, "DROP TABLE modules")
    error = one_line_error("show", "a")
    assert "modules" in error and _where(database, loramgr_home) in error and "doctor --rebuild" in error


def test_damage_found_during_a_query_is_one_line(loramgr_home: Path, tmp_path: Path) -> None:
    for i in range(30):  # enough rows that the versions table spans pages of its own
        run_cli("install", str(write_peft_adapter(tmp_path / f"a{i}", MODULES, seed=i)), "--name", f"a{i}",
                "--version", "1.0")
    db = loramgr_home / "registry.db"
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'modules'").fetchone()[0]
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as handle:  # the header and the schema are intact: opening succeeds
        handle.seek((root - 1) * page_size)
        handle.write(b"\x55" * page_size)
    error = one_line_error("show", "a7")
    assert str(db) in error and "doctor --rebuild" in error
    assert str(db) in one_line_error("export", "a7", str(tmp_path / "out"))


def test_a_file_that_is_not_a_database_is_one_line(loramgr_home: Path) -> None:
    (loramgr_home / "registry.db").write_bytes(b"this is not a database" * 100)
    error = one_line_error("list")
    assert str(loramgr_home / "registry.db") in error and "doctor --rebuild" in error


# -- a read-only home -----------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_mount(folder: Path) -> Iterator[Path]:
    """``folder`` seen through a read-only bind mount (root can write to any file it may open)."""
    view = folder.parent / f"{folder.name}-ro"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {mounted.stderr.strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remounted.stderr.strip()}")
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=True)  # -l: in-process engines keep files open


@pytest.mark.parametrize("log", ["pending", "checkpointed"])
def test_a_read_only_home_can_be_read(loramgr_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      log: str) -> None:
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES, readme="# a\n")), "--version", "1.0")
    run_cli("tag", "a==1.0", "stable")
    expected = listed()
    home = loramgr_home
    if log == "checkpointed":  # as a registry closed cleanly leaves it: no -wal or -shm beside the file
        with contextlib.closing(sqlite3.connect(home / "registry.db")) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        home = tmp_path / "copy"
        shutil.copytree(loramgr_home, home, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    with read_only_mount(home) as view:
        files_before = sorted(p.name for p in view.iterdir())
        monkeypatch.setenv("LORAMGR_HOME", str(view))
        assert listed() == expected
        assert listed("a") == expected
        assert json.loads(run_cli("show", "a@stable", "--json").output)["version"] == "1.0"
        assert "all intact" in run_cli("verify").output
        run_cli("export", "a", str(tmp_path / "out"))
        assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
        error = one_line_error("install", str(write_peft_adapter(tmp_path / "b", MODULES, seed=3)))
        assert "read-only" in error.lower() or "Read-only" in error
        assert sorted(p.name for p in view.iterdir()) == files_before  # no -wal, -shm or lock file made


# -- files that lie ---------------------------------------------------------------------------------


@pytest.mark.parametrize("linked", ["README.md", "adapter_model.safetensors", "adapter_config.json"])
def test_a_link_out_of_the_adapter_folder_is_refused(loramgr_home: Path, tmp_path: Path, linked: str) -> None:
    folder = write_peft_adapter(tmp_path / "a", MODULES, readme="# a\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / linked).rename(outside / linked)
    (folder / linked).symlink_to(outside / linked)
    error = one_line_error("install", str(folder))
    assert linked in error and "outside the adapter folder" in error
    assert leftovers(loramgr_home) == [] and listed() == []


def test_a_link_inside_the_adapter_folder_is_allowed(tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "a", MODULES, readme="# a\n")
    (folder / "docs").mkdir()
    (folder / "README.md").rename(folder / "docs" / "README.md")
    (folder / "README.md").symlink_to(Path("docs") / "README.md")
    run_cli("install", str(folder))
    run_cli("export", "a", str(tmp_path / "out"))
    assert (tmp_path / "out" / "README.md").read_text() == "# a\n"


@pytest.fixture
def combined(tmp_path: Path) -> Path:
    """Two sources and a combination of them; returns the recipe file of the combination."""
    # no task_type: a LoRA of a diffusion pipeline's text encoder, which kohya files also hold
    nt = {"task_type": None}
    run_cli("install", str(write_peft_adapter(tmp_path / "a", MODULES, seed=1, extra_config=nt)), "--version", "1.0")
    run_cli("install", str(write_peft_adapter(tmp_path / "b", MODULES, seed=2, extra_config=nt)), "--version", "1.0")
    run_cli("combine", "a==1.0", "b==1.0", "--weights", "0.5,0.5", "--name", "mix", "--version", "1.0")
    recipe = tmp_path / "mix.toml"
    recipe.write_text(run_cli("show", "mix", "--recipe").output)
    return recipe


@pytest.mark.parametrize("damage", ["altered", "collected"])
def test_stored_bytes_that_changed_are_never_read(loramgr_home: Path, tmp_path: Path, combined: Path,
                                                   damage: str) -> None:
    blob = weights_blob(loramgr_home, "a==1.0")
    if damage == "altered":
        alter(blob)
    else:
        os.chmod(blob, 0o644)
        blob.unlink()
    said = "no longer matches its digest" if damage == "altered" else "is missing from the store"
    for command in (["export", "a==1.0", str(tmp_path / "out")],
                    ["export", "a==1.0", str(tmp_path / "out.safetensors"), "--format", "kohya"],
                    ["combine", "a==1.0", "b==1.0", "--name", "again"],
                    ["combine", "--recipe", str(combined), "--name", "replayed"]):
        error = one_line_error(*command)
        assert said in error and "a==1.0" in error and "verify --repair" in error, (command, error)
    assert not (tmp_path / "out").exists() and [n for n, _, _ in listed()] == ["a", "b", "mix"]


def test_the_right_bytes_installed_again_replace_a_corrupt_shared_blob(loramgr_home: Path, tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "a", MODULES)
    run_cli("install", str(folder), "--name", "x")
    run_cli("install", str(folder), "--name", "y")  # the same blobs
    alter(weights_blob(loramgr_home, "x"))
    assert run_cli("verify", code=1).output.count("corrupt blob") == 1
    run_cli("install", str(folder), "--name", "z")
    assert "all intact" in run_cli("verify").output
    run_cli("export", "y", str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (folder / "adapter_model.safetensors").read_bytes()


def test_verify_repair_restores_from_the_install_folder_or_names_what_is_lost(loramgr_home: Path,
                                                                               tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "a", MODULES)
    run_cli("install", str(folder), "--version", "1.0")
    blob = weights_blob(loramgr_home, "a")
    alter(blob)
    out = run_cli("verify", "--repair").output
    assert f"repaired blob sha256:{blob.name} from {folder / 'adapter_model.safetensors'}" in out
    assert "all intact" in run_cli("verify").output
    alter(blob)
    (folder / "adapter_model.safetensors").unlink()
    result = run_cli("verify", "--repair", code=1)
    assert f"lost blob sha256:{blob.name}" in result.output and "a==1.0 must be installed again" in result.output


# -- a full disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_stores_nothing_and_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = write_peft_adapter(tmp_path / "small", MODULES, readme="# small\n")
    big = write_peft_adapter(tmp_path / "big", {"layers.0.q": (512, 512, 256), "layers.0.v": (512, 512, 256)},
                             readme="# big\n" + "card text\n" * 500)
    with small_tmpfs(tmp_path / "disk", "1m") as home:
        monkeypatch.setenv("LORAMGR_HOME", str(home))
        run_cli("install", str(small))
        before = leftovers(home)
        error = one_line_error("install", str(big))
        assert str(big / "adapter_model.safetensors") in error and "No space left" in error
        assert leftovers(home) == before  # neither its config nor its card became an orphan blob
        assert [n for n, _, _ in listed()] == ["small"]
        assert "in 0 file(s)" in run_cli("gc").output


def test_an_install_whose_digest_is_not_the_expected_one_stores_nothing(loramgr_home: Path, tmp_path: Path) -> None:
    from loramgr.errors import IntegrityError
    from loramgr.installer import InstallOptions, install_path
    from loramgr.registry import Registry

    folder = write_peft_adapter(tmp_path / "a", MODULES, readme="# a\n")
    registry = Registry.open()
    try:
        with pytest.raises(IntegrityError, match="not the expected sha256:000000000000"):
            install_path(registry, folder, InstallOptions(), expected_digest="sha256:" + "0" * 64)
        assert registry.list_versions() == [] and leftovers(loramgr_home) == []
        digest = install_path(registry, folder, InstallOptions(name="b")).digest
        assert install_path(registry, folder, InstallOptions(name="c"), expected_digest=digest).created
    finally:
        registry.close()


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_pickle_refusal_is_one_line_in_a_terminal(tmp_path: Path) -> None:
    import pickle
    import sys

    folder = write_peft_adapter(tmp_path / "evil", MODULES)
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _RunsCode()}, handle, protocol=4)
    done = subprocess.run([sys.executable, "-m", "loramgr", "install", str(folder), "--allow-pickle"],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ))
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "weights-only" in lines[0], lines
    assert not (tmp_path / "pwned").exists()
