"""``loramgr push REF oci://host/repository``: publish a registered version as a ModelPack artifact.

The layers are the stored blobs themselves (a blob's name is already the sha256 a layer descriptor
needs), streamed from the store with nothing exported or re-hashed; the card is generated. Tags are
published versions: every tag asked for is checked before a byte is sent, and one that holds other
files refuses the whole push. A tag that already holds exactly these files makes the push a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConflictError, InvalidReferenceError
from ..registry import Registry
from ..registry.records import CARD_FILES, VersionDetails
from . import layout
from .client import OciClient
from .reference import OciReference, check_tag, parse_oci_reference

Progress = Callable[[str, int, int], None]


@dataclass
class OciPushPlan:
    """What :func:`run_push` sends: layers (stored blobs and the card), the config, the manifest, tags."""

    reference: str  # name==version pushed
    target: OciReference  # repository (no tag)
    tags: list[str]
    layers: list[layout.Layer]
    sources: dict[str, Path | bytes]  # layer digest -> a stored blob's path, or the card's bytes
    config: bytes
    manifest: bytes
    card: str
    subject: dict[str, Any] | None = None

    @property
    def manifest_digest(self) -> str:
        return layout.digest_of(self.manifest)

    @property
    def size(self) -> int:
        return sum(x.size for x in self.layers)


@dataclass
class OciPushResult:
    repository: str
    tags: list[str]
    manifest_digest: str
    pushed: bool  # False: every tag already held these files
    notes: list[str] = field(default_factory=list)


def plan_push(registry: Registry, reference: str, destination: str, *, tags: list[str] | tuple[str, ...] = (),
              base_artifact: str | None = None, insecure: bool = False) -> OciPushPlan:
    """Describe the artifact for ``reference``; contacts the registry only to resolve ``base_artifact``."""
    target = parse_oci_reference(destination)
    if target.digest:
        raise InvalidReferenceError(f"cannot push to a digest ({destination})", reference=destination,
                                    hint="push to oci://host/repository or oci://host/repository:tag")
    details = registry.show(reference)
    shown = details.to_dict()  # the manifest and config are JSON: built from the JSON form of show
    wanted = [target.tag or details.version, *tags]
    for tag in wanted:
        check_tag(tag)
    wanted = list(dict.fromkeys(wanted))
    base = _base_facts(registry, reference, shown)
    subject = _resolve_subject(base_artifact, target, insecure=insecure) if base_artifact else None
    card = _card(details, target, wanted[0])
    sources: dict[str, Path | bytes] = {}
    layers = []
    for f in sorted(shown["files"], key=lambda f: f["path"]):
        if f["path"] in CARD_FILES:
            continue  # replaced by the generated card
        layers.append(layout.Layer(f["path"], f["digest"], f["size"], layout.layer_media_type(f["path"])))
        sources[f["digest"]] = registry.store.read_path(f["digest"])
    card_bytes = card.encode("utf-8")
    layers.append(layout.Layer("README.md", layout.digest_of(card_bytes), len(card_bytes), layout.DOC))
    sources[layers[-1].digest] = card_bytes
    config = layout.model_config(shown, layers)
    annotations = layout.manifest_annotations(shown, base)
    manifest = layout.build_manifest(layers, config, annotations, subject)
    return OciPushPlan(reference=f"{shown['name']}=={shown['version']}", target=target.with_reference(),
                       tags=wanted, layers=layers, sources=sources, config=config, manifest=manifest, card=card,
                       subject=subject)


def run_push(plan: OciPushPlan, *, insecure: bool = False, progress: Progress | None = None) -> OciPushResult:
    """Check every tag, upload the blobs that are missing, then the manifest under each tag."""
    client = OciClient(plan.target, insecure=insecure)
    payload = _payload(plan.layers)
    free, held = [], []
    for tag in plan.tags:
        existing = client.manifest_digest(tag)
        if existing is None:
            free.append(tag)
            continue
        body, _, _ = client.get_manifest(existing)
        try:
            theirs = _payload(layout.parse_manifest(body, label=f"{plan.target}:{tag}").layers)
        except Exception:  # noqa: BLE001 - something that is not an adapter is "other files" too
            theirs = {}
        if theirs != payload:
            raise ConflictError(
                f"tag {tag} of {plan.target} already holds other files (manifest {existing[:19]})",
                hint="tags are immutable: push a new version, or choose another --tag",
            )
        held.append(tag)
    notes = [f"{plan.target}:{t} already holds these exact files" for t in held]
    if not free:
        return OciPushResult(str(plan.target), plan.tags, client.manifest_digest(plan.tags[0]) or plan.manifest_digest,
                             False, notes)
    total, done = plan.size, 0
    for layer in plan.layers:
        source = plan.sources[layer.digest]
        label = f"pushing {layer.path}"
        if isinstance(source, bytes):  # a small generated file (the model card): reported once sent
            client.upload_bytes(source, layer.digest)
            if progress is not None:
                progress(label, done + layer.size, total)
        else:
            def report(n: int, _size: int, base: int = done, label: str = label) -> None:
                if progress is not None:
                    progress(label, base + n, total)

            client.upload_blob(source, layer.digest, layer.size, report)
        done += layer.size
    client.upload_bytes(plan.config, layout.digest_of(plan.config))
    digest = plan.manifest_digest
    for tag in free:
        _, headers = client.put_manifest(tag, plan.manifest, layout.MANIFEST)
        if plan.subject is not None and not _has_header(headers, "OCI-Subject"):
            _add_to_referrers_index(client, plan)
    return OciPushResult(str(plan.target), plan.tags, digest, True, notes)


def _payload(layers: list[layout.Layer]) -> dict[str, str]:
    """What identifies a version's files: path -> digest, the card left out (it is regenerated)."""
    return {x.path: x.digest for x in layers if x.path not in CARD_FILES}


