"""The artifact an adapter version becomes: a CNCF ModelPack manifest, one layer per file.

::

    manifest  application/vnd.oci.image.manifest.v1+json
              artifactType application/vnd.cncf.model.manifest.v1+json
      config  application/vnd.cncf.model.config.v1+json   {descriptor, config, modelfs}
      layers  *.safetensors, *.bin     application/vnd.cncf.model.weight.v1.raw
              adapter_config.json      application/vnd.cncf.model.weight.config.v1.raw
              README.md (the card)     application/vnd.cncf.model.doc.v1.raw
              each annotated with its path under org.cncf.model.filepath and org.opencontainers.image.title
      subject (optional) the base model's manifest, when it is an artifact of the same registry
      annotations  org.opencontainers.image.* (title, version, licenses), the base model
                   (io.loramgr.base.*), the version digest, and for a combined adapter its lineage
                   and recipe (io.loramgr.lineage, io.loramgr.recipe, JSON)

Everything here is pure: bytes and dictionaries in, bytes and dictionaries out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ..errors import InvalidAdapterError, UnsupportedAdapterError

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"

FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
VERSION = "org.opencontainers.image.version"
LICENSES = "org.opencontainers.image.licenses"
DESCRIPTION = "org.opencontainers.image.description"
BASE_NAME = "io.loramgr.base.name"
BASE_REVISION = "io.loramgr.base.revision"
BASE_FINGERPRINT = "io.loramgr.base.fingerprint"
VERSION_DIGEST = "io.loramgr.version.digest"
ADAPTER_NAME = "io.loramgr.adapter.name"
LINEAGE = "io.loramgr.lineage"
RECIPE = "io.loramgr.recipe"

#: layers loramgr will write into a folder: plain files only (oras' folder layers are tar archives)
_ARCHIVE_SUFFIXES = ("+gzip", ".tar", "+zstd", ".tar.gzip", "tar+gzip")


def layer_media_type(path: str) -> str:
    name = PurePosixPath(path).name
    if name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
        return WEIGHT
    if name.endswith(".json"):
        return WEIGHT_CONFIG
    return DOC


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Layer:
    path: str
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {FILEPATH: self.path, TITLE: self.path}}


def model_config(shown: dict[str, Any], layers: list[Layer]) -> bytes:
    """The ModelPack config blob: what the model is (name, version, licences) and its file system."""
    card = shown.get("card") or {}
    descriptor: dict[str, Any] = {"name": shown["name"], "version": shown["version"]}
    if card.get("license"):
        descriptor["licenses"] = [card["license"]]
    if card.get("description"):
        descriptor["description"] = card["description"]
    config: dict[str, Any] = {"format": "safetensors" if any(x.path.endswith(".safetensors") for x in layers)
                              else shown.get("format", "unknown")}
    if shown.get("base_model"):
        config["architecture"] = "lora"
    return canonical_json({
        "descriptor": descriptor,
        "config": config,
        "modelfs": {"type": "layers", "diffIds": [x.digest for x in layers]},
    })


def manifest_annotations(shown: dict[str, Any], base: dict[str, str | None]) -> dict[str, str]:
    """The manifest's annotations: identity, base model link, lineage and recipe."""
    card = shown.get("card") or {}
    annotations = {
        TITLE: shown["name"],
        VERSION: shown["version"],
        ADAPTER_NAME: shown["name"],
        VERSION_DIGEST: shown["digest"],
    }
    if card.get("license"):
        annotations[LICENSES] = str(card["license"])
    for key, value in ((BASE_NAME, base.get("name")), (BASE_REVISION, base.get("revision")),
                       (BASE_FINGERPRINT, base.get("fingerprint"))):
        if value:
            annotations[key] = value
    if shown.get("parents"):
        annotations[LINEAGE] = canonical_json(shown["parents"]).decode()
    if shown.get("recipe"):
        annotations[RECIPE] = canonical_json(shown["recipe"]).decode()
    return annotations


def build_manifest(layers: list[Layer], config: bytes, annotations: dict[str, str],
                   subject: dict[str, Any] | None = None) -> bytes:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [x.descriptor() for x in layers],
        "annotations": annotations,
    }
    if subject is not None:
        manifest["subject"] = subject
    return canonical_json(manifest)


