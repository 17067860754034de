"""Folders of LoRA files as UIs keep them: index a whole tree at once, lay the registry out as a folder.

:func:`install_tree` installs every ``.safetensors`` file under a folder (a ComfyUI ``models/loras``
tree), each through the one install route, naming it after its path in the tree; files whose bytes are
already installed under that name are skipped, files that cannot be read are reported, not fatal.
:func:`link_tree` writes a folder of ``<name>.safetensors`` entries, hard links (or symbolic links) to the
newest version's weights in the store, so a UI reads the registry without a second copy. Nothing may
write through such a link: ``loramgr verify`` re-hashes the store and names any blob that changed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import ConflictError, InvalidAdapterError, LoramgrError

if TYPE_CHECKING:
    from ...installer import InstallOptions
    from ...registry import InstallResult, Registry

Progress = Callable[[str, int, int], None]


@dataclass
class TreeResult:
    """What ``install --recursive`` did: installed, already there, and what it could not read (path, why)."""

    installed: list[InstallResult] = field(default_factory=list)
    skipped: list[InstallResult] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def tree_name(root: Path, path: Path) -> str:
    """An adapter name from a file's path under ``root``: ``styles/Anime Style.safetensors`` -> ``styles-Anime-Style``.
    """
    relative = path.relative_to(root).with_suffix("")
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(relative.parts)).strip("-._")
    return text or "lora"


def install_tree(
    registry: Registry, root: str | os.PathLike[str], options: InstallOptions, *, progress: Progress | None = None
) -> TreeResult:
    """Install every ``.safetensors`` file under ``root`` (see the module docstring)."""
    from dataclasses import replace

    from ...installer import install_path

    root = Path(root)
    if not root.is_dir():
        raise InvalidAdapterError(f"{root}: not a folder", path=str(root), hint="--recursive installs a folder's files")
    files = sorted(p for p in root.rglob("*.safetensors") if p.is_file())
    result = TreeResult()
    for number, path in enumerate(files):
        if progress:
            progress(f"indexing {root}", number, len(files))
        try:
            done = install_path(registry, path, replace(options, name=tree_name(root, path)))
        except LoramgrError as exc:
            result.failed.append((str(path), str(exc)))
            continue
        (result.installed if done.created else result.skipped).append(done)
    if progress:
        progress(f"indexing {root}", len(files), len(files))
    return result


def link_tree(registry: Registry, folder: str | os.PathLike[str], *, symlink: bool = False) -> list[Path]:
    """Lay out ``folder`` with one ``<name>.safetensors`` per single-file adapter (its newest version)."""
    from packaging.version import Version

    from ...registry.refs import newest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    versions: dict[str, list[Version]] = {}
    for row in registry.list_versions():
        versions.setdefault(row.name, []).append(Version(row.version))
    made = []
    for name, found in sorted(versions.items()):
        details = registry.show(f"{name}=={newest(found)}")
        if details.format == "peft":
            continue  # a PEFT folder is no single file a diffusion UI reads
        blob = registry.store.path(next(f.digest for f in details.files if f.path == details.weights_file))
        target = folder / f"{name}.safetensors"
        if target.is_symlink() or target.exists():
            if target.resolve() == blob.resolve() or (not target.is_symlink() and os.path.samefile(target, blob)):
                made.append(target)
                continue
            raise ConflictError(f"{target} exists and is not {name}'s file",
                                hint="remove it, or link into a new folder")
        if symlink:
            target.symlink_to(blob)
        else:
            os.link(blob, target)
        made.append(target)
    return made
