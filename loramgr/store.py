"""The content-addressed blob store under ``<home>/blobs``.

A blob is a file's bytes stored once, read-only, at ``blobs/sha256/<2 hex>/<64 hex>``, however many
adapters or versions contain it. A new blob is copied into ``tmp/`` in the same file system (in the
kernel), fsynced, hashed from the written copy and renamed into place, so a reader never sees half a
blob and an interrupted write leaves at most a temporary file that ``gc`` removes.

Everything that uses ``tmp/`` holds a shared lock on ``<home>/store.lock`` meanwhile: an install from
its first file read to its database commit, and any scratch folder (:meth:`BlobStore.scratch`). ``gc``
holds it exclusively, so it never deletes a blob that an install is about to reference nor a scratch
folder in use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import InvalidReferenceError

CHUNK = 8 * 1024 * 1024
Progress = Callable[[str, int, int], None]


def sha256_file(path: str | Path, progress: Progress | None = None, label: str = "hashing") -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(label, done, total)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    path: Path
    size: int


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"

    def path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise InvalidReferenceError(f"not a sha256 digest: {digest!r}", reference=digest,
                                        hint="write sha256: and 64 hex digits")
        return self.blob_dir / hexdigest[:2] / hexdigest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_file(self, source: str | Path, progress: Progress | None = None, *, share: bool = False) -> BlobInfo:
        """Copy a file into the store; returns its blob.

        The bytes are copied in the kernel (``copy_file_range``, no trip through Python buffers),
        fsynced, then hashed from the written copy, so the digest describes exactly what is stored.
        A Python read/write loop that hashes while streaming measured about 6x slower here.

        ``share`` is for files nobody rewrites in place, such as huggingface_hub's cache blobs (it
        downloads to a temporary name and renames): on the same file system the blob is then a hard
        link to that file instead of a second copy of its bytes. Deleting either name leaves the
        other intact, and ``verify`` re-hashes the store whatever its blobs are linked to.
        """
        if share and os.name == "posix":
            shared = self._put_link(Path(source), progress)
            if shared is not None:
                return shared
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        label = f"storing {Path(source).name}"
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with open(source, "rb") as src, os.fdopen(fd, "r+b") as out:
                total = os.fstat(src.fileno()).st_size
                _copy(src, out, total, lambda done: progress(label, done, total) if progress else None)
                out.flush()
                os.fsync(out.fileno())
                out.seek(0)
                digest = hashlib.file_digest(out, "sha256")
            return self._commit_temp(tmp, "sha256:" + digest.hexdigest(), total)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _put_link(self, source: Path, progress: Progress | None) -> BlobInfo | None:
        """Hard-link ``source`` into the store after hashing it; None where links cannot be made."""
        real = source.resolve()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"link-{os.getpid()}-{real.name[:16]}-{os.urandom(4).hex()}.tmp"
        try:
            os.link(real, tmp)
        except OSError:  # another file system, or links not allowed: copy instead
            return None
        try:
            digest = sha256_file(tmp, progress, f"hashing {source.name}")
            return self._commit_temp(tmp, digest, tmp.stat().st_size)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _commit_temp(self, tmp: Path, blob: str, size: int) -> BlobInfo:
        """Move a fully written, fsynced temporary file into place as ``blob`` (or drop it if present)."""
        target = self.path(blob)
        if target.is_file():
            tmp.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        return BlobInfo(blob, target, size)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        if not self.blob_dir.is_dir():
            return
        for sub in sorted(self.blob_dir.iterdir()):
            if not sub.is_dir():
                continue
            for blob in sorted(sub.iterdir()):
                yield BlobInfo("sha256:" + blob.name, blob, blob.stat().st_size)

    def temp_files(self) -> list[Path]:
        if not self.tmp_dir.is_dir():
            return []
        return sorted(p for p in self.tmp_dir.iterdir())

    def verify(self, digest: str, progress: Progress | None = None) -> bool:
        path = self.path(digest)
        return path.is_file() and sha256_file(path, progress, f"verifying {digest[7:19]}") == digest

    def delete(self, path: Path) -> None:
        """Remove a blob or temporary file (blobs are read-only, which unlink does not mind on POSIX)."""
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():
                import shutil

                shutil.rmtree(path)
            else:
                os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
                path.unlink()

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private temporary folder under ``tmp/``, removed afterwards, with the shared store lock held
        throughout: ``gc`` (which empties ``tmp/`` under the exclusive lock) waits until it is gone."""
        with self.lock(exclusive=False):
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="scratch-") as folder:
                yield Path(folder)

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """Shared (installs) or exclusive (gc) advisory lock; a no-op where fcntl is unavailable."""
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process locking; gc there is best run alone
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "store.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _copy(src: BinaryIO, out: BinaryIO, total: int, report: Callable[[int], object]) -> None:
    """Copy ``total`` bytes in the kernel where the platform allows it, else through a buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < total:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(CHUNK * 8, total - done))
                if n == 0:
                    break
                done += n
                report(done)
        except OSError:  # e.g. a file system without support: fall back from where we are
            pass
    if done < total:
        src.seek(done)
        out.seek(done)
        while chunk := src.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            report(done)
    if done != total:
        raise OSError(f"{getattr(src, 'name', 'source')} changed size while being copied")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
