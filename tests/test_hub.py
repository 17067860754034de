"""loramgr's Hub layer against the local test Hub, through the real huggingface_hub client.

Nothing of loramgr.hub.client is mocked; the only patch is ``huggingface_hub.get_token`` so that a login
stored on the developer's machine cannot leak into a test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from factories import write_peft_adapter
from hubserver import OTHER_TOKEN, TEST_TOKEN, HubServer

from loramgr.errors import ConflictError, HubError, IntegrityError, InvalidReferenceError
from loramgr.hub.client import (
    HubSource,
    download_adapter,
    parse_hub_reference,
    plan_push,
    push,
)
from loramgr.hub.modelcard import parse_card, render_model_card
from loramgr.registry import Parent, SourceDetails, VersionDetails

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.0.self_attn.v_proj": (16, 16, 4)}


def _adapter(tmp_path: Path, name: str = "ad", seed: int = 0) -> Path:
    return write_peft_adapter(tmp_path / name, MODULES, seed=seed, base_model="tiny/base")


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _push(hub: HubServer, folder: Path, tag: str, repo_id: str = "tester/ad", private: bool = False) -> str:
    card = f"---\nlicense: mit\nbase_model: tiny/base\n---\n# ad\n\nAdapter {tag}.\n"
    plan = plan_push(folder, repo_id=repo_id, tag=tag, card=card, private=private)
    return push(plan, folder, endpoint=hub.url, token=TEST_TOKEN)


# -- references --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://owner/repo", HubSource("owner/repo", None, None)),
        ("hf://owner/repo@v1.2.0", HubSource("owner/repo", "v1.2.0", None)),
        ("hf://owner/repo@refs/pr/1:loras/style", HubSource("owner/repo", "refs/pr/1", "loras/style")),
        ("hf://owner/re.po-2:sub", HubSource("owner/re.po-2", None, "sub")),
    ],
)
def test_parse_hub_reference(text: str, expected: HubSource) -> None:
    assert parse_hub_reference(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["owner/repo", "hf://repo", "hf://owner/repo@", "hf://a/b/c", "hf://owner/repo:../x", "hf://o/r:"]
)
def test_parse_hub_reference_rejects(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as err:
        parse_hub_reference(text)
    assert "hf://" in str(err.value) and "\n" not in str(err.value)


# -- push and download -----------------------------------------------------------------------------


def test_push_then_download_gives_identical_digests(hub: HubServer, tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    (folder / "notes.txt").write_text("not pushed")
    commit = _push(hub, folder, "v1.0.0")
    assert hub.repos["tester/ad"].tags["v1.0.0"] == commit
    assert set(hub.repos["tester/ad"].commits[commit]) == {
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"
    }  # fmt: skip

    got = download_adapter(parse_hub_reference("hf://tester/ad@v1.0.0"), cache_dir=tmp_path / "c", endpoint=hub.url)
    assert got.commit == commit and got.revision_asked == "v1.0.0"
    assert got.files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert got.digests[name] == _sha256(folder / name) == _sha256(got.folder / name)
    assert got.card == {"license": "mit", "base_model": "tiny/base", "tags": [], "description": "Adapter v1.0.0."}


def test_a_tag_downloads_its_exact_bytes(hub: HubServer, tmp_path: Path) -> None:
    first = _adapter(tmp_path, "one", seed=1)
    second = _adapter(tmp_path, "two", seed=2)
    c1 = _push(hub, first, "v1.0.0")
    c2 = _push(hub, second, "v1.1.0")
    assert c1 != c2
    old = download_adapter(HubSource("tester/ad", "v1.0.0", None), cache_dir=tmp_path / "c", endpoint=hub.url)
    new = download_adapter(HubSource("tester/ad", None, None), cache_dir=tmp_path / "c", endpoint=hub.url)
    assert (old.commit, new.commit) == (c1, c2)
    weights = "adapter_model.safetensors"
    assert (old.folder / weights).read_bytes() == (first / weights).read_bytes()
    assert (new.folder / weights).read_bytes() == (second / weights).read_bytes()


def test_push_same_tag_same_bytes_is_fine_other_bytes_conflict(hub: HubServer, tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    commit = _push(hub, folder, "v1.0.0")
    messages: list[str] = []
    card = f"---\nlicense: mit\nbase_model: tiny/base\n---\n# ad\n\nAdapter {'v1.0.0'}.\n"
    plan = plan_push(folder, repo_id="tester/ad", tag="v1.0.0", card=card, private=False)
    n_commits = len(hub.repos["tester/ad"].commits)
    assert push(plan, folder, endpoint=hub.url, token=TEST_TOKEN, notify=messages.append) == commit
    assert len(hub.repos["tester/ad"].commits) == n_commits
    assert messages and "already holds these exact files" in messages[0]

    other = _adapter(tmp_path, "other", seed=5)
    with pytest.raises(ConflictError) as err:
        _push(hub, other, "v1.0.0")
    assert "adapter_model.safetensors" in str(err.value) and "new version" in str(err.value)


def test_push_deletes_stale_adapter_files_and_needs_a_token(hub: HubServer, tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    (folder / "extra.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    _push(hub, folder, "v1.0.0")
    (folder / "extra.safetensors").unlink()
    c2 = _push(hub, folder, "v2.0.0")
    assert "extra.safetensors" not in hub.repos["tester/ad"].commits[c2]
    plan = plan_push(folder, repo_id="tester/ad", tag="v3", card="x", private=False)
    with pytest.raises(HubError, match="needs a Hub token"):
        push(plan, folder, endpoint=hub.url)
    with pytest.raises(HubError, match="cannot write"):
        push(plan, folder, endpoint=hub.url, token="hf_not_a_valid_token")


def test_second_download_of_a_commit_transfers_nothing(hub: HubServer, tmp_path: Path) -> None:
    commit = _push(hub, _adapter(tmp_path), "v1.0.0")
    source = HubSource("tester/ad", "v1.0.0", None)
    download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    assert hub.file_gets() == 3
    hub.reset_counts()
    again = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    assert again.commit == commit
    assert hub.file_gets() == 0 and hub.count("HEAD") == 0  # only the tag -> commit lookup
    hub.reset_counts()
    download_adapter(HubSource("tester/ad", commit, None), cache_dir=tmp_path / "c", endpoint=hub.url)
    assert hub.requests == []


def test_offline_uses_the_cache(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = _push(hub, _adapter(tmp_path), "v1.0.0")
    source = HubSource("tester/ad", "v1.0.0", None)
    with pytest.raises(HubError, match="offline and not in the local cache"):
        download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url, offline=True)
    online = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    hub.reset_counts()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time, not at import time
    offline = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    assert hub.requests == []
    assert (offline.commit, offline.files, offline.digests) == (commit, online.files, online.digests)


def test_progress_reports_bytes(hub: HubServer, tmp_path: Path) -> None:
    _push(hub, _adapter(tmp_path), "v1")
    seen: list[tuple[int, int | None]] = []
    source = HubSource("tester/ad", "v1", None)
    got = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url, progress=lambda *a: seen.append(a))
    total = sum((got.folder / f).stat().st_size for f in got.files)
    assert seen and seen[-1] == (total, total)


def test_subfolder_and_pickle_handling(hub: HubServer, tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    files = {f"loras/style/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["old/adapter_model.bin"] = b"pickle bytes"
    files["old/adapter_config.json"] = b"{}"
    hub.seed("tester/multi", files)
    kw = {"cache_dir": tmp_path / "c", "endpoint": hub.url}
    with pytest.raises(HubError) as err:
        download_adapter(HubSource("tester/multi", None, None), **kw)
    assert "no adapter files" in str(err.value) and "hf://tester/multi:loras/style" in str(err.value)
    got = download_adapter(parse_hub_reference("hf://tester/multi:loras/style"), **kw)
    assert got.folder.name == "style" and "adapter_model.safetensors" in got.files
    with pytest.raises(HubError, match="pickled weights.*--allow-pickle"):
        download_adapter(HubSource("tester/multi", None, "old"), **kw)
    pickled = download_adapter(HubSource("tester/multi", None, "old"), allow_pickle=True, **kw)
    assert pickled.files == ["adapter_config.json", "adapter_model.bin"]


# -- errors ------------------------------------------------------------------------------------------


def _one_line_error(source: HubSource, tmp_path: Path, hub: HubServer, **kwargs) -> str:
    with pytest.raises(HubError) as err:
        download_adapter(source, cache_dir=tmp_path / "err", endpoint=hub.url, **kwargs)
    text = str(err.value)
    assert "\n" not in text and err.value.hint and text.endswith(err.value.hint)
    return text


def test_error_messages(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _adapter(tmp_path)
    _push(hub, folder, "v1.0.0", repo_id="tester/secret", private=True)
    hub.seed("tester/empty", {"notes.txt": b"hello"})

    assert "repository not found" in _one_line_error(HubSource("tester/nope", None, None), tmp_path, hub)
    text = _one_line_error(HubSource("tester/secret", None, None), tmp_path, hub)
    assert "private and no token" in text and "HF_TOKEN" in text
    text = _one_line_error(HubSource("tester/secret", "v9", None), tmp_path, hub, token=TEST_TOKEN)
    assert "revision 'v9' not found" in text and "v1.0.0" in text
    assert "no adapter files" in _one_line_error(HubSource("tester/empty", None, None), tmp_path, hub)
    assert "refused the token" in _one_line_error(HubSource("tester/secret", None, None), tmp_path, hub, token="x")

    hub.set_gated("tester/secret")
    text = _one_line_error(HubSource("tester/secret", None, None), tmp_path, hub, token=OTHER_TOKEN)
    assert "gated" in text
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)  # the environment's token is used when none is passed
    assert download_adapter(HubSource("tester/secret", None, None), cache_dir=tmp_path / "ok", endpoint=hub.url)


def test_broken_download_leaves_nothing_half_written(hub: HubServer, tmp_path: Path) -> None:
    commit = _push(hub, _adapter(tmp_path), "v1.0.0")
    hub.break_download("tester/ad", "adapter_model.safetensors", mode="always")
    source = HubSource("tester/ad", "v1.0.0", None)
    text = _one_line_error(source, tmp_path, hub)
    assert "broken halfway" in text
    cache = tmp_path / "err" / "models--tester--ad"
    assert not list(cache.rglob("*.incomplete"))
    assert not (cache / "snapshots" / commit / "adapter_model.safetensors").exists()
    # what did arrive is complete, but an incomplete snapshot is never handed out offline
    assert "only part of it is in the local cache" in _one_line_error(source, tmp_path, hub, offline=True)

    hub.heal_download("tester/ad", "adapter_model.safetensors")
    hub.reset_counts()
    got = download_adapter(source, cache_dir=tmp_path / "err", endpoint=hub.url)
    assert hub.file_gets() == 1  # only the file that broke
    assert got.digests["adapter_model.safetensors"] == _sha256(tmp_path / "ad" / "adapter_model.safetensors")


def test_tampered_cache_is_detected(hub: HubServer, tmp_path: Path) -> None:
    _push(hub, _adapter(tmp_path), "v1.0.0")
    source = HubSource("tester/ad", "v1.0.0", None)
    got = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    blob = (got.folder / "adapter_model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match="does not match the Hub's hash"):
        download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)


def _alter_keeping_mtime(path: Path) -> None:
    """Flip one byte, keeping the file's size and modification time (what a cache keyed by mtime trusts)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_offline_cache_altered_with_its_mtime_kept_is_refused(hub: HubServer, tmp_path: Path) -> None:
    _push(hub, _adapter(tmp_path), "v1.0.0")
    source = HubSource("tester/ad", "v1.0.0", None)
    got = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    _alter_keeping_mtime((got.folder / "adapter_model.safetensors").resolve())
    with pytest.raises(IntegrityError, match="does not match the Hub's hash"):
        download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url, offline=True)


