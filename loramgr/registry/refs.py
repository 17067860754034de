"""References to adapter versions, as users type them.

- ``name``: the newest final release (the newest pre-release if there is no final one);
  ``name@latest`` is the same.
- ``name==1.2.0``: exactly that version.
- ``name>=1.0,<2`` (any PEP 440 specifier set): the newest matching final release.
- ``name@stable``: the version a tag points at (tags move only when ``loramgr tag`` moves them).
- ``sha256:ab12cd`` (at least 6 hex digits): the version whose digest starts so.
- ``autov2:1a2b3c4d5e``, ``autov3:…``, ``crc32:…``, ``tensors:<sha256 prefix>``: the version whose weights file
  has that hash (:mod:`loramgr.formats.hashes`).

Names compare as ``packaging.utils.canonicalize_name`` normalises them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from ..errors import InvalidReferenceError
from ..formats.hashes import HASH_SCHEMES

_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{6,64})$")
_OPERATORS = "=<>!~"
LATEST = "latest"


@dataclass(frozen=True)
class Reference:
    text: str
    kind: str  # "name" | "exact" | "specifier" | "tag" | "digest" | "hash" (tag = the scheme)
    name: str | None = None  # canonical
    version: Version | None = None
    specifier: SpecifierSet | None = None
    tag: str | None = None
    digest_prefix: str | None = None

    def select(self, versions: Iterable[Version]) -> Version | None:
        """The version this reference picks among an adapter's versions (kind name / exact / specifier)."""
        candidates = sorted(versions)
        if self.kind == "exact":
            return self.version if self.version in candidates else None
        if self.kind == "specifier" and self.specifier is not None:
            candidates = list(self.specifier.filter(candidates))
        return newest(candidates)


def newest(versions: Iterable[Version]) -> Version | None:
    """The newest final release, or the newest version if all are pre-releases."""
    ordered = sorted(versions)
    finals = [v for v in ordered if not v.is_prerelease]
    if finals:
        return finals[-1]
    return ordered[-1] if ordered else None


def canonicalize_name(name: str) -> str:
    """PEP 503's normal form, as ``packaging.utils.canonicalize_name`` (whose module imports ``packaging.tags``
    and ``sysconfig``, a cost every command would pay)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_name(name: str) -> str:
    """Validate an adapter name; returns its canonical form."""
    if not _NAME.match(name):
        raise InvalidReferenceError(f"invalid adapter name {name!r}", reference=name, hint=_name_hint(name))
    return canonicalize_name(name)


def _name_hint(name: str) -> str:
    """What an invalid name was probably meant to be: ollama's name:1.0.0, huggingface-cli's owner/repo."""
    base, colon, version = name.partition(":")
    if colon and _NAME.match(base) and _looks_like_version(version):
        return f"versions are written {base}=={version}"
    owner, slash, repo = name.partition("/")
    if slash and _NAME.match(owner) and _NAME.match(repo):
        return f"to install from the Hugging Face Hub, write hf://{name}"
    return "use letters, digits, '.', '_' and '-', starting and ending with a letter or digit"


def _looks_like_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return len(text) <= 100


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """'did you mean X?' for the known name closest to a mistyped one, or None."""
    close = difflib.get_close_matches(canonicalize_name(name), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else None


def parse_version(text: str) -> Version:
    try:
        if len(text) > 100:  # also keeps packaging from parsing a 5,000-digit number (a ValueError)
            raise InvalidVersion(text)
        return Version(text)
    except (InvalidVersion, ValueError):
        raise InvalidReferenceError(
            f"invalid version {text!r}", reference=text, hint="use a PEP 440 version such as 1.0.0 or 2.1rc1"
        ) from None


def check_tag(tag: str) -> str:
    if not _TAG.match(tag) or tag == LATEST:
        raise InvalidReferenceError(
            f"invalid tag {tag!r}",
            reference=tag,
            hint="tags are letters, digits, '.', '_' and '-'; 'latest' is reserved for the newest version",
        )
    if re.fullmatch(r"v?[0-9]+(\.[0-9]+)*", tag, re.IGNORECASE) or _looks_like_version(tag):
        raise InvalidReferenceError(
            f"invalid tag {tag!r}: a tag that looks like a version would be ambiguous",
            reference=tag,
            hint="name the version with NAME==VERSION, and give tags words such as 'stable' or 'prod'",
        )
    return tag


def parse_reference(text: str) -> Reference:
    text = text.strip()
    scheme, colon, value = text.partition(":")
    if colon and scheme.lower() in HASH_SCHEMES and re.fullmatch(r"[0-9a-fA-F]{6,64}", value):
        return Reference(text, "hash", tag=scheme.lower(), digest_prefix=value.lower())
    if text.startswith("sha256:"):
        match = _DIGEST.match(text.lower())
        if not match:
            raise InvalidReferenceError(
                f"invalid digest reference {text!r}", reference=text, hint="write sha256: and at least 6 hex digits"
            )
        return Reference(text, "digest", digest_prefix="sha256:" + match[1])
    if "@" in text:
        name, _, tag = text.partition("@")
        canonical = check_name(name)
        if tag == LATEST:
            return Reference(text, "name", canonical)
        return Reference(text, "tag", canonical, tag=check_tag(tag))
    index = next((i for i, ch in enumerate(text) if ch in _OPERATORS), None)
    if index is None:
        return Reference(text, "name", check_name(text))
    name, spec = text[:index].strip(), text[index:].strip()
    canonical = check_name(name)
    if spec.startswith("==") and not any(ch in spec[2:] for ch in ",<>!~=*"):
        return Reference(text, "exact", canonical, version=parse_version(spec[2:].strip()))
    try:
        specifier = SpecifierSet(spec)
    except InvalidSpecifier:
        raise InvalidReferenceError(
            f"invalid version specifier {spec!r} in {text!r}",
            reference=text,
            hint="write e.g. name==1.2.0 or 'name>=1.0,<2'",
        ) from None
    return Reference(text, "specifier", canonical, specifier=specifier)


def next_minor(versions: Iterable[Version]) -> Version:
    """The version an install without --version gets: 0.1.0 for a new name, else the next minor."""
    ordered = sorted(versions)
    if not ordered:
        return Version("0.1.0")
    top = ordered[-1]
    major, minor = (top.release + (0, 0))[:2]
    return Version(f"{major}.{minor + 1}.0")
