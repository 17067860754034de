"""loramgr deploy: the folder vLLM's filesystem resolver, SGLang, TGI and LoRAX read; a cache that a second
deploy leaves untouched; the engine check before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from factories import one_line_error, peft_adapter_from_model, run_cli, sample_input, tiny_llama

from loramgr.api import registry

SERVED = "org/tiny-llama-instruct"


@pytest.fixture
def installed(tmp_path: Path) -> dict[str, Path]:
    model = tiny_llama()
    folders = {
        "sql-chat": peft_adapter_from_model(model, tmp_path / "src-a", seed=1),
        "house-style": peft_adapter_from_model(model, tmp_path / "src-b", seed=2, target_modules=["o_proj"]),
    }
    run_cli("install", str(folders["sql-chat"]), "--name", "sql-chat", "--version", "1.2.0")
    run_cli("install", str(folders["house-style"]), "--name", "house-style", "--version", "2.0.0")
    run_cli("tag", "house-style==2.0.0", "stable")
    return folders


def vllm_filesystem_resolver(cache_dir: Path, base_model_name: str, lora_name: str) -> Path | None:
    """What vLLM's plugins/lora_resolvers/filesystem_resolver.py checks, restated here independently."""
    if os.path.isabs(lora_name):
        return None
    root = os.path.realpath(cache_dir)
    path = os.path.realpath(os.path.join(root, lora_name))
    if os.path.commonpath([root, path]) != root:
        return None
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(config_path):
        return None
    config = json.loads(Path(config_path).read_text())
    if config["peft_type"] == "LORA" and config["base_model_name_or_path"] == base_model_name:
        return Path(path)
    return None


def _logits(adapter_folder: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_folder)).eval()
    with torch.no_grad():
        return model(sample_input()).logits


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_deploy_vllm_gives_the_filesystem_resolver_loadable_immutable_names(tmp_path: Path, installed) -> None:
    cache = tmp_path / "lora-cache"
    args = ("deploy", "vllm", str(cache), "--served-model", SERVED, "sql-chat==1.2.0", "house-style@stable")
    out = run_cli(*args).output
    assert "2 written, 0 unchanged, 0 removed" in out
    assert f"VLLM_LORA_RESOLVER_CACHE_DIR={cache.absolute()}" in out
    assert f"--lora-modules sql-chat@1.2.0={cache.absolute() / 'sql-chat@1.2.0'}" in out
    for name, source in (("sql-chat@1.2.0", "sql-chat"), ("house-style@2.0.0", "house-style")):
        path = vllm_filesystem_resolver(cache, SERVED, name)
        assert path is not None, name
        assert torch.allclose(_logits(path), _logits(installed[source]))  # PEFT loads it, same model as the source
    assert vllm_filesystem_resolver(cache, "other/model", "sql-chat@1.2.0") is None
    assert vllm_filesystem_resolver(cache, SERVED, "../lora-cache/sql-chat@1.2.0") is not None  # stays inside
    assert vllm_filesystem_resolver(cache, SERVED, "../elsewhere") is None
    # the weights are the store's blob, hard-linked (same file system here)
    details = registry().show("sql-chat==1.2.0")
    blob = registry().store.path(next(f.digest for f in details.files if f.path == "adapter_model.safetensors"))
    assert (cache / "sql-chat@1.2.0" / "adapter_model.safetensors").stat().st_ino == blob.stat().st_ino


