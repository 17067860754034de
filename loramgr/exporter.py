"""Export a stored version to any format: the one route used by ``loramgr export``, :func:`loramgr.export`
and ``loramgr push``.

A version stored as a PEFT folder and exported as one gets its stored bytes back, file for file; any
other pair converts (:mod:`loramgr.formats.convert`), with a base model linked at install supplying
the module paths that kohya names need. ``gguf`` writes a llama.cpp LoRA GGUF and ``ollama`` a folder
with that GGUF and a Modelfile (:mod:`loramgr.serve.gguf`); both need the base model's architecture
(the base linked at install, or ``base``) and run the llama.cpp check first. Every write is atomic
(:mod:`loramgr.fileio`): an error leaves no destination behind.

Destinations, as ``cp`` treats them: a file format (every one but peft and ollama) given an existing
folder writes ``<folder>/<name>.<extension>`` inside it; given a new path without an extension it adds the
format's (``.safetensors``, ``.gguf``). A folder format writes into a new or empty folder. Files get the
mode of any new file (0644 under umask 022), folders 0755, whatever the format.

kohya and diffusers files are diffusion conventions (kohya's ``lora_unet_`` / ``lora_te_`` names,
diffusers' pipeline loaders): an adapter made for a transformers task (a PEFT ``task_type``) or for
GPT-2-style Conv1D layers (``fan_in_fan_out``) is refused in them by name; PEFT and GGUF are its formats.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UnknownFormatError
from .fileio import atomic_folder, require_new_file, require_new_folder

if TYPE_CHECKING:
    from .adapter import LoraAdapter
    from .compat.basemodel import BaseFingerprint
    from .registry import Registry, VersionDetails

#: every format ``export`` writes: a PEFT folder, a kohya file, a diffusers file (any LoRA); a ComfyUI /
#: original-names file, an XLabs file (diffusion transformers: Flux, Wan, Qwen-Image); a llama.cpp GGUF
#: file, an Ollama folder (GGUF + Modelfile) (LLMs). A format that cannot hold an adapter refuses it by name.
EXPORT_FORMATS = ("peft", "kohya", "diffusers", "comfyui", "xlabs", "gguf", "ollama")
FOLDER_FORMATS = ("peft", "ollama")
#: the extension a file format adds to a destination that has none
EXTENSIONS = {"kohya": ".safetensors", "diffusers": ".safetensors", "comfyui": ".safetensors",
              "xlabs": ".safetensors", "gguf": ".gguf"}
#: formats whose key names exist only for diffusion models
DIFFUSION_ONLY = ("kohya", "diffusers")


def export_version(
    registry: Registry,
    reference: str,
    destination: str | os.PathLike[str],
    *,
    fmt: str = "peft",
    base: str | os.PathLike[str] | BaseFingerprint | None = None,
) -> Path:
    """Write version ``reference`` to ``destination`` (a new or empty folder for peft and ollama, a new file
    otherwise: see :func:`export_destination`); returns the path written. ``base`` (a registered base's
    name, a path or a fingerprint) overrides the base linked at install, for the formats that need one
    (gguf, ollama: the architecture, and Ollama's FROM line)."""
    if fmt not in EXPORT_FORMATS:
        raise UnknownFormatError(f"unknown export format {fmt!r}", format=fmt, known=EXPORT_FORMATS)
    details = registry.show(reference)
    reference = details.ref  # the version shown, whatever is installed meanwhile: resolved once
    destination = export_destination(destination, fmt, details.name)
    if fmt in DIFFUSION_ONLY:
        require_diffusion_adapter(details, fmt)
    if fmt == "peft":
        require_new_folder(destination)
        if details.format == "peft":
            return _copy_stored(registry, details, destination)
    adapter = registry.open_adapter(reference)
    if fmt != "peft":  # the other formats hold LoRA factors only
        from .formats.extras import refuse_extras

        refuse_extras([adapter], f"export to {fmt}")
    if fmt in ("gguf", "ollama"):
        return _export_gguf(registry, details, adapter, destination, fmt=fmt, base=base)
    if fmt != "peft":
        require_new_file(destination)
    from .compat.check import open_base
    from .formats.convert import export_converted

    fingerprint = open_base(base, registry) if base is not None else registry.base_of(reference)
    return export_converted(adapter, destination, fmt=fmt, base=fingerprint)


def export_destination(destination: str | os.PathLike[str], fmt: str, name: str) -> Path:
    """Where a ``fmt`` export of adapter ``name`` to ``destination`` goes: inside an existing folder as
    ``<name><extension>`` for a file format, with the format's extension added when a new path has none."""
    path = Path(destination)
    if fmt in FOLDER_FORMATS:
        return path
    extension = EXTENSIONS[fmt]
    if path.is_dir():
        return path / f"{name}{extension}"
    return path if path.suffix else path.with_name(path.name + extension)


def require_diffusion_adapter(details: VersionDetails, fmt: str) -> None:
    """Refuse a kohya / diffusers export of an adapter made for a transformers model (an LLM, a classifier)."""
    from .errors import UnsupportedAdapterError

    task = details.task_type
    conv1d = bool(details.config.get("fan_in_fan_out"))
    if not task and not conv1d:
        return
    made_for = f"a {task} model" if task else "Conv1D layers (GPT-2 style, fan_in_fan_out)"
    raise UnsupportedAdapterError(
        f"{fmt} files hold LoRAs of diffusion models, and {details.name}=={details.version} is made for {made_for}",
        adapter_type=details.adapter_type,
        hint="export it with --format peft (PEFT, vLLM, transformers) or --format gguf (llama.cpp)",
    )


def _copy_stored(registry: Registry, details: VersionDetails, destination: Path) -> Path:
    """The version's stored files, byte for byte, in a folder written whole and then renamed."""
    with atomic_folder(destination) as staging:
        for entry in details.files:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(registry.store.read_path(entry.digest, used_by=details.ref), target)
    return destination


def _export_gguf(
    registry: Registry,
    details: VersionDetails,
    adapter: LoraAdapter,
    destination: Path,
    *,
    fmt: str,
    base: str | os.PathLike[str] | BaseFingerprint | None,
) -> Path:
    from .compat.check import open_base
    from .errors import IncompatibleError
    from .formats.lycoris import require_plain_lora
    from .serve.gguf import gguf_architecture, ollama_modelfile, write_lora_gguf
    from .serve.guard import require_engine_ok

    (require_new_folder if fmt == "ollama" else require_new_file)(destination)
    reference = details.ref
    require_plain_lora(adapter.info, f"export to {fmt}", label=reference)  # the guard runs before any other check
    fingerprint = open_base(base, registry) if base is not None else registry.base_of(reference)
    if fingerprint is None:
        raise IncompatibleError(f"{fmt} export of {reference} needs its base model's architecture",
                                hint="pass --base NAME (see 'loramgr base list') or install it with --base")
    gguf_architecture(fingerprint)  # an architecture without a name map is refused before anything is read
    label = f"{details.name}@{details.version}"
    require_engine_ok([adapter], "ollama" if fmt == "ollama" else "llama.cpp", labels=[label], base=fingerprint)
    if fmt == "gguf":
        return write_lora_gguf(adapter, fingerprint, destination)
    with atomic_folder(destination) as staging:
        write_lora_gguf(adapter, fingerprint, staging / "adapter.gguf")
        (staging / "Modelfile").write_text(ollama_modelfile(fingerprint.name or label, "adapter.gguf"))
    return destination
