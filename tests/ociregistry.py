"""A real OCI registry for tests: Debian's ``docker-registry`` (CNCF distribution) on 127.0.0.1.

``OciRegistry`` writes a minimal config (filesystem storage under a temporary folder, deletes
enabled), starts ``docker-registry serve`` on a free port, waits for ``/v2/`` and stops it on exit.
``htpasswd`` adds basic authentication for credential tests. ``blob_path`` is where a layer's bytes
live on the registry's disk, for tamper tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BINARY = "docker-registry"


def available() -> bool:
    return shutil.which(BINARY) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OciRegistry:
    def __init__(self, root: Path, *, users: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def url(self, repository: str) -> str:
        return f"oci://{self.host}/{repository}"

    def blob_path(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def __enter__(self) -> OciRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.users:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt  # deprecated, still the standard library's only bcrypt (until Python 3.13)
            lines = []
            for user, password in self.users.items():
                # cost 4 (rounds=16) keeps each request cheap; distribution reads the 2a prefix (same algorithm)
                salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)
                hashed = crypt.crypt(password, salt).replace("$2b$", "$2a$", 1)
                lines.append(f"{user}:{hashed}")
            (self.root / "htpasswd").write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {self.root / 'htpasswd'}\n"
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
            + auth
        )
        log = (self.root / "registry.log").open("wb")
        self.process = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # 401 with auth on: it is up
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("docker-registry did not start within 20 s")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
