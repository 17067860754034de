"""Identity that survives metadata edits: the tensor-payload digest, AutoV2 / AutoV3 / CRC32 references,
and ``loramgr duplicates``."""

from __future__ import annotations

import hashlib
import json
import zlib

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loramgr.cli.main import cli


def _payload_sha256(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_metadata_edit_keeps_tensor_digest_and_duplicates_finds_the_pair(tmp_path):
    tensors = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, 16),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(16, 2),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0)}
    first = tmp_path / "style.safetensors"
    save_file(tensors, str(first), metadata={"ss_network_module": "networks.lora"})
    edited = tmp_path / "style-renamed.safetensors"  # what a metadata editor writes: same tensors, new header
    save_file(load_file(str(first)), str(edited), metadata={"ss_network_module": "networks.lora",
                                                            "modelspec.title": "My style (edited)"})
    assert first.read_bytes() != edited.read_bytes()
    runner = CliRunner()
    for path, name in ((first, "style"), (edited, "style-edited")):
        assert runner.invoke(cli, ["install", str(path), "--name", name]).exit_code == 0
    shown = {n: json.loads(runner.invoke(cli, ["show", n, "--json"]).output) for n in ("style", "style-edited")}
    a, b = (shown[n]["config"]["hashes"] for n in ("style", "style-edited"))
    assert a["tensors_sha256"] == b["tensors_sha256"] == _payload_sha256(first) == _payload_sha256(edited)
    assert a["sha256"] != b["sha256"] and shown["style"]["digest"] != shown["style-edited"]["digest"]
    assert a["autov2"] == hashlib.sha256(first.read_bytes()).hexdigest()[:10]
    assert a["crc32"] == f"{zlib.crc32(first.read_bytes()):08X}"
    assert a["autov3"] == _payload_sha256(first)[:12]
    # the hashes are references
    for scheme in ("autov2", "crc32"):
        out = runner.invoke(cli, ["show", f"{scheme}:{b[scheme]}"])
        assert out.exit_code == 0 and out.output.startswith("style-edited "), out.output
    both = runner.invoke(cli, ["show", f"autov3:{a['autov3']}"])
    assert both.exit_code == 1 and "matches 2 versions" in both.output
    assert f"AutoV2 {a['autov2']}" in runner.invoke(cli, ["show", "style"]).output
    dupes = runner.invoke(cli, ["duplicates", "--json"])
    assert json.loads(dupes.output) == [["style-edited==0.1.0", "style==0.1.0"]]
    assert "same tensors: style-edited==0.1.0, style==0.1.0" in runner.invoke(cli, ["duplicates"]).output


def _wan_lora(path, dim: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, dim, generator=gen),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(dim, 2, generator=gen),
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(1.0)}, str(path))


def test_install_recursive_link_and_base_family(tmp_path):
    import os

    tree = tmp_path / "models" / "loras"
    _wan_lora(tree / "wan" / "Anime Style.safetensors", 1536, 1)
    _wan_lora(tree / "wan" / "v2" / "detail.safetensors", 1536, 2)
    (tree / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tree / "notes.txt").write_text("ignored")
    runner = CliRunner()
    first = runner.invoke(cli, ["install", str(tree), "--recursive", "--json"])
    assert first.exit_code == 1  # one file could not be read; the others are installed
    report = json.loads(first.output)
    assert sorted(r["name"] for r in report["installed"]) == ["wan-anime-style", "wan-v2-detail"]
    assert [f["path"] for f in report["failed"]] == [str(tree / "broken.safetensors")]
    (tree / "broken.safetensors").unlink()
    again = runner.invoke(cli, ["install", str(tree), "--recursive"])
    assert again.exit_code == 0 and "0 installed, 2 already installed, 0 could not be read" in again.output
    listed = json.loads(runner.invoke(cli, ["list", "--base-family", "wan", "--json"]).output)
    assert sorted(r["name"] for r in listed) == ["wan-anime-style", "wan-v2-detail"]
    assert json.loads(runner.invoke(cli, ["list", "--base-family", "flux1", "--json"]).output) == []
    unknown = runner.invoke(cli, ["list", "--base-family", "sd5"])
    assert unknown.exit_code != 0 and "unknown base family 'sd5'" in unknown.output
    ui = tmp_path / "ui-loras"
    linked = runner.invoke(cli, ["link", str(ui)])
    assert linked.exit_code == 0, linked.output
    target = ui / "wan-anime-style.safetensors"
    assert target.read_bytes() == (tree / "wan" / "Anime Style.safetensors").read_bytes()
    assert os.stat(target).st_nlink >= 2  # a hard link into the store, not a copy
    assert runner.invoke(cli, ["link", str(ui)]).exit_code == 0  # idempotent
    assert runner.invoke(cli, ["verify"]).exit_code == 0


