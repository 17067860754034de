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
    return home
