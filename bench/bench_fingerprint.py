"""Structural fingerprints read headers only: a multi-GB sharded checkpoint takes as long as a tiny one.

Writes a Llama-shaped sharded checkpoint of about ``--size-gb`` GB (real bytes on disk, zeros) plus a
tiny one into a temporary folder, then times:

- ``fingerprint_base_model`` (structural + dtype fingerprints, config, module list) on both;
- ``add_content_digests`` (sha256 of every byte) on the big one, for contrast.

Usage: python bench/bench_fingerprint.py [--size-gb 3] [--shards 4] [--repeat 5] [--dir /tmp]
The files are deleted at the end. Timings include the page cache state of this machine: the big
checkpoint was just written, so part of it is cached; the header reads touch a few KB per shard anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

from loramgr.compat.basemodel import add_content_digests, fingerprint_base_model

CHUNK = bytes(64 << 20)


def llama_layout(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
                                    "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = [hidden, hidden]
        shapes[f"{p}mlp.gate_proj.weight"] = [intermediate, hidden]
        shapes[f"{p}mlp.up_proj.weight"] = [intermediate, hidden]
        shapes[f"{p}mlp.down_proj.weight"] = [hidden, intermediate]
        shapes[f"{p}input_layernorm.weight"] = [hidden]
        shapes[f"{p}post_attention_layernorm.weight"] = [hidden]
    return shapes


def write_safetensors(path: Path, shapes: dict[str, list[int]], dtype: str = "BF16", itemsize: int = 2) -> int:
    """A valid safetensors file of zeros, written without torch (so the bench measures reading only)."""
    header, offset = {}, 0
    for name in sorted(shapes):
        size = itemsize
        for d in shapes[name]:
            size *= d
        header[name] = {"dtype": dtype, "shape": shapes[name], "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        left = offset
        while left:
            n = min(left, len(CHUNK))
            handle.write(CHUNK[:n])
            left -= n
    return 8 + len(raw) + offset


def write_sharded(folder: Path, shapes: dict[str, list[int]], shards: int) -> int:
    folder.mkdir(parents=True)
    names = sorted(shapes)
    weight_map, total = {}, 0
    per = -(-len(names) // shards)
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        total += write_safetensors(folder / file, {k: shapes[k] for k in part})
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return total


def evict(folder: Path) -> None:
    """Drop the files from the page cache (no root needed for one's own files), for a cold read."""
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn, repeat: int) -> float:  # noqa: ANN001
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: system temp)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="loramgr-bench-", dir=args.dir))
    try:
        hidden, intermediate, vocab = 2048, 5632, 32000  # TinyLlama-1.1B shapes, bf16
        per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
        layers = max(1, int((args.size_gb * 1e9 - 4 * vocab * hidden) // per_layer))
        start = time.perf_counter()
        big_bytes = write_sharded(root / "big", llama_layout(hidden, intermediate, layers, vocab), args.shards)
        write_s = time.perf_counter() - start
        tiny_bytes = write_sharded(root / "tiny", llama_layout(32, 64, 2, 128), 1)
        # the same number of tensors and shards as the big one, at tiny sizes: isolates bytes from tensor count
        same_bytes = write_sharded(root / "same", llama_layout(32, 64, layers, 128), args.shards)
        big = fingerprint_base_model(root / "big")
        print(f"disk: {root} ({shutil.disk_usage(root).free / 1e9:.0f} GB free)")
        print(f"big: {big_bytes / 1e9:.2f} GB in {args.shards} shards, {len(big.tensors)} tensors "
              f"(written in {write_s:.1f} s); tiny: {tiny_bytes / 1e3:.0f} KB, 1 file")
        t_big = timed(lambda: fingerprint_base_model(root / "big"), args.repeat)
        t_tiny = timed(lambda: fingerprint_base_model(root / "tiny"), args.repeat)
        t_same = timed(lambda: fingerprint_base_model(root / "same"), args.repeat)
        evict(root / "big")
        t_cold = timed(lambda: fingerprint_base_model(root / "big"), 1)
        print(f"structural fingerprint, median of {args.repeat} (warm cache): big {t_big * 1e3:.1f} ms, "
              f"same layout at {same_bytes / 1e6:.1f} MB {t_same * 1e3:.1f} ms, tiny {t_tiny * 1e3:.1f} ms")
        print(f"structural fingerprint, big, after evicting it from the page cache: {t_cold * 1e3:.1f} ms")
        start = time.perf_counter()
        add_content_digests(big)
        t_content = time.perf_counter() - start
        print(f"content digests (sha256 of every byte), big: {t_content:.1f} s "
              f"({big_bytes / 1e9 / t_content:.2f} GB/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
