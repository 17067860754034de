"""Install from anywhere and export to any format: the dispatch on top of the registry.

``install_any`` takes what a user types (a folder, a file, ``hf://owner/repo[@rev][:subfolder]``);
``export_any`` writes a stored version as a PEFT folder or converts it (kohya, diffusers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import ConflictError
from .registry import InstallResult, Registry

Progress = Callable[[str, int, int], None]
HUB_SCHEME = "hf://"


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
    """Install ``source`` (folder, file or hf:// reference) into ``registry``."""
    if source.startswith(HUB_SCHEME):
        from .hub_install import install_from_hub

        return install_from_hub(
            registry, source, name=name, version=version, allow_pickle=allow_pickle, base=base, progress=progress
        )
    result = registry.install(
        Path(source), name=name, version=version, allow_pickle=allow_pickle, progress=progress
    )
    if base is not None or result.created:
        link_base(registry, result, base)
    return result


def link_base(registry: Registry, result: InstallResult, base: str | None) -> None:
    """Record the version's base model: the one named, or a registered one matching its declared name."""
    try:
        from .basemodels import link_version_to_base
    except ImportError:  # base-model registry not available in this build
        return
    link_version_to_base(registry, f"{result.name}=={result.version}", base)


def export_any(registry: Registry, reference: str, destination: str | os.PathLike[str], *, fmt: str = "peft") -> Path:
    destination = Path(destination)
    if fmt == "peft":
        row = registry.show(reference)
        if row["format"] != "peft":
            from .formats.convert import export_converted

            return export_converted(registry.open_adapter(reference), destination, fmt="peft")
        return registry.export(reference, destination)
    if destination.exists() and (destination.is_file() or any(destination.iterdir())):
        raise ConflictError(f"{destination} exists", hint="choose a new file or folder name")
    from .formats.convert import export_converted

    return export_converted(registry.open_adapter(reference), destination, fmt=fmt)
