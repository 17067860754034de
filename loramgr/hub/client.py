"""The Hugging Face Hub as a source and a destination of adapters, with no registry involved.

Reading goes through ``huggingface_hub.snapshot_download`` into its own cache (``cache_dir``), for
only the files an adapter needs; an install then hard-links them into the registry's content-addressed
store (a copy only across file systems, see docs/hub.md "Caching"). That keeps the client's
guarantees: atomic blobs, resume on a cut connection, revisions resolved to commits, and a cached
commit re-used without a byte transferred.

Every failure reaches the user as one line (:class:`~loramgr.errors.HubError` with a hint):
repository not found, private or gated without a token, revision not found, no adapter files,
a download broken halfway, offline with nothing cached.

``huggingface_hub`` reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME when it is imported, so this module
takes ``endpoint``, ``cache_dir`` and ``offline`` explicitly and reads HF_HUB_OFFLINE and HF_TOKEN
itself, at call time. It imports huggingface_hub inside functions: ``loramgr --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConflictError, HubError, IntegrityError, InvalidReferenceError
from .errors import download_error, no_adapter_files, push_error, push_errors
from .modelcard import parse_card

logger = logging.getLogger(__name__)

SCHEME = "hf://"
#: an adapter's files; single-file adapters (kohya, diffusers) are any *.safetensors
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "README.md", "*.safetensors")
#: pickled weights run code when loaded: only on request (docs/hub.md, "What gets downloaded")
PICKLE_PATTERNS = ("*.bin",)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FORMAT_HINT = "write hf://owner/repo, hf://owner/repo@revision or hf://owner/repo@revision:subfolder"

#: progress(bytes_done, bytes_total or None), called from download threads
Progress = Callable[[int, "int | None"], None]


@dataclass
class HubSource:
    """Where an adapter lives on the Hub: a repository, a revision (branch, tag, commit), a subfolder."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        text = SCHEME + self.repo_id
        if self.revision:
            text += f"@{self.revision}"
        if self.subfolder:
            text += f":{self.subfolder}"
        return text


@dataclass
class Download:
    """An adapter's files in huggingface_hub's cache, verified, at the commit the revision resolved to."""

    folder: Path  # the snapshot folder (plus subfolder) inside cache_dir; read-only by convention
    repo_id: str
    revision_asked: str | None
    commit: str
    card: dict[str, Any]  # license, base_model, tags, description
    files: list[str]  # paths relative to folder
    digests: dict[str, str] = field(default_factory=dict)  # path -> "sha256:<hex>", for the store


@dataclass
class PushPlan:
    """What :func:`push` will upload: the adapter files with their sizes, the card, the tag."""

    repo_id: str
    files: list[tuple[str, int]]
    card: str
    tag: str
    private: bool


def parse_hub_reference(text: str) -> HubSource:
    """Parse ``hf://owner/repo[@revision][:subfolder]``.

    ``:`` cannot occur in a git ref name, so the first ``:`` after the scheme starts the subfolder
    and a revision may still contain ``/`` (``refs/pr/1``, ``feature/x``).
    """
    if not text.startswith(SCHEME):
        raise InvalidReferenceError(f"not a Hub reference: {text!r}", reference=text, hint=_FORMAT_HINT)
    rest = text[len(SCHEME) :]
    target, _, subfolder = rest.partition(":")
    repo_id, at, revision = target.partition("@")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise InvalidReferenceError(
            f"invalid Hub repository id {repo_id!r} in {text!r}", reference=text, hint=_FORMAT_HINT
        )
    if at and not revision:
        raise InvalidReferenceError(f"empty revision after '@' in {text!r}", reference=text, hint=_FORMAT_HINT)
    sub = subfolder.strip("/")
    if ":" in rest and (not sub or any(part in ("", ".", "..") for part in sub.split("/"))):
        raise InvalidReferenceError(
            f"invalid subfolder {subfolder!r} in {text!r}", reference=text, hint="give a relative folder path"
        )
    return HubSource(repo_id=repo_id, revision=revision or None, subfolder=sub or None)


