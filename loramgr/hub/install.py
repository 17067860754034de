"""``loramgr install hf://owner/repo[@revision][:subfolder]``: the Hub layer feeding the registry.

huggingface_hub keeps the downloaded files in its own cache (shared with transformers and every other
tool, so a second install of the same commit downloads nothing); the registry then copies the
adapter's files into its content-addressed store and records the repository, the revision asked for
and the commit it resolved to.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from ..registry import InstallResult, Registry

Progress = Callable[[str, int, int], None]


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


def install_from_hub(
    registry: Registry,
    text: str,
    *,
    name: str | None = None,
    version: str | None = None,
    allow_pickle: bool = False,
    base: str | None = None,
    progress: Progress | None = None,
    offline: bool | None = None,
) -> tuple[InstallResult, dict[str, Any]]:
    """Install an adapter from the Hub; returns the result and the Hub facts of this request (repo,
    revision, commit, subfolder, card). They are what ``lock`` pins: when the registry already held the
    same bytes from elsewhere (a local folder, another repository), the stored version's own source
    says nothing about this Hub repository."""
    from ..install import install_path
    from .client import download_adapter, parse_hub_reference

    source = parse_hub_reference(text)

    def byte_progress(done: int, total: int | None) -> None:
        if progress is not None and total:
            progress(f"downloading {source.repo_id}", done, total)

    download = download_adapter(
        source,
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
    default_name = (source.subfolder or source.repo_id).rstrip("/").rsplit("/", 1)[-1]
    details = {
        "hub": {
            "repo": source.repo_id,
            "revision": source.revision,
            "commit": download.commit,
            "subfolder": source.subfolder,
            "card": download.card,
        }
    }
    result = install_path(
        registry,
        target,
        name=name or default_name,
        version=version or version_from_revision(source.revision),
        allow_pickle=allow_pickle,
        source_label=f"hf://{source.repo_id}@{download.commit}" + (f":{source.subfolder}" if source.subfolder else ""),
        source_details=details,
        base=base,
        share_files=True,  # huggingface_hub never rewrites a cached blob: link it instead of copying
        progress=progress,
    )
    return result, details["hub"]