def _base_facts(registry: Registry, reference: str, shown: dict[str, Any]) -> dict[str, str | None]:
    fingerprint = registry.base_of(reference)
    if fingerprint is not None:
        return {"name": fingerprint.name, "revision": fingerprint.revision, "fingerprint": fingerprint.structural}
    return {"name": shown.get("base_model"), "revision": shown.get("base_model_revision"), "fingerprint": None}


def _resolve_subject(text: str, target: OciReference, *, insecure: bool) -> dict[str, Any]:
    """The descriptor of the base model's manifest, which must live on the registry being pushed to."""
    base = parse_oci_reference(text)
    if base.host != target.host:
        raise InvalidReferenceError(
            f"the base artifact {text} is on {base.host}, not on {target.host}", reference=text,
            hint="a manifest's subject links artifacts of one registry; the base model's name is annotated anyway")
    if not base.reference:
        raise InvalidReferenceError(f"{text} names no tag or digest", reference=text,
                                    hint="write oci://host/repository:tag or @sha256:<digest>")
    body, media_type, digest = OciClient(base, insecure=insecure).get_manifest(base.reference)
    subject: dict[str, Any] = {"mediaType": media_type or layout.MANIFEST, "digest": digest, "size": len(body)}
    return subject


def _add_to_referrers_index(client: OciClient, plan: OciPushPlan) -> None:
    """The tag-schema fallback of the referrers API: an index tagged ``sha256-<subject hex>`` listing the
    manifests whose subject is that digest (registries without the API, such as distribution 2.8)."""
    assert plan.subject is not None  # only called when the plan has a subject
    tag = layout.referrers_tag(plan.subject["digest"])
    existing = client.manifest_digest(tag)
    body = client.get_manifest(existing)[0] if existing else None
    annotations = {k: v for k, v in _manifest_annotations(plan.manifest).items()
                   if k in (layout.TITLE, layout.VERSION, layout.BASE_NAME)}
    entry = layout.descriptor(layout.MANIFEST, plan.manifest, artifact_type=layout.ARTIFACT_TYPE,
                              annotations=annotations)
    client.put_manifest(tag, layout.add_referrer(body, entry), layout.INDEX)


def _manifest_annotations(body: bytes) -> dict[str, str]:
    import json

    return dict(json.loads(body).get("annotations") or {})


def _has_header(headers: dict[str, str], name: str) -> bool:
    return any(k.lower() == name.lower() for k in headers)


def _card(details: VersionDetails, target: OciReference, tag: str) -> str:
    """The Hub card (shape, lineage, recipe) with usage lines for an OCI registry."""
    from ..hub.modelcard import render_model_card
    from ..merge.recipes import recipe_toml

    card = render_model_card(details, repo_id=str(target),
                             recipe_toml=recipe_toml(details) if details.recipe else None)
    card = card.split("\n## Use it\n", 1)[0].rstrip() + "\n"
    host_path = f"{target.host}/{target.repository}:{tag}"
    return card + (
        "\n## Use it\n\n```bash\n"
        f"loramgr install {target.repository_url}:{tag}\n"
        f"oras pull {host_path}   # writes the files by name\n"
        "```\n"
    )
