"""Which format a single adapter file is in, decided from its tensor keys, and reading it.

One ``.safetensors`` file can be a kohya/LyCORIS file (``lora_unet_...`` names with ``lora_down`` /
``hada_w1_a`` / ... suffixes), a diffusers file (``unet.`` / ``text_encoder.`` / ``transformer.``
prefixes with PEFT-style factors), or the weights of a PEFT folder without its config. Keys decide,
not the file name: people rename files freely. Only the header (and kohya's alpha scalars) is read.
"""

from __future__ import annotations

from pathlib import Path

from ..adapter import AdapterInfo
from ..compat.identify import identify_adapter
from ..errors import InvalidAdapterError, UnsupportedAdapterError
from ..safetensors_io import SafetensorsHeader, read_header
from .diffusers import looks_like_diffusers, read_diffusers
from .diffusion.read import annotate_diffusers, detect_convention, read_original
from .hashes import file_hashes
from .kohya import kohya_prefix, read_kohya
from .lycoris import split_key
from .peft import refuse_empty_factors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def detect_format(keys: list[str], metadata: dict[str, str] | None = None) -> str | None:
    """"kohya", "diffusers", "peft" (PEFT weights without config) or None for unknown keys."""
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if looks_like_diffusers(keys, metadata):
        return "diffusers"
    named = [k for k in keys if kohya_prefix(k) is not None]
    if named and any(split_key(k) is not None for k in named):
        return "kohya"
    return None


def read_adapter_file(path: str | Path) -> AdapterInfo:
    """Read one adapter ``.safetensors`` file (kohya, LyCORIS or diffusers) into an AdapterInfo.

    Raises UnsupportedAdapterError for pickles (they can run code) and PEFT weights without their
    config, InvalidAdapterError for files whose keys fit no known layout.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedAdapterError(
            f"{path}: a pickle file, which can run code when loaded",
            path=str(path),
            hint="convert it to .safetensors first (or use the PEFT folder install with --allow-pickle)",
        )
    if path.is_dir():
        raise InvalidAdapterError(
            f"{path}: is a folder, not an adapter file", path=str(path), hint="install a PEFT folder as a folder"
        )
    header = read_header(path)
    keys = list(header.tensors)
    info = _read_known(header, keys)
    if info is not None:
        refuse_empty_factors(info, header)
        info.config["hashes"] = file_hashes(path)
        identity = identify_adapter(info)
        if identity is not None:
            info.config["base_identity"] = identity.to_dict()
            info.notes.extend(identity.warnings)
        return info
    fmt = detect_format(keys)
    if fmt == "peft":
        raise UnsupportedAdapterError(
            f"{path}: PEFT weights (base_model.model.* keys) without their adapter_config.json",
            path=str(path),
            hint="install the whole PEFT folder (adapter_config.json + adapter_model.safetensors)",
        )
    example = keys[0] if keys else "(no tensors)"
    raise InvalidAdapterError(
        f"{path}: tensor keys fit no known adapter layout (kohya, LyCORIS, diffusers), e.g. {example}",
        path=str(path),
        hint="if this is a base-model checkpoint, add it with 'loramgr base add'",
    )


def _read_known(header: SafetensorsHeader, keys: list[str]) -> AdapterInfo | None:
    """A diffusion-transformer convention first (its kohya names resolve without a base), then kohya, diffusers."""
    convention = detect_convention(keys, dict(header.metadata))
    if convention is not None:
        return read_original(header, *convention)
    fmt = detect_format(keys, dict(header.metadata))
    if fmt == "kohya":
        return read_kohya(header)
    if fmt == "diffusers":
        return annotate_diffusers(read_diffusers(header))
    return None
