from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def loramgr_home(tmp_path_factory, monkeypatch):
    """Every test gets its own LORAMGR_HOME; nothing touches the user's home directory."""
    home = tmp_path_factory.mktemp("loramgr-home")
    monkeypatch.setenv("LORAMGR_HOME", str(home))
    monkeypatch.delenv("LORAMGR_DATABASE_URL", raising=False)
    monkeypatch.delenv("LORAMGR_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home
