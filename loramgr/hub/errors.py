"""huggingface_hub's failures, translated into loramgr's one-line :class:`~loramgr.errors.HubError`.

The client raises a dozen exception classes with multi-line messages written for developers; a
user needs one line saying what went wrong with which reference, and what to do. The client's
exception stays attached as ``__cause__`` (shown with LORAMGR_DEBUG=1). Where it helps, a hint is
made sharper with one more look at the Hub or the cache: the tags that do exist, the subfolders
that do hold adapters.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HubError

if TYPE_CHECKING:
    from .client import HubSource


def download_error(
    exc: Exception, source: HubSource, *, offline: bool, token: str | None, endpoint: str | None
) -> HubError:
    """One line per failure the user can act on; the client's multi-line message stays in __cause__."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{source}: the repository is gated",
            hint="accept its conditions on the Hub page, then use a token of that account (HF_TOKEN)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        if token:
            return HubError(f"{source}: repository not found", hint="check the name and that your token can read it")
        return HubError(
            f"{source}: repository not found, or private and no token was given",
            hint="check the name; for a private repository set HF_TOKEN or run `hf auth login`",
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{source}: revision {source.revision!r} not found", hint=_known_tags(source, endpoint, token))
    if isinstance(exc, IncompleteSnapshotError):
        return HubError(
            f"{source}: only part of it is in the local cache (an earlier download was interrupted)",
            hint="download it again online to complete it" + (", or unset HF_HUB_OFFLINE" if offline else ""),
        )
    if isinstance(exc, LocalEntryNotFoundError):
        if offline:
            return HubError(
                f"{source}: offline and not in the local cache", hint="download it once online, or unset HF_HUB_OFFLINE"
            )
        return HubError(f"{source}: the Hub cannot be reached and nothing is cached", hint="check the network")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        return HubError(f"{source}: the Hub refused the token", hint="check HF_TOKEN or run `hf auth login` again")
    if isinstance(exc, _transfer_errors()):  # a transfer that died mid-way
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status else type(exc).__name__
        return HubError(
            f"{source}: download broken halfway ({reason}); nothing partial was kept",
            hint="run the same command again to resume from the files already complete",
        )
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return HubError(
        f"{source}: download failed ({type(exc).__name__}: {first_line})", hint="retry with LORAMGR_DEBUG=1"
    )


def _transfer_errors() -> tuple[type[BaseException], ...]:
    """OSError (HfHubHTTPError is one) and the HTTP client's own errors (httpx2 in huggingface_hub 2.x)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _known_tags(source: HubSource, endpoint: str | None, token: str | None) -> str:
    """The repository's tags, for the hint of a revision that does not exist (best effort)."""
    from huggingface_hub import HfApi

    try:
        tags = sorted(
            t.name for t in HfApi(endpoint=endpoint, token=token or False).list_repo_refs(source.repo_id).tags
        )
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        tags = []
    return f"known tags: {', '.join(tags)}" if tags else "use a branch, a tag or a commit sha that exists"


def no_adapter_files(source: HubSource, *, cache_dir: Path, commit: str, allow_pickle: bool) -> HubError:
    """Explain why nothing matched: only pickles, or adapters in subfolders, or no adapter at all."""
    from huggingface_hub import get_cached_repo_tree

    try:
        paths = [f.path for f in get_cached_repo_tree(source.repo_id, revision=commit, cache_dir=str(cache_dir))]
    except Exception:  # noqa: BLE001 - the tree listing only sharpens the hint
        paths = []
    prefix = f"{source.subfolder}/" if source.subfolder else ""
    if not allow_pickle and any(
        p.startswith(prefix) and "/" not in p[len(prefix) :] and p.endswith(".bin") for p in paths
    ):
        return HubError(
            f"{source}: only pickled weights (.bin), which can run code when loaded",
            hint="pass --allow-pickle if you trust this repository",
        )
    folders = sorted({p.rsplit("/", 1)[0] for p in paths if p.endswith("/adapter_config.json")})
    hint = (
        f"adapters found in subfolders: {', '.join(str(replace(source, subfolder=f)) for f in folders)}"
        if folders
        else "this repository holds no adapter_config.json or .safetensors file"
    )
    return HubError(f"{source}: no adapter files", hint=hint)


def push_errors() -> tuple[type[Exception], ...]:
    """What a push translates with :func:`push_error`: HTTP answers, and a network that does not answer."""
    return tuple(e for e in _transfer_errors() if issubclass(e, Exception))


def push_error(exc: Exception, repo_id: str, endpoint: str | None = None) -> HubError:
    """A failed write: no network, no access, a concurrent push, or the Hub being unwell."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is None and isinstance(exc, _network_errors()):
        where = endpoint or "the Hub"
        return HubError(f"push to {repo_id} failed: cannot reach {where} ({_first_line(exc)})",
                        hint="check the network (and HF_ENDPOINT), then push again")
    if status in (401, 403, 404):
        return HubError(
            f"cannot write to {repo_id} (HTTP {status})", hint="use a token with write access to that namespace"
        )
    if status == 409:
        return HubError(f"{repo_id}: the tag was created by someone else meanwhile", hint="push again to compare")
    if status == 412:
        return HubError(f"{repo_id} changed during the push", hint="push again")
    if status is None:
        return HubError(f"push to {repo_id} failed ({type(exc).__name__}: {_first_line(exc)})",
                        hint="retry with LORAMGR_DEBUG=1")
    return HubError(f"push to {repo_id} failed (HTTP {status})", hint="try again later")


def _network_errors() -> tuple[type[BaseException], ...]:
    """A connection refused, reset or timed out, in the builtin and in the HTTP clients' own classes."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
