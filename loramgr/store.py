"""The content-addressed blob store under ``<home>/blobs``.

A blob is a file's bytes stored once, read-only, at ``blobs/sha256/<2 hex>/<64 hex>``, however many
adapters or versions contain it. A new blob is copied into ``tmp/`` in the same file system (in the
kernel), fsynced, hashed from the written copy and renamed into place, so a reader never sees half a
blob and an interrupted write leaves at most a temporary file that ``gc`` removes.

Everything that uses ``tmp/`` holds a shared lock on ``<home>/store.lock`` meanwhile: an install from
its first file read to its database commit, and any scratch folder (:meth:`BlobStore.scratch`). ``gc``
holds it exclusively, so it never deletes a blob that an install is about to reference nor a scratch
folder in use.

:meth:`BlobStore.put_files` stages every file of a version in ``tmp/`` before the first one becomes a
blob, so a failure (a full disk) part-way leaves no orphan blob. A stored blob whose bytes no longer
match its name is replaced when the right bytes are stored again.

Every read of stored bytes goes through :meth:`BlobStore.read_path`, which re-hashes the blob unless
``<home>/verified/`` records that these bytes were hashed already: an entry holds the blob's inode,
size and change time (ctime), which any write to the file, through any of its names, advances, and
which no user can set back.
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

from .errors import IntegrityError, InvalidReferenceError, StoreWriteError

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


REPAIR_HINT = "run 'loramgr verify --repair' to restore it from a source that still has these bytes"


class BlobStore:
    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.verified_dir = self.root / "verified"
        self.read_only = read_only

    def path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise InvalidReferenceError(f"not a sha256 digest: {digest!r}", reference=digest,
                                        hint="write sha256: and 64 hex digits")
        return self.blob_dir / hexdigest[:2] / hexdigest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_files(self, sources: list[Path], progress: Progress | None = None, *, share: bool = False,
                  before_commit: Callable[[list[tuple[str, int]]], None] | None = None) -> list[BlobInfo]:
        """Store several files as blobs, all or none: each is staged in ``tmp/`` first, then all are moved
        into place, so a failure (a full disk) while staging leaves no blob behind.

        ``before_commit`` sees the (digest, size) of every staged file and may refuse them by raising.
        """
        staged: list[tuple[Path, str, int]] = []
        try:
            for source in sources:
                staged.append(self._stage(source, progress, share=share))
            if before_commit is not None:
                before_commit([(digest, size) for _, digest, size in staged])
            return [self._commit_temp(tmp, digest, size) for tmp, digest, size in staged]
        except BaseException:
            for tmp, _, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            raise

    def put_file(self, source: str | Path, progress: Progress | None = None, *, share: bool = False) -> BlobInfo:
        """Copy a file into the store; returns its blob (see :meth:`_stage`)."""
        tmp, digest, size = self._stage(Path(source), progress, share=share)
        try:
            return self._commit_temp(tmp, digest, size)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _stage(self, source: Path, progress: Progress | None, *, share: bool) -> tuple[Path, str, int]:
        try:
            return self._stage_file(source, progress, share=share)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot store {source} in {self.root}: {exc.strerror or exc}", path=str(source),
                hint="free space (or fix permissions) there and install again; nothing was stored",
            ) from exc

    def _stage_file(self, source: Path, progress: Progress | None, *, share: bool) -> tuple[Path, str, int]:
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
            shared = self._link(Path(source), progress)
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
                hashing = f"hashing {Path(source).name}"
                digest = _sha256_stream(out, lambda done: progress(hashing, done, total) if progress else None)
            return tmp, digest, total
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _link(self, source: Path, progress: Progress | None) -> tuple[Path, str, int] | None:
        """Hard-link ``source`` into ``tmp/`` and hash it; None where links cannot be made."""
        real = source.resolve()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"link-{os.getpid()}-{real.name[:16]}-{os.urandom(4).hex()}.tmp"
        try:
            os.link(real, tmp)
        except OSError:  # another file system, or links not allowed: copy instead
            return None
        try:
            digest = sha256_file(tmp, progress, f"hashing {source.name}")
            return tmp, digest, tmp.stat().st_size
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _commit_temp(self, tmp: Path, blob: str, size: int) -> BlobInfo:
        """Move a fully written, fsynced temporary file into place as ``blob``.

        Where the blob is present already the temporary file is dropped, unless the stored bytes no
        longer match the digest: then these (right) bytes replace them.
        """
        target = self.path(blob)
        if target.is_file() and self._intact(blob, target):
            tmp.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            self._remember(blob, target.stat())  # hashed just now: the first read need not hash again
        return BlobInfo(blob, target, size)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        if not self.blob_dir.is_dir():
            return
        for sub in sorted(self.blob_dir.iterdir()):
            if not sub.is_dir():
                continue
            for blob in sorted(sub.iterdir()):
                yield BlobInfo("sha256:" + blob.name, blob, blob.stat().st_size)

    def orphans(self, referenced: set[str]) -> list[tuple[str, int, Path | None]]:
        """(digest, size, path) of every stored blob whose digest is not in ``referenced``, by digest.

        Each blob folder is read once and only the orphans are stat'ed, relative to an open folder
        (``fstatat``), as ``find`` does: no query, path walk or Path object per blob. The path is given
        only for a file that is not where its name says (a stray file): :meth:`delete_blobs` finds the
        others from their digest."""
        try:
            folders = sorted(entry.name for entry in os.scandir(self.blob_dir) if entry.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        from concurrent.futures import ThreadPoolExecutor

        # folders in parallel, as delete_blobs does: the listing and the stats wait in the kernel
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            found = [orphan for orphans in pool.map(lambda f: self._orphans_in(f, referenced), folders)
                     for orphan in orphans]
        found.sort()
        return found

    def _orphans_in(self, folder: str, referenced: set[str]) -> list[tuple[str, int, Path | None]]:
        found: list[tuple[str, int, Path | None]] = []
        try:
            fd = os.open(self.blob_dir / folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return found
        try:
            for name in os.listdir(fd):
                digest = "sha256:" + name
                if digest not in referenced:
                    try:
                        size = os.stat(name, dir_fd=fd, follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                    stray = len(name) != 64 or name[:2] != folder
                    found.append((digest, size, self.blob_dir / folder / name if stray else None))
        finally:
            os.close(fd)
        return found

    def delete_blobs(self, digests: list[str]) -> None:
        """Remove these blobs and forget their verified stamps: one ``unlinkat`` per blob, as ``find -delete``."""
        by_folder: dict[str, list[str]] = {}
        for digest in digests:
            hexdigest = digest[7:]
            if not digest.startswith("sha256:") or "/" in hexdigest or hexdigest in ("", ".", ".."):
                self.path(digest)  # raises the error naming what a digest is
            by_folder.setdefault(hexdigest[:2], []).append(hexdigest)
        if not self.read_only and self.verified_dir.is_dir():
            gone = {name for names in by_folder.values() for name in names}
            with os.scandir(self.verified_dir) as entries:
                stamps = [entry.path for entry in entries if entry.name in gone]
            for stamp in stamps:
                with contextlib.suppress(OSError):
                    os.unlink(stamp)
        from concurrent.futures import ThreadPoolExecutor

        # folders in parallel: unlink waits in the kernel (the GIL is released), one folder's lock at a time
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(self._unlink_in, by_folder.items()))

    def _unlink_in(self, folder_names: tuple[str, list[str]]) -> None:
        folder, names = folder_names
        try:
            fd = os.open(self.blob_dir / folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            for name in names:
                try:
                    os.unlink(name, dir_fd=fd)  # a read-only file goes when its folder is writable
                except FileNotFoundError:
                    pass
                except PermissionError:
                    self.delete(self.blob_dir / folder / name)
        finally:
            os.close(fd)

    def temp_files(self) -> list[Path]:
        if not self.tmp_dir.is_dir():
            return []
        return sorted(p for p in self.tmp_dir.iterdir())

    def verify(self, digest: str, progress: Progress | None = None) -> bool:
        """Re-hash a blob (whatever the verified-at record says); True when its bytes match its digest."""
        path = self.path(digest)
        if not path.is_file():
            return False
        before = path.stat()
        if sha256_file(path, progress, f"verifying {digest[7:19]}") != digest:
            self._forget(digest)
            return False
        self._remember(digest, before)
        return True

    def read_path(self, digest: str, *, used_by: str | None = None) -> Path:
        """The path of a blob whose bytes were checked against its digest; IntegrityError otherwise."""
        path = self.path(digest)
        of = f" of {used_by}" if used_by else ""
        try:
            before = path.stat()
        except FileNotFoundError:
            raise IntegrityError(
                f"blob {digest[:19]}{of} is missing from the store ({path})", digest=digest,
                hint=f"{REPAIR_HINT}, or remove the version and install it again",
            ) from None
        if not self._intact(digest, path, before):
            raise IntegrityError(
                f"blob {digest[:19]}{of} ({path}) no longer matches its digest: its bytes were altered",
                digest=digest, hint=REPAIR_HINT,
            )
        return path

    def _intact(self, digest: str, path: Path, before: os.stat_result | None = None) -> bool:
        before = before or path.stat()
        if self._stamp(before) == self._recorded(digest):
            return True
        if sha256_file(path) != digest:
            self._forget(digest)
            return False
        self._remember(digest, before)
        return True

    @staticmethod
    def _stamp(st: os.stat_result) -> str:
        return f"{st.st_ino}:{st.st_size}:{st.st_ctime_ns}"

    def _recorded(self, digest: str) -> str | None:
        try:
            return (self.verified_dir / digest[7:]).read_text()
        except OSError:
            return None

    def _remember(self, digest: str, st: os.stat_result) -> None:
        if self.read_only:
            return
        with contextlib.suppress(OSError):  # only a cache: hashing again next time is always right
            self.verified_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.verified_dir, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                handle.write(self._stamp(st))
            os.replace(tmp, self.verified_dir / digest[7:])

    def _forget(self, digest: str) -> None:
        if not self.read_only:
            with contextlib.suppress(OSError):
                (self.verified_dir / digest[7:]).unlink()

    def delete(self, path: Path) -> None:
        """Remove a blob or temporary file (blobs are read-only, which unlink does not mind on POSIX)."""
        if path.parent.parent == self.blob_dir:
            self._forget("sha256:" + path.name)
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
        if self.read_only:  # nothing to collect in a home nobody may write: a private folder elsewhere
            with tempfile.TemporaryDirectory(prefix="loramgr-scratch-") as folder:
                yield Path(folder)
            return
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
        if self.read_only:  # no writer can run here; a shared lock on an existing file costs nothing
            if exclusive or not (self.root / "store.lock").is_file():
                yield
                return
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "store.lock", "rb" if self.read_only else "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256_stream(handle: BinaryIO, report: Callable[[int], object]) -> str:
    """``sha256:<hex>`` of the rest of ``handle``, reporting the bytes hashed so far after each chunk."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    done = 0
    while n := handle.readinto(buffer):  # type: ignore[attr-defined]
        digest.update(buffer[:n])
        done += n
        report(done)
    return "sha256:" + digest.hexdigest()


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
