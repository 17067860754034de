"""Downloading a 500 MB adapter: ``loramgr.hub.client.download_adapter`` against a plain ``snapshot_download``.

The repository lives on the local test Hub (tests/hubserver.py), run in a child process so that the
server and the client do not share one interpreter lock. It holds adapter_config.json, README.md and a
~500 MB adapter_model.safetensors (rank-64 factors of Llama-2-7B-sized projections, float32).

Timed, each with a fresh huggingface_hub cache, median of ``--repeat`` runs:

- ``snapshot_download``: the client alone, the whole repository;
- ``download_adapter``: the same transfer restricted to adapter files, plus verification (every byte
  re-hashed against the Hub's blob id, and sha256 digests for the store);
- its verification step alone (re-hashing the cached files), so the transfer and the hashing can be
  told apart, and a second ``download_adapter`` of the same tag (cache hit: no file transferred).

- ``loramgr install hf://...`` end to end (``install_from_hub`` into a fresh registry, fresh cache):
  the download and its verification, the adapter's validation (every tensor read, NaN / Inf refused)
  and the copy into the content-addressed store (hash while streaming, fsync, rename). Its phases are
  timed by wrapping the functions it calls, and the disk it leaves behind is measured: the store, the
  huggingface_hub cache, and anything else (temporary files would show up there).

Results go to docs/benchmarks/hub.md (``--out``); notes written below its NOTES_MARKER line are kept.
Run: ``python bench/bench_hub.py`` (about three minutes, 3 GB of temporary disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test Hub lives with the tests
sys.path.insert(0, str(ROOT))
REPO_ID = "bench/adapter-500mb"
NOTES_MARKER = "<!-- hand-written notes: kept when bench_hub.py rewrites this file -->"
T = TypeVar("T")


def write_adapter(folder: Path, megabytes: int) -> Path:
    """A PEFT folder whose weights total about ``megabytes`` MB (rank-64 A/B pairs, 4096 x 4096)."""
    import torch
    from factories import write_peft_adapter

    per_module = 2 * 64 * 4096 * 4  # A and B, float32
    n_modules = max(1, megabytes * 1_000_000 // per_module)
    modules = {f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj": (4096, 4096, 64) for i in range(n_modules)}
    write_peft_adapter(folder, modules, dtype=torch.float32, base_model="meta-llama/Llama-2-7b-hf", readme="# bench\n")
    return folder


def serve(folder: Path) -> None:
    """Child process: seed the repository from ``folder``, print the URL, serve until stdin closes."""
    from hubserver import HubServer

    hub = HubServer(lifetime_s=3600).start()
    hub.seed(REPO_ID, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, tag="v1.0.0")
    print(json.dumps({"url": hub.url}), flush=True)
    sys.stdin.read()
    hub.stop()


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def disk_bytes(*roots: Path) -> int:
    """Bytes allocated on disk under ``roots``: regular files only (the cache's snapshot links are
    free), each inode once (a store blob hard-linked to a cache blob is one copy of the bytes)."""
    total, seen = 0, set()
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if not os.path.islink(os.path.join(dirpath, name)) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


class PhaseTimer:
    """Wraps module functions to add up the time spent in each (the phases of one install)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed_call(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        self._undo.append((owner, attr, original))
        setattr(owner, attr, timed_call)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def install_once(url: str, cache: Path, home: Path) -> tuple[float, dict[str, float], dict[str, int]]:
    """``loramgr install hf://REPO@v1.0.0`` into an empty registry at ``home`` with the cache ``cache``."""
    import loramgr.formats.peft as peft_format
    import loramgr.hub.client as hub_module
    import loramgr.installer as install_module
    import loramgr.store as store_module
    from loramgr.hub.install import install_from_hub
    from loramgr.installer import InstallOptions
    from loramgr.registry import Registry

    os.environ["HF_ENDPOINT"] = url  # read by loramgr when the install runs, as the CLI does
    os.environ["HF_HUB_CACHE"] = str(cache)
    registry = Registry.open(home)
    phases = PhaseTimer()
    phases.wrap(hub_module, "download_adapter", "download")
    phases.wrap(hub_module, "_verify_files", "verify")
    phases.wrap(install_module, "install_path", "store")
    phases.wrap(peft_format, "check_tensor_values", "validate")
    phases.wrap(store_module.BlobStore, "put_file", "copy")
    try:
        seconds, result = timed(partial(install_from_hub, registry, f"hf://{REPO_ID}@v1.0.0", InstallOptions()))
    finally:
        phases.restore()
        registry.close()
    assert result.created, result
    store, hf_cache = disk_bytes(home / "blobs"), disk_bytes(cache)
    disk = {"store": store, "cache": hf_cache, "other": disk_bytes(home) - store, "payload": result.size,
            "all": disk_bytes(home, cache)}
    return seconds, phases.seconds, disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "hub.md")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    from loramgr.hub.client import HubSource, _verify, download_adapter

    disable_progress_bars()  # neither side draws; bars would only add noise to the timings
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp_name:
        tmp = Path(tmp_name)
        folder = write_adapter(tmp / "adapter", args.megabytes)
        size = sum(p.stat().st_size for p in folder.iterdir())
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            url = json.loads(child.stdout.readline())["url"]  # type: ignore[union-attr]
            source = HubSource(REPO_ID, "v1.0.0", None)
            plain, ours, verify, cached, install = [], [], [], [], []
            phases: list[dict[str, float]] = []
            disk: dict[str, int] = {}
            # warm-up: the first request of a process pays for the HTTP session and imports
            snapshot_download(REPO_ID, revision="v1.0.0", endpoint=url, cache_dir=tmp / "warm", allow_patterns="*.json")
            for i in range(args.repeat):
                # alternate which goes first, and start each from a quiet disk (previous deletes flushed)
                order = ("plain", "ours", "install")
                for which in order[i % 3 :] + order[: i % 3]:
                    cache = tmp / f"{which}-{i}"
                    os.sync()
                    if which == "install":
                        seconds, spent, disk = install_once(url, cache, tmp / f"home-{i}")
                        install.append(seconds)
                        phases.append(spent)
                        shutil.rmtree(tmp / f"home-{i}")
                    elif which == "plain":
                        fetch = partial(snapshot_download, REPO_ID, revision="v1.0.0", endpoint=url, cache_dir=cache)
                        plain.append(timed(fetch)[0])
                    else:
                        seconds, got = timed(partial(download_adapter, source, cache_dir=cache, endpoint=url))
                        ours.append(seconds)
                        verify.append(timed(lambda g=got: [_verify(g.folder / f, source) for f in g.files])[0])
                        cached.append(timed(partial(download_adapter, source, cache_dir=cache, endpoint=url))[0])
                    shutil.rmtree(cache)
        finally:
            child.stdin.close()  # type: ignore[union-attr]
            child.wait(timeout=30)

    runs = {"plain": plain, "ours": ours, "verify": verify, "cached": cached, "install": install}
    for label in ("download", "verify", "store", "validate", "copy"):
        runs[f"phase-{label}"] = [p.get(label, 0.0) for p in phases]
    runs["phase-transfer"] = [p["download"] - p.get("verify", 0.0) for p in phases]
    runs["phase-other"] = [p["store"] - p.get("validate", 0.0) - p.get("copy", 0.0) for p in phases]
    med = {k: statistics.median(v) for k, v in runs.items()}
    mb = size / 1e6
    rows = [
        ("`snapshot_download` (client alone)", "plain", True),
        ("`download_adapter` (transfer + verification)", "ours", True),
        ("  of which verification (sha1 + sha256 re-hash)", "verify", True),
        ("`download_adapter` again, same tag (cache hit)", "cached", False),
        ("`loramgr install hf://...` end to end (fresh cache, empty registry)", "install", True),
        ("  transfer (huggingface_hub)", "phase-transfer", False),
        ("  verification against the Hub's hashes", "phase-verify", False),
        ("  validation (every tensor read, NaN / Inf check)", "phase-validate", False),
        ("  into the store (hard link + sha256; across file systems: copy, fsync, sha256)", "phase-copy", False),
        ("  the rest (config parsing, database)", "phase-other", False),
    ]
    table = ["| step | median s | min-max s | MB/s |", "|---|---|---|---|"]
    for name, key, rate in rows:
        spread = f"{min(runs[key]):.3f}-{max(runs[key]):.3f}"
        table.append(f"| {name} | {med[key]:.3f} | {spread} | {f'{mb / med[key]:.0f}' if rate else '-'} |")
    ratio = med["ours"] / med["plain"]
    install_ratio = med["install"] / med["plain"]
    # the ratio within each round, where plain and install ran minutes apart at most
    paired = statistics.median(a / b for a, b in zip(install, plain))
    overhead = med["install"] - med["phase-transfer"]

    def mbs(n: int) -> str:
        return f"{n / 1e6:.0f} MB"
    machine = f"{platform.machine()}, {platform.python_version()}, {platform.system()}"
    text = "\n".join(
        [
            "# Hub download and install benchmark",
            "",
            f"`python bench/bench_hub.py` — {mb:.0f} MB adapter ({REPO_ID}, tag v1.0.0) from the local test Hub",
            f"(tests/hubserver.py, in a child process, over 127.0.0.1), fresh cache each run, median of {args.repeat}.",
            f"Machine: {machine}, {os.cpu_count()} CPUs. Transfers from a Python server are noisy on a shared",
            "machine: read the min-max column before the medians.",
            "",
            *table,
            "",
            f"Ratio `download_adapter` / `snapshot_download`: **{ratio:.2f}**.",
            f"Ratio `loramgr install hf://` / `snapshot_download`: **{install_ratio:.2f}** (medians; the median of",
            f"the per-round ratios is {paired:.2f}). Target: at most 1.3.",
            "",
            f"Of the {overhead:.2f} s an install adds to the transfer, the copy into the store takes "
            f"{med['phase-copy']:.2f} s",
            f"and verification {med['phase-verify']:.2f} s (medians of the phases).",
            "",
            "## Disk",
            "",
            f"After one install of the {mbs(disk['payload'])} adapter: store {mbs(disk['store'])},",
            f"huggingface_hub cache {mbs(disk['cache'])}, everything else in LORAMGR_HOME (database, temporary",
            f"files) {mbs(disk['other'])}: {mbs(disk['all'])} in all, each file counted once "
            "(allocated blocks, snapshot links not counted).",
            "With the cache and LORAMGR_HOME on one file system, as here, the store's blobs are hard links to",
            "the verified cache blobs (huggingface_hub never rewrites a cached blob in place), so the bytes",
            "are on disk once; on two file systems the store copies them and they are on disk twice, never",
            "more: the download's temporary files are renamed into the cache, the store's into the store.",
            "",
            "## How to read the phases",
            "",
            "What `download_adapter` adds is verification: huggingface_hub only checks a download's",
            "size, loramgr re-hashes every byte against the blob id the Hub served (git sha1 for regular",
            "files, sha256 for LFS) and computes the sha256 digests the content-addressed store keys on.",
            "`loramgr install` then validates the adapter (scans every tensor's bytes, refuses NaN / Inf) and",
            "puts its files into the store: a hard link to the cache blob plus one sha256 pass over it (a",
            "kernel copy, fsync and sha256 across file systems). The phase rows add up the time spent inside",
            "each function during the install.",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written notes below NOTES_MARKER (analysis, experiments) survive a re-run
    previous = args.out.read_text() if args.out.exists() else ""
    notes = previous[previous.index(NOTES_MARKER) :] if NOTES_MARKER in previous else ""
    args.out.write_text(text + ("\n" + notes if notes else ""))
    print(text)


if __name__ == "__main__":
    main()
