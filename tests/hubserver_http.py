"""The HTTP side of the local test Hub: routes, headers and error answers as huggingface_hub expects them.

Each route mirrors what the real Hub answers to huggingface_hub 2.4.0 (read from the client's source:
``hf_api.py``, ``_commit_api.py``, ``file_download.py``, ``utils/_http.py``). Errors carry the Hub's
``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) because that, not
the status code, is what the client turns into its exception classes. State lives in
:class:`hubserver.HubServer`; this module only speaks the protocol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from hubserver import HubServer

#: the token of user "tester": reads private repositories, writes, passes gates
TEST_TOKEN = "hf_loramgr_test_token_0123456789"
#: a second valid token, for a user who has not been let into gated repositories
OTHER_TOKEN = "hf_loramgr_other_token_987654321"
_USERS = {TEST_TOKEN: "tester", OTHER_TOKEN: "other"}
_MAX_BODY = 1 << 31  # bound on one request body (the commit endpoint carries base64 files)
_CHUNK = 1 << 20
_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as ``oid`` and ``ETag`` for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repository: immutable commit snapshots plus movable branches and fixed tags."""

    repo_id: str
    private: bool = False
    gated: bool = False
    gated_allowed: set[str] = field(default_factory=set)  # tokens let into a gated repo
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if _SHA.match(revision) and revision in self.commits:
            return revision
        return None


