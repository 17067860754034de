"""A local stand-in for the Hugging Face Hub, spoken to by the real ``huggingface_hub`` client.

Tests and benchmarks must never reach huggingface.co, yet loramgr's Hub layer has to be exercised
through the real client (its cache layout, retries and error classes are the behaviour we depend on).
This server implements the part of the Hub HTTP API that ``huggingface_hub`` 2.4.0 uses for
``create_repo``, ``create_commit`` / ``upload_folder``, ``create_tag``, ``list_repo_refs``,
``repo_info`` / ``model_info``, ``list_repo_tree`` and ``hf_hub_download`` / ``snapshot_download``.

Storage: one repository is a dict of commits (sha -> {path: bytes}) plus branches and tags. Every file
is served as a regular git blob: preupload answers ``"regular"`` and no response carries ``X-Xet-*``
headers or ``xetHash``/``lfs`` fields, so neither LFS nor Xet (``hf_xet`` is installed) comes into play.

Switches for tests: :meth:`HubServer.break_download` / :meth:`HubServer.heal_download` (send the
full Content-Length, then close halfway), :meth:`HubServer.set_gated`, :meth:`HubServer.seed` (a repo
without going through the client), and the request log (:meth:`HubServer.count`,
:meth:`HubServer.file_gets`). The server binds 127.0.0.1 on a free port, serves from daemon threads
and stops itself after ``lifetime_s``. The HTTP routes live in tests/hubserver_http.py.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import ThreadingHTTPServer

from hubserver_http import OTHER_TOKEN, TEST_TOKEN, HubHandler, Repo, git_blob_sha1

__all__ = ["OTHER_TOKEN", "TEST_TOKEN", "HubServer", "Repo", "git_blob_sha1"]


class HubServer:
    """The server and its state; use as a context manager (``with HubServer() as hub: hub.url``)."""

    def __init__(self, *, lifetime_s: float = 300.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.broken: dict[tuple[str, str], str] = {}  # (repo_id, path) -> "once" | "always"
        self.lock = threading.RLock()
        self.lifetime_s = lifetime_s
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("BoundHandler", (HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        ).start()
        # self-stopping: a test that forgets to stop the server cannot leave it running for long
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- switches and seeding ------------------------------------------------------------------------
    def seed(self, repo_id: str, files: dict[str, bytes], *, tag: str | None = None, private: bool = False) -> str:
        """Create (or extend) a repository without going through the client; returns the commit sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self._create(repo_id, private)
            sha = self._commit(repo, "main", files, deleted=())
            if tag:
                repo.tags[tag] = sha
            return sha

    def break_download(self, repo_id: str, path: str, *, mode: str = "always") -> None:
        """Make GETs of one file send the full Content-Length, then close after half the body.

        ``mode="once"`` breaks only the next GET (the client's Range resume then succeeds);
        ``"always"`` breaks the first GET and answers resumes with 503, like a dead CDN node.
        """
        self.broken[(repo_id, path)] = mode

    def heal_download(self, repo_id: str, path: str) -> None:
        """Undo :meth:`break_download`."""
        self.broken.pop((repo_id, path), None)

    def set_gated(self, repo_id: str, gated: bool = True, *, allowed: tuple[str, ...] = (TEST_TOKEN,)) -> None:
        """Gate a repository's files: only the ``allowed`` tokens may download them."""
        with self.lock:
            self.repos[repo_id].gated = gated
            self.repos[repo_id].gated_allowed = set(allowed)

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many requests matched ``method`` and had ``contains`` in their path."""
        with self.lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    def file_gets(self) -> int:
        """GETs of file contents (``/resolve/``): what a cached re-download must not make."""
        return self.count("GET", "/resolve/")

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- internals -----------------------------------------------------------------------------------
    def _create(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        self.repos[repo_id] = repo
        # the Hub starts every repository with a .gitattributes commit
        self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, ())
        return repo

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], deleted: tuple[str, ...]) -> str:
        parent = repo.branches.get(branch)
        snapshot = dict(repo.commits[parent]) if parent else {}
        for path in deleted:
            snapshot = {p: b for p, b in snapshot.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        snapshot.update(files)
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{self._counter}".encode())
        for path in sorted(snapshot):
            digest.update(path.encode() + b"\0" + git_blob_sha1(snapshot[path]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = snapshot
        repo.branches[branch] = sha
        return sha
