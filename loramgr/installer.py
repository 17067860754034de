"""Install an adapter from anywhere: the one route from what a user names to a stored version.

:func:`install_source` takes what a user types (a folder, a file, ``hf://owner/repo[@rev][:subfolder]``,
``oci://host/repository:tag`` or ``oci://host/repository@sha256:<manifest digest>``);
``loramgr install``, :func:`loramgr.install` and ``loramgr sync`` all end in it or in its two halves:
the Hub half (:mod:`loramgr.hub.install`) fetches into huggingface_hub's cache and then calls
:func:`install_path`, which validates, matches a registered base model, and hands the files to
:meth:`Registry.add <loramgr.registry.core.Registry.add>`, the registry's storage primitive.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import AdapterInfo
from .errors import IncompatibleError, InvalidAdapterError, InvalidBaseModelError, LoramgrError
from .registry import InstallResult, Registry, SourceDetails
from .registry.records import Parent
from .registry.sources import read_local

if TYPE_CHECKING:
    from .compat.basemodel import BaseFingerprint

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class InstallOptions:
    """What a user may choose about an install: the options of ``loramgr install`` and the keyword
    arguments of :func:`loramgr.install`, in one place."""

    name: str | None = None  # default: the folder, file or repository (subfolder) name
    version: str | None = None  # default: the Hub tag's version, else 0.1.0 or the next minor version
    base: str | None = None  # a registered base model the adapter must fit
    allow_pickle: bool = False  # load a pickled adapter_model.bin weights-only, store it as safetensors


def install_source(
    registry: Registry,
    source: str | os.PathLike[str],
    options: InstallOptions = InstallOptions(),
    *,
    progress: Progress | None = None,
) -> InstallResult:
    """Install ``source`` (a PEFT folder, an adapter file, an ``hf://`` or ``oci://`` reference) into ``registry``.

    For an ``hf://`` source the result carries the Hub facts of this request (``result.hub``), for an
    ``oci://`` one the OCI facts (``result.oci``).
    """
    from .hub.client import SCHEME
    from .oci.reference import SCHEME as OCI_SCHEME

    if isinstance(source, str) and source.startswith(OCI_SCHEME):
        from .oci.pull import install_from_oci

        return install_from_oci(registry, source, options, progress=progress)
    if isinstance(source, str) and source.startswith(SCHEME):
        from .hub.install import install_from_hub

        return install_from_hub(registry, source, options, progress=progress)
    return install_path(registry, Path(source), options, progress=progress)


def install_path(
    registry: Registry,
    path: Path,
    options: InstallOptions,
    *,
    source_label: str | None = None,
    source_details: SourceDetails | None = None,
    share_files: bool = False,
    parents: list[Parent] | None = None,
    recipe: dict[str, Any] | None = None,
    expected_digest: str | None = None,
    progress: Progress | None = None,
) -> InstallResult:
    """Validate, match a base model, store and register an adapter on disk.

    With ``options.base`` (a registered base model's name) the adapter must fit it: kohya names are
    resolved to the base's module paths and every module's shape is checked before anything is stored.
    Without it, a registered base whose name the adapter declares is linked when the adapter fits.
    ``share_files``: the files are never rewritten in place (huggingface_hub's cache), so the store
    may hard-link them instead of copying. ``parents`` and ``recipe``: the lineage an artifact carries
    (an OCI pull of a combined adapter). ``expected_digest``: refuse (storing nothing) unless the
    version's digest is this one (``sync`` passes the lock's).
    """
    from .registry.bases import find_base, get_base

    checkpoints = refuse_non_adapter_folder(path)
    explicit = find_base(registry, options.base) if options.base else None
    if options.base and explicit is None:
        get_base(registry, options.base)  # raises the not-found error with its hint
    # the scratch folder (a pickle converted to safetensors) holds the shared store lock: gc waits
    with registry.store.scratch() as scratch:
        local = read_local(path, allow_pickle=options.allow_pickle, scratch=scratch, progress=progress,
                           links_into=_hub_repository_folder(path) if share_files else None)
        info, base_id = local.info, None
        if explicit is not None:
            info = fit_to_base(info, explicit[1], label=str(path))
            base_id = explicit[0]
        else:
            declared = _declared_base(info)
            implicit = find_base(registry, declared) if declared else None
            if implicit is not None:
                try:
                    info, base_id = fit_to_base(info, implicit[1], label=str(path)), implicit[0]
                except LoramgrError as exc:
                    info.notes.append(f"declares base {declared}, which is registered, but does not fit it ({exc})")
        result = registry.add(
            info,
            local.files,
            name=options.name or local.default_name,
            version=options.version,
            source=source_label or str(path.resolve()),
            source_details=source_details,
            base_model_id=base_id,
            share_files=share_files,
            parents=parents,
            recipe=recipe,
            expected_digest=expected_digest,
            progress=progress,
        )
    if checkpoints:
        result.notes.append(f"{path} also holds training checkpoints ({_names(checkpoints)}): install one with "
                            f"'loramgr install {checkpoints[-1]}'")
    return result


#: files that make a folder a whole model (transformers, diffusers) rather than an adapter
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "diffusion_pytorch_model.safetensors", "model_index.json")


def refuse_non_adapter_folder(path: Path) -> list[Path]:
    """Refuse a folder that is not an adapter but something users mistake for one: a whole model, or a
    training run whose adapters are its ``checkpoint-*`` subfolders. Returns the checkpoints found
    beside an adapter at the folder's top (the adapter is installed, the checkpoints mentioned)."""
    if not path.is_dir():
        return []
    from .formats.peft import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME

    checkpoints = training_checkpoints(path)
    if (path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists() or (path / PICKLE_NAME).exists():
        return checkpoints
    if checkpoints:
        raise InvalidAdapterError(
            f"{path} is a training run: its adapters are the checkpoints {_names(checkpoints)}", path=str(path),
            hint=f"install one, e.g. the last: 'loramgr install {checkpoints[-1]}'",
        )
    found = [name for name in MODEL_FILES if (path / name).exists()]
    if found and ((path / "config.json").exists() or "model_index.json" in found):
        what = " + ".join(["config.json"] * (path / "config.json").exists() + found[:1])
        raise InvalidAdapterError(
            f"{path} is a whole model ({what}), not an adapter", path=str(path),
            hint=f"register it as a base model with 'loramgr base add {path}'",
        )
    return []


def training_checkpoints(path: Path) -> list[Path]:
    """``checkpoint-<step>`` subfolders holding a PEFT adapter, in step order (as transformers' Trainer saves)."""
    from .formats.peft import CONFIG_NAME

    found = [p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
             and (p / CONFIG_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.rpartition("-")[2]))


def refuse_adapter_as_base(path: Path) -> None:
    """Refuse an adapter (a PEFT folder, an adapter .safetensors file) given where a base model is expected."""
    from .formats.detect import detect_format
    from .formats.peft import CONFIG_NAME
    from .safetensors_io import read_header

    install = path
    checkpoints = training_checkpoints(path) if path.is_dir() else []
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        what = f"a LoRA adapter ({CONFIG_NAME})"
    elif checkpoints:
        what = f"a training run whose checkpoints are adapters ({_names(checkpoints)})"
        install = checkpoints[-1]
    else:
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        fmt = None
        for file in files:
            try:
                fmt = detect_format(list(read_header(file).tensors))
            except LoramgrError:
                continue  # not a safetensors file loramgr reads: the fingerprint says what is wrong with it
            if fmt is not None:
                install = file
                break
        if fmt is None:
            return
        what = f"a LoRA adapter ({fmt} tensor names)"
    raise InvalidBaseModelError(f"{path} is {what}, not a base model", path=str(path),
                                hint=f"install it with 'loramgr install {install}'")


def _names(folders: list[Path]) -> str:
    return ", ".join(p.name for p in folders)


def _hub_repository_folder(path: Path) -> Path | None:
    """``<cache>/models--owner--name`` for a path inside one of its snapshots (whose files link there)."""
    for folder in (path, *path.parents):
        if folder.parent.name == "snapshots":
            return folder.parent.parent
    return None


def _declared_base(info: AdapterInfo) -> str | None:
    kohya = info.config.get("kohya") or {}
    return info.base_model or kohya.get("ss_sd_model_name") or info.file_metadata.get("ss_sd_model_name")


def fit_to_base(info: AdapterInfo, fingerprint: BaseFingerprint, *, label: str) -> AdapterInfo:
    """Resolve kohya names against the base and refuse an adapter whose modules do not fit it."""
    from .compat.basemodel import module_shapes
    from .compat.check import check_adapters
    from .formats.kohya import resolve_kohya_info

    info = resolve_kohya_info(info, module_shapes(fingerprint))
    errors = [f for f in check_adapters([info], base=fingerprint, labels=[label]) if f.severity == "error"]
    if errors:
        first = errors[0]
        where = f" module {first.module}" if first.module else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise IncompatibleError(
            f"{label}:{where} {first.message}{more}",
            hint=f"this adapter does not fit base model {fingerprint.name}; run 'loramgr check' for every finding",
        )
    return info
