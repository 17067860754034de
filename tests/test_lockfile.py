"""Reproducible sets end to end: ``loramgr.toml`` -> ``loramgr lock`` -> ``loramgr sync`` on another machine.

"Another machine" is a fresh, empty LORAMGR_HOME; the Hub is the local test Hub (HF_ENDPOINT), and
huggingface_hub's cache is either shared (offline syncs) or fresh (a machine that never saw the files).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from factories import one_line_error, write_peft_adapter
from factories import run_cli as run
from hubserver import TEST_TOKEN, HubServer

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.0.self_attn.v_proj": (16, 16, 4)}


def installed() -> list[tuple[str, str, str]]:
    return [(r["name"], r["version"], r["digest"]) for r in json.loads(run("list", "--json").output)]


def store_blobs() -> list[Path]:
    return sorted(p for p in (Path(os.environ["LORAMGR_HOME"]) / "blobs").rglob("*") if p.is_file())


def new_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    home = tmp_path / name
    monkeypatch.setenv("LORAMGR_HOME", str(home))
    return home


def publish(hub: HubServer, tmp_path: Path, repo_id: str, tag: str, seed: int) -> Path:
    """Seed ``repo_id`` at ``tag`` with a fresh adapter; returns its source folder."""
    folder = write_peft_adapter(tmp_path / f"src-{repo_id.replace('/', '-')}-{tag}", MODULES, seed=seed,
                                base_model="tiny/base", readme=f"---\nlicense: mit\n---\n# {repo_id} {tag}\n")
    hub.seed(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()}, tag=tag)
    return folder


@pytest.fixture
def project(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project whose loramgr.toml names a range of a registry adapter and a pinned Hub adapter.

    The developer's registry holds sql 1.0.0, 1.5.0 (both installed from the Hub) and 2.0.0 (outside
    the range); ``alpha`` is taken straight from the Hub at v2.1.0 (its tag is v2.1.0; main moved on).
    """
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    for tag, seed in (("v1.0.0", 1), ("v1.5.0", 2), ("v2.0.0", 3)):
        publish(hub, tmp_path, "tester/sql", tag, seed)
    publish(hub, tmp_path, "tester/alpha", "v2.1.0", 4)
    publish(hub, tmp_path, "tester/alpha", "v3.0.0", 5)
    for tag in ("v1.0.0", "v1.5.0", "v2.0.0"):
        run("install", f"hf://tester/sql@{tag}")
    project = tmp_path / "project"
    project.mkdir()
    (project / "loramgr.toml").write_text(
        '[adapters]\nsql = ">=1.0,<2"\nalpha = { hub = "tester/alpha", revision = "v2.1.0" }\n'
    )
    monkeypatch.chdir(project)
    return project


def test_lock_then_sync_reproduces_the_set(project: Path, hub: HubServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = run("lock").output
    mine = installed()
    assert [(n, v) for n, v, _ in mine] == [("alpha", "2.1.0"), ("sql", "1.0.0"), ("sql", "1.5.0"), ("sql", "2.0.0")]
    wanted = [mine[0], mine[2]]  # the range picks the newest 1.x; the Hub entry its tag
    for name, version, digest in wanted:
        assert f"locked {name}=={version} {digest[:19]}" in out
    assert out.strip().endswith("wrote loramgr.lock")

    lock = (project / "loramgr.lock").read_text()
    entries = _lock_entries(lock)
    assert [(e["name"], e["version"], e["digest"]) for e in entries] == wanted
    alpha = entries[0]
    assert (alpha["hub"], alpha["revision"], alpha["commit"]) == (
        "tester/alpha", "v2.1.0", hub.repos["tester/alpha"].tags["v2.1.0"])
    assert entries[1]["commit"] == hub.repos["tester/sql"].tags["v1.5.0"]

    # another machine: an empty registry and an empty huggingface_hub cache
    new_home(tmp_path, monkeypatch, "machine-b")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "machine-b-hf"))
    out = run("sync").output
    assert "installed alpha==2.1.0" in out and "installed sql==1.5.0" in out
    assert out.strip().endswith("2 installed, 0 already present and verified")
    assert installed() == wanted
    assert sorted(p.name for p in store_blobs()) == sorted(
        {f["digest"][7:] for e in entries for f in e["files"]})
    assert run("verify").output.strip().endswith("all intact")
    out = run("sync").output
    assert out.strip() == "0 installed, 2 already present and verified"


