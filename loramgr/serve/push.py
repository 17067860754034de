"""``loramgr push-to-server``: load (or unload) adapters in a running vLLM or SGLang server.

Both engines load an adapter at run time from a folder on the server's file system:
vLLM ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` (with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)
and ``POST /v1/unload_lora_adapter {"lora_name"}``; SGLang ``POST /load_lora_adapter`` and
``/unload_lora_adapter`` with the same fields. So a push first deploys the versions into a folder the
server can read (:func:`loramgr.serve.deploy.deploy`, engine check included, ``keep`` so that other
adapters stay), then asks the server to load each one under its immutable ``name@version``.
An adapter the server reports as already loaded under that name counts as loaded: the name pins the bytes.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EngineSpecError, ServerError

if TYPE_CHECKING:
    from ..registry import Registry

#: engine -> (load path, unload path)
ENDPOINTS = {
    "vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "sglang": ("/load_lora_adapter", "/unload_lora_adapter"),
}


@dataclass(frozen=True)
class PushResult:
    name: str  # name@version
    path: Path | None
    action: str  # "loaded" | "already loaded" | "unloaded"


def push_to_server(
    registry: Registry,
    url: str,
    references: list[str],
    *,
    engine: str = "vllm",
    directory: str | os.PathLike[str] | None = None,
    served_model: str | None = None,
    unload: bool = False,
    timeout: float = 60.0,
) -> list[PushResult]:
    """Load ``references`` into the server at ``url`` (or unload them), one request per adapter."""
    from .deploy import deploy, served_name
    from .vllm_plugin import cache_dir

    if engine not in ENDPOINTS:
        raise EngineSpecError(f"push-to-server does not speak to engine {engine!r}", engine=engine,
                              hint=f"use one of {', '.join(ENDPOINTS)}")
    load_path, unload_path = ENDPOINTS[engine]
    base = url.rstrip("/")
    results = []
    if unload:
        for reference in references:
            details = registry.show(reference)
            name = served_name(details.name, details.version)
            _post(base + unload_path, {"lora_name": name}, timeout=timeout)
            results.append(PushResult(name, None, "unloaded"))
        return results
    folder = Path(directory) if directory is not None else cache_dir().parent / engine
    report = deploy(registry, engine, references, folder, served_model=served_model or _served_model(base, engine),
                    keep=True)
    for entry in report.adapters:
        already = _post(base + load_path, {"lora_name": entry.name, "lora_path": str(entry.path)}, timeout=timeout)
        results.append(PushResult(entry.name, entry.path, "already loaded" if already else "loaded"))
    return results


def _served_model(base: str, engine: str) -> str | None:
    """The model a vLLM server serves (its first model in /v1/models), for the adapter config; None elsewhere."""
    if engine != "vllm":
        return None
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as response:
            models = json.loads(response.read()).get("data") or []
    except (OSError, ValueError) as exc:
        raise ServerError(f"cannot reach {base}: {getattr(exc, 'reason', exc)}", url=base,
                          hint="check the URL and that the server is running") from None
    roots = [m.get("id") for m in models if not m.get("parent")]
    return roots[0] if roots else None


def _post(url: str, payload: dict[str, str], *, timeout: float) -> bool:
    """POST JSON; True when the server says the adapter is already loaded, raise ServerError on a refusal."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return False
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        if "already been loaded" in text or "already loaded" in text:
            return True
        try:
            detail = json.loads(text)
            message = detail.get("message") or detail.get("error", {}).get("message") or text
        except (ValueError, AttributeError):
            message = text
        raise ServerError(f"{url} refused {payload['lora_name']} (HTTP {exc.code}): {' '.join(str(message).split())}",
                          url=url, status=exc.code, hint=_HINTS.get(exc.code)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}", url=url,
                          hint="check the URL and that the server is running") from None


_HINTS = {
    404: "start the server with runtime LoRA updating on (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=true)",
    400: "the server's own check refused it; see its log",
}
