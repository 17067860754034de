"""LyCORIS and other non-LoRA types: recognised by their keys, kept whole, refused where LoRA maths is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramgr.adapter import LoraAdapter
from loramgr.errors import UnsupportedAdapterError
from loramgr.formats.convert import to_diffusers_file, to_kohya_file, to_peft_folder
from loramgr.formats.detect import read_adapter_file
from loramgr.formats.lycoris import require_plain_lora

M = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a Linear 8 -> 16
r = 4


def t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


# tensors per module as LyCORIS / kohya write them (suffix -> tensor)
TYPES: dict[str, tuple[str, dict[str, torch.Tensor]]] = {
    "loha": ("LoHa", {"hada_w1_a": t(16, r), "hada_w1_b": t(r, 8), "hada_w2_a": t(16, r), "hada_w2_b": t(r, 8),
                      "alpha": torch.tensor(2.0)}),
    "lokr": ("LoKr", {"lokr_w1": t(4, 2), "lokr_w2_a": t(4, r), "lokr_w2_b": t(r, 4), "alpha": torch.tensor(2.0)}),
    "full": ("full", {"diff": t(16, 8), "diff_b": t(16)}),
    "ia3": ("IA3", {"weight": t(16), "on_input": torch.tensor(False)}),
    "glora": ("GLoRA", {"a1.weight": t(8, r), "a2.weight": t(r, 8), "b1.weight": t(16, r), "b2.weight": t(r, 8),
                        "alpha": torch.tensor(4.0)}),
    "oft": ("OFT", {"oft_blocks": t(4, 4, 4), "alpha": torch.tensor(1.0)}),
    "boft": ("BOFT", {"oft_blocks": t(2, 4, 4, 4), "alpha": torch.tensor(1.0)}),
    "dora": ("DoRA", {"lora_down.weight": t(r, 8), "lora_up.weight": t(16, r), "alpha": torch.tensor(2.0),
                      "dora_scale": t(1, 8)}),
    "lora_tucker": ("Tucker", {"lora_down.weight": t(r, 8, 1, 1), "lora_mid.weight": t(r, r, 3, 3),
                               "lora_up.weight": t(16, r, 1, 1), "alpha": torch.tensor(4.0)}),
}


def write(tmp_path: Path, kind: str) -> Path:
    tensors = {f"{M}.{suffix}": value for suffix, value in TYPES[kind][1].items()}
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


@pytest.mark.parametrize("kind", list(TYPES))
def test_type_recognised_kept_whole_and_refused(tmp_path: Path, kind: str) -> None:
    path = write(tmp_path, kind)
    info = read_adapter_file(path)
    assert info.format == "kohya" and info.adapter_type == kind
    spec = info.module(M)
    kept = {spec.key_a, spec.key_b, spec.key_alpha, *spec.extra_keys} - {"", None}
    assert kept == set(load_file(str(path))), "every tensor belongs to the module description"
    name = TYPES[kind][0]
    with pytest.raises(UnsupportedAdapterError, match=name) as err:
        require_plain_lora(info, "combine")
    assert "\n" not in str(err.value) and err.value.adapter_type in (kind, "dora")
    adapter = LoraAdapter(info, tmp_path)
    for convert in (
        lambda: to_peft_folder(adapter, tmp_path / "p", module_paths=["unet.down_blocks.0.attentions.0.proj_in"]),
        lambda: to_diffusers_file(adapter, tmp_path / "d.safetensors"),
    ):
        with pytest.raises(UnsupportedAdapterError, match=name):
            convert()


def test_shapes_described_where_meaningful(tmp_path: Path) -> None:
    loha = read_adapter_file(write(tmp_path, "loha")).module(M)
    assert (loha.rank, loha.in_features, loha.out_features, loha.alpha) == (4, 8, 16, 2.0)
    lokr = read_adapter_file(write(tmp_path, "lokr")).module(M)
    assert (lokr.in_features, lokr.out_features) == (8, 16)
    glora = read_adapter_file(write(tmp_path, "glora")).module(M)
    assert (glora.rank, glora.in_features, glora.out_features, glora.alpha) == (4, 8, 16, 4.0)
    boft = read_adapter_file(write(tmp_path, "boft")).module(M)
    assert boft.out_features == 16  # block_num x block_size
    full = read_adapter_file(write(tmp_path, "full")).module(M)
    assert (full.in_features, full.out_features) == (8, 16)
    tucker = read_adapter_file(write(tmp_path, "lora_tucker")).module(M)
    assert (tucker.kind, tucker.kernel, tucker.in_features) == ("conv", (4, 8, 3, 3), 72)


def test_lycoris_file_exports_to_kohya_verbatim(tmp_path: Path) -> None:
    path = write(tmp_path, "loha")
    out = to_kohya_file(LoraAdapter(read_adapter_file(path), tmp_path), tmp_path / "copy.safetensors")
    original, written = load_file(str(path)), load_file(str(out))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) for k in original)


def test_plain_lora_passes_the_guard(tmp_path: Path) -> None:
    save_file({f"{M}.lora_down.weight": t(2, 8), f"{M}.lora_up.weight": t(16, 2)}, str(tmp_path / "l.safetensors"))
    require_plain_lora(read_adapter_file(tmp_path / "l.safetensors"), "combine")


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_fuse_refusal_names_type_and_operation_with_a_true_hint(tmp_path: Path, kind: str) -> None:
    """One guard, one message; PEFT cannot read kohya files, so the hint must not send the user there."""
    from test_kohya import TinyUNet

    from loramgr.model.weights import fuse

    path = write(tmp_path, kind)
    adapter = LoraAdapter(read_adapter_file(path), tmp_path, label="style", weights_path=path)
    model = TinyUNet()  # has down_blocks.0.attentions.0.proj_in, the module the file targets
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedAdapterError) as caught:
        fuse(model, adapter)
    message = str(caught.value)
    assert message.startswith(f"fuse is not possible for style: a {TYPES[kind][0]} adapter (kohya format)")
    assert "PeftModel" not in message and "LyCORIS" in message and "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_dora_refusal_points_at_peft(tmp_path: Path) -> None:
    from factories import peft_adapter_from_model, tiny_llama

    from loramgr.formats.peft import read_peft_folder
    from loramgr.model.weights import unfuse

    model = tiny_llama()
    folder = peft_adapter_from_model(model, tmp_path / "d", use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="unfuse is not possible .* DoRA .*PeftModel.from_pretrained"):
        unfuse(model, LoraAdapter(read_peft_folder(folder), folder))


def lycoris_library_file(model: torch.nn.Module, path: Path, algo: str = "lora") -> Path:
    """A file saved by the LyCORIS library itself, wrapping a bare model: keys ``lycoris_<path with _>``."""
    from lycoris import create_lycoris

    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo)
    network.apply_to()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        network.restore()  # unhook: the model is the bare base again
    network.save_weights(str(path), torch.float32, None)
    return path


def test_lycoris_default_prefix_installs_and_fuses_as_lycoris_merges(tmp_path: Path) -> None:
    """LyCORIS' default ``lycoris_`` key prefix is read, resolved against the wrapped model, and fused exactly as
    the LyCORIS library's own merge does."""
    import copy

    from factories import run_cli, sample_input, tiny_llama
    from lycoris import create_lycoris_from_weights

    from loramgr.api import get
    from loramgr.model.weights import fuse

    model = tiny_llama()
    path = lycoris_library_file(copy.deepcopy(model), tmp_path / "lyco.safetensors")
    assert all(key.startswith("lycoris_") for key in load_file(str(path)))
    run_cli("install", str(path), "--name", "ly", "--version", "1.0.0")
    adapter = get("ly==1.0.0")
    assert adapter.info.format == "kohya" and len(adapter.info.modules) == len({k.split(".")[0] for k in
                                                                                 load_file(str(path))})
    theirs = copy.deepcopy(model)
    network, _ = create_lycoris_from_weights(1.0, str(path), theirs)
    network.merge_to(1.0)
    ours = copy.deepcopy(model)
    fuse(ours, adapter)
    changed = 0
    for (key, mine), (_, reference) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.allclose(mine, reference, rtol=1e-5, atol=1e-6), key
        changed += not torch.equal(mine, model.state_dict()[key])
    assert changed == len(adapter.info.modules)
    x = sample_input()
    assert torch.allclose(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_lycoris_prefixed_loha_is_recognised_and_refused_for_fuse_by_type(tmp_path: Path) -> None:
    from factories import tiny_llama

    from loramgr.model.weights import fuse

    path = lycoris_library_file(tiny_llama(), tmp_path / "loha.safetensors", algo="loha")
    info = read_adapter_file(path)
    assert info.adapter_type == "loha" and all(m.name.startswith("lycoris_") for m in info.modules)
    with pytest.raises(UnsupportedAdapterError, match="fuse is not possible .* LoHa .*LyCORIS library"):
        fuse(tiny_llama(), LoraAdapter(info, tmp_path, weights_path=path))


def test_the_fuse_refusal_hint_is_true_the_lycoris_library_loads_the_file(tmp_path: Path) -> None:
    """The refusal sends a kohya LoHa file to the LyCORIS library (PEFT cannot read kohya files, and diffusers'
    load_lora_weights has no LoHa): that library's kohya loader takes the very file onto the UNet it names, every
    tensor in its place."""
    from lycoris.kohya import create_network_from_weights
    from test_kohya import TinyUNet

    path = write(tmp_path, "loha")
    unet = TinyUNet()
    network, weights = create_network_from_weights(1.0, str(path), None, None, unet, for_inference=True)
    assert [(lora.lora_name, type(lora).__name__) for lora in network.unet_loras] == [(M, "LohaModule")]
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    loaded = network.load_state_dict(weights, strict=True)  # every tensor of the file has its place
    assert not loaded.missing_keys and not loaded.unexpected_keys
