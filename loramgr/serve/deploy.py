"""``loramgr deploy``: a folder of immutable ``name@version`` adapters that a serving engine reads.

Layout, the same for every engine: ``<dir>/<name>@<version>/adapter_config.json`` and the weights file,
the layout vLLM's filesystem resolver (``VLLM_LORA_RESOLVER_CACHE_DIR``), ``--lora-modules``, SGLang's
``--lora-paths``, TGI's ``LORA_ADAPTERS`` and LoRAX's local ``adapter_source`` read. ``adapter_config.json``
gets ``base_model_name_or_path`` set to the served model's name, which vLLM's resolver requires.

Names are immutable: the folder of ``sql-chat@1.2.0`` only ever holds the bytes of that version
(``name@tag`` references are resolved to their version first), so an engine's caches keyed by adapter
name never serve stale weights. Where an engine needs an integer id (vLLM's ``lora_int_id``) it is
:func:`lora_int_id` of the digest, the same in every process.

The folder is a cache: each adapter's folder is written whole and renamed into place
(:mod:`loramgr.fileio`); weights are hard-linked from the blob store when it is on the same file system;
a second deploy of the same set writes nothing; adapters no longer in the set are removed unless
``keep``. ``.loramgr-deploy.json`` records what loramgr wrote, so folders it did not write are never
touched. Every adapter passes the engine's check (:func:`loramgr.serve.guard.require_engine_ok`) before
anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compat.check import open_base
from ..compat.engines import VLLM_RANKS
from ..errors import EngineSpecError, IntegrityError
from ..fileio import atomic_folder, write_atomic
from .guard import require_engine_ok

if TYPE_CHECKING:
    from ..compat.basemodel import BaseFingerprint
    from ..compat.findings import Finding
    from ..registry import Registry, VersionDetails

#: the engines ``deploy`` writes folders for
DEPLOY_ENGINES = ("vllm", "sglang", "tgi", "lorax")
MANIFEST = ".loramgr-deploy.json"


def served_name(name: str, version: str) -> str:
    """The immutable name an engine gets for a version: ``name@version``."""
    return f"{name}@{version}"


def lora_int_id(digest: str) -> int:
    """A positive 31-bit integer id derived from the digest: stable across processes and machines."""
    value = int(digest.partition(":")[2][:8], 16) & 0x7FFFFFFF
    return value or 1


@dataclass(frozen=True)
class DeployedAdapter:
    name: str  # name@version, the name the engine serves it under
    digest: str
    path: Path
    lora_int_id: int
    max_rank: int
    written: bool  # False when the folder already held exactly this


@dataclass
class DeployReport:
    engine: str
    directory: Path
    adapters: list[DeployedAdapter]
    removed: list[str] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def written(self) -> list[DeployedAdapter]:
        return [a for a in self.adapters if a.written]

    def launch(self) -> list[str]:
        """What to pass the engine to serve this folder: flags and environment, one item per line."""
        pairs = [f"{a.name}={a.path}" for a in self.adapters]
        top = max((a.max_rank for a in self.adapters), default=1)
        rank = next((r for r in VLLM_RANKS if r >= top), top)
        if self.engine == "vllm":
            return [
                f"VLLM_PLUGINS=lora_filesystem_resolver VLLM_LORA_RESOLVER_CACHE_DIR={self.directory} "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
                f"--enable-lora --max-lora-rank {rank} --lora-modules {' '.join(pairs)}",
            ]
        if self.engine == "sglang":
            return [f"--enable-lora --max-lora-rank {top} --lora-paths {' '.join(pairs)}"]
        if self.engine == "tgi":
            return [f"LORA_ADAPTERS={','.join(pairs)}"]
        return [f'{{"adapter_id": "{a.path}", "adapter_source": "local"}}' for a in self.adapters]


@dataclass(frozen=True)
class _Entry:
    details: VersionDetails
    reference: str

    @property
    def name(self) -> str:
        return served_name(self.details.name, self.details.version)


def deploy(
    registry: Registry,
    engine: str,
    references: list[str],
    directory: str | os.PathLike[str],
    *,
    served_model: str | None = None,
    lock: str | os.PathLike[str] | None = None,
    keep: bool = False,
    base: str | os.PathLike[str] | BaseFingerprint | None = None,
    max_lora_rank: int | None = None,
) -> DeployReport:
    """Make ``directory`` hold exactly ``references`` (or the versions of ``lock``) for ``engine``.

    ``served_model`` is the name the engine serves the base model under (vLLM: required). ``base``
    (a registered base, a path or a fingerprint) adds the module and shape checks against it.
    ``max_lora_rank`` is the engine's rank limit (vLLM's ``--max-lora-rank``; default its largest).
    """
    if engine not in DEPLOY_ENGINES:
        raise EngineSpecError(f"deploy does not write for engine {engine!r}", engine=engine,
                              hint=f"use one of {', '.join(DEPLOY_ENGINES)}")
    if engine == "vllm" and not served_model:
        raise EngineSpecError("deploy vllm needs the served model's name", engine=engine, option="served-model",
                              hint="pass --served-model, the name vLLM serves the base model under")
    entries = _entries(registry, references, lock)
    adapters = [registry.open_adapter(e.reference) for e in entries]
    spec = f"vllm:max-rank={max_lora_rank or VLLM_RANKS[-1]}" if engine == "vllm" else engine
    fingerprint = open_base(base, registry) if base is not None else None
    warnings = require_engine_ok(adapters, spec, labels=[e.name for e in entries], base=fingerprint,
                                 adapter_bases=[registry.base_of(e.reference) for e in entries])
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(directory)
    deployed = []
    for entry, adapter in zip(entries, adapters, strict=True):
        target = directory / entry.name
        wanted = {"digest": entry.details.digest, "served_model": served_model}
        fresh = manifest.get(entry.name) == wanted and _intact(registry, entry.details, target)
        if not fresh:
            _write_entry(registry, entry.details, target, served_model)
            manifest[entry.name] = wanted
        deployed.append(DeployedAdapter(entry.name, entry.details.digest, target, lora_int_id(entry.details.digest),
                                        max(m.rank for m in adapter.info.modules), written=not fresh))
    removed = []
    if not keep:
        keep_names = {e.name for e in entries}
        for name in sorted(set(manifest) - keep_names):
            shutil.rmtree(directory / name, ignore_errors=True)
            del manifest[name]
            removed.append(name)
    _write_manifest(directory, manifest)
    return DeployReport(engine, directory, deployed, removed, warnings)


def _entries(registry: Registry, references: list[str], lock: str | os.PathLike[str] | None) -> list[_Entry]:
    from ..lockfile import read_lock

    entries: dict[str, _Entry] = {}
    for reference in references:
        details = registry.show(reference)
        entry = _Entry(details, f"{details.name}=={details.version}")
        entries.setdefault(entry.name, entry)
    for locked in read_lock(Path(lock)) if lock is not None else []:
        details = registry.show(f"{locked.name}=={locked.version}")
        if details.digest != locked.digest:
            raise IntegrityError(f"{locked.name}=={locked.version} is {details.digest[:19]} in the registry, the lock "
                                 f"pins {locked.digest[:19]}", digest=locked.digest,
                                 hint="run 'loramgr sync' to make the registry match the lock")
        entry = _Entry(details, f"{details.name}=={details.version}")
        entries.setdefault(entry.name, entry)
    if not entries:
        raise EngineSpecError("nothing to deploy", engine="deploy", hint="give adapter references or --lock FILE")
    return list(entries.values())


def _files(registry: Registry, details: VersionDetails) -> tuple[Path, str, Path]:
    """(stored adapter_config.json, weights file name, stored weights) of a PEFT version."""
    by_path = {f.path: registry.store.path(f.digest) for f in details.files}
    weights = next((p for p in sorted(by_path) if p.endswith(".safetensors") and "/" not in p),
                   "adapter_model.safetensors")
    return by_path["adapter_config.json"], weights, by_path[weights]


def _intact(registry: Registry, details: VersionDetails, target: Path) -> bool:
    _, weights, stored = _files(registry, details)
    deployed = target / weights
    return (target / "adapter_config.json").is_file() and deployed.is_file() and (
        deployed.stat().st_size == stored.stat().st_size)


def _write_entry(registry: Registry, details: VersionDetails, target: Path, served_model: str | None) -> None:
    config_path, weights, stored = _files(registry, details)
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    if served_model:
        config["base_model_name_or_path"] = served_model
    incoming = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.new"
    with atomic_folder(incoming) as staging:
        write_atomic(staging / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
        try:
            os.link(stored, staging / weights)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(stored, staging / weights)
    if target.exists():
        old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
        target.rename(old)
        incoming.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        incoming.rename(target)


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}  # a broken record only makes the next deploy rewrite what it lists
    adapters = data.get("adapters") if isinstance(data, dict) else None
    return dict(adapters) if isinstance(adapters, dict) else {}


def _write_manifest(directory: Path, manifest: dict[str, dict[str, Any]]) -> None:
    data = (json.dumps({"adapters": dict(sorted(manifest.items()))}, indent=2) + "\n").encode()
    path = directory / MANIFEST
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)
