"""The vLLM resolver plugin: registered in the wheel's entry points; called with vLLM's LoRAResolver signature it
returns a request whose path PEFT loads and whose id is the same in another process; None when it cannot serve."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from factories import peft_adapter_from_model, run_cli, sample_input, tiny_llama

from loramgr.serve.vllm_plugin import RegistryResolver

SERVED = "org/tiny-llama"


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    folder = peft_adapter_from_model(tiny_llama(), tmp_path / "src", seed=3)
    run_cli("install", str(folder), "--name", "sql-chat", "--version", "1.2.0")
    run_cli("tag", "sql-chat==1.2.0", "stable")
    dora = peft_adapter_from_model(tiny_llama(), tmp_path / "dora", use_dora=True)
    run_cli("install", str(dora), "--name", "dora", "--version", "1.0.0")
    return folder


def _resolve(cache: Path, lora_name: str, base: str = SERVED) -> object:
    resolver = RegistryResolver(cache)
    return asyncio.run(resolver.resolve_lora(base, lora_name))  # vLLM's LoRAResolver signature, awaited


def _logits(folder: str | Path) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()(sample_input()).logits


def test_resolver_answers_versions_and_tags_with_loadable_stable_requests(tmp_path: Path, installed: Path) -> None:
    cache = tmp_path / "cache"
    request = _resolve(cache, "sql-chat@1.2.0")
    assert request is not None
    assert request.lora_name == "sql-chat@1.2.0"  # type: ignore[attr-defined]
    path = Path(request.lora_path)  # type: ignore[attr-defined]
    assert path.parent == cache and torch.allclose(_logits(path), _logits(installed))
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == SERVED
    tagged = _resolve(cache, "sql-chat@stable")
    assert (tagged.lora_name, tagged.lora_int_id) == ("sql-chat@1.2.0", request.lora_int_id)  # type: ignore[attr-defined]
    # another process (another hash seed) derives the same id from the digest
    code = ("import asyncio, sys; from loramgr.serve.vllm_plugin import RegistryResolver; "
            "r = asyncio.run(RegistryResolver(sys.argv[1]).resolve_lora('org/tiny-llama', 'sql-chat@1.2.0')); "
            "print(r.lora_int_id)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache2")], env=env, capture_output=True,
                           text=True, check=True)
    assert int(other.stdout.strip()) == request.lora_int_id > 0  # type: ignore[attr-defined]


def test_resolver_returns_none_for_what_it_cannot_serve(tmp_path: Path, installed: Path) -> None:
    cache = tmp_path / "cache"
    assert _resolve(cache, "no-such@1.0.0") is None
    assert _resolve(cache, "sql-chat@9.9.9") is None
    assert _resolve(cache, "sql-chat") is None  # a bare name could later point at other weights
    assert _resolve(cache, "dora@1.0.0") is None  # vLLM refuses DoRA
    assert not (cache / "dora@1.0.0").exists()


def test_register_without_vllm_is_a_no_op() -> None:
    from loramgr.serve.vllm_plugin import register

    try:
        import vllm  # noqa: F401
    except ImportError:
        assert register() is None
    else:  # pragma: no cover - only where vLLM is installed
        from vllm.lora.resolver import LoRAResolverRegistry

        register()
        assert "loramgr" in LoRAResolverRegistry.get_supported_resolvers()


@pytest.mark.slow
def test_wheel_registers_the_resolver_entry_point(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("loramgr-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(name).decode()
        assert "loramgr/serve/vllm_plugin.py" in archive.namelist()
    section = text.split("[vllm.general_plugins]", 1)[1].split("[", 1)[0]
    entries = dict(line.split(" = ", 1) for line in section.strip().splitlines())
    module, _, function = entries["loramgr"].partition(":")
    assert (module, function) == ("loramgr.serve.vllm_plugin", "register")
    import importlib

    assert callable(getattr(importlib.import_module(module), function))
