"""Whole commands as users feel them: process start to exit, against ``python -c pass`` in the same run.

Every command runs as a real subprocess (``python -m loramgr ...``) against a temporary LORAMGR_HOME on
the default SQLite registry; the figure is the median of ``--repeat`` runs (after one warm-up run that
fills the page cache and writes the bytecode caches, as any installed package has them), with the peak
RSS of the process. Commands timed:

- ``--help``, ``list`` (with the adapters below installed), ``show``, ``tag``;
- ``install`` of a small PEFT adapter (two tiny modules, about 16 KB), a new name each run;
- ``combine --method svd --rank 16`` of two rank-16 adapters on 2 and on all 32 Llama-2-7B-shaped decoder layers
  (q, k, v, o, gate, up, down; float32), registered under a new name each run;
- ``export --format peft`` of the small adapter, and ``--format kohya`` of a small UNet adapter (kohya files
  are for diffusion models), to a new folder or file each run.

Targets (issue "A CLI that answers at once"): ``show``, ``list``, ``tag`` under 0.3 s; the whole
``combine --method svd`` of two 7B layers under 1 s. The report goes to docs/benchmarks/cli.md (``--out``).

Usage: python bench/bench_cli.py [--repeat 5] [--layers 32] [--out docs/benchmarks/cli.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

LORAMGR = [sys.executable, "-m", "loramgr"]
HIDDEN, INTERMEDIATE, RANK = 4096, 11008, 16
SHAPES = {"self_attn": {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
                        "o_proj": (HIDDEN, HIDDEN)},
          "mlp": {"gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
                  "down_proj": (INTERMEDIATE, HIDDEN)}}


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process, from start to reaped exit.

    The peak RSS comes from GNU time (``/usr/bin/time -f %M``), whose child is forked from a small process
    (a child forked from this one would count the benchmark's own pages); the wall time is measured
    around the command alone.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        command = ["/usr/bin/time", "-q", "-f", "%M", "-o", report.name, *cmd]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.decode().strip()}")
        return elapsed, int(report.read().split()[-1]) / 1024


def measure(make_cmd: Callable[[int], list[str]], env: dict[str, str], repeat: int) -> tuple[float, float, float]:
    """Median and best wall time, and the largest peak RSS, of ``repeat`` runs after one warm-up run."""
    run_once(make_cmd(-1), env)
    runs = [run_once(make_cmd(i), env) for i in range(repeat)]
    times = [t for t, _ in runs]
    return statistics.median(times), min(times), max(rss for _, rss in runs)


def write_small_adapter(folder: Path, *, unet: bool = False) -> Path:
    """A PEFT LoRA folder with two 64 x 64 modules at rank 8 (about 16 KB of float32): attention of a Llama
    layer, or with ``unet`` of a diffusers UNet block (kohya files are for diffusion models)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parent, leaves = (("down_blocks.0.attentions.0.transformer_blocks.0.attn1", ("to_q", "to_v")) if unet
                      else ("model.layers.0.self_attn", ("q_proj", "v_proj")))
    tensors = {}
    for leaf in leaves:
        key = f"base_model.model.{parent}.{leaf}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((8, 64), dtype=np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((64, 8), dtype=np.float32)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": list(leaves),
              "base_model_name_or_path": "bench-tiny-unet" if unet else "bench-tiny-llama",
              "task_type": None if unet else "CAUSAL_LM", "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def write_adapter(folder: Path, layers: int, seed: int) -> Path:
    """A PEFT LoRA folder with random rank-16 float32 factors on ``layers`` Llama-2-7B-shaped decoder layers."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for parent, leaves in SHAPES.items():
            for leaf, (d_in, d_out) in leaves.items():
                key = f"base_model.model.model.layers.{layer}.{parent}.{leaf}"
                tensors[f"{key}.lora_A.weight"] = rng.standard_normal((RANK, d_in), dtype=np.float32) / d_in**0.5
                tensors[f"{key}.lora_B.weight"] = rng.standard_normal((d_out, RANK), dtype=np.float32) / RANK**0.5
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK,
              "target_modules": sorted(leaf for leaves in SHAPES.values() for leaf in leaves),
              "base_model_name_or_path": "bench-llama-2-7b-shapes", "task_type": "CAUSAL_LM", "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def cli(env: dict[str, str], *args: str) -> None:
    subprocess.run([*LORAMGR, *args], env=env, check=True, stdout=subprocess.DEVNULL)


def bench(work: Path, repeat: int, layers: int) -> list[tuple[str, float, float, float]]:
    env = {**os.environ, "LORAMGR_HOME": str(work / "home"), "NO_COLOR": "1"}
    # PYTHONDONTWRITEBYTECODE would make every run compile loramgr's sources again: users run from .pyc files
    for variable in ("LORAMGR_DATABASE_URL", "HF_HUB_OFFLINE", "PYTHONDONTWRITEBYTECODE"):
        env.pop(variable, None)
    small = write_small_adapter(work / "small")
    cli(env, "install", str(small), "--name", "small")
    cli(env, "install", str(write_small_adapter(work / "small-unet", unet=True)), "--name", "small-unet")
    sources = {}
    for count in sorted({2, layers}):
        for seed in (1, 2):
            folder = write_adapter(work / f"seven-b-{count}-{seed}", count, seed)
            cli(env, "install", str(folder), "--name", f"l{count}-s{seed}")
        sources[count] = (f"l{count}-s1", f"l{count}-s2")

    rows: list[tuple[str, float, float, float]] = []

    def add(label: str, make_cmd: Callable[[int], list[str]]) -> None:
        median, best, rss = measure(make_cmd, env, repeat)
        rows.append((label, median, best, rss))
        print(f"{label}: {median:.3f} s (best {best:.3f} s), peak RSS {rss:.0f} MB", flush=True)

    add("python -c pass", lambda i: [sys.executable, "-c", "pass"])
    add("loramgr --help", lambda i: [*LORAMGR, "--help"])
    add("loramgr list", lambda i: [*LORAMGR, "list"])
    add("loramgr show small", lambda i: [*LORAMGR, "show", "small"])
    add("loramgr tag small stable", lambda i: [*LORAMGR, "tag", "small", f"stable{i + 1}"])
    add("loramgr install (16 KB adapter)", lambda i: [*LORAMGR, "install", str(small), "--name", f"small-{i + 1}"])
    for count, (a, b) in sources.items():
        add(f"loramgr combine --method svd, two adapters on {count} 7B layers",
            lambda i, a=a, b=b, count=count: [*LORAMGR, "combine", a, b, "--weights", "0.5,0.5", "--method", "svd",
                                              "--rank", "16", "--name", f"svd{count}-{i + 1}"])
    add("loramgr export --format peft (16 KB adapter)",
        lambda i: [*LORAMGR, "export", "small", str(work / f"out-peft-{i + 1}")])
    add("loramgr export --format kohya (16 KB UNet adapter)",
        lambda i: [*LORAMGR, "export", "small-unet", str(work / f"out-kohya-{i + 1}.safetensors"), "--format",
                   "kohya"])
    return rows


def render(rows: list[tuple[str, float, float, float]], repeat: int, layers: int) -> str:
    python = rows[0][1]
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    lines = [
        "# Whole commands: process start to exit",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} with `python bench/bench_cli.py --repeat {repeat} --layers {layers}` "
        f"on {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch_version}. "
        "Each command is a real `python -m loramgr` subprocess on the default SQLite registry in a temporary "
        "LORAMGR_HOME; the figure is the median (and best) of the runs after one warm-up, with the process's peak "
        "RSS. The 7B layers are Llama-2-7B shapes (4096 / 11008, q k v o gate up down) with rank-16 float32 factors.",
        "",
        "| command | median | best | minus `python -c pass` | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for label, median, best, rss in rows:
        over = "" if label == "python -c pass" else f"{median - python:.3f} s"
        lines.append(f"| `{label}` | {median:.3f} s | {best:.3f} s | {over} | {rss:.0f} MB |")
    lines += [
        "",
        "Targets: `show`, `list`, `tag` under 0.3 s; the whole `combine --method svd` of two 7B layers under 1 s.",
        "Merges run on numpy and the registry's commands on SQLite use the standard library's sqlite3: neither",
        "imports torch or SQLAlchemy, and neither do format conversions on export (the kohya row) or `check",
        "--values`. torch is imported where a torch model is involved (apply, fuse, hot-swap, a pickle",
        "conversion) and by full-space DARE's masks.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32, help="layers of the large combine (default 32)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs" / "benchmarks" / "cli.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loramgr-bench-cli-") as tmp:
        rows = bench(Path(tmp), args.repeat, args.layers)
    args.out.write_text(render(rows, args.repeat, args.layers))
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