def adapter_patterns(subfolder: str | None = None, *, allow_pickle: bool = False) -> list[str]:
    """allow_patterns for an adapter. Deterministic on purpose: an offline call must repeat the exact
    patterns of the online one, or huggingface_hub raises IncompleteSnapshotError (docs/hub.md, "Offline")."""
    patterns = list(ADAPTER_PATTERNS) + (list(PICKLE_PATTERNS) if allow_pickle else [])
    # nested files are kept out by download_adapter's ignore_patterns (fnmatch's "*" also matches "/")
    return [f"{subfolder}/{p}" for p in patterns] if subfolder else patterns


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else HF_HUB_OFFLINE read now (huggingface_hub read it at import time)."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_token(token: str | None = None) -> str | None:
    """The argument, else HF_TOKEN, else the token stored by ``hf auth login``."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def download_adapter(
    source: HubSource,
    *,
    cache_dir: Path,
    endpoint: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    offline: bool | None = None,
    progress: Progress | None = None,
) -> Download:
    """Download only the adapter's files of ``source`` into ``cache_dir`` and verify them.

    A commit already in the cache costs no file request (and none at all when ``source.revision``
    is a commit sha). Verification re-hashes every file against the id huggingface_hub named its
    blob after (git blob sha1, or sha256 for LFS), because the client itself only checks sizes.
    """
    from huggingface_hub import snapshot_download

    offline = is_offline(offline)
    token = resolve_token(token)
    patterns = adapter_patterns(source.subfolder, allow_pickle=allow_pickle)
    try:
        with _client_quiet():
            snapshot = snapshot_download(
                source.repo_id,
                revision=source.revision,
                cache_dir=str(cache_dir),
                endpoint=endpoint,
                token=token or False,  # False: never fall back to a login the caller did not choose
                allow_patterns=patterns,
                ignore_patterns=[f"{source.subfolder}/*/*" if source.subfolder else "*/*"],  # "*" crosses "/"
                local_files_only=offline,
                tqdm_class=_progress_class(progress),
            )
    except Exception as exc:  # noqa: BLE001 - every client failure becomes one HubError below
        raise download_error(exc, source, offline=offline, token=token, endpoint=endpoint) from exc
    root = Path(snapshot)
    folder = root / source.subfolder if source.subfolder else root
    files = (
        sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    )
    weights = (".safetensors", ".bin") if allow_pickle else (".safetensors",)
    if not any(f.endswith(weights) for f in files):  # a config or a card alone is not an adapter
        raise no_adapter_files(source, cache_dir=cache_dir, commit=root.name, allow_pickle=allow_pickle)
    digests = _verify_files(
        folder, files, source, record=root.parent.parent / ".loramgr-verified.json",
        tree_hashes=lambda: _tree_hashes(source, root.name, endpoint=endpoint, token=token, offline=offline),
    )
    card = parse_card((folder / "README.md").read_text("utf-8", "replace")) if "README.md" in files else {}
    card = {"license": None, "base_model": None, "tags": [], "description": None, **card}
    if not card["base_model"] and "adapter_config.json" in files:
        card["base_model"] = _config_base_model(folder / "adapter_config.json")
    return Download(
        folder=folder,
        repo_id=source.repo_id,
        revision_asked=source.revision,
        commit=root.name,
        card=card,
        files=files,
        digests=digests,
    )


def plan_push(folder: Path, *, repo_id: str, tag: str, card: str, private: bool) -> PushPlan:
    """Choose the files to push (config, safetensors weights, and the card as README.md); no network.

    Pickled weights are never pushed: a registry that refuses to load them unasked should not
    publish them either.
    """
    folder = Path(folder)
    if not _REPO_ID.match(repo_id):
        raise InvalidReferenceError(f"invalid Hub repository id {repo_id!r}", reference=repo_id, hint="use owner/name")
    if not tag or tag.startswith(("-", "/")) or any(c in tag for c in " :~^?*[\\"):
        raise InvalidReferenceError(f"invalid tag {tag!r}", reference=tag, hint="use a tag like v1.2.0")
    names = (
        sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file() and (p.suffix == ".safetensors" or p.name == "adapter_config.json")
        )
        if folder.is_dir()
        else []
    )
    if not any(n.endswith(".safetensors") for n in names):
        raise HubError(f"nothing to push from {folder}: no .safetensors weights", hint="convert the adapter first")
    files = [(name, (folder / name).stat().st_size) for name in names]
    return PushPlan(repo_id=repo_id, files=files, card=card, tag=tag, private=private)


def push(
    plan: PushPlan,
    folder: Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    notify: Callable[[str], None] | None = None,
) -> str:
    """Upload ``plan`` in one commit, tag it, and return the commit sha.

    A tag is a published version: if it exists with other files, refuse (ConflictError); if it
    exists with exactly these bytes, the push already happened and nothing is sent (``notify`` says so).
    Adapter files left on the branch from an earlier version are deleted in the same commit, so the
    tag holds this adapter and nothing stale.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    token = resolve_token(token)
    if not token:
        raise HubError(f"pushing to {plan.repo_id} needs a Hub token", hint="set HF_TOKEN or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    folder = Path(folder)
    local: dict[str, Path | bytes] = {name: folder / name for name, _ in plan.files}  # paths: streamed
    local["README.md"] = plan.card.encode("utf-8")
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        tagged = {t.name: t.target_commit for t in api.list_repo_refs(plan.repo_id).tags}
        if plan.tag in tagged:
            different = _differences(api, plan.repo_id, tagged[plan.tag], local)
            if different:
                raise ConflictError(
                    f"tag {plan.tag} of {plan.repo_id} already exists at commit {tagged[plan.tag][:12]} "
                    f"with other files ({', '.join(different)})",
                    hint="tags are immutable: push a new version",
                )
            if notify:
                notify(f"{plan.repo_id}@{plan.tag} already holds these exact files; nothing pushed")
            return tagged[plan.tag]
        head = api.repo_info(plan.repo_id).sha or ""  # the Hub always answers a sha for an existing repo
        stale = [p for p in _adapter_files(api, plan.repo_id, head) if p not in local]
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(c) if isinstance(c, Path) else c)
            for p, c in local.items()
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        commit = api.create_commit(
            plan.repo_id,
            operations,
            commit_message=f"loramgr: {plan.tag}",
            parent_commit=head or None,  # refuse to commit over a concurrent push
        ).oid
        api.create_tag(plan.repo_id, tag=plan.tag, revision=commit, tag_message=f"loramgr {plan.tag}")
    except push_errors() as exc:
        raise push_error(exc, plan.repo_id, api.endpoint) from exc
    return commit


