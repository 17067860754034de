"""OCI registries: push and install adapters as ModelPack artifacts against a real registry.

The registry is Debian's ``docker-registry`` (CNCF distribution 2.8) on 127.0.0.1 (tests/ociregistry.py);
oras-py, the ORAS project's client, is the independent reader and writer of the artifacts.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from factories import one_line_error, run_cli, write_peft_adapter
from ociregistry import OciRegistry, available

import loramgr
from loramgr.registry import Registry

pytestmark = [
    pytest.mark.slow,  # a registry server per module: outside the everyday loop
    pytest.mark.skipif(not available(), reason="docker-registry (CNCF distribution) is not installed; "
                       "apt-get install docker-registry"),
]

MODELPACK = {
    "artifact": "application/vnd.cncf.model.manifest.v1+json",
    "config": "application/vnd.cncf.model.config.v1+json",
    "weight": "application/vnd.cncf.model.weight.v1.raw",
    "weight_config": "application/vnd.cncf.model.weight.config.v1.raw",
    "doc": "application/vnd.cncf.model.doc.v1.raw",
}
MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4), "model.layers.0.self_attn.v_proj": (16, 8, 4)}


@pytest.fixture(scope="module")
def oci_registry(tmp_path_factory):
    with OciRegistry(tmp_path_factory.mktemp("oci-registry")) as registry:
        yield registry


def use_home(monkeypatch, tmp_path: Path, name: str) -> Registry:
    monkeypatch.setenv("LORAMGR_HOME", str(tmp_path / name))
    return Registry.open()


def get_json(url: str, accept: str = "application/vnd.oci.image.manifest.v1+json") -> tuple[dict, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request) as response:
        body = response.read()
    return json.loads(body), body


def manifest_of(reg: OciRegistry, repository: str, reference: str) -> tuple[dict, str]:
    import hashlib

    manifest, body = get_json(f"http://{reg.host}/v2/{repository}/manifests/{reference}")
    return manifest, "sha256:" + hashlib.sha256(body).hexdigest()


def oras_client(reg: OciRegistry):
    import oras.client

    return oras.client.OrasClient(hostname=reg.host, insecure=True)


def test_push_then_install_gives_the_same_version_by_tag_and_by_digest(oci_registry, tmp_path, monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "a")
    adapter = write_peft_adapter(tmp_path / "sql", MODULES)
    digest = json.loads(run_cli("install", str(adapter), "--name", "sql-chat", "--version", "1.2.0",
                                "--json").output)["digest"]
    url = oci_registry.url("team/sql-chat")
    out = run_cli("push", "sql-chat==1.2.0", url, "--tag", "stable").output
    manifest, manifest_digest = manifest_of(oci_registry, "team/sql-chat", "1.2.0")
    assert f"manifest {manifest_digest}" in out
    assert manifest_of(oci_registry, "team/sql-chat", "stable")[1] == manifest_digest

    use_home(monkeypatch, tmp_path, "b")
    by_tag = json.loads(run_cli("install", f"{url}:1.2.0", "--json").output)
    assert (by_tag["name"], by_tag["version"], by_tag["digest"]) == ("sql-chat", "1.2.0", digest)
    shown = json.loads(run_cli("show", "sql-chat==1.2.0", "--json").output)
    assert shown["source"] == f"{url}@{manifest_digest}"
    assert shown["source_details"]["oci"]["manifest"] == manifest_digest

    use_home(monkeypatch, tmp_path, "c")
    by_digest = json.loads(run_cli("install", f"{url}@{manifest_digest}", "--name", "pinned", "--json").output)
    assert by_digest["digest"] == digest
    stored = loramgr.export("pinned", tmp_path / "exported")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (stored / name).read_bytes() == (adapter / name).read_bytes()

    listing = run_cli("list-remote", url).output
    assert "1.2.0" in listing and "stable" in listing and "sql-chat" in listing and manifest_digest[:19] in listing
    rows = json.loads(run_cli("list-remote", url, "--json").output)
    assert {r["tag"]: r["digest"] for r in rows} == {"1.2.0": manifest_digest, "stable": manifest_digest}


@pytest.mark.slow
def test_manifest_is_a_modelpack_artifact_with_file_names_and_base_link(oci_registry, tmp_path, monkeypatch) -> None:
    from factories import peft_adapter_from_model, tiny_llama
    from test_bases import save_base

    registry = use_home(monkeypatch, tmp_path, "a")
    run_cli("base", "add", str(save_base(tiny_llama(), tmp_path / "llama")), "--name", "org/tiny-llama")
    adapter = peft_adapter_from_model(tiny_llama(), tmp_path / "adapter", base_model="org/tiny-llama")
    run_cli("install", str(adapter), "--name", "linked", "--version", "0.3.0")
    fingerprint = registry.base_of("linked")
    run_cli("push", "linked==0.3.0", oci_registry.url("team/linked"))
    manifest, _ = manifest_of(oci_registry, "team/linked", "0.3.0")

    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == MODELPACK["artifact"]
    assert manifest["config"]["mediaType"] == MODELPACK["config"]
    kinds = {layer["annotations"]["org.cncf.model.filepath"]: layer["mediaType"] for layer in manifest["layers"]}
    assert kinds == {"adapter_model.safetensors": MODELPACK["weight"],
                     "adapter_config.json": MODELPACK["weight_config"], "README.md": MODELPACK["doc"]}
    for layer in manifest["layers"]:
        annotations = layer["annotations"]
        assert annotations["org.opencontainers.image.title"] == annotations["org.cncf.model.filepath"]
        path = annotations["org.cncf.model.filepath"]
        if path != "README.md":  # the layer is the file itself: its digest is the file's sha256
            import hashlib

            assert layer["digest"] == "sha256:" + hashlib.sha256((adapter / path).read_bytes()).hexdigest()
    annotations = manifest["annotations"]
    assert annotations["io.loramgr.base.name"] == "org/tiny-llama"
    assert annotations["io.loramgr.base.fingerprint"] == fingerprint.structural
    assert annotations["org.opencontainers.image.version"] == "0.3.0"
    config, _ = get_json(f"http://{oci_registry.host}/v2/team/linked/blobs/{manifest['config']['digest']}")
    assert config["descriptor"]["name"] == "linked" and config["descriptor"]["version"] == "0.3.0"
    assert config["config"]["format"] == "safetensors"
    assert config["modelfs"] == {"type": "layers", "diffIds": [x["digest"] for x in manifest["layers"]]}


def test_oras_pulls_what_loramgr_pushed(oci_registry, tmp_path, monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "a")
    adapter = write_peft_adapter(tmp_path / "style", MODULES, seed=3)
    run_cli("install", str(adapter), "--name", "style", "--version", "2.0.0")
    run_cli("push", "style==2.0.0", oci_registry.url("team/style"))
    out = tmp_path / "oras-out"
    files = oras_client(oci_registry).pull(target=f"{oci_registry.host}/team/style:2.0.0", outdir=str(out))
    assert sorted(Path(f).name for f in files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (adapter / name).read_bytes()
    assert "loramgr install oci://" in (out / "README.md").read_text()


def test_loramgr_installs_an_artifact_oras_pushed(oci_registry, tmp_path, monkeypatch) -> None:
    adapter = write_peft_adapter(tmp_path / "by-oras", MODULES, seed=5)
    monkeypatch.chdir(adapter)
    oras_client(oci_registry).push(
        target=f"{oci_registry.host}/team/by-oras:1.0.0",
        files=[f"adapter_config.json:{MODELPACK['weight_config']}", f"adapter_model.safetensors:{MODELPACK['weight']}"],
    )
    registry = use_home(monkeypatch, tmp_path, "a")
    expected = loramgr.install(adapter, name="reference", registry_=registry).digest  # the same files from disk
    result = json.loads(run_cli("install", oci_registry.url("team/by-oras") + ":1.0.0", "--json").output)
    assert (result["name"], result["version"], result["digest"]) == ("by-oras", "1.0.0", expected)


def test_a_layer_tampered_with_on_the_registry_disk_is_refused_and_nothing_registered(
        oci_registry, tmp_path, monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "a")
    adapter = write_peft_adapter(tmp_path / "victim", MODULES, seed=7)
    run_cli("install", str(adapter), "--name", "victim", "--version", "1.0.0")
    run_cli("push", "victim==1.0.0", oci_registry.url("team/victim"))
    manifest, _ = manifest_of(oci_registry, "team/victim", "1.0.0")
    weights = next(x for x in manifest["layers"] if x["annotations"]["org.opencontainers.image.title"].endswith(
        ".safetensors"))
    blob = oci_registry.blob_path(weights["digest"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    blob.write_bytes(bytes(data))

    registry = use_home(monkeypatch, tmp_path, "b")
    error = one_line_error("install", oci_registry.url("team/victim") + ":1.0.0")
    assert "adapter_model.safetensors" in error and weights["digest"][:19] in error and "nothing was installed" in error
    assert registry.list_versions() == []
    assert not any(p.is_file() for p in (registry.root / "blobs").rglob("*"))
    assert not any((registry.root / "tmp").iterdir())


def test_a_taken_tag_is_refused_and_a_repeated_push_sends_nothing(oci_registry, tmp_path, monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "a")
    run_cli("install", str(write_peft_adapter(tmp_path / "one", MODULES, seed=1)), "--name", "taken",
            "--version", "1.0.0")
    url = oci_registry.url("team/taken")
    run_cli("push", "taken==1.0.0", url)
    _, first = manifest_of(oci_registry, "team/taken", "1.0.0")
    assert "already holds these exact files" in run_cli("push", "taken==1.0.0", url).output

    use_home(monkeypatch, tmp_path, "b")
    run_cli("install", str(write_peft_adapter(tmp_path / "two", MODULES, seed=2)), "--name", "taken",
            "--version", "1.0.0")
    error = one_line_error("push", "taken==1.0.0", url)
    assert "tag 1.0.0" in error and "already holds other files" in error
    assert manifest_of(oci_registry, "team/taken", "1.0.0")[1] == first
    # a new version tag is free, but an extra tag that is taken refuses the whole push before any upload
    run_cli("install", str(write_peft_adapter(tmp_path / "three", MODULES, seed=3)), "--name", "taken",
            "--version", "1.1.0")
    assert "tag 1.0.0" in one_line_error("push", "taken==1.1.0", url, "--tag", "1.0.0")
    tags = {r["tag"] for r in json.loads(run_cli("list-remote", url, "--json").output)}
    assert tags == {"1.0.0"}


def test_lineage_and_recipe_travel_with_a_combined_adapter(oci_registry, tmp_path, monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "a")
    run_cli("install", str(write_peft_adapter(tmp_path / "s1", MODULES, seed=1)), "--name", "sql")
    run_cli("install", str(write_peft_adapter(tmp_path / "s2", MODULES, seed=2)), "--name", "tone")
    run_cli("combine", "sql", "tone", "--weights", "0.7,0.3", "--name", "mix", "--version", "1.0.0")
    before = json.loads(run_cli("show", "mix==1.0.0", "--json").output)
    recipe = run_cli("show", "mix==1.0.0", "--recipe").output
    assert before["parents"] and before["recipe"] and "[[sources]]" in recipe
    run_cli("push", "mix==1.0.0", oci_registry.url("team/mix"))

    use_home(monkeypatch, tmp_path, "b")
    run_cli("install", oci_registry.url("team/mix") + ":1.0.0")
    after = json.loads(run_cli("show", "mix==1.0.0", "--json").output)
    assert after["digest"] == before["digest"]
    assert after["parents"] == before["parents"]
    assert after["recipe"] == before["recipe"]
    assert run_cli("show", "mix==1.0.0", "--recipe").output == recipe


@pytest.mark.slow
def test_lockfile_pins_an_oci_entry_by_manifest_and_syncs_all_or_nothing(oci_registry, tmp_path,
                                                                        monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "publisher")
    for seed, name in ((11, "alpha"), (12, "beta")):
        run_cli("install", str(write_peft_adapter(tmp_path / name, MODULES, seed=seed)), "--name", name,
                "--version", "1.0.0")
        run_cli("push", f"{name}==1.0.0", oci_registry.url(f"lock/{name}"))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    (project / "loramgr.toml").write_text(
        "[adapters]\n"
        f'alpha = {{ oci = "{oci_registry.url("lock/alpha")}:1.0.0" }}\n'
        f'beta = {{ oci = "{oci_registry.url("lock/beta")}:1.0.0" }}\n'
    )
    use_home(monkeypatch, tmp_path, "locker")
    run_cli("lock")
    import tomllib

    lock = tomllib.loads((project / "loramgr.lock").read_text())
    pinned = {e["name"]: e for e in lock["adapter"]}
    for name in ("alpha", "beta"):
        assert pinned[name]["oci"] == oci_registry.url(f"lock/{name}")
        assert pinned[name]["manifest"] == manifest_of(oci_registry, f"lock/{name}", "1.0.0")[1]

    # beta's weights are damaged on the registry: sync refuses and installs neither
    manifest, _ = manifest_of(oci_registry, "lock/beta", "1.0.0")
    weights = next(x for x in manifest["layers"] if x["mediaType"] == MODELPACK["weight"])
    blob = oci_registry.blob_path(weights["digest"])
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    fresh = use_home(monkeypatch, tmp_path, "syncer")
    error = one_line_error("sync")
    assert "lock/beta" in error and "nothing was installed" in error
    assert fresh.list_versions() == []
    assert not any(p.is_file() for p in (fresh.root / "blobs").rglob("*"))
    blob.write_bytes(original)
    assert "2 installed" in run_cli("sync").output
    assert {(v.name, v.digest) for v in fresh.list_versions()} == {(n, pinned[n]["digest"]) for n in pinned}
    assert "2 already present" in run_cli("sync").output

    # the tag is moved to other files (by another client): the lock still installs the pinned manifest
    other = write_peft_adapter(tmp_path / "other", MODULES, seed=99)
    monkeypatch.chdir(other)
    oras_client(oci_registry).push(target=f"{oci_registry.host}/lock/alpha:1.0.0",
                                   files=["adapter_config.json", "adapter_model.safetensors"])
    monkeypatch.chdir(project)
    again = use_home(monkeypatch, tmp_path, "syncer-2")
    run_cli("sync")
    assert {(v.name, v.digest) for v in again.list_versions()} == {(n, pinned[n]["digest"]) for n in pinned}


@pytest.mark.slow
def test_credentials_from_the_environment_and_docker_config(tmp_path, monkeypatch) -> None:
    pytest.importorskip("crypt", reason="Python's crypt module writes the test registry's htpasswd")
    use_home(monkeypatch, tmp_path, "a")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))  # an empty docker config: no login yet
    run_cli("install", str(write_peft_adapter(tmp_path / "secret", MODULES)), "--name", "secret",
            "--version", "1.0.0")
    with OciRegistry(tmp_path / "auth-registry", users={"alice": "s3cret"}) as reg:
        url = reg.url("private/secret")
        assert "docker login" in one_line_error("push", "secret==1.0.0", url)
        monkeypatch.setenv("LORAMGR_OCI_USERNAME", "alice")
        monkeypatch.setenv("LORAMGR_OCI_PASSWORD", "wrong")
        assert "refused the credentials from LORAMGR_OCI_USERNAME" in one_line_error("push", "secret==1.0.0", url)
        monkeypatch.setenv("LORAMGR_OCI_PASSWORD", "s3cret")
        run_cli("push", "secret==1.0.0", url)
        monkeypatch.delenv("LORAMGR_OCI_USERNAME")
        monkeypatch.delenv("LORAMGR_OCI_PASSWORD")
        import base64

        (tmp_path / "docker").mkdir()
        (tmp_path / "docker" / "config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        use_home(monkeypatch, tmp_path, "b")
        assert json.loads(run_cli("install", f"{url}:1.0.0", "--json").output)["name"] == "secret"

        # a credential helper, asked the way docker asks it: the host on stdin, JSON on stdout
        helpers = tmp_path / "bin"
        helpers.mkdir()
        helper = helpers / "docker-credential-testhelper"
        answer = json.dumps({"ServerURL": reg.host, "Username": "alice", "Secret": "s3cret"})
        helper.write_text(f"#!/bin/sh\nread host\n[ \"$host\" = \"{reg.host}\" ] || exit 1\necho '{answer}'\n")
        helper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{helpers}:{os.environ['PATH']}")
        (tmp_path / "docker" / "config.json").write_text(json.dumps({"credHelpers": {reg.host: "testhelper"}}))
        use_home(monkeypatch, tmp_path, "c")
        assert json.loads(run_cli("install", f"{url}:1.0.0", "--json").output)["name"] == "secret"


def test_plain_http_only_for_loopback_or_insecure(monkeypatch) -> None:
    from loramgr.oci.reference import url_scheme

    assert url_scheme("127.0.0.1:5000", insecure=False) == "http"
    assert url_scheme("localhost:5000", insecure=False) == "http"
    assert url_scheme("[::1]:5000", insecure=False) == "http"
    assert url_scheme("registry.example.com", insecure=False) == "https"
    assert url_scheme("10.0.0.5:5000", insecure=False) == "https"
    assert url_scheme("10.0.0.5:5000", insecure=True) == "http"
    monkeypatch.setenv("LORAMGR_OCI_INSECURE", "10.0.0.5:5000")
    assert url_scheme("10.0.0.5:5000", insecure=False) == "http"
    error = one_line_error("list-remote", "oci://registry.invalid/team/x")
    assert "cannot reach https://registry.invalid/v2/" in error


def test_bad_oci_input_is_one_line(oci_registry, tmp_path, monkeypatch) -> None:
    use_home(monkeypatch, tmp_path, "a")
    assert "invalid repository name" in one_line_error("install", f"oci://{oci_registry.host}/Team/X:1")
    assert "names no tag or digest" in one_line_error("install", oci_registry.url("team/none"))
    assert "has no tag 9.9.9" in one_line_error("install", oci_registry.url("team/none") + ":9.9.9")
    assert "invalid manifest digest" in one_line_error("install", oci_registry.url("team/x") + "@sha256:abc")
    run_cli("install", str(write_peft_adapter(tmp_path / "x", MODULES)), "--name", "x")
    assert "cannot push to a digest" in one_line_error("push", "x", oci_registry.url("team/x") + "@sha256:" + "0" * 64)
    assert "no adapter named" in one_line_error("push", "nope", oci_registry.url("team/x"))
    assert run_cli("push", "x", "--tag", "t", code=2).exit_code == 2


def test_subject_links_the_base_artifact_with_the_referrers_tag_fallback(oci_registry, tmp_path, monkeypatch) -> None:
    base_files = tmp_path / "base-model"
    base_files.mkdir()
    (base_files / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    monkeypatch.chdir(base_files)
    oras_client(oci_registry).push(target=f"{oci_registry.host}/team/models:tiny-base", files=["config.json"])
    _, base_digest = manifest_of(oci_registry, "team/models", "tiny-base")

    use_home(monkeypatch, tmp_path, "a")
    run_cli("install", str(write_peft_adapter(tmp_path / "child", MODULES)), "--name", "child", "--version", "1.0.0")
    url = oci_registry.url("team/models")
    for _ in range(2):  # pushing under a second tag must not list the manifest twice
        run_cli("push", "child==1.0.0", f"{url}:child-1.0.0", "--tag", "child-latest",
                "--base-artifact", f"{url}:tiny-base")
    manifest, adapter_digest = manifest_of(oci_registry, "team/models", "child-1.0.0")
    assert manifest["subject"]["digest"] == base_digest
    assert manifest["annotations"]["io.loramgr.base.name"] == "tiny-base"
    # distribution 2.8 has no referrers API: the index lives under the tag sha256-<hex of the subject>
    index, _ = get_json(f"http://{oci_registry.host}/v2/team/models/manifests/sha256-{base_digest.split(':')[1]}",
                        accept="application/vnd.oci.image.index.v1+json")
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(adapter_digest, MODELPACK["artifact"])]
    kinds = {r["tag"]: r["kind"] for r in json.loads(run_cli("list-remote", url, "--json").output)}
    assert kinds[f"sha256-{base_digest.split(':')[1]}"] == "referrers" and kinds["child-1.0.0"] == "adapter"
    other = oci_registry.url("team/models").replace("127.0.0.1", "localhost")
    assert "not on" in one_line_error("push", "child==1.0.0", f"{url}:x", "--base-artifact", f"{other}:tiny-base")
