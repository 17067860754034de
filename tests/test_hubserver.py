"""The local test Hub, proven with the real huggingface_hub client (no mocks on either side).

If these pass, loramgr's Hub tests exercise the client's true code paths: its cache layout, its
error classes and its retry behaviour, not a model of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hubserver import OTHER_TOKEN, TEST_TOKEN, HubServer, git_blob_sha1
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 4}')
    (src / "adapter_model.safetensors").write_bytes(os.urandom(5000))
    (src / "README.md").write_text("---\nlicense: mit\n---\nA test adapter.\n")
    (src / "notes.txt").write_text("not an adapter file")
    return src


def _upload(hub: HubServer, folder: Path, repo_id: str = "tester/ad", **kwargs) -> tuple[HfApi, str]:
    api = HfApi(endpoint=hub.url, token=TEST_TOKEN)
    api.create_repo(repo_id, **kwargs)
    return api, api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add").oid


def test_create_upload_tag_and_list(hub: HubServer, folder: Path) -> None:
    api, sha = _upload(hub, folder)
    api.create_tag("tester/ad", tag="v1.0.0", revision=sha)
    refs = api.list_repo_refs("tester/ad")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0.0", sha)]
    assert refs.branches[0].target_commit == sha
    info = api.model_info("tester/ad", revision="v1.0.0")
    assert info.sha == sha
    assert {s.rfilename for s in info.siblings} == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "notes.txt",
    }
    tree = {f.path: f for f in api.list_repo_tree("tester/ad", recursive=True, revision=sha)}
    data = (folder / "adapter_model.safetensors").read_bytes()
    assert tree["adapter_model.safetensors"].size == len(data)
    assert tree["adapter_model.safetensors"].blob_id == git_blob_sha1(data)
    assert tree["adapter_model.safetensors"].lfs is None and tree["adapter_model.safetensors"].xet_hash is None
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag("tester/ad", tag="v1.0.0", revision=sha)
    assert err.value.response.status_code == 409
    api.create_repo("tester/ad", exist_ok=True)  # 409 swallowed by the client


def test_snapshot_by_tag_and_commit_with_allow_patterns(hub: HubServer, folder: Path, tmp_path: Path) -> None:
    api, first = _upload(hub, folder)
    api.create_tag("tester/ad", tag="v1", revision=first)
    (folder / "adapter_model.safetensors").write_bytes(b"second version")
    second = api.upload_folder(repo_id="tester/ad", folder_path=folder).oid
    assert second != first

    patterns = ["adapter_config.json", "*.safetensors"]
    by_tag = Path(
        snapshot_download(
            "tester/ad", revision="v1", allow_patterns=patterns, endpoint=hub.url, cache_dir=tmp_path / "c1"
        )
    )
    assert by_tag.name == first
    assert sorted(p.name for p in by_tag.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (by_tag / "adapter_model.safetensors").read_bytes() != b"second version"

    by_commit = Path(snapshot_download("tester/ad", revision=second, endpoint=hub.url, cache_dir=tmp_path / "c2"))
    assert (by_commit / "adapter_model.safetensors").read_bytes() == b"second version"
    assert (by_commit / "notes.txt").exists()

    one = hf_hub_download("tester/ad", "README.md", revision="main", endpoint=hub.url, cache_dir=tmp_path / "c3")
    assert Path(one).read_text().startswith("---")


def test_cached_snapshot_makes_no_file_request(hub: HubServer, folder: Path, tmp_path: Path) -> None:
    _, sha = _upload(hub, folder)
    snapshot_download("tester/ad", revision=sha, endpoint=hub.url, cache_dir=tmp_path)
    assert hub.file_gets() == 5  # 4 uploaded files and .gitattributes
    hub.reset_counts()
    snapshot_download("tester/ad", revision=sha, endpoint=hub.url, cache_dir=tmp_path)
    assert hub.requests == []  # a commit sha needs no resolution and every file is cached


def test_error_codes_map_to_client_exceptions(hub: HubServer, folder: Path, tmp_path: Path) -> None:
    _upload(hub, folder, repo_id="tester/secret", private=True)
    kw = {"endpoint": hub.url, "cache_dir": tmp_path}
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("tester/missing", **kw)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("tester/secret", **kw)  # private, no token
    assert Path(snapshot_download("tester/secret", token=TEST_TOKEN, **kw)).is_dir()
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("tester/secret", revision="v9", token=TEST_TOKEN, **kw)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tester/secret", "nope.bin", token=TEST_TOKEN, **kw)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").model_info("tester/secret")
    assert err.value.response.status_code == 401

    hub.set_gated("tester/secret")
    with pytest.raises(GatedRepoError):
        hf_hub_download("tester/secret", "README.md", token=OTHER_TOKEN, endpoint=hub.url, cache_dir=tmp_path / "g")
    assert hf_hub_download("tester/secret", "README.md", token=TEST_TOKEN, endpoint=hub.url, cache_dir=tmp_path / "g")


def test_broken_download_once_resumes_and_always_fails(hub: HubServer, tmp_path: Path) -> None:
    payload = os.urandom(3 << 20)
    sha = hub.seed("tester/big", {"adapter_model.safetensors": payload})
    hub.break_download("tester/big", "adapter_model.safetensors", mode="once")
    path = hf_hub_download(
        "tester/big", "adapter_model.safetensors", revision=sha, endpoint=hub.url, cache_dir=tmp_path / "a"
    )
    assert Path(path).read_bytes() == payload  # the client resumed with a Range request

    hub.break_download("tester/big", "adapter_model.safetensors", mode="always")
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(
            "tester/big",
            "adapter_model.safetensors",
            revision=sha,
            endpoint=hub.url,
            cache_dir=tmp_path / "b",
        )
    repo_cache = tmp_path / "b" / "models--tester--big"
    assert not [p for p in repo_cache.rglob("*") if p.is_file() and p.parent.name != "refs"]  # no partial blob


def test_server_stops_itself() -> None:
    server = HubServer(lifetime_s=0.2).start()
    url = server.url
    server._timer.join(2)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        _ = server.url
    assert url.startswith("http://127.0.0.1:")