# -- helpers -------------------------------------------------------------------------------------------


def _progress_class(progress: Progress | None) -> type:
    """A never-drawing tqdm that forwards the snapshot's byte counts to ``progress``.

    The library must not draw (only the CLI draws progress bars). huggingface_hub feeds
    the bar named "huggingface_hub.snapshot_download" with bytes written, summed over files.
    """
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    lock = threading.Lock()

    class _Silent(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._report = progress is not None and kwargs.get("name") == "huggingface_hub.snapshot_download"
            self._done = 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

        def update(self, n: float | None = 1) -> bool | None:
            if self._report and n and progress is not None:
                with lock:
                    self._done += int(n)
                    done, total = self._done, self.total
                progress(done, int(total) if total else None)
            return None

    return _Silent


@contextlib.contextmanager
def _client_quiet() -> Iterator[None]:
    """huggingface_hub's retry and resume notes off stderr meanwhile: what became of a download reaches
    the user once, as the result or as one HubError line (LORAMGR_DEBUG=1 keeps them)."""
    if os.environ.get("LORAMGR_DEBUG"):
        yield
        return
    client_logger = logging.getLogger("huggingface_hub")
    level = client_logger.level
    client_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        client_logger.setLevel(level)


def _verify_files(folder: Path, files: list[str], source: HubSource, record: Path,
                  tree_hashes: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Verify ``files`` by content and return their digests, re-hashing only blobs not verified before.

    The hash each file must have is the one huggingface_hub named its cache blob after (the ETag:
    git blob sha1, or sha256 for LFS) when that is a hash, else the ``oid`` (or LFS sha256) of the
    repository's tree listing (``tree_hashes``, one request), whatever the ETag is (an MD5, any string).

    ``record`` (one JSON file per repository in the cache) remembers, per blob, the inode, size and
    change time (ctime) it had when it was verified, and its sha256. Any write to a blob advances its
    ctime, which, unlike its mtime, nobody can set back: a blob whose record still matches is not
    read again, so a cache hit costs no hashing; any other is re-hashed, offline too.
    """
    import json

    try:
        known = json.loads(record.read_text("utf-8"))
    except (OSError, ValueError):
        known = {}
    digests: dict[str, str] = {}
    listing: dict[str, str] | None = None
    for name in files:
        path = folder / name
        stat = path.stat()
        key = path.resolve().name if path.is_symlink() else path.relative_to(record.parent).as_posix()
        stamp = [stat.st_size, stat.st_ino, stat.st_ctime_ns]
        entry = known.get(key)
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == stamp:
            digests[name] = entry[3]
            continue
        expected = key if (_HEX40.match(key) or _HEX64.match(key)) else None
        if expected is None:
            listing = tree_hashes() if listing is None else listing
            expected = listing.get(name)
        if expected is None:
            raise IntegrityError(
                f"{source}: {name} cannot be verified: its cache name {key!r} is not a hash and the Hub's tree "
                "listing names none for it", hint="install it once while online, or from a trusted folder",
            )
        digests[name] = _verify(path, source, expected)
        known[key] = [*stamp, digests[name]]
    from ..fileio import write_atomic

    with contextlib.suppress(OSError):  # a read-only cache still installs; it only re-hashes next time
        write_atomic(record, json.dumps(known).encode("utf-8"))
    return digests


def _tree_hashes(source: HubSource, commit: str, *, endpoint: str | None, token: str | None,
                 offline: bool) -> dict[str, str]:
    """Path (relative to the subfolder) -> the tree's LFS sha256 or git ``oid`` at ``commit``; {} offline."""
    if offline:
        return {}
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        tree = api.list_repo_tree(source.repo_id, path_in_repo=source.subfolder or None, revision=commit,
                                  recursive=False, expand=False)
        out: dict[str, str] = {}
        prefix = f"{source.subfolder.rstrip('/')}/" if source.subfolder else ""
        for item in tree:
            if isinstance(item, RepoFile):
                lfs = getattr(item, "lfs", None)
                sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
                out[item.path.removeprefix(prefix)] = sha256 or item.blob_id
        return out
    except Exception as exc:  # noqa: BLE001 - every client failure becomes one HubError
        raise download_error(exc, source, offline=offline, token=token, endpoint=endpoint) from exc


def _verify(path: Path, source: HubSource, expected: str) -> str:
    """Re-hash a cached file against ``expected`` (git blob sha1 or sha256); return its ``sha256:<hex>``.

    The two hashes run in two threads (hashlib releases the GIL), one read.
    """
    from concurrent.futures import ThreadPoolExecutor

    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as handle, ThreadPoolExecutor(1) as pool:
        while chunk := handle.read(8 << 20):
            pending = pool.submit(sha1.update, chunk) if _HEX40.match(expected) else None
            sha256.update(chunk)
            if pending is not None:
                pending.result()
    found = sha1.hexdigest() if _HEX40.match(expected) else sha256.hexdigest()
    if found != expected:
        raise IntegrityError(
            f"{source}: {path.name} does not match the Hub's hash (expected {expected}, got {found})",
            digest=f"sha256:{sha256.hexdigest()}",
            hint=f"delete {path.resolve()} and download again",
        )
    return f"sha256:{sha256.hexdigest()}"


def _config_base_model(path: Path) -> str | None:
    import json

    try:
        value = json.loads(path.read_text("utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def _adapter_files(api: Any, repo_id: str, commit: str) -> list[str]:
    """Top-level files at ``commit`` that an adapter download would take (README.md aside)."""
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils._paths import filter_repo_objects

    paths = [f.path for f in api.list_repo_tree(repo_id, revision=commit) if isinstance(f, RepoFile)]
    return [p for p in filter_repo_objects(paths, allow_patterns=adapter_patterns()) if "/" not in p]


def _hashes(content: Path | bytes) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file or of bytes, streamed: the ids the Hub reports for a file."""
    size = content.stat().st_size if isinstance(content, Path) else len(content)
    sha1, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    if isinstance(content, bytes):
        sha1.update(content)
        sha256.update(content)
        return sha1.hexdigest(), sha256.hexdigest()
    with content.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def _differences(api: Any, repo_id: str, commit: str, local: dict[str, Path | bytes]) -> list[str]:
    """Files whose bytes differ between ``commit`` and ``local`` (compared by git blob id / LFS sha256)."""
    from huggingface_hub.hf_api import RepoFile

    remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit) if isinstance(f, RepoFile)}
    different = []
    for path, content in local.items():
        entry = remote.get(path)
        if entry is None:
            different.append(f"{path} missing")
            continue
        git_sha1, sha256 = _hashes(content)
        if (entry.lfs.sha256 if entry.lfs is not None else entry.blob_id) not in (git_sha1, sha256):
            different.append(path)
    extra = [p for p in _adapter_files(api, repo_id, commit) if p not in local]
    return different + [f"{p} extra" for p in extra]
