"""One route per step: ``loramgr install`` / ``loramgr export`` and ``loramgr.install`` / ``loramgr.export``
run the same code, so the same input gives the same stored version or the same written files, and the
same mistake the same one-line error. Also: what every route shares (atomic writes, the store lock
around scratch folders, typed results, a registry that imports nothing above it).
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import torch
from factories import one_line_error, run_cli, write_peft_adapter
from hubserver import TEST_TOKEN, HubServer
from safetensors import safe_open
from safetensors.torch import load_file
from test_kohya import TinyPipeline, kohya_delta, write_kohya_file

import loramgr
from loramgr.errors import DestinationExistsError, LoramgrError, UnknownFormatError
from loramgr.exporter import EXPORT_FORMATS
from loramgr.registry import Registry, VersionDetails

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.0.self_attn.v_proj": (16, 8, 4)}
CARD = "---\nlicense: mit\n---\n# sql\n\nWrites SQL.\n"


def use_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    home = tmp_path / name
    monkeypatch.setenv("LORAMGR_HOME", str(home))
    return home


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def api_error(call) -> str:  # noqa: ANN001 - a zero-argument callable
    with pytest.raises(LoramgrError) as err:
        call()
    return f"Error: {err.value}"


# -- install -----------------------------------------------------------------------------------------


@pytest.fixture(params=["folder", "file", "hub"])
def source(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Path]]:
    """What a user installs, and the files (path in the adapter -> file) the version must hold."""
    folder = write_peft_adapter(tmp_path / "src" / "sql", MODULES, base_model="tiny/base", readme=CARD)
    files = {p.name: p for p in folder.iterdir()}
    if request.param == "folder":
        return str(folder), files
    if request.param == "file":
        path = write_kohya_file(tmp_path / "src" / "style.safetensors", TinyPipeline())
        return str(path), {path.name: path}
    hub: HubServer = request.getfixturevalue("hub")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    hub.seed("tester/sql", {name: path.read_bytes() for name, path in files.items()}, tag="v1.0.0")
    return "hf://tester/sql@v1.0.0", files


def test_install_stores_the_same_version_from_the_cli_and_the_api(source, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    text, files = source
    use_home(tmp_path, monkeypatch, "cli")
    printed = json.loads(run_cli("install", text, "--json").output)
    from_cli = json.loads(run_cli("show", f"{printed['name']}=={printed['version']}", "--json").output)

    use_home(tmp_path, monkeypatch, "api")
    result = loramgr.install(text)
    from_api = loramgr.Registry.open().show(result.ref).to_dict()

    assert result.to_dict() == printed
    from_cli.pop("installed_at"), from_api.pop("installed_at")
    assert from_api == from_cli
    # the stored files are the source's, byte for byte (hashed here, independently of the store)
    assert {f["path"]: f["digest"] for f in from_api["files"]} == {name: sha256(p) for name, p in files.items()}
    if text.startswith("hf://"):
        assert result.hub is not None and result.hub.repo == "tester/sql" and result.hub.revision == "v1.0.0"
        assert (from_api["name"], from_api["version"]) == ("sql", "1.0.0")


def test_install_mistakes_are_the_same_one_line_error(tmp_path: Path) -> None:
    folder = write_peft_adapter(tmp_path / "sql", MODULES)
    cases = [
        ([str(tmp_path / "nowhere")], {}),
        ([str(folder), "--version", "banana"], {"version": "banana"}),
        ([str(folder), "--base", "no-such-base"], {"base": "no-such-base"}),
        (["hf://not-a-repo"], {}),
    ]
    for args, options in cases:
        from_cli = one_line_error("install", *args)
        assert from_cli == api_error(lambda args=args, options=options: loramgr.install(args[0], **options))
    assert Registry.open().list_versions() == []


# -- export ------------------------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A plain LoRA (alpha != rank, so a converter that drops alpha is caught) installed as sql==1.0.0."""
    # no task_type (a diffusion text encoder's LoRA has none): every export format's writer can take it
    folder = write_peft_adapter(tmp_path / "sql", MODULES, alpha=12.0, base_model="tiny/base", readme=CARD,
                                extra_config={"task_type": None})
    loramgr.install(folder, name="sql", version="1.0.0")
    return folder


def _source_delta(folder: Path, module: str) -> torch.Tensor:
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    return config["lora_alpha"] / config["r"] * (b @ a)


def _contents(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k).numpy().tobytes() for k in handle.keys()}  # noqa: SIM118


