"""Writing files and folders so that a reader never sees half of one.

Every write loramgr makes outside its blob store goes through here: a merged adapter, a converted
file, an exported folder, a lockfile. A file is written to a temporary name beside its destination,
fsynced and renamed; a folder is filled under a temporary name beside its destination and renamed
whole. An error or Ctrl-C leaves the destination as it was (absent, or the previous file).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DestinationExistsError


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file: temporary file in the same folder, fsync, rename over ``path``."""
    write_atomic_with(path, lambda tmp: tmp.write_bytes(data))


def write_atomic_with(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """:func:`write_atomic` for a writer that fills a file itself (streamed, never whole in memory): ``write``
    gets the temporary path beside ``path``; the file is then fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode of any new file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``destination``; on success it becomes ``destination``.

    ``destination`` must not exist or be an empty folder (it is refused before anything is written).
    On any error the staging folder is removed and ``destination`` is left untouched.
    """
    destination = Path(destination)
    require_new_folder(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
        yield staging
        for child in staging.rglob("*"):
            if child.is_file():
                _fsync(child)
        if destination.is_dir():
            destination.rmdir()  # empty, checked above; rmdir fails if something appeared meanwhile
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def require_new_folder(destination: Path) -> None:
    """Refuse a destination that exists as a file or a non-empty folder."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise DestinationExistsError(f"{destination} exists and is not empty", path=str(destination),
                                     hint="choose a new or empty folder")


def require_new_file(destination: Path) -> None:
    """Refuse a destination that exists at all (a file, or a folder in the way of one)."""
    if destination.exists():
        raise DestinationExistsError(f"{destination} exists", path=str(destination), hint="choose a new file name")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
