"""The registry library: metadata read at install, references, versioning, dedup, export, gc, verify."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from factories import peft_adapter_from_model, sample_input, tiny_llama, write_peft_adapter
from safetensors.torch import load_file

import loramgr
from loramgr.errors import (
    AmbiguousReferenceError,
    ConflictError,
    InvalidReferenceError,
    NotFoundError,
    UnsupportedAdapterError,
)
from loramgr.registry import (
    InstallResult,
    Registry,
    StoredModule,
    execute_gc,
    execute_remove,
    plan_gc,
    plan_remove,
    verify,
)

LLAMA_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="session")
def llama_adapter(tmp_path_factory) -> Path:
    """A PEFT-made adapter on tiny_llama: r=4, alpha=8 on q_proj (32->32) and v_proj (32->16), 2 layers."""
    return peft_adapter_from_model(
        tiny_llama(), tmp_path_factory.mktemp("peft") / "sql-lora", r=4, alpha=8.0, target_modules=LLAMA_TARGETS
    )


@pytest.fixture
def registry():
    reg = Registry.open()
    yield reg
    reg.close()


def install(registry: Registry, source: Path, **options) -> InstallResult:
    return loramgr.install(source, registry_=registry, **options)


def export(registry: Registry, reference: str, destination: Path, **options) -> Path:
    return loramgr.export(reference, destination, registry_=registry, **options)


def mixed_rank_adapter(folder: Path, seed: int = 0, **kwargs) -> Path:
    """Hand-built: ranks 8 / 4 / 8, alpha 16 except v (alpha_pattern 2.0), target_modules disagreeing."""
    return write_peft_adapter(
        folder,
        {"layers.0.q": (32, 32, 8), "layers.0.v": (32, 16, 4), "layers.1.q": (32, 32, 8)},
        alpha=16.0,
        alpha_pattern={"v": 2.0},
        target_modules=["q", "k"],
        seed=seed,
        readme="---\nlicense: mit\ntags: [sql, text-to-sql]\n---\n# SQL assistant\n\nWrites SQL from questions.\n",
        **kwargs,
    )


def small_adapter(folder: Path, seed: int = 0, readme: str | None = None) -> Path:
    return write_peft_adapter(folder, {"layers.0.q": (8, 8, 2)}, seed=seed, readme=readme)


def blob_files(home: Path) -> set[str]:
    root = home / "blobs"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


# -- metadata read at install -----------------------------------------------------------------------


def test_install_peft_made_adapter_records_rank_alpha_targets_and_counts(registry, llama_adapter):
    result = install(registry, llama_adapter, name="sql-assistant", version="1.0.0")
    assert (result.name, result.version, result.created) == ("sql-assistant", "1.0.0", True)
    data = registry.show("sql-assistant")
    assert data.rank == 4 and data.ranks_found == [4]
    assert data.alpha == 8.0
    assert sorted(data.target_modules) == LLAMA_TARGETS
    assert data.target_modules_found == LLAMA_TARGETS
    # 2 layers x (q: 4*(32+32) + v: 4*(32+16)) trainable parameters, 2 tensors per module
    assert data.n_modules == 4
    assert data.n_params == 2 * (4 * 64 + 4 * 48)
    assert data.dtypes == ["float32"]
    assert data.base_model == "tiny-llama"
    assert data.file_metadata == {"format": "pt"}
    assert data.source == str(llama_adapter.resolve())
    assert data.notes == []
    modules = {m.name: m for m in data.modules}
    assert modules["model.layers.1.self_attn.v_proj"] == StoredModule(
        name="model.layers.1.self_attn.v_proj", kind="linear", rank=4, alpha=8.0, in_features=32, out_features=16,
        dtype="float32",
    )
    assert modules["model.layers.0.self_attn.q_proj"].out_features == 32
    assert {f.path for f in data.files} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    weights = next(f for f in data.files if f.path == "adapter_model.safetensors")
    assert weights.size == (llama_adapter / "adapter_model.safetensors").stat().st_size


def test_install_hand_built_adapter_with_per_module_ranks(registry, tmp_path):
    folder = mixed_rank_adapter(tmp_path / "mixed", extra_config={"use_rslora": True, "revision": "abc123"})
    result = install(registry, folder, version="0.3.0")
    assert result.name == "mixed" and result.version == "0.3.0"
    data = registry.show("mixed==0.3.0")
    assert data.rank == 8 and data.ranks_found == [4, 8]
    assert data.rank_pattern == {"layers.0.v": 4}
    assert data.alpha_pattern == {"v": 2.0}
    assert data.use_rslora is True and data.use_dora is False
    assert data.base_model == "tiny-base" and data.base_model_revision == "abc123"
    assert data.task_type == "CAUSAL_LM"
    assert data.n_params == 8 * 64 + 4 * 48 + 8 * 64
    ranks = {m.name: (m.rank, m.alpha, m.in_features, m.out_features) for m in data.modules}
    assert ranks == {"layers.0.q": (8, 16.0, 32, 32), "layers.0.v": (4, 2.0, 32, 16), "layers.1.q": (8, 16.0, 32, 32)}
    # config targets q, k; the weights hold q, v: both disagreements are reported
    assert data.target_modules == ["q", "k"] and data.target_modules_found == ["q", "v"]
    assert any("not in target_modules" in n and "layers.0.v" in n for n in data.notes)
    assert any("lists k" in n for n in data.notes)
    assert data.card == {"license": "mit", "description": "Writes SQL from questions.",
                            "tags": ["sql", "text-to-sql"]}
    assert data.installed_at[:4].isdigit()
    row = registry.list_versions("mixed")[0]
    assert (row.rank, row.alpha, row.n_modules, row.base_model) == (8, 16.0, 3, "tiny-base")


# -- versioning and immutability --------------------------------------------------------------------


def test_auto_versioning_starts_at_0_1_0_then_next_minor(registry, tmp_path):
    assert install(registry, small_adapter(tmp_path / "a", seed=1), name="auto").version == "0.1.0"
    assert install(registry, small_adapter(tmp_path / "b", seed=2), name="auto").version == "0.2.0"
    assert install(registry, small_adapter(tmp_path / "c", seed=3), name="auto", version="1.3.2").version == "1.3.2"
    assert install(registry, small_adapter(tmp_path / "d", seed=4), name="auto").version == "1.4.0"
    # the same bytes again without --version: nothing new, reported as the existing version
    again = install(registry, tmp_path / "b", name="auto")
    assert (again.version, again.created) == ("0.2.0", False)
    assert [r.version for r in registry.list_versions("auto")] == ["0.1.0", "0.2.0", "1.3.2", "1.4.0"]


def test_names_are_canonicalised(registry, tmp_path):
    install(registry, small_adapter(tmp_path / "a"), name="SQL_Assistant.v2", version="1.0")
    assert registry.resolve("sql-assistant-v2").version == "1.0"
    assert registry.resolve("Sql.Assistant_V2==1.0.0").version == "1.0"


def test_identical_bytes_store_one_blob_set(registry, tmp_path, loramgr_home):
    folder = small_adapter(tmp_path / "a", readme="# card\n\nhello\n")
    first = install(registry, folder, name="one", version="1.0.0")
    blobs = blob_files(loramgr_home)
    assert len(blobs) == 3  # config, weights, card
    again = install(registry, folder, name="one", version="1.0.0")
    assert (again.created, again.digest) == (False, first.digest)
    other = install(registry, folder, name="two", version="5.0")
    assert other.created and other.digest == first.digest
    assert blob_files(loramgr_home) == blobs
    assert len(registry.list_versions()) == 2


def test_a_version_is_immutable(registry, tmp_path, loramgr_home):
    install(registry, small_adapter(tmp_path / "a", seed=1), name="imm", version="1.0.0")
    blobs = blob_files(loramgr_home)
    with pytest.raises(ConflictError, match=r"imm==1\.0\.0 is already installed with other bytes"):
        install(registry, small_adapter(tmp_path / "b", seed=2), name="imm", version="1.0.0")
    # refused before storing anything, and 1.0 is the same version as 1.0.0
    assert blob_files(loramgr_home) == blobs
    with pytest.raises(ConflictError):
        install(registry, tmp_path / "b", name="imm", version="1.0")
    assert [r.digest for r in registry.list_versions("imm")] == [registry.resolve("imm").digest]


# -- references -------------------------------------------------------------------------------------


@pytest.fixture
def versions(registry, tmp_path):
    """ref: 1.0.0, 1.1.0, 1.2.0b1, 2.0.0rc1, each with its own bytes."""
    digests = {}
    for i, version in enumerate(["1.0.0", "1.1.0", "1.2.0b1", "2.0.0rc1"]):
        digests[version] = install(registry, small_adapter(tmp_path / version, seed=10 + i), name="ref",
                                            version=version).digest
    return digests


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("ref", "1.1.0"),  # newest final release, pre-releases skipped
        ("ref@latest", "1.1.0"),
        ("REF", "1.1.0"),
        ("ref==1.0.0", "1.0.0"),
        ("ref==1.0", "1.0.0"),
        ("ref==2.0.0rc1", "2.0.0rc1"),
        ("ref>=1.0,<2", "1.1.0"),
        ("ref>=1,<1.1", "1.0.0"),
        ("ref~=1.0", "1.1.0"),
        ("ref>=2.0.0rc1", "2.0.0rc1"),  # a specifier naming a pre-release admits it
        ("ref!=1.1.0", "1.0.0"),
    ],
)
def test_reference_resolution(registry, versions, reference, expected):
    assert registry.resolve(reference).version == expected


def test_only_prereleases_resolve_to_the_newest_prerelease(registry, tmp_path):
    install(registry, small_adapter(tmp_path / "a", seed=1), name="pre", version="0.1.0a1")
    install(registry, small_adapter(tmp_path / "b", seed=2), name="pre", version="0.1.0b2")
    assert registry.resolve("pre").version == "0.1.0b2"


def test_references_that_match_nothing(registry, versions):
    with pytest.raises(NotFoundError, match="no version of ref matches") as err:
        registry.resolve("ref>=3")
    assert "1.0.0, 1.1.0, 1.2.0b1, 2.0.0rc1" in str(err.value)
    with pytest.raises(NotFoundError, match="no adapter named 'nope'"):
        registry.resolve("nope")
    with pytest.raises(NotFoundError, match="no adapter version with digest"):
        registry.resolve("sha256:000000")
    with pytest.raises(InvalidReferenceError, match="invalid version specifier"):
        registry.resolve("ref>=>1")


def test_tags_move_and_resolve(registry, versions):
    assert registry.tag("ref==1.0.0", "stable") == ("1.0.0", None)
    assert registry.resolve("ref@stable").version == "1.0.0"
    assert registry.tag("ref==1.1.0", "stable") == ("1.1.0", "1.0.0")
    assert registry.resolve("ref@stable").version == "1.1.0"
    assert registry.show("ref==1.1.0").tags == ["stable"] and registry.show("ref==1.0.0").tags == []
    with pytest.raises(NotFoundError, match="has no tag 'beta'.*its tags: stable"):
        registry.resolve("ref@beta")
    with pytest.raises(InvalidReferenceError, match="reserved"):
        registry.tag("ref==1.0.0", "latest")
    assert registry.untag("ref", "stable") == "1.1.0"
    with pytest.raises(NotFoundError):
        registry.resolve("ref@stable")


def test_digest_prefix_resolution(registry, versions):
    digest = versions["1.1.0"]
    assert registry.resolve(digest).version == "1.1.0"
    assert registry.resolve(digest[:13]).version == "1.1.0"  # sha256: + 6 hex digits
    with pytest.raises(InvalidReferenceError, match="at least 6 hex"):
        registry.resolve(digest[:11])


def test_ambiguous_digest_prefix(registry, versions, tmp_path):
    # two versions whose digests share their first 12 hex digits
    twin = versions["1.0.0"][:19] + "f" * 52
    with registry.transaction() as tx:
        tx.execute("UPDATE versions SET digest = :twin WHERE version = '1.1.0'", twin=twin)
    with pytest.raises(AmbiguousReferenceError, match="matches 2 versions") as err:
        registry.resolve(twin[:19])
    assert err.value.candidates == ["ref==1.0.0", "ref==1.1.0"]
    assert registry.resolve(twin[:20]).version == "1.1.0"


# -- export -----------------------------------------------------------------------------------------


def test_export_loads_in_peft_with_the_original_outputs(registry, llama_adapter, tmp_path):
    from peft import PeftModel

    install(registry, llama_adapter, name="sql-assistant", version="1.0.0")
    registry.tag("sql-assistant==1.0.0", "stable")
    out = export(registry, "sql-assistant@stable", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (llama_adapter / name).read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # a normal new folder, not mkdtemp's 0700
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) & stat.S_IWUSR  # not a read-only blob

    tokens = sample_input()
    with torch.no_grad():
        base = tiny_llama()(tokens).logits
        original = PeftModel.from_pretrained(tiny_llama(), str(llama_adapter)).eval()(tokens).logits
        exported = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()(tokens).logits
    assert not torch.allclose(original, base, atol=1e-4)  # the adapter changes the outputs
    torch.testing.assert_close(exported, original, rtol=0, atol=0)


def test_export_refuses_a_non_empty_destination(registry, tmp_path):
    install(registry, small_adapter(tmp_path / "a"), name="x", version="1")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError, match="exists and is not empty"):
        export(registry, "x", dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert export(registry, "x", tmp_path / "empty-ok").is_dir()


# -- remove, gc, verify -----------------------------------------------------------------------------


def test_gc_after_remove_frees_only_blobs_no_version_uses(registry, tmp_path, loramgr_home):
    # v1 and v2 share config and weights, differ in their model card
    folder = small_adapter(tmp_path / "a", readme="first card\n")
    v1 = install(registry, folder, name="shared", version="1.0.0")
    (folder / "README.md").write_text("second card\n")
    install(registry, folder, name="shared", version="2.0.0")
    assert len(blob_files(loramgr_home)) == 4
    first_card = registry.store.path(next(f.digest for f in registry.show("shared==1.0.0").files
                                          if f.path == "README.md"))

    plan = plan_remove(registry, "shared==1.0.0")
    assert [i.label for i in plan.items] == ["shared==1.0.0"]
    execute_remove(registry, plan)
    assert [r.version for r in registry.list_versions()] == ["2.0.0"]
    assert first_card.exists()  # remove touches rows only

    dry = plan_gc(registry)
    assert [(i.what, i.label) for i in dry.items] == [("blob", "sha256:" + first_card.name)]
    assert dry.freed == len("first card\n")
    assert first_card.exists()
    done = execute_gc(registry)
    assert done.freed == dry.freed and not first_card.exists()
    assert len(blob_files(loramgr_home)) == 3
    assert verify(registry).ok
    exported = export(registry, "shared", tmp_path / "out")
    assert (exported / "README.md").read_text() == "second card\n"
    # a version's digest leaves out its model card: 2.0.0 now answers 1.0.0's digest alone
    assert registry.resolve(v1.digest).version == "2.0.0"


def test_remove_all_versions_then_gc_empties_the_store(registry, tmp_path, loramgr_home):
    install(registry, small_adapter(tmp_path / "a", seed=1), name="gone", version="1.0")
    install(registry, small_adapter(tmp_path / "b", seed=2), name="gone", version="2.0")
    with pytest.raises(InvalidReferenceError, match="matches 2 versions"):
        plan_remove(registry, "gone")
    execute_remove(registry, plan_remove(registry, "gone", all_versions=True))
    assert registry.list_versions() == []
    with pytest.raises(NotFoundError):
        registry.resolve("gone")
    assert len(execute_gc(registry).items) == 3  # one shared config, two weights
    assert blob_files(loramgr_home) == set()


def test_remove_by_specifier_counts_only_the_matching_versions(registry, versions):
    assert [i.label for i in plan_remove(registry, "ref>=1,<1.1").items] == ["ref==1.0.0"]
    with pytest.raises(InvalidReferenceError, match="'ref>=1' matches 2 versions of ref"):
        plan_remove(registry, "ref>=1")
    assert [i.label for i in plan_remove(registry, "ref>=1", all_versions=True).items] == ["ref==1.0.0", "ref==1.1.0"]
    with pytest.raises(NotFoundError, match="no version of ref matches 'ref>=5'"):
        plan_remove(registry, "ref>=5", all_versions=True)
    assert [i.label for i in plan_remove(registry, "ref@latest", all_versions=True).items] == [
        "ref==1.0.0", "ref==1.1.0", "ref==1.2.0b1", "ref==2.0.0rc1",
    ]


def test_verify_names_the_adapters_using_a_corrupt_blob(registry, tmp_path):
    folder = small_adapter(tmp_path / "a", seed=1)
    install(registry, folder, name="good", version="1.0")
    install(registry, folder, name="bad", version="1.0")  # same bytes: same blobs
    install(registry, small_adapter(tmp_path / "b", seed=2), name="other", version="1.0")
    report = verify(registry)
    assert report.ok and report.checked == 3  # one config (identical JSON in both folders), two weights

    weights = next(f.digest for f in registry.show("bad").files if f.path == "adapter_model.safetensors")
    blob = registry.store.path(weights)
    assert stat.S_IMODE(blob.stat().st_mode) & 0o222 == 0  # stored read-only
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    report = verify(registry)
    assert not report.ok
    assert [(p.digest, p.problem, p.used_by) for p in report.problems] == [
        (weights, "corrupt", ["bad==1.0", "good==1.0"])
    ]
    assert verify(registry, "other").ok
    blob.unlink()
    assert verify(registry).problems[0].problem == "missing"


def test_interrupted_install_leaves_list_unchanged_and_gc_cleans_up(registry, tmp_path, loramgr_home, monkeypatch):
    install(registry, small_adapter(tmp_path / "keep", seed=1), name="keep", version="1.0")
    before_blobs = blob_files(loramgr_home)
    before_list = [r.to_dict() for r in registry.list_versions()]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Registry, "_commit_version", interrupted)
        install(registry, small_adapter(tmp_path / "new", seed=2, readme="card\n"), name="new", version="1.0")
    assert [r.to_dict() for r in registry.list_versions()] == before_list
    orphans = blob_files(loramgr_home) - before_blobs
    assert len(orphans) == 2  # the new weights and card; the config JSON is byte-identical to keep's
    # a write killed mid-way (kill -9) leaves a temporary file
    (loramgr_home / "tmp" / "blob-killed.tmp").write_bytes(b"x" * 10)
    plan = execute_gc(registry)
    assert sorted(i.what for i in plan.items) == ["blob", "blob", "temp"]
    assert blob_files(loramgr_home) == before_blobs
    assert list((loramgr_home / "tmp").iterdir()) == []
    assert verify(registry).ok


# -- pickles ----------------------------------------------------------------------------------------


def _pickled_copy(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    torch.save(load_file(src / "adapter_model.safetensors"), dest / "adapter_model.bin")
    return dest


def test_pickled_weights_are_refused_by_default(registry, tmp_path, loramgr_home):
    folder = _pickled_copy(small_adapter(tmp_path / "src"), tmp_path / "pickled")
    with pytest.raises(UnsupportedAdapterError, match=r"adapter_model\.bin.*--allow-pickle"):
        install(registry, folder)
    assert blob_files(loramgr_home) == set() and registry.list_versions() == []


def test_allow_pickle_stores_safetensors_with_the_same_tensors(registry, tmp_path):
    src = small_adapter(tmp_path / "src")
    folder = _pickled_copy(src, tmp_path / "pickled")
    result = install(registry, folder, allow_pickle=True)
    assert result.created and any("converted from adapter_model.bin" in n for n in result.notes)
    data = registry.show("pickled")
    assert {f.path for f in data.files} == {"adapter_config.json", "adapter_model.safetensors"}
    assert data.ranks_found == [2]
    out = export(registry, "pickled", tmp_path / "out")
    stored, original = load_file(out / "adapter_model.safetensors"), load_file(src / "adapter_model.safetensors")
    assert stored.keys() == original.keys()
    for key in original:
        assert torch.equal(stored[key], original[key])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_allow_pickle_still_refuses_a_pickle_that_runs_code(registry, tmp_path, monkeypatch):
    folder = small_adapter(tmp_path / "evil")
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _RunsCode()}, handle)
    monkeypatch.chdir(tmp_path)
    from loramgr.errors import InvalidAdapterError

    with pytest.raises(InvalidAdapterError, match="weights-only"):
        install(registry, folder, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()
    assert registry.list_versions() == []


# -- database location ------------------------------------------------------------------------------


def test_database_url_points_at_another_sqlite_file(tmp_path, loramgr_home, monkeypatch):
    other = tmp_path / "elsewhere" / "other.db"
    monkeypatch.setenv("LORAMGR_DATABASE_URL", f"sqlite:///{other}")
    reg = Registry.open()
    try:
        install(reg, small_adapter(tmp_path / "a"), name="remote", version="1.0")
    finally:
        reg.close()
    assert other.is_file() and not (loramgr_home / "registry.db").exists()
    import sqlite3

    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT name FROM adapters").fetchall() == [("remote",)]
    monkeypatch.delenv("LORAMGR_DATABASE_URL")
    # the home's own (new, empty) database does not describe the blobs stored there: refused, not "empty"
    from loramgr.errors import RegistryError

    with pytest.raises(RegistryError, match=r"registry.db is empty, but .* holds 2 blob\(s\).*doctor --rebuild"):
        Registry.open()


def test_show_json_round_trips(registry, tmp_path):
    install(registry, mixed_rank_adapter(tmp_path / "m"), name="m", version="1")
    data = registry.show("m").to_dict()
    assert json.loads(json.dumps(data, default=str))["modules"][1]["name"] == "layers.0.v"
