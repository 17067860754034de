"""A vLLM ``LoRAResolver`` that serves adapters straight from the loramgr registry.

Installing loramgr registers :func:`register` under the ``vllm.general_plugins`` entry point; vLLM calls
it at start-up and it registers :class:`RegistryResolver` with ``LoRAResolverRegistry``. With
``vllm serve BASE --enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``, a request for
``model="sql-chat@1.2.0"`` (a version) or ``model="sql-chat@stable"`` (a tag) is answered by deploying
that version into the resolver's cache folder (:func:`loramgr.serve.deploy.deploy`, with the vLLM check
first) and returning a ``LoRARequest`` for it:

- ``lora_name`` is the immutable ``name@version`` (a tag is resolved once, so a name never points at
  other weights), ``lora_int_id`` derives from the digest (stable across vLLM's processes), and
  ``lora_path`` is the deployed folder;
- an unknown reference, a bare name, or an adapter that fails the vLLM check gives None: vLLM then
  answers "model not found" and tries its other resolvers.

Where vLLM is not importable (this module's tests), :class:`ResolvedLora` carries the same fields.
The cache folder is ``$LORAMGR_VLLM_CACHE_DIR`` or ``<LORAMGR_HOME>/serve/vllm``; the rank check uses
vLLM's largest ``--max-lora-rank`` (vLLM itself refuses an adapter above the server's limit).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from ..errors import LoramgrError

if TYPE_CHECKING:
    from ..registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedLora:
    """The fields of vLLM's ``LoRARequest`` that a resolver fills, for use without vLLM."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def lora_local_path(self) -> str:
        return self.lora_path


def engine_reference(lora_name: str) -> str | None:
    """The registry reference for a model name a client asks vLLM for, or None for a mutable bare name.

    ``name@1.2.0`` is that version, ``name@stable`` that tag, ``name==1.2.0`` as loramgr writes it.
    """
    name, at, suffix = lora_name.partition("@")
    if "==" in lora_name:
        return lora_name
    if not at or not name or not suffix:
        return None
    try:
        Version(suffix)
    except InvalidVersion:
        return lora_name  # a tag
    return f"{name}=={suffix}"


def cache_dir() -> Path:
    from ..paths import home

    configured = os.environ.get("LORAMGR_VLLM_CACHE_DIR")
    return Path(configured) if configured else home() / "serve" / "vllm"


class RegistryResolver:
    """vLLM's ``LoRAResolver`` interface over the registry: ``async resolve_lora(base_model_name, lora_name)``."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, registry: Registry | None = None) -> None:
        self.directory = Path(directory) if directory is not None else cache_dir()
        self._registry = registry

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """A ``LoRARequest`` (or :class:`ResolvedLora`) for ``lora_name``, or None when it cannot be served."""
        reference = engine_reference(lora_name)
        if reference is None:
            return None
        try:
            return self.resolve(base_model_name, reference)
        except LoramgrError as exc:
            logger.warning("loramgr: cannot serve %s: %s", lora_name, exc)
            return None

    def resolve(self, base_model_name: str, reference: str) -> Any:
        """Deploy ``reference`` for ``base_model_name`` and describe it; raises LoramgrError when it cannot."""
        from .deploy import deploy

        if self._registry is None:
            from ..api import registry

            self._registry = registry()
        report = deploy(self._registry, "vllm", [reference], self.directory, served_model=base_model_name, keep=True)
        entry = report.adapters[0]
        return lora_request(entry.name, entry.lora_int_id, str(entry.path))


def lora_request(name: str, int_id: int, path: str) -> Any:
    """vLLM's ``LoRARequest`` when vLLM is importable, else a :class:`ResolvedLora` with the same fields."""
    try:
        from vllm.lora.request import LoRARequest
    except ImportError:
        return ResolvedLora(name, int_id, path)
    return LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver with vLLM (nothing without vLLM)."""
    try:
        from vllm.lora.resolver import LoRAResolverRegistry
    except ImportError:
        return
    LoRAResolverRegistry.register_resolver("loramgr", RegistryResolver())