@dataclass
class Artifact:
    """A manifest read back: its files (path -> layer), config digest and annotations."""

    layers: list[Layer]
    annotations: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    config_descriptor: dict[str, Any] = field(default_factory=dict)
    artifact_type: str | None = None
    subject: dict[str, Any] | None = None

    @property
    def name(self) -> str | None:
        return (self.annotations.get(ADAPTER_NAME) or (self.config.get("descriptor") or {}).get("name")
                or None)

    @property
    def version(self) -> str | None:
        return (self.annotations.get(VERSION) or (self.config.get("descriptor") or {}).get("version") or None)

    @property
    def parents(self) -> list[dict[str, Any]]:
        return _json_annotation(self.annotations, LINEAGE, list) or []

    @property
    def recipe(self) -> dict[str, Any] | None:
        recipe: dict[str, Any] | None = _json_annotation(self.annotations, RECIPE, dict)
        return recipe

    @property
    def base(self) -> dict[str, str]:
        return {k: self.annotations[a] for k, a in (("name", BASE_NAME), ("revision", BASE_REVISION),
                                                    ("fingerprint", BASE_FINGERPRINT)) if a in self.annotations}

    @property
    def size(self) -> int:
        return sum(x.size for x in self.layers)


def parse_manifest(body: bytes, *, label: str) -> Artifact:
    """Read a manifest's layers as files; refuse what cannot be an adapter's files (one line, no traceback)."""
    try:
        manifest = json.loads(body)
    except ValueError:
        raise InvalidAdapterError(f"{label}: the manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise InvalidAdapterError(f"{label}: the manifest is not a JSON object")
    media_type = manifest.get("mediaType", MANIFEST)
    if media_type == INDEX or "manifests" in manifest:
        raise UnsupportedAdapterError(f"{label} is an image index, not an artifact",
                                      hint="name one of its manifests by digest")
    layers: list[Layer] = []
    seen: set[str] = set()
    for raw in manifest.get("layers") or []:
        annotations = raw.get("annotations") or {}
        path = annotations.get(FILEPATH) or annotations.get(TITLE)
        layer_type = str(raw.get("mediaType", ""))
        if not path:
            raise UnsupportedAdapterError(f"{label}: layer {str(raw.get('digest'))[:19]} has no file name",
                                          hint=f"annotate each layer with {TITLE}")
        if layer_type.endswith(_ARCHIVE_SUFFIXES):
            raise UnsupportedAdapterError(f"{label}: layer {path} is an archive ({layer_type})",
                                          hint="push the adapter's files one per layer, not a folder")
        safe = PurePosixPath(path)
        if safe.is_absolute() or any(part in ("", ".", "..") for part in safe.parts) or "\\" in path:
            raise InvalidAdapterError(f"{label}: layer file name {path!r} leaves the adapter folder")
        if path in seen:
            raise InvalidAdapterError(f"{label}: two layers are named {path}")
        seen.add(path)
        try:
            layers.append(Layer(path, str(raw["digest"]), int(raw["size"]), layer_type))
        except (KeyError, TypeError, ValueError):
            raise InvalidAdapterError(f"{label}: layer {path} has no digest or size") from None
    if not layers:
        raise InvalidAdapterError(f"{label}: the artifact has no layers")
    return Artifact(
        layers=layers,
        annotations={str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()},
        config_descriptor=dict(manifest.get("config") or {}),
        artifact_type=manifest.get("artifactType"),
        subject=manifest.get("subject"),
    )


def parse_config(body: bytes) -> dict[str, Any]:
    """A ModelPack config blob; anything else (oras' empty ``{}``, another tool's config) reads as empty."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def descriptor(media_type: str, body: bytes, *, artifact_type: str | None = None,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"mediaType": media_type, "digest": digest_of(body), "size": len(body)}
    if artifact_type:
        found["artifactType"] = artifact_type
    if annotations:
        found["annotations"] = annotations
    return found


def referrers_tag(subject_digest: str) -> str:
    """The tag-schema fallback for registries without the referrers API: ``sha256-<hex>``."""
    algorithm, _, hexdigest = subject_digest.partition(":")
    return f"{algorithm}-{hexdigest}"


def add_referrer(index_body: bytes | None, referrer: dict[str, Any]) -> bytes:
    """The referrers index with ``referrer`` added (once); a new index when there was none."""
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX, "manifests": []}
    if index_body:
        try:
            found = json.loads(index_body)
            if isinstance(found, dict) and isinstance(found.get("manifests"), list):
                index = found
        except ValueError:
            pass
    if all(m.get("digest") != referrer["digest"] for m in index["manifests"]):
        index["manifests"].append(referrer)
    return canonical_json(index)


def _json_annotation(annotations: dict[str, str], key: str, kind: type) -> Any:
    if key not in annotations:
        return None
    try:
        value = json.loads(annotations[key])
    except ValueError:
        raise InvalidAdapterError(f"annotation {key} is not JSON") from None
    return value if isinstance(value, kind) else None