def test_hub_bytes_are_checked_against_the_tree_whatever_the_etag(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubserver_http import HubHandler

    send_header = HubHandler.send_header

    def md5_etag(self: HubHandler, key: str, value: str) -> None:  # a CDN's ETag: an MD5, not a git hash
        send_header(self, key, f'"{hashlib.md5(value.encode()).hexdigest()}"' if key == "ETag" else value)

    monkeypatch.setattr(HubHandler, "send_header", md5_etag)
    folder = _adapter(tmp_path)
    _push(hub, folder, "v1.0.0")
    source = HubSource("tester/ad", "v1.0.0", None)
    got = download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    blob = (got.folder / "adapter_model.safetensors").resolve()
    assert len(blob.name) == 32  # named after the MD5 ETag: nothing to check the bytes against but the tree
    assert got.digests["adapter_model.safetensors"] == _sha256(folder / "adapter_model.safetensors")
    _alter_keeping_mtime(blob)
    with pytest.raises(IntegrityError, match="does not match the Hub's hash"):
        download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url)
    with pytest.raises(IntegrityError, match="cannot be verified"):
        download_adapter(source, cache_dir=tmp_path / "c", endpoint=hub.url, offline=True)


# -- model card --------------------------------------------------------------------------------------


def test_render_model_card() -> None:
    parent = Parent(name="a", version="1.0.0", digest="sha256:" + "ab" * 32, weight=0.5)
    details = VersionDetails(
        name="haiku", display_name="haiku", version="1.2.0", digest="sha256:" + "0" * 64, tags=[], size=0,
        installed_at="2026-01-01T00:00:00", source=None, source_details=SourceDetails(), format="peft",
        adapter_type="lora", rank=8, ranks_found=[4, 8], alpha=16.0, use_rslora=False, use_dora=False,
        rank_pattern={"v_proj": 4}, alpha_pattern={}, target_modules=["q_proj", "v_proj"], target_modules_found=[],
        base_model="meta-llama/Llama-2-7b-hf", base_model_revision=None, task_type="CAUSAL_LM", n_modules=2,
        n_params=1234, dtypes=["float32"], file_metadata={}, weights_file="adapter_model.safetensors", config={},
        card={"license": "apache-2.0", "description": "Writes haiku.", "tags": ["poetry"]}, notes=[], files=[],
        modules=[], parents=[parent], recipe={"method": "cat"},
    )
    text = render_model_card(details, repo_id="me/haiku", recipe_toml='method = "cat"\n')
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:3] == ["lora", "loramgr", "base_model:adapter:meta-llama/Llama-2-7b-hf"]
    assert "poetry" in meta["tags"]
    assert "| `q_proj` | 8 | 16.0 |" in text and "| `v_proj` | 4 | 16.0 |" in text
    assert f"| a | 1.0.0 | {parent.digest} | 0.5 |" in text and "- method: `cat`" in text and 'method = "cat"' in text
    assert 'PeftModel.from_pretrained(base, "me/haiku", revision="v1.2.0")' in text
    assert "loramgr install hf://me/haiku@v1.2.0" in text
    assert parse_card(text)["description"] == "Writes haiku."