def test_llm_adapters_identified_by_published_widths(tmp_path):
    """A PEFT adapter's widths (hidden, k_proj, MLP) and layer indices name the published model."""
    from factories import write_peft_adapter

    from loramgr.compat.identify import identify_adapter
    from loramgr.formats.peft import read_peft_folder

    def adapter(folder, hidden: int, kv: int, ffn: int, layer: int):
        modules = {f"model.layers.{layer}.self_attn.q_proj": (hidden, hidden, 1),
                   f"model.layers.{layer}.self_attn.k_proj": (hidden, kv, 1),
                   f"model.layers.{layer}.mlp.up_proj": (hidden, ffn, 1)}  # (in, out, rank)
        write_peft_adapter(folder, modules)
        return read_peft_folder(folder)

    small = adapter(tmp_path / "q05", 896, 128, 4864, 23)
    assert small.config["base_identity"]["variant"] == "Qwen2.5 0.5B"
    assert small.config["base_identity"]["family"] == "qwen2"
    # Llama 3 8B and Mistral 7B have the same widths: both are named
    same = identify_adapter(adapter(tmp_path / "l8", 4096, 1024, 14336, 31))
    assert same is not None and same.variant == "Llama 3 / 3.1 8B or Mistral 7B"
    # a layer index past a model's last layer rules it out
    assert identify_adapter(adapter(tmp_path / "deep", 2048, 512, 8192, 20)).variant is None


def _wan_diffusers_file(path, dim: int, ffn: int, base_model: str) -> None:
    """A diffusers-named Wan LoRA of a published size whose embedded PEFT config names ``base_model``."""
    tensors = {}
    for module, (out, inp) in {"blocks.0.attn1.to_q": (dim, dim), "blocks.0.ffn.net.0.proj": (ffn, dim)}.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(1, inp)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(out, 1)
    config = {"transformer.r": 1, "transformer.lora_alpha": 1, "transformer.target_modules": ["to_q", "proj"],
              "transformer.base_model_name_or_path": base_model}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})


def test_base_model_claims_are_shown_next_to_the_shapes_and_a_disagreement_is_a_warning(tmp_path):
    runner = CliRunner()
    cases = {"agrees": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "family": "black-forest-labs/FLUX.1-dev",
             "size": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
    for name, claim in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _wan_diffusers_file(path, 1536, 8960, claim)  # the published Wan 1.3B widths
        installed = runner.invoke(cli, ["install", str(path), "--name", name])
        assert installed.exit_code == 0, installed.output
        shown = runner.invoke(cli, ["show", name]).output
        assert "base (shapes) Wan 2.1 / 2.2 1.3B" in shown
        assert f"metadata: {claim} (base_model_name_or_path)" in shown
        warning = f"base_model_name_or_path says {claim!r}, the shapes say Wan 2.1 / 2.2 1.3B"
        assert (warning in installed.output and warning in shown) == (name != "agrees"), name
    identity = json.loads(runner.invoke(cli, ["show", "family", "--json"]).output)["config"]["base_identity"]
    assert identity["claims"] == [{"source": "base_model_name_or_path", "text": cases["family"]}]


def test_model_card_base_model_is_a_claim(tmp_path):
    """A PEFT folder's card (base_model) and config (base_model_name_or_path) both name a base; each is held
    against the shapes."""
    from safetensors.torch import save_file as save

    import loramgr
    from loramgr.compat.identify import identify_adapter

    folder = tmp_path / "peft"
    folder.mkdir()
    dim = 1536
    save({"base_model.model.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1, dim),
          "base_model.model.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(dim, 1),
          "base_model.model.blocks.0.ffn.net.0.proj.lora_A.weight": torch.zeros(1, dim),
          "base_model.model.blocks.0.ffn.net.0.proj.lora_B.weight": torch.zeros(8960, 1)},
         str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["to_q", "proj"],
        "base_model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}))
    (folder / "README.md").write_text("---\nbase_model: stabilityai/stable-diffusion-xl-base-1.0\n---\nA LoRA.\n")
    loramgr.install(folder, name="carded")
    identity = identify_adapter(loramgr.get("carded").info)
    assert identity is not None and identity.variant == "Wan 2.1 / 2.2 1.3B"
    assert identity.claims == [
        {"source": "card base_model", "text": "stabilityai/stable-diffusion-xl-base-1.0"},
        {"source": "base_model_name_or_path", "text": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}]
    assert identity.warnings == ["card base_model says 'stabilityai/stable-diffusion-xl-base-1.0', "
                                 "the shapes say Wan 2.1 / 2.2 1.3B (dim 1536, ffn 8960)"]
    # the card is read before identification, so `show` holds the card's claim and the warning too
    shown = CliRunner().invoke(cli, ["show", "carded"]).output
    assert "stabilityai/stable-diffusion-xl-base-1.0 (card base_model)" in shown
    assert identity.warnings[0] in shown