def _lock_entries(text: str) -> list[dict]:
    import tomllib

    data = tomllib.loads(text)
    assert data["lock-version"] == 1
    return data["adapter"]


def test_lock_is_byte_identical_when_run_twice(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    first = (project / "loramgr.lock").read_bytes()
    # the same requirements written in another order, locked again a second later
    (project / "loramgr.toml").write_text(
        '[adapters]\nalpha = { revision = "v2.1.0", hub = "tester/alpha" }\nsql = ">=1.0,<2"\n'
    )
    run("lock")
    assert (project / "loramgr.lock").read_bytes() == first
    text = first.decode()
    assert not re.search(r"\d{4}-\d\d-\d\d|installed_at|T\d\d:\d\d", text)  # no timestamps
    names = [e["name"] for e in _lock_entries(text)]
    assert names == sorted(names)
    for entry in _lock_entries(text):
        assert [f["path"] for f in entry["files"]] == sorted(f["path"] for f in entry["files"])


def test_sync_works_offline_when_everything_is_cached(project: Path, hub: HubServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    expected = [e for e in installed() if (e[0], e[1]) in {("alpha", "2.1.0"), ("sql", "1.5.0")}]
    new_home(tmp_path, monkeypatch, "offline-machine")  # same huggingface_hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counts()
    out = run("sync").output
    assert hub.requests == []
    assert out.strip().endswith("2 installed, 0 already present and verified")
    assert installed() == expected

    new_home(tmp_path, monkeypatch, "offline-empty-cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    text = one_line_error("sync")
    assert "hf://tester/alpha@" in text and "offline and not in the local cache" in text
    assert installed() == [] and store_blobs() == []


def _tamper(path: Path) -> None:
    path.chmod(0o644)  # store blobs are read-only
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_tampered_store_blob_refuses_the_whole_sync(project: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    entries = _lock_entries((project / "loramgr.lock").read_text())
    # this registry already has sql==1.5.0 (the second entry), but one of its blobs went bad
    home = new_home(tmp_path, monkeypatch, "machine-c")
    run("install", "hf://tester/sql@v1.5.0")
    sql_weights = next(f["digest"] for f in entries[1]["files"] if f["path"] == "adapter_model.safetensors")
    _tamper(home / "blobs" / "sha256" / sql_weights[7:9] / sql_weights[7:])
    before = installed()
    text = one_line_error("sync")
    assert f"sql==1.5.0: stored blob {sql_weights[:19]} (adapter_model.safetensors) is missing or corrupt" in text
    # alpha comes first in the lock and needed installing: it was not installed either
    assert installed() == before and [n for n, _, _ in before] == ["sql"]


def test_a_tampered_cache_blob_refuses_the_whole_sync(project: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    cache = Path(os.environ["HF_HUB_CACHE"])
    # sql is the second entry of the lock; alpha (first) is fetched and verified before it
    weights = {p.resolve() for p in (cache / "models--tester--sql" / "snapshots").glob("*/adapter_model.safetensors")}
    assert len(weights) == 3  # three tags installed; make sure we break the locked one
    commit = _lock_entries((project / "loramgr.lock").read_text())[1]["commit"]
    blob = (cache / "models--tester--sql" / "snapshots" / commit / "adapter_model.safetensors").resolve()
    verified_at = blob.stat().st_mtime_ns
    _tamper(blob)
    # a write moves the mtime, which is what makes loramgr re-hash a cached blob; make sure it moved
    os.utime(blob, ns=(verified_at, verified_at + 1_000_000_000))
    new_home(tmp_path, monkeypatch, "machine-d")
    text = one_line_error("sync")
    assert "hf://tester/sql@" in text and "adapter_model.safetensors does not match the Hub's hash" in text
    assert installed() == [] and store_blobs() == []


def test_a_lock_whose_digest_does_not_match_installs_nothing(project: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    lock = project / "loramgr.lock"
    entries = _lock_entries(lock.read_text())
    digest = entries[1]["digest"]
    forged = digest[:-4] + ("0000" if not digest.endswith("0000") else "1111")
    lock.write_text(lock.read_text().replace(digest, forged))
    new_home(tmp_path, monkeypatch, "machine-e")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "machine-e-hf"))
    text = one_line_error("sync")
    assert "sql==1.5.0: the files at tester/sql@" in text and f"do not match the lock's digest {forged[:19]}" in text
    assert installed() == [] and store_blobs() == []


def test_sync_needs_a_hub_source_for_what_is_missing(hub: HubServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_peft_adapter(tmp_path / "local", MODULES, base_model="tiny/base")
    run("install", str(folder), "--name", "local", "--version", "1.0.0")
    (tmp_path / "loramgr.toml").write_text('[adapters]\nlocal = "==1.0.0"\n')
    monkeypatch.chdir(tmp_path)
    run("lock")
    assert "hub" not in _lock_entries((tmp_path / "loramgr.lock").read_text())[0]
    assert run("sync").output.strip() == "0 installed, 1 already present and verified"
    new_home(tmp_path, monkeypatch, "elsewhere")
    text = one_line_error("sync")
    assert "local==1.0.0" in text and "is not in this registry and the lock has no Hub source" in text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("", "loramgr.toml: no [adapters] table"),
        ("[adapters]\n", "loramgr.toml: no [adapters] table"),
        ("[adapters]\nsql = 3\n", "loramgr.toml: sql: expected a version specifier or { hub = ... }"),
        ('[adapters]\nsql = { hub = "o/r", rev = "v1" }\n', "loramgr.toml: sql: unknown key(s) rev"),
        ('[adapters]\nsql = { revision = "v1" }\n', "loramgr.toml: sql: expected a version specifier"),
        ('[adapters]\nsql = ">=1.0,<2\n', "loramgr.toml: not valid TOML"),
        ('[adapters]\n"not a name!" = ">=1"\n', "not a name!"),
        ('[adapters]\nsql = ">>1.0"\n', "invalid version specifier '>>1.0'"),
        ('[adapters]\nsql = { hub = "not-a-repo" }\n', "invalid Hub repository id 'not-a-repo'"),
    ],
)
def test_bad_requirements_are_one_line_errors(toml: str, message: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "loramgr.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    assert message in one_line_error("lock")
    assert not (tmp_path / "loramgr.lock").exists()


def test_project_file_mistakes_carry_the_file_and_the_entry(tmp_path: Path) -> None:
    from loramgr.errors import ProjectFileError
    from loramgr.lockfile import read_lock, read_requirements

    toml = tmp_path / "loramgr.toml"
    toml.write_text('[adapters]\nsql = { hub = "o/r", rev = "v1" }\n')
    with pytest.raises(ProjectFileError) as err:
        read_requirements(toml)
    assert (err.value.path, err.value.entry) == (str(toml), "sql")
    lock = tmp_path / "loramgr.lock"
    lock.write_text('lock-version = 1\n[[adapter]]\nname = "x"\nversion = "1.0"\n')
    with pytest.raises(ProjectFileError, match="entry has no digest") as err:
        read_lock(lock)
    assert (err.value.path, err.value.entry) == (str(lock), "x")


def test_missing_or_foreign_files_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "loramgr.toml: no such file" in one_line_error("lock")
    assert "loramgr.lock: no such file" in one_line_error("sync")
    (tmp_path / "loramgr.lock").write_text("lock-version = 7\n")
    assert "loramgr.lock: lock-version 7 is not 1" in one_line_error("sync")
    (tmp_path / "loramgr.lock").write_text('lock-version = 1\n[[adapter]]\nname = "x"\n')
    assert "loramgr.lock: an [[adapter]] entry has no version" in one_line_error("sync")


def test_a_hub_entry_pushed_from_this_registry_locks_its_hub_source(hub: HubServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The author's registry holds the version from a local folder; the lock must still say where it lives."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    folder = write_peft_adapter(tmp_path / "ad", MODULES, base_model="tiny/base")
    run("install", str(folder), "--name", "ad", "--version", "1.0.0")
    run("push", "ad==1.0.0", "--repo", "tester/ad")
    (tmp_path / "loramgr.toml").write_text('[adapters]\nad = { hub = "tester/ad", revision = "v1.0.0" }\n')
    monkeypatch.chdir(tmp_path)
    run("lock")
    (entry,) = _lock_entries((tmp_path / "loramgr.lock").read_text())
    assert (entry.get("hub"), entry.get("revision"), entry.get("commit")) == (
        "tester/ad", "v1.0.0", hub.repos["tester/ad"].tags["v1.0.0"])
    expected = installed()
    new_home(tmp_path, monkeypatch, "teammate")
    assert run("sync").output.strip().endswith("1 installed, 0 already present and verified")
    assert installed() == expected


def test_sync_installs_a_subfolder_entry_exactly_as_install_hf_does(hub: HubServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One Hub route: sync records what ``install hf://`` records (the subfolder too) and links the cache's
    blobs into the store as install does, instead of copying them."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    folder = write_peft_adapter(tmp_path / "style", MODULES, seed=7, base_model="tiny/base",
                                readme="---\nlicense: mit\n---\n# style\n")
    hub.seed("tester/multi", {f"loras/style/{p.name}": p.read_bytes() for p in folder.iterdir()}, tag="v1.0.0")
    (tmp_path / "loramgr.toml").write_text(
        '[adapters]\nstyle = { hub = "tester/multi", revision = "v1.0.0", subfolder = "loras/style" }\n')
    monkeypatch.chdir(tmp_path)
    run("lock")  # installs it here, through install hf://
    installed_here = json.loads(run("show", "style", "--json").output)
    (entry,) = _lock_entries((tmp_path / "loramgr.lock").read_text())
    assert entry["subfolder"] == "loras/style"

    home = new_home(tmp_path, monkeypatch, "teammate")  # same huggingface_hub cache, empty registry
    assert run("sync").output.strip().endswith("1 installed, 0 already present and verified")
    synced = json.loads(run("show", "style", "--json").output)
    commit = hub.repos["tester/multi"].tags["v1.0.0"]
    assert synced["source"] == installed_here["source"] == f"hf://tester/multi@{commit}:loras/style"
    assert synced["source_details"] == installed_here["source_details"]
    assert synced["source_details"]["hub"]["subfolder"] == "loras/style"
    assert (synced["digest"], synced["files"]) == (installed_here["digest"], installed_here["files"])
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / "models--tester--multi" / "snapshots" / commit / "loras" / "style"
    for f in synced["files"]:
        blob = home / "blobs" / "sha256" / f["digest"][7:9] / f["digest"][7:]
        assert os.path.samefile(blob, snapshot / f["path"])  # a hard link to the verified cache blob, not a copy
        assert blob.stat().st_nlink >= 2


def _rewrite_lock(path: Path, entries: list[dict]) -> None:
    import tomli_w

    path.write_text(tomli_w.dumps({"lock-version": 1, "adapter": entries}))


def test_a_lock_path_outside_the_snapshot_is_refused(project: Path, hub: HubServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    lock = project / "loramgr.lock"
    entries = _lock_entries(lock.read_text())
    # sql==1.5.0 forged to name 1.0.0's files, reached from 1.5.0's snapshot through the shared cache
    other = json.loads(run("show", "sql==1.0.0", "--json").output)
    commit = hub.repos["tester/sql"].tags["v1.0.0"]
    entries[1]["files"] = [{"path": f"../{commit}/{f['path']}", "digest": f["digest"], "size": f["size"]}
                           for f in other["files"] if f["path"] != "README.md"]  # the card is not in a digest
    from loramgr.registry.records import ManifestEntry, manifest_digest

    entries[1]["digest"] = manifest_digest([ManifestEntry(f["path"], f["digest"], f["size"])
                                            for f in entries[1]["files"]])  # consistent with its paths
    _rewrite_lock(lock, entries)
    new_home(tmp_path, monkeypatch, "machine-f")  # the same huggingface_hub cache, which holds every commit
    text = one_line_error("sync")
    assert f"sql==1.5.0 lists file '../{commit}/adapter_config.json'" in text
    assert installed() == [] and store_blobs() == []


def test_a_name_and_version_locked_twice_installs_nothing(project: Path, hub: HubServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run("lock")
    lock = project / "loramgr.lock"
    entries = _lock_entries(lock.read_text())
    # a second sql==1.5.0 that is consistent in itself: the files, digest and commit of 1.0.0
    other = json.loads(run("show", "sql==1.0.0", "--json").output)
    twin = {**entries[1], "digest": other["digest"], "commit": hub.repos["tester/sql"].tags["v1.0.0"],
            "revision": "v1.0.0", "files": [{k: f[k] for k in ("path", "digest", "size")} for f in other["files"]]}
    _rewrite_lock(lock, [*entries, twin])
    new_home(tmp_path, monkeypatch, "machine-g")
    assert "sql==1.5.0 is locked twice" in one_line_error("sync")
    assert installed() == [] and store_blobs() == []