# the formats any LoRA exports to; comfyui / xlabs (diffusion transformers) are covered by tests/test_diffusion_*.py,
# gguf / ollama (LLMs on llama.cpp) by tests/test_serve_gguf.py
@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers"])
def test_export_writes_the_same_files_from_the_cli_and_the_api(fmt: str, stored: Path, tmp_path: Path) -> None:
    suffix = "" if fmt == "peft" else ".safetensors"
    by_cli, by_api = tmp_path / f"cli-out{suffix}", tmp_path / f"api-out{suffix}"
    assert run_cli("export", "sql", str(by_cli), "--format", fmt).output == f"exported sql to {by_cli}\n"
    assert loramgr.export("sql", by_api, format=fmt) == by_api
    if fmt == "peft":
        assert sorted(p.name for p in by_api.iterdir()) == sorted(p.name for p in by_cli.iterdir())
        for path in stored.iterdir():  # the stored bytes, file for file
            assert (by_api / path.name).read_bytes() == (by_cli / path.name).read_bytes() == path.read_bytes()
        return
    # the same tensors and metadata (safetensors writes its metadata map in no fixed order)
    assert _contents(by_api) == _contents(by_cli)
    tensors = load_file(str(by_api))
    for module in MODULES:
        if fmt == "kohya":  # ΔW as kohya's own merge computes it from the file
            got = kohya_delta(tensors, "lora_unet_" + module.replace(".", "_"))
        else:  # diffusers: the factors verbatim, the scale in lora_adapter_metadata
            with safe_open(str(by_api), framework="pt") as handle:
                config = json.loads(handle.metadata()["lora_adapter_metadata"])
            a, b = tensors[f"unet.{module}.lora_A.weight"], tensors[f"unet.{module}.lora_B.weight"]
            got = config["unet.lora_alpha"] / config["unet.r"] * (b.double() @ a.double())
        torch.testing.assert_close(got, _source_delta(stored, module), rtol=1e-6, atol=1e-7)


def test_export_mistakes_are_the_same_one_line_error(stored: Path, tmp_path: Path) -> None:
    taken_folder = tmp_path / "taken"
    taken_folder.mkdir()
    (taken_folder / "mine.txt").write_text("keep")
    taken_file = tmp_path / "taken.safetensors"
    taken_file.write_bytes(b"mine")
    cases = [("nope", tmp_path / "out", "peft"), ("sql", taken_folder, "peft"), ("sql", taken_file, "kohya"),
             ("sql", taken_file, "diffusers")]  # a file format given a folder writes inside it, as cp does
    for reference, destination, fmt in cases:
        from_cli = one_line_error("export", reference, str(destination), "--format", fmt)
        assert from_cli == api_error(lambda r=reference, d=destination, f=fmt: loramgr.export(r, str(d), format=f))
    assert [p.name for p in taken_folder.iterdir()] == ["mine.txt"] and taken_file.read_bytes() == b"mine"
    with pytest.raises(DestinationExistsError) as err:
        loramgr.export("sql", taken_file, format="kohya")
    assert err.value.path == str(taken_file)
    # an unknown format: a usage error on the command line, the same list of formats from either
    refused = run_cli("export", "sql", str(tmp_path / "x"), "--format", "onnx", code=2).output
    with pytest.raises(UnknownFormatError) as unknown:
        loramgr.export("sql", tmp_path / "x", format="onnx")
    assert unknown.value.known == EXPORT_FORMATS and str(unknown.value) == (
        "unknown export format 'onnx': use one of peft, kohya, diffusers, comfyui, xlabs, gguf, ollama")
    assert all(f"'{fmt}'" in refused for fmt in EXPORT_FORMATS)
    assert not (tmp_path / "x").exists()
    # a format that cannot hold this adapter refuses it by name, the same from either, writing nothing
    from_cli = one_line_error("export", "sql", str(tmp_path / "x.safetensors"), "--format", "comfyui")
    assert "comfyui files hold LoRAs of diffusion transformers" in from_cli
    assert from_cli == api_error(lambda: loramgr.export("sql", tmp_path / "x.safetensors", format="comfyui"))
    assert not (tmp_path / "x.safetensors").exists()


