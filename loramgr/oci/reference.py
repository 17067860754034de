"""``oci://host[:port]/repository[:tag|@sha256:<hex>]``: where an artifact lives.

Plain HTTP is used only for a loopback host (127.0.0.0/8, ::1, localhost), when the caller says
``insecure`` (``loramgr push --insecure``), or for a host listed in ``LORAMGR_OCI_INSECURE``
(comma-separated ``host[:port]``, docker's "insecure-registries" list); every other registry is
spoken to over HTTPS.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from ..errors import InvalidReferenceError

SCHEME = "oci://"
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")
_FORMAT_HINT = "write oci://host/repository, oci://host/repository:tag or oci://host/repository@sha256:<digest>"


@dataclass(frozen=True)
class OciReference:
    """A repository on a registry, optionally narrowed to a tag or a manifest digest."""

    host: str  # host[:port], as typed
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository_url(self) -> str:
        return f"{SCHEME}{self.host}/{self.repository}"

    @property
    def reference(self) -> str | None:
        """What names the manifest in the distribution API: the digest when given, else the tag."""
        return self.digest or self.tag

    def with_reference(self, *, tag: str | None = None, digest: str | None = None) -> OciReference:
        return OciReference(self.host, self.repository, tag, digest)

    def __str__(self) -> str:
        text = self.repository_url
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


def parse_oci_reference(text: str) -> OciReference:
    """Parse ``oci://host/repository[:tag][@sha256:hex]`` (the repository is lower case, as OCI asks)."""
    if not text.startswith(SCHEME):
        raise InvalidReferenceError(f"not an OCI reference: {text!r}", reference=text, hint=_FORMAT_HINT)
    rest = text[len(SCHEME):]
    host, slash, path = rest.partition("/")
    if not slash or not path or not _HOST.match(host):
        raise InvalidReferenceError(f"{text!r} names no registry host and repository", reference=text,
                                    hint=_FORMAT_HINT)
    path, at, digest = path.partition("@")
    if at and not _DIGEST.match(digest):
        raise InvalidReferenceError(f"invalid manifest digest {digest!r} in {text!r}", reference=text,
                                    hint="a digest is sha256: followed by 64 lower-case hex digits")
    repository, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r} in {text!r}", reference=text,
                                        hint="a tag is up to 128 letters, digits, '.', '_' or '-'")
    if not _REPOSITORY.match(repository):
        raise InvalidReferenceError(f"invalid repository name {repository!r} in {text!r}", reference=text,
                                    hint="repository names are lower case: letters, digits, '.', '_', '-' and '/'")
    return OciReference(host, repository, tag, digest or None)


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise InvalidReferenceError(f"invalid tag {tag!r}", reference=tag,
                                    hint="a tag is up to 128 letters, digits, '.', '_' or '-'")
    return tag


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def url_scheme(host: str, *, insecure: bool) -> str:
    """``http`` for a loopback host or an explicit ``insecure``; ``https`` for every other registry."""
    listed = {h.strip() for h in os.environ.get("LORAMGR_OCI_INSECURE", "").split(",") if h.strip()}
    return "http" if insecure or is_loopback(host) or host in listed else "https"