def test_second_deploy_writes_nothing_and_stale_entries_go(tmp_path: Path, installed) -> None:
    cache = tmp_path / "cache"
    args = ["deploy", "vllm", str(cache), "--served-model", SERVED]
    run_cli(*args, "sql-chat==1.2.0", "house-style@stable")
    (cache / "not-ours").mkdir()  # a folder loramgr did not write is never touched
    before = _snapshot(cache)
    out = run_cli(*args, "house-style@stable", "sql-chat==1.2.0").output
    assert "0 written, 2 unchanged, 0 removed" in out and _snapshot(cache) == before
    run_cli(*args, "sql-chat==1.2.0", "--keep")
    assert (cache / "house-style@2.0.0").is_dir()
    out = run_cli(*args, "sql-chat==1.2.0").output
    assert "0 written, 1 unchanged, 1 removed" in out
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["not-ours", "sql-chat@1.2.0"]
    # another served model: the config is rewritten (whole folder renamed into place), the weights still linked
    run_cli("deploy", "vllm", str(cache), "--served-model", "other/model", "sql-chat==1.2.0")
    assert vllm_filesystem_resolver(cache, "other/model", "sql-chat@1.2.0") is not None
    assert not [p for p in cache.iterdir() if p.name.endswith((".new", ".old", ".tmp"))]


def test_deploy_lock_deploys_exactly_the_locked_set(tmp_path: Path, installed) -> None:
    from loramgr.lockfile import Requirement, lock, render_lock

    locked = lock(registry(), [Requirement("sql-chat", "==1.2.0")])
    (tmp_path / "loramgr.lock").write_text(render_lock(locked))
    cache = tmp_path / "cache"
    run_cli("deploy", "vllm", str(cache), "--served-model", SERVED, "house-style@stable")
    run_cli("deploy", "vllm", str(cache), "--served-model", SERVED, "--lock", str(tmp_path / "loramgr.lock"))
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["sql-chat@1.2.0"]
    tampered = render_lock(locked).replace(locked[0].digest, "sha256:" + "0" * 64)
    (tmp_path / "bad.lock").write_text(tampered)
    assert "the lock pins" in one_line_error("deploy", "vllm", str(cache), "--served-model", SERVED, "--lock",
                                             str(tmp_path / "bad.lock"))


def test_refused_before_anything_is_written(tmp_path: Path, installed) -> None:
    dora = peft_adapter_from_model(tiny_llama(), tmp_path / "dora", use_dora=True)
    run_cli("install", str(dora), "--name", "dora", "--version", "1.0.0")
    cache = tmp_path / "cache"
    message = one_line_error("deploy", "vllm", str(cache), "--served-model", SERVED, "sql-chat==1.2.0", "dora==1.0.0")
    assert "dora@1.0.0" in message and "DoRA" in message
    assert not cache.exists()
    message = one_line_error("deploy", "vllm", str(cache), "--served-model", SERVED, "--max-lora-rank", "1",
                             "sql-chat==1.2.0")
    assert "max_lora_rank 1" in message and not cache.exists()
    assert "--served-model" in one_line_error("deploy", "vllm", str(cache), "sql-chat==1.2.0")
    assert "no-such" in one_line_error("deploy", "tgi", "no-such==1.0.0", "--dir", str(cache))


def test_tgi_sglang_lorax_layouts_and_flags(tmp_path: Path, installed) -> None:
    adapters = tmp_path / "adapters"
    out = run_cli("deploy", "tgi", "sql-chat==1.2.0", "house-style@stable", "--dir", str(adapters)).output
    line = next(x for x in out.splitlines() if x.startswith("LORA_ADAPTERS="))
    pairs = dict(item.split("=", 1) for item in line.removeprefix("LORA_ADAPTERS=").split(","))
    assert set(pairs) == {"sql-chat@1.2.0", "house-style@2.0.0"}
    for name, path in pairs.items():
        assert torch.allclose(_logits(Path(path)), _logits(installed[name.split("@")[0]]))  # a PEFT folder
        # without --served-model the declared base stays as installed
        assert json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    out = run_cli("deploy", "sglang", str(tmp_path / "sg"), "sql-chat==1.2.0").output
    assert f"--lora-paths sql-chat@1.2.0={tmp_path / 'sg' / 'sql-chat@1.2.0'}" in out
    data = json.loads(run_cli("deploy", "lorax", str(tmp_path / "lx"), "sql-chat==1.2.0", "--json").output)
    request = json.loads(data["launch"][0])
    assert request == {"adapter_id": str(tmp_path / "lx" / "sql-chat@1.2.0"), "adapter_source": "local"}
    assert data["adapters"][0]["lora_int_id"] > 0
