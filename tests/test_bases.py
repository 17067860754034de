"""Base models in the registry: base add / list / show, install --base, declared-name matching, check."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from factories import one_line_error, peft_adapter_from_model, run_cli, tiny_llama
from safetensors.torch import save_file

from loramgr.registry import Registry


def save_base(model: torch.nn.Module, folder: Path) -> Path:
    """A base checkpoint as transformers saves one: safetensors weights plus config.json."""
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}))
    return folder


def test_base_add_list_show_and_refusals(tmp_path: Path) -> None:
    base = save_base(tiny_llama(), tmp_path / "llama")
    assert "registered base tiny-llama (LlamaForCausalLM" in run_cli("base", "add", str(base), "--name",
                                                                     "tiny-llama").output
    listing = run_cli("base", "list").output
    assert "tiny-llama" in listing and "LlamaForCausalLM" in listing
    shown = json.loads(run_cli("base", "show", "tiny-llama", "--json").output)
    assert shown["structural"].startswith("sha256:") and shown["sizes"]["hidden_size"] == 32
    run_cli("base", "add", str(base), "--name", "tiny-llama")  # the same structure again is fine
    other = save_base(tiny_llama(hidden_size=48, num_attention_heads=4), tmp_path / "other")
    assert "already registered with another structure" in one_line_error("base", "add", str(other), "--name",
                                                                         "tiny-llama")
    assert "no base model named 'nope'" in one_line_error("base", "show", "nope")


def test_base_content_and_modules_through_the_real_registry(tmp_path: Path) -> None:
    """``base add --content`` stores the weight file's sha256 in the registry; ``show --modules`` lists shapes."""
    import hashlib

    base = save_base(tiny_llama(), tmp_path / "llama")
    added = run_cli("base", "add", str(base), "--name", "tiny", "--content").output
    assert "registered base tiny (LlamaForCausalLM" in added
    stored = Registry.open().get_base("tiny")
    assert stored.content_digests == {
        "model.safetensors": "sha256:" + hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()}
    listing = run_cli("base", "list").output
    assert "tiny" in listing and stored.structural[:19] in listing and (stored.content or "")[:19] in listing
    shown = " ".join(run_cli("base", "show", "tiny", "--modules").output.split())
    # tiny_llama: hidden 32, intermediate 64 (up_proj weight is 64 x 32)
    up = tiny_llama().model.layers[0].mlp.up_proj.weight.shape
    assert f"model.layers.0.mlp.up_proj linear {up[0]}x{up[1]}" in shown


def test_install_base_refuses_a_misfit_and_stores_nothing(tmp_path: Path) -> None:
    run_cli("base", "add", str(save_base(tiny_llama(), tmp_path / "llama")), "--name", "tiny-llama")
    run_cli("base", "add", str(save_base(tiny_llama(hidden_size=48), tmp_path / "wide")), "--name", "wide-llama")
    adapter = peft_adapter_from_model(tiny_llama(), tmp_path / "adapter", base_model="somewhere/else")
    error = one_line_error("install", str(adapter), "--name", "a", "--base", "wide-llama")
    assert "does not fit base model wide-llama" in error
    registry = Registry.open()
    assert registry.list_versions() == []
    assert not any(p.is_file() for p in (registry.root / "blobs").rglob("*"))  # checked before storing
    run_cli("install", str(adapter), "--name", "a", "--base", "tiny-llama")
    assert Registry.open().base_of("a").name == "tiny-llama"


def test_declared_base_is_linked_and_check_uses_it(tmp_path: Path) -> None:
    run_cli("base", "add", str(save_base(tiny_llama(), tmp_path / "llama")), "--name", "org/tiny-llama")
    fits = peft_adapter_from_model(tiny_llama(), tmp_path / "fits", base_model="org/tiny-llama")
    run_cli("install", str(fits), "--name", "fits")
    assert Registry.open().base_of("fits").name == "org/tiny-llama"
    # no --base given: check uses the linked base and verifies every module's shape
    assert "modules and shapes not checked" not in run_cli("check", "fits").output
    # an adapter that declares the base but was trained on another shape is installed, not linked, and says why
    misfit = peft_adapter_from_model(tiny_llama(hidden_size=48), tmp_path / "misfit", base_model="org/tiny-llama")
    out = run_cli("install", str(misfit), "--name", "misfit").output
    assert "does not fit it" in out
    assert Registry.open().base_of("misfit") is None
    assert run_cli("check", "misfit", "--base", "org/tiny-llama", code=1).output.count("error") >= 1
