"""Install from anywhere and export to any format: the dispatch on top of the registry.

``install_any`` takes what a user types (a folder, a file, ``hf://owner/repo[@rev][:subfolder]``,
``oci://host/repository:tag`` or ``@sha256:<digest>``);
``export_any`` writes a stored version as a PEFT folder or converts it (kohya, diffusers).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .adapter import AdapterInfo
from .errors import ConflictError, IncompatibleError, LoramgrError
from .registry import InstallResult, Registry
from .registry.records import Parent
from .registry.sources import read_local

Progress = Callable[[str, int, int], None]
HUB_SCHEME = "hf://"
OCI_SCHEME = "oci://"


def install_any(
    registry: Registry,
    source: str,
    *,
    name: str | None = None,
    version: str | None = None,
    allow_pickle: bool = False,
    base: str | None = None,
    progress: Progress | None = None,
) -> InstallResult:
    """Install ``source`` (folder, file, hf:// or oci:// reference) into ``registry``."""
    if source.startswith(OCI_SCHEME):
        from .oci.pull import install_from_oci

        return install_from_oci(
            registry, source, name=name, version=version, allow_pickle=allow_pickle, base=base, progress=progress
        )[0]
    if source.startswith(HUB_SCHEME):
        from .hub.install import install_from_hub

        return install_from_hub(
            registry, source, name=name, version=version, allow_pickle=allow_pickle, base=base, progress=progress
        )[0]
    return install_path(registry, Path(source), name=name, version=version, allow_pickle=allow_pickle, base=base,
                        progress=progress)


def install_path(
    registry: Registry,
    path: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    allow_pickle: bool = False,
    base: str | None = None,
    source_label: str | None = None,
    source_details: dict[str, Any] | None = None,
    share_files: bool = False,
    parents: list[Parent] | None = None,
    recipe: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> InstallResult:
    """Validate, match a base model, store and register an adapter on disk.

    With ``base`` (a registered base model's name) the adapter must fit it: kohya names are resolved
    to the base's module paths and every module's shape is checked before anything is stored.
    Without it, a registered base whose name the adapter declares is linked when the adapter fits.
    """
    from .registry.bases import find_base

    explicit = find_base(registry, base) if base else None
    if base and explicit is None:
        from .registry.bases import get_base

        get_base(registry, base)  # raises the not-found error with its hint
    registry.store.tmp_dir.mkdir(parents=True, exist_ok=True)
    # the shared lock keeps gc (which empties tmp/) away from the scratch folder of a pickle conversion
    with registry.store.lock(exclusive=False), tempfile.TemporaryDirectory(dir=registry.store.tmp_dir) as scratch:
        local = read_local(path, allow_pickle=allow_pickle, scratch=Path(scratch), progress=progress)
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
        return registry.add(
            info,
            local.files,
            name=name or local.default_name,
            version=version,
            source=source_label or str(path.resolve()),
            source_details=source_details,
            base_model_id=base_id,
            share_files=share_files,
            parents=parents,
            recipe=recipe,
            progress=progress,
        )


def _declared_base(info: AdapterInfo) -> str | None:
    kohya = info.config.get("kohya") or {}
    return info.base_model or kohya.get("ss_sd_model_name") or info.file_metadata.get("ss_sd_model_name")


def fit_to_base(info: AdapterInfo, fingerprint: Any, *, label: str) -> AdapterInfo:
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


def export_any(registry: Registry, reference: str, destination: str | os.PathLike[str], *, fmt: str = "peft") -> Path:
    destination = Path(destination)
    if fmt == "peft":
        row = registry.show(reference)
        if row["format"] != "peft":
            from .formats.convert import export_converted

            return export_converted(registry.open_adapter(reference), destination, fmt="peft",
                                    base=registry.base_of(reference))
        return registry.export(reference, destination)
    if destination.exists() and (destination.is_file() or any(destination.iterdir())):
        raise ConflictError(f"{destination} exists", hint="choose a new file or folder name")
    from .formats.convert import export_converted

    return export_converted(registry.open_adapter(reference), destination, fmt=fmt, base=registry.base_of(reference))
