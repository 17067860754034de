"""Format conversions on numpy: ``export --format kohya`` and ``check --values`` import no torch, tensors
are copied bit for bit in their own dtypes, B rescaling rounds as torch does, and the written files are
the safetensors library's own bytes with the hashes sd-scripts computes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import run_cli, run_without_torch, write_peft_adapter
from safetensors.torch import load_file, save, save_file
from test_merge_io import awkward_float32

from loramgr.adapter import LoraAdapter
from loramgr.formats.convert import to_kohya_file
from loramgr.formats.peft import read_peft_folder
from loramgr.merge.tensorfile import StoredTensor, TensorFile, safetensors_bytes, stored_tensor

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
UNET_MODULES = {BLOCK + "to_q": (16, 16, 4), BLOCK + "to_k": (16, 16, 4), BLOCK + "to_v": (16, 24, 8)}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_from_torch(tensor: torch.Tensor) -> StoredTensor:
    """An independent encoding: the bytes torch's own safetensors writer stores for ``tensor``."""
    data = save({"t": tensor.contiguous()})
    length = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + length])["t"]
    return StoredTensor(entry["dtype"], tuple(entry["shape"]), data[8 + length :])


def test_tensors_of_every_dtype_are_written_as_the_safetensors_library_writes_them(tmp_path: Path) -> None:
    """Mixed dtypes (ints, bool, a 0-dim scalar) are laid out in the library's order, byte for byte, and a
    file read with TensorFile.stored is rewritten unchanged."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{name}.{i}": (torch.randn(3, 2 + i, generator=gen) * 50).to(dtype)
               for i, (name, dtype) in enumerate([
                   ("f64", torch.float64), ("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16),
                   ("i64", torch.int64), ("i32", torch.int32), ("i16", torch.int16), ("i8", torch.int8),
                   ("u8", torch.uint8), ("bool", torch.bool), ("f32b", torch.float32), ("bf16b", torch.bfloat16)])}
    tensors["alpha"] = torch.tensor(4.0, dtype=torch.float32)
    metadata = {"ss_network_module": "networks.lora"}  # one key: the library orders several at random
    theirs = save(tensors, metadata=metadata)
    assert safetensors_bytes({k: stored_from_torch(t) for k, t in tensors.items()}, metadata) == theirs
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata=metadata)
    with TensorFile(tmp_path / "f.safetensors") as source:
        assert safetensors_bytes({k: source.stored(k) for k in tensors}, metadata) == theirs


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_rescaling_a_factor_rounds_as_torch_does(dtype: str) -> None:
    """(B.double() * factor).to(B.dtype), torch's rounding (via float32 for float16 and bfloat16)."""
    values = awkward_float32(1 << 14, seed=4)
    values = values[np.isfinite(values) & (np.abs(values) < 1e30)]
    original = torch.from_numpy(values).to(TORCH_DTYPES[dtype])
    for factor in (0.125, 1 / 3, 7.25, 1e-3):
        expected = stored_from_torch((original.double() * factor).to(original.dtype))
        assert stored_tensor(stored_from_torch(original).values() * factor, dtype) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kohya_export_matches_the_torch_computation(tmp_path: Path, dtype: torch.dtype) -> None:
    """Differing alphas: lora_up of the odd module rescaled as torch rescales it, the rest copied, alpha
    float32 scalars; the tensor data and both hashes are those of the library's file of those tensors."""
    src = write_peft_adapter(tmp_path / "src", UNET_MODULES, alpha=8, alpha_pattern={BLOCK + "to_v": 3.0},
                             dtype=dtype, seed=5, extra_config={"task_type": None})
    out = to_kohya_file(LoraAdapter(read_peft_folder(src), src), tmp_path / "k.safetensors")
    source = load_file(str(src / "adapter_model.safetensors"))
    expected: dict[str, torch.Tensor] = {}
    for module in UNET_MODULES:
        name = "lora_unet_" + module.replace(".", "_")
        a, b = (source[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
        alpha = 3.0 if module.endswith("to_v") else 8.0
        expected[f"{name}.lora_down.weight"] = a
        expected[f"{name}.lora_up.weight"] = (b.double() * (alpha / 8.0)).to(b.dtype)
        expected[f"{name}.alpha"] = torch.tensor(8.0, dtype=torch.float32)
    written = out.read_bytes()
    metadata = json.loads(written[8 : 8 + int.from_bytes(written[:8], "little")])["__metadata__"]
    theirs = save(expected, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    data = theirs[8 + int.from_bytes(theirs[:8], "little") :]
    assert written.endswith(data) and len(written) - len(data) == 8 + int.from_bytes(written[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(theirs[0x100000:0x110000]).hexdigest()[:8]
    got = load_file(str(out))
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in expected.items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int32,
                                   torch.uint8, torch.bool])
def test_stored_tensor_value_tests_agree_with_torch(dtype: torch.dtype) -> None:
    """non_finite and any_nonzero (the check --values findings) against torch.isnan / isinf / any."""
    cases = [[0.0, -0.0], [0.0, 1.0], [-0.0, float("nan")], [1.0, float("inf")], [float("-inf"), float("nan")],
             [float("-inf"), 2.0], [0.0, 0.0]]
    for case in cases:
        if not dtype.is_floating_point and any(not np.isfinite(v) for v in case):
            continue
        tensor = torch.tensor(case, dtype=torch.float64).to(dtype)
        stored = stored_from_torch(tensor)
        if dtype.is_floating_point:
            expected = "NaN" if tensor.isnan().any() else "Inf" if tensor.isinf().any() else None
        else:
            expected = None
        assert (stored.non_finite(), stored.any_nonzero()) == (expected, bool(tensor.any())), case




@pytest.mark.slow
def test_kohya_export_and_check_values_do_not_import_torch(tmp_path: Path) -> None:
    """Whole commands in a fresh process: a kohya export of a bfloat16 UNet adapter with differing alphas,
    and check --values of an adapter with a NaN and one whose lora_B are all zero."""
    src = write_peft_adapter(tmp_path / "unet", UNET_MODULES, alpha=8, alpha_pattern={BLOCK + "to_v": 3.0},
                             dtype=torch.bfloat16, extra_config={"task_type": None})
    run_cli("install", str(src), "--name", "unet")
    out = tmp_path / "unet-kohya.safetensors"
    done = run_without_torch("export", "unet", str(out), "--format", "kohya")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "NO TORCH"
    assert load_file(str(out))[f"lora_unet_{BLOCK.replace('.', '_')}to_q.lora_down.weight"].dtype == torch.bfloat16
    bad = {f"base_model.model.{BLOCK}to_q.lora_A.weight": torch.tensor([[float("nan")] * 16] * 4)}
    zero = {f"base_model.model.{m}.lora_B.weight": torch.zeros(d_out, r) for m, (_, d_out, r) in UNET_MODULES.items()}
    for name, override in (("nan", bad), ("zero", zero)):
        folder = write_peft_adapter(tmp_path / name, UNET_MODULES, tensors_override=override,
                                    extra_config={"task_type": None})
        done = run_without_torch("check", str(folder), "--values", "--json")
        assert done.stdout.strip().splitlines()[-1] == "NO TORCH", done.stderr
        report = json.loads("\n".join(done.stdout.strip().splitlines()[:-1]))
        codes = {f["code"]: f["message"] for f in report}
        if name == "nan":
            assert codes["non-finite"] == f"tensor base_model.model.{BLOCK}to_q.lora_A.weight contains NaN"
        else:
            assert "zero-delta" in codes and "non-finite" not in codes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_gguf_factors_are_torchs_float32_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    """GGUF export on numpy: A as float32, B times its folded scale in float32 and rows permuted for
    rotary, exactly as torch computes them from the source file."""
    from test_serve_gguf import _base, _gguf_name, _llama_cpp_permute, _modules, _read_gguf

    _, model = _base(tmp_path, "llama")
    modules = _modules(model, ("q_proj", "k_proj", "v_proj", "o_proj"), {"q_proj": 2})
    folder = write_peft_adapter(tmp_path / "chat", modules, rank=4, alpha=8.0, dtype=dtype,
                                alpha_pattern={"o_proj": 32.0, "k_proj": 3.0})
    run_cli("install", str(folder), "--name", "chat", "--base", "tiny-llama")
    run_cli("export", "chat", str(tmp_path / "out.gguf"), "--format", "gguf")
    fields, tensors = _read_gguf(tmp_path / "out.gguf")
    source = load_file(str(folder / "adapter_model.safetensors"))
    scales = {m: (32.0 if m.endswith("o_proj") else 3.0 if m.endswith("k_proj") else 8.0) / r
              for m, (_, _, r) in modules.items()}
    alpha = fields["alpha"]  # the first module's alpha, whichever the reader lists first
    assert alpha in (3.0, 8.0, 32.0)
    for module, (_, _, rank) in modules.items():
        a = source[f"base_model.model.{module}.lora_A.weight"].to(torch.float32)
        b = source[f"base_model.model.{module}.lora_B.weight"].to(torch.float32) * (scales[module] / (alpha / rank))
        if module.endswith(("q_proj", "k_proj")):
            b = _llama_cpp_permute(b, 4 if module.endswith("q_proj") else 2)
        name = _gguf_name(module)
        assert torch.equal(tensors[f"{name}.lora_a"], a) and torch.equal(tensors[f"{name}.lora_b"], b), module


@pytest.mark.slow
def test_diffusion_transformer_export_keeps_bfloat16_bits(tmp_path: Path) -> None:
    """A bfloat16 Flux kohya file to diffusers: each part's A is the fused module's A and its B the
    module's rows, bit for bit, in bfloat16; kohya again from that file fuses them back block-diagonally
    with zeros elsewhere."""
    from diffusion_files import flux_model, flux_original_shapes, flux_to_diffusers_rows, random_factors, write_kohya

    model = flux_model()
    factors = {name: (a.to(torch.bfloat16), b.to(torch.bfloat16), alpha)
               for name, (a, b, alpha) in random_factors(flux_original_shapes(model)).items()}
    write_kohya(tmp_path / "flux.safetensors", factors)
    run_cli("install", str(tmp_path / "flux.safetensors"), "--name", "flux")
    run_cli("export", "flux", str(tmp_path / "d.safetensors"), "--format", "diffusers")
    written = load_file(str(tmp_path / "d.safetensors"))
    d = model.config.num_attention_heads * model.config.attention_head_dim
    checked = 0
    for name, (a, b, _) in factors.items():
        if name == "final_layer.adaLN_modulation.1":  # (shift, scale) -> (scale, shift)
            assert torch.equal(written["transformer.norm_out.linear.lora_B.weight"], torch.cat([b[d:], b[:d]]))
            continue
        for target, rows in flux_to_diffusers_rows(name, d):
            got_a, got_b = (written[f"transformer.{target}.lora_{x}.weight"] for x in "AB")
            assert got_a.dtype == got_b.dtype == torch.bfloat16
            assert torch.equal(got_a, a) and torch.equal(got_b, b[rows]), target
            checked += 1
    assert checked > len(factors)  # fused modules were split
    run_cli("install", str(tmp_path / "d.safetensors"), "--name", "flux-d")
    run_cli("export", "flux-d", str(tmp_path / "k.safetensors"), "--format", "kohya")
    back = load_file(str(tmp_path / "k.safetensors"))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    a, b, _ = factors["double_blocks.0.img_attn.qkv"]
    assert torch.equal(back[f"{qkv}.lora_down.weight"], torch.cat([a, a, a]))
    blocks = [b[i * d : (i + 1) * d] for i in range(3)]
    assert torch.equal(back[f"{qkv}.lora_up.weight"], torch.block_diag(*blocks))