class ErrorAnswer(Exception):
    """An error answer: status, X-Error-Code and message (raised inside a handler)."""

    def __init__(self, status: int, code: str | None, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class HubHandler(BaseHTTPRequestHandler):
    """Routes one request; every answer has a Content-Length so connections stay alive."""

    hub: HubServer  # set on the subclass made by HubServer.start (tests/hubserver.py)
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds of silence before a connection is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    # -- plumbing ------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((method, url.path))
        try:
            body = self._read_body()
            self._route(method, url.path, parse_qs(url.query), body)
        except ErrorAnswer as err:
            self._send_json({"error": err.message, **err.extra}, status=err.status, code=err.code, message=err.message)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise ErrorAnswer(413, None, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send_json(self, data: Any, *, status: int = 200, code: str | None = None, message: str | None = None) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def _user(self) -> str | None:
        """The user behind the Authorization header; 401 for a token the server does not know."""
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in _USERS:
            raise ErrorAnswer(401, None, "Invalid credentials in Authorization header")
        return _USERS[token]

    def _repo(self, repo_id: str, *, write: bool = False, files: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            # like the Hub: a private repository is indistinguishable from a missing one
            raise ErrorAnswer(401 if user is None else 404, "RepoNotFound", "Repository not found")
        if write and user is None:
            raise ErrorAnswer(401, None, "You must be authenticated to write")
        if files and repo.gated:
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            if token not in repo.gated_allowed:
                status = 401 if user is None else 403
                raise ErrorAnswer(status, "GatedRepo", "Access to this repository is restricted")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> str:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            raise ErrorAnswer(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        return sha

    # -- routes --------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._send_json({"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            user = self._user()
            if user is None:
                raise ErrorAnswer(401, None, "Invalid username or password.")
            return self._send_json({"type": "user", "name": user, "auth": {"type": "access_token"}})
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/([a-z-]+)(?:/(.*))?)?$", path)
        if m:
            repo_id, action, rest = m.group(1), m.group(2), m.group(3) or ""
            return self._repo_api(method, repo_id, action, rest, query, body)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, m.group(1), m.group(2), unquote(m.group(3)))
        raise ErrorAnswer(404, None, f"no route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        if self._user() is None:
            raise ErrorAnswer(401, None, "You must be authenticated to create a repository")
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub.lock:
            if repo_id in self.hub.repos:
                # the client reads "url" from this 409 when called with exist_ok=True
                raise ErrorAnswer(409, None, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
            self.hub._create(repo_id, private)
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _repo_api(
        self,
        method: str,
        repo_id: str,
        action: str | None,
        rest: str,
        query: dict[str, list[str]],
        body: bytes,
    ) -> None:
        with self.hub.lock:
            repo = self._repo(repo_id, write=method == "POST")
            if method == "GET" and action in (None, "revision"):
                return self._info(repo, self._commit_of(repo, rest or "main"))
            if method == "GET" and action == "tree":
                revision, _, prefix = rest.partition("/")
                recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
                return self._tree(repo, self._commit_of(repo, revision), unquote(prefix), recursive)
            if method == "GET" and action == "refs":
                return self._send_json(
                    {
                        "branches": [_ref(n, "heads", s) for n, s in repo.branches.items()],
                        "tags": [_ref(n, "tags", s) for n, s in repo.tags.items()],
                        "converts": [],
                        "pullRequests": [],
                    }
                )
            if method == "POST" and action == "preupload":
                files = repo.commits[self._commit_of(repo, rest)]
                requested = json.loads(body)["files"]
                answer = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",  # never LFS, never Xet
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in requested
                ]
                return self._send_json({"files": answer})
            if method == "POST" and action == "commit":
                return self._commit(repo, unquote(rest), body)
            if method == "POST" and action == "tag":
                sha = self._commit_of(repo, rest)
                tag = json.loads(body)["tag"]
                if tag in repo.tags:
                    raise ErrorAnswer(409, None, f"Tag {tag} already exists")
                repo.tags[tag] = sha
                return self._send_json({})
        raise ErrorAnswer(404, None, f"no route for {method} /api/models/{repo_id}/{action}")

    def _info(self, repo: Repo, sha: str) -> None:
        files = repo.commits[sha]
        self._send_json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)],
                "lastModified": "2026-01-01T00:00:00.000Z",
            }
        )

    def _tree(self, repo: Repo, sha: str, prefix: str, recursive: bool) -> None:
        entries: dict[str, dict[str, Any]] = {}
        base = prefix.rstrip("/") + "/" if prefix else ""
        for path, data in sorted(repo.commits[sha].items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40, "size": 0})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": git_blob_sha1(data), "size": len(data)}
        if prefix and not entries:
            raise ErrorAnswer(404, "EntryNotFound", f"{prefix} does not exist")
        self._send_json(list(entries.values()))

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch not in repo.branches:
            raise ErrorAnswer(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        header: dict[str, Any] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise ErrorAnswer(400, None, f"this test Hub stores regular files only, got {key!r}")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise ErrorAnswer(412, None, "A commit has happened since. Please refresh and try again.")
        sha = self.hub._commit(repo, branch, files, tuple(deleted))
        self._send_json(
            {
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        with self.hub.lock:
            repo = self._repo(repo_id, files=True)
            sha = self._commit_of(repo, revision)
            data = repo.commits[sha].get(path)
            broken = self.hub.broken.get((repo_id, path)) if method == "GET" else None
            if broken == "once":
                del self.hub.broken[(repo_id, path)]
            elif broken == "always":
                self.hub.broken[(repo_id, path)] = "dead"
        if data is None:
            # the client reads X-Repo-Commit off a 404 to cache the file's absence
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", sha)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if broken == "dead":
            raise ErrorAnswer(503, None, "Service Unavailable")
        start = 0
        range_header = self.headers.get("Range")
        if range_header and method == "GET" and broken is None:
            m = re.match(r"bytes=(\d+)-", range_header)
            start = int(m.group(1)) if m else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{git_blob_sha1(data)}"')
        self.send_header("X-Repo-Commit", sha)
        self.end_headers()
        if method == "HEAD":
            return
        end = len(data) // 2 if broken else len(data)
        view = memoryview(data)
        for offset in range(start, end, _CHUNK):
            self.wfile.write(view[offset : min(offset + _CHUNK, end)])
        if broken:
            # promised Content-Length, delivered half: the client sees a connection cut mid-body
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


def _ref(name: str, kind: str, sha: str) -> dict[str, str]:
    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
