"""The OCI distribution API, the few calls an adapter needs, over one HTTP session.

Why not oras-py for the transfers: its requests retry every error (a refused connection included)
with sleeps that grow to over a minute, a monolithic blob upload reads the whole file into memory,
downloads are not checked against their digest, and a manifest is re-serialised on upload so the
digest the registry stores is not the one computed from the bytes. loramgr needs the opposite on
each point, so this module sends the requests itself (``requests``), streams blobs in both
directions, hashes while reading and fails fast with one line. oras-py stays the independent client
the tests and the benchmark compare against.

Credentials, first match wins: ``LORAMGR_OCI_USERNAME`` + ``LORAMGR_OCI_PASSWORD`` (or
``LORAMGR_OCI_TOKEN``, a bearer token), then docker's ``config.json`` (``$DOCKER_CONFIG`` or
``~/.docker``): an ``auths`` entry, a ``credHelpers`` entry or the ``credsStore``, asked through the
``docker-credential-<name>`` program as docker does. A registry's ``Basic`` challenge gets the
credentials directly; a ``Bearer`` challenge gets a token from the realm it names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import IntegrityError, NotFoundError, OciError
from .reference import OciReference, url_scheme

#: progress(bytes_done, bytes_total)
ByteProgress = Callable[[int, int], None]
CHUNK = 1 << 20
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None
    origin: str = ""  # where they were found, for messages

    @property
    def basic(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def find_credentials(host: str) -> Credentials | None:
    """The credentials a user keeps for ``host`` (see the module docstring for the order)."""
    env = os.environ
    if env.get("LORAMGR_OCI_TOKEN"):
        return Credentials(token=env["LORAMGR_OCI_TOKEN"], origin="LORAMGR_OCI_TOKEN")
    if env.get("LORAMGR_OCI_USERNAME") and env.get("LORAMGR_OCI_PASSWORD") is not None:
        return Credentials(env["LORAMGR_OCI_USERNAME"], env["LORAMGR_OCI_PASSWORD"],
                           origin="LORAMGR_OCI_USERNAME/LORAMGR_OCI_PASSWORD")
    folder = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OciError(f"{path} cannot be read ({exc})", hint="fix or remove the docker config file") from None
    names = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    auths = config.get("auths") or {}
    for name in names:
        entry = auths.get(name) or {}
        if entry.get("identitytoken"):
            return Credentials(token=entry["identitytoken"], origin=str(path))
        if entry.get("auth"):
            username, _, password = base64.b64decode(entry["auth"]).decode("utf-8", "replace").partition(":")
            return Credentials(username, password, origin=str(path))
    helper = next(((config.get("credHelpers") or {}).get(n) for n in names if (config.get("credHelpers") or {})
                   .get(n)), None) or config.get("credsStore")
    if helper:
        return _from_helper(str(helper), host)
    return None


def _from_helper(helper: str, host: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, "get"], input=host.encode(), capture_output=True, timeout=60, check=False)
    except FileNotFoundError:
        raise OciError(f"docker's config names the credential helper {program}, which is not installed",
                       hint="install it, or set LORAMGR_OCI_USERNAME and LORAMGR_OCI_PASSWORD") from None
    if done.returncode != 0:
        return None  # the helper holds nothing for this host: anonymous, as docker does
    try:
        payload = json.loads(done.stdout)
    except ValueError:
        raise OciError(f"{program} answered something that is not JSON") from None
    if payload.get("Username") == "<token>":
        return Credentials(token=payload.get("Secret"), origin=program)
    return Credentials(payload.get("Username"), payload.get("Secret"), origin=program)


class OciClient:
    """One repository on one registry: manifests, tags and blobs."""

    def __init__(self, ref: OciReference, *, insecure: bool = False, timeout: float = TIMEOUT) -> None:
        import requests

        self.ref = ref
        self.timeout = timeout
        self.root = f"{url_scheme(ref.host, insecure=insecure)}://{ref.host}/v2/"
        self.base = f"{self.root}{ref.repository}/"
        self.session = requests.Session()
        self._credentials: Credentials | None = None
        self._credentials_read = False
        self._authorization: str | None = None

    # -- transport --------------------------------------------------------------------------------

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, data: Any = None,
                stream: bool = False, ok: tuple[int, ...] = (200,), rewind: Callable[[], Any] | None = None) -> Any:
        """Send one request (answering one auth challenge); an unexpected status raises OciError."""
        import requests

        url = url if url.startswith(("http://", "https://")) else self.base + url
        for attempt in range(2):
            sent = dict(headers or {})
            if self._authorization:
                sent["Authorization"] = self._authorization
            try:
                response = self.session.request(method, url, headers=sent, data=data, stream=stream,
                                                timeout=self.timeout, allow_redirects=True)
            except requests.exceptions.SSLError as exc:
                raise OciError(f"TLS failed talking to {self.ref.host} ({_reason(exc)})", reference=str(self.ref),
                               hint="check the registry's certificate; --insecure uses plain HTTP") from None
            except requests.exceptions.RequestException as exc:
                raise OciError(f"cannot reach {self.root} ({_reason(exc)})", reference=str(self.ref),
                               hint="check the host and port; plain HTTP only for loopback or --insecure") from None
            if response.status_code == 401 and attempt == 0:
                self._authenticate(response)
                if rewind is not None:
                    rewind()
                continue
            break
        if response.status_code not in ok:
            raise self._error(method, response)
        return response

    def _authenticate(self, response: Any) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, params = challenge.partition(" ")
        credentials = self.credentials()
        if scheme.lower() == "basic":
            if credentials is None or credentials.basic is None:
                raise self._needs_credentials()
            self._authorization = f"Basic {credentials.basic}"
            return
        if scheme.lower() != "bearer":
            raise self._needs_credentials()
        if credentials is not None and credentials.token and credentials.origin == "LORAMGR_OCI_TOKEN":
            self._authorization = f"Bearer {credentials.token}"
            return
        fields = _challenge_fields(params)
        if "realm" not in fields:
            raise OciError(f"{self.ref.host} asked for a token without saying where to get one",
                           reference=str(self.ref))
        query = {k: v for k, v in fields.items() if k in ("service", "scope")}
        auth_header = {"Authorization": f"Basic {credentials.basic}"} if credentials and credentials.basic else {}
        import requests

        try:
            answer = self.session.get(fields["realm"], params=query, headers=auth_header, timeout=self.timeout)
        except requests.exceptions.RequestException as exc:
            raise OciError(f"cannot reach the token service of {self.ref.host} ({_reason(exc)})",
                           reference=str(self.ref)) from None
        if answer.status_code != 200:
            raise self._needs_credentials()
        try:
            body = answer.json()
        except ValueError:
            body = {}
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not token:
            raise self._needs_credentials()
        self._authorization = f"Bearer {token}"

    def credentials(self) -> Credentials | None:
        if not self._credentials_read:
            self._credentials = find_credentials(self.ref.host)
            self._credentials_read = True
        return self._credentials

    def _needs_credentials(self) -> OciError:
        found = self.credentials()
        if found is None:
            return OciError(f"{self.ref.host} refused access to {self.ref.repository} without credentials",
                            reference=str(self.ref), status=401,
                            hint="run 'docker login', or set LORAMGR_OCI_USERNAME and LORAMGR_OCI_PASSWORD")
        return OciError(f"{self.ref.host} refused the credentials from {found.origin} for {self.ref.repository}",
                        reference=str(self.ref), status=401, hint="check the user name, password or token")

    def _error(self, method: str, response: Any) -> OciError:
        status = response.status_code
        detail = ""
        try:
            errors = response.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except ValueError:
            detail = response.reason or ""
        if status in (401, 403):
            return self._needs_credentials() if status == 401 else OciError(
                f"{self.ref.host} denied {method} on {self.ref.repository} ({detail or 'forbidden'})",
                reference=str(self.ref), status=status, hint="check that your account may write this repository")
        return OciError(f"{self.ref.host} answered {status} to {method} {response.url} ({detail or response.reason})",
                        reference=str(self.ref), status=status)

    # -- manifests and tags -----------------------------------------------------------------------

    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest by tag or digest; a digest is checked against the bytes."""
        response = self.request("GET", f"manifests/{reference}", headers={"Accept": ", ".join(MANIFEST_TYPES)},
                                ok=(200, 404))
        if response.status_code == 404:
            what = "manifest" if reference.startswith("sha256:") else "tag"
            raise NotFoundError(f"{self.ref.repository_url} has no {what} {reference}", reference=str(self.ref),
                                hint=f"run 'loramgr list-remote {self.ref.repository_url}' to see its tags")
        body = response.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{self.ref.repository_url}@{reference}: the registry sent a manifest whose "
                                 f"digest is {digest}", digest=reference, hint="nothing was installed")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return body, media_type, digest

    def manifest_digest(self, reference: str) -> str | None:
        """The digest a tag points at, or None when the tag does not exist."""
        try:
            return self.get_manifest(reference)[2]
        except NotFoundError:
            return None

    def put_manifest(self, reference: str, body: bytes, media_type: str) -> tuple[str, dict[str, str]]:
        """Upload manifest bytes as they are (so their digest is the one computed here); returns (digest, headers)."""
        response = self.request("PUT", f"manifests/{reference}", data=body, headers={"Content-Type": media_type},
                                ok=(200, 201, 202))
        return "sha256:" + hashlib.sha256(body).hexdigest(), dict(response.headers)

    def list_tags(self) -> list[str]:
        """Every tag of the repository, following the registry's pagination."""
        tags: list[str] = []
        url: str | None = "tags/list?n=1000"
        while url:
            response = self.request("GET", url, ok=(200, 404))
            if response.status_code == 404:
                return tags
            tags += response.json().get("tags") or []
            url = _next_link(response.headers.get("Link", ""), self.root)
        return sorted(tags)

    # -- blobs ------------------------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        status: int = self.request("HEAD", f"blobs/{digest}", ok=(200, 404)).status_code
        return status == 200

    def get_blob_bytes(self, digest: str, *, limit: int = 16 << 20) -> bytes:
        """A small blob (a config), checked against its digest."""
        response = self.request("GET", f"blobs/{digest}", stream=True)
        body: bytes = response.raw.read(limit + 1, decode_content=True)
        if len(body) > limit:
            raise OciError(f"blob {digest[:19]} is larger than {limit} bytes", reference=str(self.ref))
        found = "sha256:" + hashlib.sha256(body).hexdigest()
        if found != digest:
            raise IntegrityError(f"{self.ref.repository_url}: blob {digest[:19]} arrived with digest {found[:19]}",
                                 digest=digest, hint="nothing was installed; the registry's copy is damaged")
        return body

    def upload_blob(self, path: Path, digest: str, size: int, progress: ByteProgress | None = None) -> None:
        """Upload a file as one blob (monolithic PUT, streamed from disk), unless the registry has it."""
        if self.has_blob(digest):
            if progress is not None:
                progress(size, size)
            return
        with path.open("rb") as handle:
            body = _ProgressReader(handle, size, progress)
            self._put_blob(body, digest, size, rewind=body.rewind)

    def upload_bytes(self, data: bytes, digest: str) -> None:
        if not self.has_blob(digest):
            self._put_blob(data, digest, len(data))

    def _put_blob(self, body: Any, digest: str, size: int, rewind: Callable[[], Any] | None = None) -> None:
        start = self.request("POST", "blobs/uploads/", headers={"Content-Length": "0"}, ok=(202,))
        location = start.headers.get("Location", "")
        if not location:
            raise OciError(f"{self.ref.host} started an upload without a location", reference=str(self.ref))
        if location.startswith("/"):
            location = self.root[: -len("/v2/")] + location
        separator = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{separator}digest={digest}", data=body,
                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                     ok=(201, 204), rewind=rewind)

    def download_blob(self, digest: str, size: int, destination: Path,
                      progress: ByteProgress | None = None) -> None:
        """Stream a blob to ``destination``, hashing as it arrives; a size or digest mismatch raises and
        leaves no file."""
        if not digest.startswith("sha256:"):
            raise OciError(f"unsupported digest algorithm in {digest[:19]}", reference=str(self.ref),
                           hint="loramgr verifies sha256 layers only")
        from concurrent.futures import Future, ThreadPoolExecutor

        response = self.request("GET", f"blobs/{digest}", stream=True)
        sha, done = hashlib.sha256(), 0
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            # hashing runs in a second thread while this one receives and writes (hashlib releases the GIL)
            with destination.open("wb") as out, ThreadPoolExecutor(1) as hasher:
                pending: Future[None] | None = None
                for chunk in _chunks(response):
                    done += len(chunk)
                    if done > size:
                        break
                    if pending is not None:
                        pending.result()
                    pending = hasher.submit(sha.update, chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(done, size)
                if pending is not None:
                    pending.result()
                out.flush()
                os.fsync(out.fileno())
            found = "sha256:" + sha.hexdigest()
            if done != size or found != digest:
                what = f"{done} bytes instead of {size}" if done != size else f"digest {found[:19]}"
                raise IntegrityError(
                    f"{self.ref.repository_url}: layer {destination.name} ({digest[:19]}) arrived with {what}",
                    digest=digest, hint="nothing was installed; the registry's copy is damaged or was replaced")
        except BaseException:
            destination.unlink(missing_ok=True)
            raise
        finally:
            response.close()


class _ProgressReader:
    """A file object for ``requests`` that reports the bytes read (it streams from ``read``)."""

    def __init__(self, handle: BinaryIO, size: int, progress: ByteProgress | None) -> None:
        self.handle, self.size, self.progress, self.done = handle, size, progress, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.handle.read(CHUNK if n is None or n < 0 else max(n, CHUNK))
        self.done += len(chunk)
        if self.progress is not None and chunk:
            self.progress(self.done, self.size)
        return chunk

    def __len__(self) -> int:
        return self.size - self.done

    def rewind(self) -> None:
        self.handle.seek(0)
        self.done = 0


def _chunks(response: Any) -> Iterator[bytes]:
    yield from response.iter_content(chunk_size=CHUNK)


def _reason(exc: Exception) -> str:
    text = str(exc.args[0] if exc.args else exc)
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return str(reason or text).split("\n")[0][:200]


def _challenge_fields(params: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in _split_params(params):
        key, _, value = part.partition("=")
        fields[key.strip().lower()] = value.strip().strip('"')
    return fields


def _split_params(text: str) -> Iterator[str]:
    current, quoted = "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            yield current
            current = ""
        else:
            current += char
    if current.strip():
        yield current


def _next_link(header: str, root: str) -> str | None:
    """The next page of a paginated list (``Link: </v2/...>; rel="next"``)."""
    if 'rel="next"' not in header:
        return None
    target = header.split(";")[0].strip().strip("<>")
    if target.startswith("/v2/"):
        return root + target[len("/v2/"):]
    return target
