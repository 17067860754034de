"""LoRA adapters as llama.cpp GGUF files, written with the ``gguf`` package llama.cpp publishes.

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-server --lora`` reads:
``general.type = "adapter"``, ``adapter.type = "lora"``, one float32 ``adapter.lora.alpha``, and per
adapted base tensor ``<gguf name>.weight.lora_a`` (A, rank x in) and ``.lora_b`` (B, out x rank),
named by gguf's per-architecture tensor name map. Architectures whose converter permutes the rows of
q_proj / k_proj for rotary embeddings (Llama and Mistral) get B's rows permuted the same way, so that
B·A lands on the converted base weight.

Scale: llama.cpp multiplies each module by ``alpha / rank`` with the file's one alpha and the module's
own rank, so any other per-module scale (rank and alpha patterns, rsLoRA's alpha / sqrt(rank), the mixed
ranks of merge results) is folded into B here: every module gets exactly s·B·A. Embedding LoRA,
modules_to_save, DoRA and modules the name map does not know are refused by name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleError, MissingDependencyError, UnsupportedAdapterError
from ..fileio import write_atomic
from ..formats.lycoris import require_plain_lora

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from ..adapter import LoraAdapter
    from ..compat.basemodel import BaseFingerprint

#: transformers architecture -> gguf MODEL_ARCH member: the architectures this writer maps
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": "LLAMA",
    "MistralForCausalLM": "LLAMA",
    "Qwen2ForCausalLM": "QWEN2",
    "Qwen3ForCausalLM": "QWEN3",
    "GemmaForCausalLM": "GEMMA",
    "Gemma2ForCausalLM": "GEMMA2",
    "Phi3ForCausalLM": "PHI3",
}
#: architectures whose converter permutes q_proj / k_proj rows (llama.cpp's rotary layout)
_ROTARY_PERMUTED = {"LLAMA"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise MissingDependencyError("writing GGUF needs the gguf package", package="gguf",
                                     hint="pip install gguf") from exc
    return gguf


def gguf_architecture(base: BaseFingerprint) -> str:
    """The gguf architecture name ("llama", "qwen2", ...) for a base model, or a one-line refusal."""
    arch = GGUF_ARCHITECTURES.get(base.architecture or "")
    if arch is None:
        raise IncompatibleError(
            f"no GGUF tensor name map for architecture {base.architecture or 'unknown'} (base {base.name})",
            hint=f"GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))}",
        )
    name: str = _gguf().MODEL_ARCH_NAMES[_gguf().MODEL_ARCH[arch]]
    return name


def permute_rotary(b: NDArray[Any], n_head: int) -> NDArray[Any]:
    """The row order llama.cpp's converter gives q_proj / k_proj weights (and so their B factors)."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def gguf_tensors(adapter: LoraAdapter, base: BaseFingerprint) -> tuple[float, dict[str, NDArray[Any]]]:
    """(alpha, {gguf tensor name: float32 factor}) with every module's scale folded so alpha / rank gives
    it exactly."""
    import numpy as np

    gguf = _gguf()
    info = adapter.info
    require_plain_lora(info, "GGUF export", label=adapter.label)
    if info.config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"a LoRA GGUF has no place for modules_to_save {list(info.config['modules_to_save'])}",
            adapter_type="lora", path=adapter.label, hint="export --format peft and serve it with PEFT or vLLM",
        )
    gguf_architecture(base)  # refuses an unmapped architecture first
    arch = GGUF_ARCHITECTURES[base.architecture or ""]
    n_layers = int(base.sizes.get("num_hidden_layers") or 0)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], n_layers)
    if not info.modules:
        raise UnsupportedAdapterError("the adapter has no modules", path=adapter.label)
    first = info.modules[0]
    alpha = first.scale * first.rank  # llama.cpp's alpha / rank then needs no folding for the first module
    tensors: dict[str, NDArray[Any]] = {}
    with adapter.open_weights() as weights:
        for spec in info.modules:
            if spec.kind != "linear":
                raise UnsupportedAdapterError(
                    f"module {spec.name} is {spec.kind} LoRA, which GGUF export does not write",
                    adapter_type="lora", module=spec.name, path=adapter.label, hint="export --format peft",
                )
            target = name_map.get_name(spec.name)
            if target is None:
                raise UnsupportedAdapterError(
                    f"module {spec.name} has no GGUF tensor name for architecture {base.architecture}",
                    adapter_type="lora", module=spec.name, path=adapter.label,
                    hint="llama.cpp has no such tensor in this architecture (tied or unknown weight)",
                )
            a, b = adapter.array_factors(spec.name, weights)
            b = b * np.float32(spec.scale / (alpha / spec.rank))
            if arch in _ROTARY_PERMUTED and spec.name.endswith(("q_proj", "k_proj")):
                heads = int(base.sizes["num_attention_heads"])
                if spec.name.endswith("k_proj"):
                    heads = int(base.sizes.get("num_key_value_heads") or heads)
                b = permute_rotary(b, heads)
            tensors[f"{target}.weight.lora_a"] = np.ascontiguousarray(a)
            tensors[f"{target}.weight.lora_b"] = np.ascontiguousarray(b)
    return alpha, tensors


def write_lora_gguf(adapter: LoraAdapter, base: BaseFingerprint, destination: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as a llama.cpp LoRA GGUF for ``base``'s architecture; atomic (:mod:`loramgr.fileio`)."""
    gguf = _gguf()
    destination = Path(destination)
    arch = gguf_architecture(base)
    alpha, tensors = gguf_tensors(adapter, base)
    with tempfile.TemporaryDirectory(prefix="loramgr-gguf-") as scratch:
        path = Path(scratch) / "adapter.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if adapter.label:
            writer.add_name(adapter.label)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        write_atomic(destination, path.read_bytes())
    return destination


def ollama_modelfile(base_name: str, adapter_file: str) -> str:
    """An Ollama Modelfile: the base model to start from and the adapter to apply."""
    return f"FROM {base_name}\nADAPTER ./{adapter_file}\n"
