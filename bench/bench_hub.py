"""Downloading a 500 MB adapter: ``loramgr.hub.download_adapter`` against a plain ``snapshot_download``.

The repository lives on the local test Hub (tests/hubserver.py), run in a child process so that the
server and the client do not share one interpreter lock. It holds adapter_config.json, README.md and a
~500 MB adapter_model.safetensors (rank-64 factors of Llama-2-7B-sized projections, float32).

Timed, each with a fresh huggingface_hub cache, median of ``--repeat`` runs:

- ``snapshot_download``: the client alone, the whole repository;
- ``download_adapter``: the same transfer restricted to adapter files, plus verification (every byte
  re-hashed against the Hub's blob id, and sha256 digests for the store);
- its verification step alone (re-hashing the cached files), so the transfer and the hashing can be
  told apart, and a second ``download_adapter`` of the same tag (cache hit: no file transferred).

The registry's "copy into the content-addressed store" step is not part of this layer; add its cost
separately. Results go to docs/benchmarks/hub.md (``--out``). Run: ``python bench/bench_hub.py``
(about a minute, 2 GB of temporary disk).
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

    from loramgr.hub import HubSource, _verify, download_adapter

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
            plain, ours, verify, cached = [], [], [], []
            # warm-up: the first request of a process pays for the HTTP session and imports
            snapshot_download(REPO_ID, revision="v1.0.0", endpoint=url, cache_dir=tmp / "warm", allow_patterns="*.json")
            for i in range(args.repeat):
                # alternate which goes first, and start each from a quiet disk (previous deletes flushed)
                for which in ("plain", "ours") if i % 2 == 0 else ("ours", "plain"):
                    cache = tmp / f"{which}-{i}"
                    os.sync()
                    if which == "plain":
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

    runs = {"plain": plain, "ours": ours, "verify": verify, "cached": cached}
    med = {k: statistics.median(v) for k, v in runs.items()}
    mb = size / 1e6
    rows = [
        ("`snapshot_download` (client alone)", "plain", True),
        ("`download_adapter` (transfer + verification)", "ours", True),
        ("  of which verification (sha1 + sha256 re-hash)", "verify", True),
        ("`download_adapter` again, same tag (cache hit)", "cached", False),
    ]
    table = ["| step | median s | min-max s | MB/s |", "|---|---|---|---|"]
    for name, key, rate in rows:
        spread = f"{min(runs[key]):.3f}-{max(runs[key]):.3f}"
        table.append(f"| {name} | {med[key]:.3f} | {spread} | {f'{mb / med[key]:.0f}' if rate else '-'} |")
    ratio = med["ours"] / med["plain"]
    machine = f"{platform.machine()}, {platform.python_version()}, {platform.system()}"
    text = "\n".join(
        [
            "# Hub download benchmark",
            "",
            f"`python bench/bench_hub.py` — {mb:.0f} MB adapter ({REPO_ID}, tag v1.0.0) from the local test Hub",
            f"(tests/hubserver.py, in a child process, over 127.0.0.1), fresh cache each run, median of {args.repeat}.",
            f"Machine: {machine}, {os.cpu_count()} CPUs. Transfers from a Python server are noisy on a shared",
            "machine: read the min-max column before the medians.",
            "",
            *table,
            "",
            f"Ratio `download_adapter` / `snapshot_download`: **{ratio:.2f}**.",
            "",
            "What `download_adapter` adds is verification: huggingface_hub only checks a download's",
            "size, loramgr re-hashes every byte against the blob id the Hub served (git sha1 for regular",
            "files, sha256 for LFS) and computes the sha256 digests the content-addressed store keys on.",
            "Not included: the registry's copy of the files into its store (one more read and write of the",
            "same bytes).",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