def test_a_converted_peft_export_that_fails_midway_leaves_no_folder(stored: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """kohya / diffusers -> PEFT writes a new folder: an error after the config leaves nothing behind."""
    diffusers_file = loramgr.export("sql", tmp_path / "sql-diffusers.safetensors", format="diffusers")
    loramgr.install(diffusers_file, name="diff", version="1.0.0")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    destination = tmp_path / "exports" / "diff"
    with monkeypatch.context() as patch:
        patch.setattr("loramgr.merge.tensorfile.safetensors_bytes", disk_full)
        with pytest.raises(OSError, match="No space left"):
            loramgr.export("diff", destination)
    assert not destination.exists() and list(destination.parent.iterdir()) == []
    # the same export, now with room: a PEFT folder with the adapter's ΔW
    loramgr.export("diff", destination)
    config = json.loads((destination / "adapter_config.json").read_text())
    tensors = load_file(str(destination / "adapter_model.safetensors"))
    for module in MODULES:
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        got = config["alpha_pattern"].get(module, config["lora_alpha"]) / config["r"] * (b @ a)
        torch.testing.assert_close(got, _source_delta(stored, module), rtol=1e-6, atol=1e-7)


# -- what the routes share ---------------------------------------------------------------------------


def test_a_push_scratch_folder_holds_the_store_lock_that_gc_needs(stored: Path) -> None:
    """gc empties tmp/ under the exclusive lock: while a push's files sit in tmp/, gc must wait."""
    import fcntl

    from loramgr.hub.publish import prepare_push
    from loramgr.registry import execute_gc

    registry = Registry.open()
    with prepare_push(registry, "sql", repo_id="tester/sql") as (plan, folder):
        assert folder.is_relative_to(registry.store.tmp_dir)
        with open(registry.root / "store.lock", "a+b") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what gc takes, refused while the push runs
        assert sorted(name for name, _ in plan.files) == ["adapter_config.json", "adapter_model.safetensors"]
        assert all((folder / name).is_file() for name, _ in plan.files)
    assert execute_gc(registry).items == [] and list(registry.store.tmp_dir.iterdir()) == []


def test_show_is_typed_and_show_json_prints_it(stored: Path) -> None:
    details = Registry.open().show("sql")
    assert isinstance(details, VersionDetails)
    assert (details.ref, details.rank, details.alpha, details.source_details.hub) == ("sql==1.0.0", 4, 12.0, None)
    assert [f.path for f in details.files] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    printed = json.loads(run_cli("show", "sql", "--json").output)
    assert printed == json.loads(json.dumps(details.to_dict()))
    assert sorted(printed) == sorted([
        "name", "display_name", "version", "digest", "tags", "size", "installed_at", "source", "source_details",
        "format", "adapter_type", "rank", "ranks_found", "alpha", "use_rslora", "use_dora", "rank_pattern",
        "alpha_pattern", "target_modules", "target_modules_found", "base_model", "base_model_revision",
        "task_type", "n_modules", "n_params", "dtypes", "file_metadata", "card", "notes", "weights_file", "config",
        "files", "modules", "parents", "recipe", "init_method", "extras",
    ])
    assert printed["source_details"] == {} and printed["files"][0] == {
        "path": "README.md", "digest": sha256(stored / "README.md"), "size": len(CARD)}


def test_the_registry_imports_nothing_above_it() -> None:
    """The registry stores what it is given; installing, exporting, merging and the Hub sit on top of it."""
    allowed = {"adapter", "errors", "paths", "store", "fileio", "safetensors_io", "formats", "compat.basemodel"}
    package = Path(loramgr.__file__).parent / "registry"
    upward = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from ..x import y, from .. import x
                targets = [node.module] if node.module else [a.name for a in node.names]
                upward += [f"{path.name}: {'.' * node.level}{t}" for t in targets
                           if not any(t == a or t.startswith(a + ".") for a in allowed)]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # from loramgr.x import y
                upward += [f"{path.name}: from {node.module}"] if (node.module or "").startswith("loramgr") else []
            elif isinstance(node, ast.Import):
                upward += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("loramgr")]
    assert upward == []


def test_the_export_formats_are_listed_once(tmp_path: Path) -> None:
    """The CLI's --format choices, the export route and the converters' dispatch name the same formats."""
    from loramgr.errors import UnknownFormatError
    from loramgr.exporter import EXPORT_FORMATS
    from loramgr.formats.convert import export_adapter

    with pytest.raises(UnknownFormatError) as caught:
        export_adapter(None, tmp_path / "x", "gguf-typo")  # type: ignore[arg-type]
    assert caught.value.known == EXPORT_FORMATS
