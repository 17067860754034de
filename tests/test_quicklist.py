"""`loramgr list`'s former fast path is the registry's own list: same rows, same refusals."""

from __future__ import annotations

import os

import pytest
from factories import write_peft_adapter

import loramgr
from loramgr import paths
from loramgr.errors import RegistryError
from loramgr.registry import Registry
from loramgr.registry.quicklist import quick_list

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4)}


def _populate(tmp_path) -> Registry:
    registry = Registry.open()
    for i, (name, version) in enumerate([("b-adapter", "1.10.0"), ("b-adapter", "1.9.0"), ("A_Adapter", "2.0rc1"),
                                         ("a-adapter", "1.0.0"), ("b-adapter", "1.9.1")]):
        folder = write_peft_adapter(tmp_path / f"ad{i}", MODULES, seed=i)
        loramgr.install(folder, name=name, version=version, registry_=registry)
    registry.tag("b-adapter==1.9.0", "stable")
    registry.tag("b-adapter==1.9.0", "Beta")
    return registry


def test_quick_list_equals_the_registry(tmp_path) -> None:
    registry = _populate(tmp_path)
    fast = quick_list(paths.home())
    assert fast is not None
    assert [r.to_dict() for r in fast] == [r.to_dict() for r in registry.list_versions()]
    assert [(r.name, r.version) for r in fast][:3] == [("a-adapter", "1.0.0"), ("a-adapter", "2.0rc1"),
                                                        ("b-adapter", "1.9.0")]
    assert fast[2].tags == ["Beta", "stable"]
    one = quick_list(paths.home(), "B_Adapter")
    assert [r.version for r in one or []] == ["1.9.0", "1.9.1", "1.10.0"]


def test_quick_list_is_the_registry_of_the_home_and_its_database_url(tmp_path, monkeypatch) -> None:
    assert quick_list(paths.home()) == []  # a new home: the database is created on the way
    _populate(tmp_path)
    other = tmp_path / "other.db"
    monkeypatch.setenv("LORAMGR_DATABASE_URL", f"sqlite:///{os.fspath(other)}")
    # a new database beside blobs is refused with the registry's own one-line error, not bypassed
    with pytest.raises(RegistryError, match="is empty, but"):
        quick_list(paths.home())
    monkeypatch.delenv("LORAMGR_DATABASE_URL")
    assert len(quick_list(paths.home())) == 5
