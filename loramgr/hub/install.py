"""``loramgr install hf://owner/repo[@revision][:subfolder]``: the Hub half of the install route.

huggingface_hub keeps the downloaded files in its own cache (shared with transformers and every other
tool, so a second install of the same commit downloads nothing). :func:`fetch_from_hub` downloads and
verifies them there and chooses what to install; :func:`install_fetched` hands that to
:func:`loramgr.installer.install_path`, whose store hard-links the cache's files (huggingface_hub never
rewrites a cached blob) instead of copying them, and records the repository, the revision asked for,
the commit it resolved to and the subfolder. ``install hf://`` runs both halves at once; ``sync``
fetches every locked entry first, checks it against the lock, and only then installs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.version import InvalidVersion, Version

from ..registry import HubOrigin, InstallResult, Registry, SourceDetails
from .client import HubSource

if TYPE_CHECKING:
    from ..installer import InstallOptions

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class HubFetch:
    """An adapter downloaded and verified in huggingface_hub's cache, ready to install."""

    target: Path  # what install reads: the (sub)folder, or its one .safetensors file
    folder: Path  # the snapshot folder (plus subfolder)
    files: list[str]  # paths relative to ``folder``
    default_name: str
    origin: HubOrigin

    @property
    def source_label(self) -> str:
        """``hf://repo@commit[:subfolder]``: the one-line source a stored version records."""
        return str(HubSource(self.origin.repo, self.origin.commit, self.origin.subfolder))


def hub_endpoint() -> str | None:
    """HF_ENDPOINT read now (huggingface_hub itself reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def version_from_revision(revision: str | None) -> str | None:
    """``v1.2.0`` or ``1.2.0`` as a revision names version 1.2.0; branches and commits name none."""
    if not revision:
        return None
    text = revision.removeprefix("v")
    if not text[:1].isdigit():
        return None
    try:
        return str(Version(text))
    except InvalidVersion:
        return None


def fetch_from_hub(
    source: HubSource,
    *,
    commit: str | None = None,
    allow_pickle: bool = False,
    offline: bool | None = None,
    progress: Progress | None = None,
) -> HubFetch:
    """Download ``source`` (at ``commit`` when given: a lock pins one) into the cache and verify it.

    A folder with adapter_config.json is installed as a PEFT folder; otherwise its one .safetensors
    file is (several of them: the folder, whose reading then names the problem).
    """
    from .client import download_adapter

    def byte_progress(done: int, total: int | None) -> None:
        if progress is not None and total:
            progress(f"downloading {source.repo_id}", done, total)

    download = download_adapter(
        replace(source, revision=commit) if commit else source,
        cache_dir=hub_cache_dir(),
        endpoint=hub_endpoint(),
        allow_pickle=allow_pickle,
        offline=offline,
        progress=byte_progress,
    )
    target = download.folder
    if "adapter_config.json" not in download.files:
        weights = [f for f in download.files if f.endswith(".safetensors")]
        if len(weights) == 1:
            target = download.folder / weights[0]
    origin = HubOrigin(repo=source.repo_id, revision=source.revision, commit=download.commit,
                       subfolder=source.subfolder, card=download.card)
    default_name = (source.subfolder or source.repo_id).rstrip("/").rsplit("/", 1)[-1]
    return HubFetch(target=target, folder=download.folder, files=download.files, default_name=default_name,
                    origin=origin)


def install_fetched(
    registry: Registry, fetched: HubFetch, options: InstallOptions, *, progress: Progress | None = None,
    expected_digest: str | None = None,
) -> InstallResult:
    """Install a fetched adapter; the result carries the Hub facts of this request (``result.hub``).

    ``expected_digest`` (a lock's): the version is registered only if its digest is this one."""
    from ..installer import install_path

    chosen = replace(options, name=options.name or fetched.default_name,
                     version=options.version or version_from_revision(fetched.origin.revision))
    result = install_path(
        registry,
        fetched.target,
        chosen,
        source_label=fetched.source_label,
        source_details=SourceDetails(hub=fetched.origin),
        share_files=True,  # huggingface_hub never rewrites a cached blob: link it instead of copying
        expected_digest=expected_digest,
        progress=progress,
    )
    result.hub = fetched.origin
    return result


def install_from_hub(
    registry: Registry,
    text: str,
    options: InstallOptions,
    *,
    progress: Progress | None = None,
    offline: bool | None = None,
) -> InstallResult:
    """Install ``hf://owner/repo[@revision][:subfolder]``: fetch, then install.

    ``result.hub`` holds this request's Hub facts, which ``lock`` pins: when the registry already held
    the same bytes from elsewhere (a local folder, another repository), the stored version's own
    source says nothing about this Hub repository."""
    from .client import parse_hub_reference

    fetched = fetch_from_hub(parse_hub_reference(text), allow_pickle=options.allow_pickle, offline=offline,
                             progress=progress)
    return install_fetched(registry, fetched, options, progress=progress)
