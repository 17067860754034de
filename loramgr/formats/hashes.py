"""The digests people use to recognise a LoRA file, computed in one pass over it.

- ``sha256``: of the whole file (the registry's file digest); Civitai's **AutoV2** is its first 10 hex digits.
- ``tensors_sha256``: of the tensor payload, the bytes after the 8-byte length and the JSON header
  (kohya's ``sshs_model_hash`` is this digest of the file as saved). It stays the same when a tool
  rewrites the header metadata, so it is the identity that survives renames and metadata edits;
  **AutoV3** is shown as its first 12 hex digits (Civitai documents AutoV3 as a hash that ignores the
  metadata; this definition is not checked against Civitai's own code).
- ``crc32``: of the whole file, 8 upper-case hex digits, as Civitai lists it.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..safetensors_io import read_header

if TYPE_CHECKING:
    from ..registry import Registry

#: the reference schemes ``loramgr show`` accepts, with the number of hex digits each is written with
HASH_SCHEMES = {"autov2": 10, "autov3": 12, "crc32": 8, "tensors": 64}
_CHUNK = 1 << 22


def file_hashes(path: str | Path) -> dict[str, str]:
    """sha256, tensors_sha256, autov2, autov3 and crc32 of a safetensors file (see the module docstring)."""
    header = read_header(path)
    whole, payload, crc = hashlib.sha256(), hashlib.sha256(), 0
    position = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            whole.update(chunk)
            crc = zlib.crc32(chunk, crc)
            if position + len(chunk) > header.data_offset:
                payload.update(chunk[max(0, header.data_offset - position):])
            position += len(chunk)
    digest, tensors = whole.hexdigest(), payload.hexdigest()
    return {
        "sha256": digest,
        "tensors_sha256": tensors,
        "autov2": digest[:10],
        "autov3": tensors[:12],
        "crc32": f"{crc:08X}",
    }


def matches(hashes: dict[str, str], scheme: str, value: str) -> bool:
    """Whether a stored ``hashes`` record answers the reference ``scheme:value`` (a prefix for tensors)."""
    value = value.lower()
    if scheme == "tensors":
        return len(value) >= 6 and hashes.get("tensors_sha256", "").startswith(value)
    return hashes.get(scheme, "").lower() == value


def version_matches(record: Mapping[str, Any] | None, scheme: str, value: str) -> bool:
    """Whether a stored version's info record answers ``scheme:value``; AutoV2 also from the file digest."""
    config = (record or {}).get("config") or {}
    return matches(config.get("hashes") or {}, scheme, value)


def duplicate_groups(versions: Iterable[tuple[str, Mapping[str, Any]]]) -> list[list[str]]:
    """Versions (reference, adapter config) whose tensor payloads are equal, in groups of two or more.

    Equal tensors under different headers (renamed, re-tagged, metadata edited) are the same adapter.
    """
    groups: dict[str, list[str]] = {}
    for ref, config in versions:
        tensors = (config.get("hashes") or {}).get("tensors_sha256")
        if tensors:
            groups.setdefault(tensors, []).append(ref)
    return [sorted(refs) for _, refs in sorted(groups.items()) if len(refs) > 1]


def find_duplicates(registry: Registry) -> list[list[str]]:
    """Groups of installed versions (``name==version``) with the same tensors under different headers."""
    versions = []
    for row in registry.list_versions():
        ref = f"{row.name}=={row.version}"
        versions.append((ref, registry.show(ref).config))
    return duplicate_groups(versions)
