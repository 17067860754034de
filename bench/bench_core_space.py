"""Benchmark of core-space merges (loramgr.merge.core_space) against PEFT 0.21's dense TIES / DARE-TIES.

One process, one run, Llama-2-7B shapes (hidden 4096, intermediate 11008; q, k, v, o, gate, up, down),
random factors held in memory (no files), float32:

1. two decoder layers (14 modules), two rank-16 adapters (alpha 32), weights 0.5 / 0.5, density 0.5,
   output rank 16: PEFT ``LoraModel.add_weighted_adapter(combination_type="ties_svd")`` and
   ``"dare_ties_svd"`` (``svd_full_matrices=False``; PEFT's default True is slower still) on a minimal
   module tree with those Linear shapes, against ``core_space.merge_module("ties" / "dare_ties")`` on
   the same factors. The two are different operators (the rule acts on the dense delta in one, on the
   R x R cores in the other), so the table gives the relative difference of the results for the record,
   not as an error;
2. all 32 layers (224 modules), four rank-16 adapters, weights 0.4 / 0.3 / 0.2 / 0.1, every core-space
   method (density 0.5 where used), exact result (rank 64), loramgr alone: seconds per method and the
   process's peak RSS;
3. the whole command as a user runs it: four rank-16 PEFT adapters of all 32 layers written to files
   and installed into a temporary registry (not timed), then ``loramgr combine a0 a1 a2 a3 --method ...
   --name ...`` as a subprocess per case (reading the store, merging, writing and registering the
   result): wall seconds and the child's peak RSS (from os.wait4's rusage), in float32 and bfloat16.

Usage: python bench/bench_core_space.py [--threads 2] [--skip-peft] [--command-only]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_merge import (
    SHAPES,
    Layers,
    merged_deltas,
    module_names,
    note,
    peak_rss_mb,
    relative_difference,
    write_adapter,
)

RANK, ALPHA, DENSITY = 16, 32.0, 0.5


def random_factors(layers: int, adapters: int, seed: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per adapter, module name -> (A, B), with B non-zero (a trained adapter, not PEFT's init)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(adapters):
        factors = {}
        for name, d_in, d_out in module_names(layers):
            a = torch.randn(RANK, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, RANK, generator=gen) / RANK**0.5
            factors[name] = (a, b)
        out.append(factors)
    return out


def core_merge(adapters, weights, method: str, rank: int | None) -> tuple[float, float, dict, list]:
    """Every module through core_space.merge_module; returns wall and CPU seconds, the merged factors
    and the kept energies."""
    import numpy as np

    from loramgr.merge import core_space
    from loramgr.merge.elementwise import module_seed

    scale = ALPHA / RANK
    merged, energies = {}, []
    start, cpu = time.perf_counter(), time.process_time()
    for name in adapters[0]:
        sources = [(f[name][0].numpy(), f[name][1].numpy(), scale) for f in adapters]
        generator = np.random.Generator(np.random.PCG64(module_seed(0, name)))
        result = core_space.merge_module(method, sources, weights, density=DENSITY, generator=generator, rank=rank)
        merged[name] = result
        energies.append(result.kept_energy)
    return time.perf_counter() - start, time.process_time() - cpu, merged, energies


def peft_merge(adapters, weights, combination: str) -> tuple[float, dict[str, torch.Tensor]]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(SHAPES), lora_dropout=0.0)
    model = get_peft_model(Layers(2), config, adapter_name="a0")
    names = [f"a{i}" for i in range(len(adapters))]
    for extra in names[1:]:
        model.add_adapter(extra, config)
    with torch.no_grad():
        for module_name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "a0" in module.lora_A:
                for adapter_name, factors in zip(names, adapters):
                    a, b = factors[module_name]
                    module.lora_A[adapter_name].weight.copy_(a)
                    module.lora_B[adapter_name].weight.copy_(b)
    torch.manual_seed(0)  # PEFT's DARE draws from the global generator
    start = time.perf_counter()
    model.base_model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination,
                                          density=DENSITY, svd_rank=RANK, svd_full_matrices=False)
    elapsed = time.perf_counter() - start
    return elapsed, merged_deltas(model)


#: the commands of part 3, as a user types them after ``loramgr combine a0 a1 a2 a3``
COMMANDS = [
    ["--method", "linear"],
    ["--method", "ties", "--density", "0.3"],
    ["--method", "ties", "--density", "0.3", "--rank", "16"],
    ["--method", "dare_ties", "--density", "0.5", "--seed", "7"],
    ["--method", "tsv"],
    ["--method", "iso_cts"],
    ["--method", "knots_ties", "--density", "0.3"],
]


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; its wall seconds, its own peak RSS in MB (os.wait4 reports the one child's
    rusage, so earlier children do not count) and its output."""
    with tempfile.TemporaryFile(mode="w+") as output:
        start = time.perf_counter()
        child = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({child.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text


def command_runs(layers: int) -> list[tuple[str, str, float, float, str]]:
    """Part 3: (dtype, command, wall s, peak RSS MB, the command's first output line) per case."""
    loramgr = str(Path(sys.executable).with_name("loramgr"))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        with tempfile.TemporaryDirectory(prefix="bench-core-command-") as tmp:
            root = Path(tmp)
            env = {**os.environ, "LORAMGR_HOME": str(root / "home")}
            names = [f"a{i}" for i in range(4)]
            for seed, name in enumerate(names, start=1):
                folder = write_adapter(root / name, layers, seed=seed, dtype=dtype)
                run_child([loramgr, "install", str(folder), "--name", name, "--version", "1.0.0"], env)
            dtype_name = str(dtype).removeprefix("torch.")
            for index, flags in enumerate(COMMANDS):
                args = [loramgr, "combine", *names, *flags, "--name", f"out{index}"]
                seconds, rss, text = run_child(args, env)
                command = " ".join(["loramgr combine a0 a1 a2 a3", *flags])
                note(f"{dtype_name}: {command}: {seconds:.2f} s, peak RSS {rss:.0f} MB")
                rows.append((dtype_name, command, seconds, rss, text.splitlines()[0]))
    return rows


def print_command_runs(rows: list[tuple[str, str, float, float, str]], layers: int) -> None:
    print(f"\n| whole command, {layers} layers, 4 x rank 16 (files in the store) | dtype | wall (s) "
          "| peak RSS (MB) | first line of its output |")
    print("|---|---|---:|---:|---|")
    for dtype, command, seconds, rss, first in rows:
        print(f"| `{command}` | {dtype} | {seconds:.2f} | {rss:.0f} | {first} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true", help="skip the (slow, ~10 min) PEFT runs")
    parser.add_argument("--command-only", action="store_true", help="run only part 3, the whole command")
    parser.add_argument("--layers", type=int, default=32, help="layers of part 3")
    args = parser.parse_args()
    if args.command_only:
        print_command_runs(command_runs(args.layers), args.layers)
        return
    torch.set_num_threads(args.threads)
    from loramgr.merge import core_space

    rows = []
    two = random_factors(2, 2, seed=1)
    core_merge(two, (0.5, 0.5), "ties", RANK)  # warm-up: the one-time linear-algebra initialisation
    for method, combination in (("ties", "ties_svd"), ("dare_ties", "dare_ties_svd")):
        ours_s, _, ours, energies = core_merge(two, (0.5, 0.5), method, RANK)
        note(f"core-space {method}, 2 layers: {ours_s:.3f} s")
        if args.skip_peft:
            rows.append((method, combination, ours_s, None, None, min(energies)))
            continue
        theirs_s, theirs = peft_merge(two, (0.5, 0.5), combination)
        note(f"PEFT {combination}, 2 layers: {theirs_s:.1f} s")
        ours_dense = {name: torch.from_numpy(f.b @ f.a) for name, f in ours.items()}
        rows.append((method, combination, ours_s, theirs_s, relative_difference(ours_dense, theirs), min(energies)))
        del theirs, ours_dense

    four = random_factors(32, 4, seed=2)
    baseline = peak_rss_mb()
    full = []
    for method in core_space.METHODS:
        seconds, cpu, merged, _ = core_merge(four, (0.4, 0.3, 0.2, 0.1), method, None)
        ranks = sorted({f.rank for f in merged.values()})
        full.append((method, seconds, cpu, ranks))
        note(f"core-space {method}, 32 layers x 4 adapters: {seconds:.2f} s (CPU {cpu:.2f} s)")
        del merged

    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads (PEFT), 1 thread (core space), "
          f"{platform.processor() or platform.machine()}, load average at the end {load[0]:.1f}\n")
    print("| 2 layers (14 modules), 2 x rank 16, density 0.5, to rank 16 | loramgr core space (s) "
          "| PEFT 0.21 (s) | speed-up | rel. diff of ΔW | min kept energy (core) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, combination, ours_s, theirs_s, diff, energy in rows:
        if theirs_s is None:
            print(f"| {method} vs {combination} | {ours_s:.3f} | - | - | - | {energy:.3f} |")
        else:
            print(f"| {method} vs {combination} | {ours_s:.3f} | {theirs_s:.1f} | {theirs_s / ours_s:,.0f}x "
                  f"| {diff:.2f} | {energy:.3f} |")
    print("\n| 32 layers (224 modules), 4 x rank 16, exact result | wall (s) | CPU (s) | output ranks |")
    print("|---|---:|---:|---|")
    for method, seconds, cpu, ranks in full:
        print(f"| {method} | {seconds:.2f} | {cpu:.2f} | {', '.join(map(str, ranks))} |")
    print(f"\npeak RSS {peak_rss_mb():.0f} MB (holding the 4 x 32-layer factors; {baseline:.0f} MB before the "
          f"32-layer merges)")
    print_command_runs(command_runs(args.layers), args.layers)


if __name__ == "__main__":
    main()
