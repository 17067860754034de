"""One throwaway PostgreSQL cluster per test session, shared by every module that needs it.

Started on first use from Debian's postgresql binaries (which .ci/run installs) on 127.0.0.1 and
stopped when the session ends; :func:`cluster_url` returns None where the binaries or psycopg are absent.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _as_postgres(*command: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=60)


def psycopg_missing() -> bool:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return True
    return False


@functools.cache
def cluster_url() -> str | None:
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not binaries or psycopg_missing():
        return None
    bindir = binaries[-1].parent
    root = Path(tempfile.mkdtemp(prefix="loramgr-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _as_postgres(str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
    _as_postgres(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-w", "-l", str(root / "log"),
                 "-o", f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200", "start")

    def stop() -> None:
        _as_postgres(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def reset(url: str) -> None:
    """An empty public schema: a clean database for one test."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
