"""Export a stored version to any format: the one route used by ``loramgr export``, :func:`loramgr.export`
and ``loramgr push``.

A version stored as a PEFT folder and exported as one gets its stored bytes back, file for file; any
other pair converts (:mod:`loramgr.formats.convert`), with a base model linked at install supplying
the module paths that kohya names need. Every write is atomic (:mod:`loramgr.fileio`): an error
leaves no destination behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UnknownFormatError
from .fileio import atomic_folder, require_new_file, require_new_folder

if TYPE_CHECKING:
    from .registry import Registry, VersionDetails

#: the formats ``export`` writes: a PEFT folder, a kohya file, a diffusers file
EXPORT_FORMATS = ("peft", "kohya", "diffusers")


def export_version(
    registry: Registry, reference: str, destination: str | os.PathLike[str], *, fmt: str = "peft"
) -> Path:
    """Write version ``reference`` to ``destination`` (a new or empty folder for peft, a new file otherwise)."""
    if fmt not in EXPORT_FORMATS:
        raise UnknownFormatError(f"unknown export format {fmt!r}", format=fmt, known=EXPORT_FORMATS)
    destination = Path(destination)
    details = registry.show(reference)
    if fmt == "peft":
        require_new_folder(destination)
        if details.format == "peft":
            return _copy_stored(registry, details, destination)
    else:
        require_new_file(destination)
    from .formats.convert import export_converted

    return export_converted(registry.open_adapter(reference), destination, fmt=fmt, base=registry.base_of(reference))


def _copy_stored(registry: Registry, details: VersionDetails, destination: Path) -> Path:
    """The version's stored files, byte for byte, in a folder written whole and then renamed."""
    with atomic_folder(destination) as staging:
        for entry in details.files:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(registry.store.read_path(entry.digest, used_by=details.ref), target)
    return destination
