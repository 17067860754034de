from __future__ import annotations

import pytest


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
