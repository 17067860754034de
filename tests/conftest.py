from __future__ import annotations

import os
from pathlib import Path

import pytest

# huggingface_hub reads its settings once, at import: whatever the caller's shell has set (HF_HUB_OFFLINE=1,
# a HF_HOME with a login, another endpoint) must not reach the tests, so it goes before anything imports it
for _name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "LORAMGR_HOME",
              "LORAMGR_DATABASE_URL", "LORAMGR_DEBUG", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True)
def loramgr_home(tmp_path_factory, monkeypatch):
    """Every test gets its own LORAMGR_HOME; nothing touches the user's home directory."""
    home = tmp_path_factory.mktemp("loramgr-home")
    monkeypatch.setenv("LORAMGR_HOME", str(home))
    monkeypatch.delenv("LORAMGR_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORAMGR_DEBUG", raising=False)
    # huggingface_hub's cache and token live under HF_HOME: keep them out of the user's home too
    monkeypatch.setenv("HF_HOME", str(home / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf-home" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # in case a plugin imported it first
    # a login stored on a developer's machine must never reach the test Hub
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    return home


@pytest.fixture
def hub():
    """A local Hub on 127.0.0.1 speaking the API the real huggingface_hub client uses (tests/hubserver.py)."""
    from hubserver import HubServer

    with HubServer(lifetime_s=120) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, loramgr_home: Path) -> str:
    """The registry's database: the home's SQLite file, or a clean PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{loramgr_home / 'registry.db'}"
    from pgcluster import cluster_url, reset

    url = cluster_url()
    if url is None:
        pytest.skip("PostgreSQL server or psycopg not installed (.ci/run installs both)")
    reset(url)
    monkeypatch.setenv("LORAMGR_DATABASE_URL", url)
    return url


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    """Two installed adapters for the merge tests: sql (rank 4 on q, v) and style (rank 2 rsLoRA on q, k)."""
    from factories import run_cli, write_peft_adapter

    q, v, k = (f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj", "k_proj"))
    a = write_peft_adapter(tmp_path / "a", {q: (16, 16, 4), v: (16, 16, 4)}, alpha=8, seed=1)
    b = write_peft_adapter(tmp_path / "b", {q: (16, 16, 2), k: (16, 16, 2)}, alpha=4, use_rslora=True, seed=2)
    run_cli("install", str(a), "--name", "sql", "--version", "1.0.0")
    run_cli("install", str(b), "--name", "style", "--version", "1.0.0")
    return a, b
