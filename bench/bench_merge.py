"""Benchmark of loramgr's merge engine against PEFT's LoraModel.add_weighted_adapter.

Llama-2-7B shapes (hidden 4096, intermediate 11008), two rank-16 adapters on q, k, v, o, gate, up,
down, weights 0.5 / 0.5, float32. Prints a markdown table:

1. two decoder layers head to head: loramgr "svd" vs PEFT "svd" (svd_full_matrices=False), and
   loramgr "ties" in full space vs PEFT "ties_svd" (density 0.5), both to rank 16, with the relative difference of
   the resulting ΔW (||ΔW_loramgr - ΔW_peft||_F / ||ΔW_peft||_F over all modules);
2. all 32 layers, loramgr alone, "svd" to rank 16 in a subprocess: wall time and peak RSS.

``--scale`` runs instead the figures of the torch-free, streamed merge, each for this checkout and, with
``--before PATH``, for another checkout of loramgr (e.g. the commit before it):

3. peak RSS of the library step ``loramgr.merge.operations.combine(..., output=DIR)`` (svd to rank 16)
   over ``--layers`` layers of ``--shape`` (7b or 70b) shapes, in a fresh process that imports no torch
   itself;
4. whole-command wall time, process start to exit, of ``loramgr combine a b --method svd --rank 16
   --name m`` for 2 and ``--layers`` 7B layers, against ``python -c pass``, median of ``--repeat``.

Usage: python bench/bench_merge.py [--threads 2] [--skip-peft] [--layers 32]
       python bench/bench_merge.py --scale [--shape 7b|70b] [--layers 32] [--before /path/to/loramgr]
The adapter files are written to a temporary folder by the benchmark itself and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, RANK, ALPHA = 4096, 11008, 16, 32.0
PREFIX = "base_model.model."


def llama_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[str, int, int]]:
    """leaf -> (parent, in_features, out_features) of a Llama decoder layer."""
    return {
        "q_proj": ("self_attn", hidden, hidden),
        "k_proj": ("self_attn", hidden, kv),
        "v_proj": ("self_attn", hidden, kv),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, intermediate),
        "up_proj": ("mlp", hidden, intermediate),
        "down_proj": ("mlp", intermediate, hidden),
    }


SHAPES = llama_shapes(HIDDEN, INTERMEDIATE, HIDDEN)  # Llama-2-7B
SHAPES_BY_MODEL = {"7b": SHAPES, "70b": llama_shapes(8192, 28672, 1024)}  # Llama-2-70B: grouped-query k, v


def module_names(layers: int, shapes: dict[str, tuple[str, int, int]] = SHAPES) -> list[tuple[str, int, int]]:
    return [
        (f"model.layers.{i}.{parent}.{leaf}", d_in, d_out)
        for i in range(layers)
        for leaf, (parent, d_in, d_out) in shapes.items()
    ]


def write_adapter(folder: Path, layers: int, seed: int, dtype: torch.dtype = torch.float32,
                  shapes: dict[str, tuple[str, int, int]] = SHAPES) -> Path:
    """A PEFT LoRA folder with random factors (B non-zero) for the given number of layers."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, d_in, d_out in module_names(layers, shapes):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (torch.randn(RANK, d_in, generator=gen) / d_in**0.5).to(dtype)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (torch.randn(d_out, RANK, generator=gen) / RANK**0.5).to(dtype)
    config = {
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(shapes),
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": "bench-llama-2-7b-shapes", "revision": None, "bias": "none",
        "task_type": None, "lora_dropout": 0.0, "fan_in_fan_out": False, "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def load(folder: Path, label: str):  # -> LoraAdapter
    from loramgr.adapter import LoraAdapter
    from loramgr.formats.peft import read_peft_folder

    return LoraAdapter(read_peft_folder(folder), folder, label=label)


def loramgr_merge(folders: list[Path], method: str, density: float | None) -> tuple[float, dict[str, torch.Tensor]]:
    from loramgr.merge import MergeOptions, combine

    adapters = [load(f, f.name) for f in folders]
    # ties in full space, the same operator as PEFT's ties_svd (core space: bench_core_space.py)
    space = "full" if density is not None else None
    options = MergeOptions(method=method, weights=(0.5, 0.5), rank=RANK, density=density, space=space)
    start = time.perf_counter()
    merged = combine(adapters, options)
    elapsed = time.perf_counter() - start
    deltas = {}
    for report in merged.modules:
        a = merged.tensors[f"{PREFIX}{report.name}.lora_A.weight"]
        b = merged.tensors[f"{PREFIX}{report.name}.lora_B.weight"]
        deltas[report.name] = b @ a  # scale 1: baked into B
    return elapsed, deltas


class Layers(torch.nn.Module):
    """The minimal module tree PEFT needs: model.layers.<i>.{self_attn,mlp}.<leaf> Linear layers.

    Weights are left uninitialised (skip_init): add_weighted_adapter never reads them.
    """

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            layer = torch.nn.Module()
            layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
            for leaf, (parent, d_in, d_out) in SHAPES.items():
                linear = torch.nn.utils.skip_init(torch.nn.Linear, d_in, d_out, bias=False)
                setattr(getattr(layer, parent), leaf, linear)
            self.model.layers.append(layer)


def peft_merge(folders: list[Path], layers: int, combination: str, density: float | None):
    from peft import PeftModel

    model = PeftModel.from_pretrained(Layers(layers), str(folders[0]), adapter_name="a")
    model.load_adapter(str(folders[1]), adapter_name="b")
    kwargs = {"svd_rank": RANK, "svd_full_matrices": False}
    if density is not None:
        kwargs["density"] = density
    start = time.perf_counter()
    model.base_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "merged", combination_type=combination, **kwargs)
    elapsed = time.perf_counter() - start
    return elapsed, merged_deltas(model)


def merged_deltas(model) -> dict[str, torch.Tensor]:  # model: a PeftModel after add_weighted_adapter
    """ΔW of the adapter PEFT's add_weighted_adapter wrote as "merged", per module."""
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            deltas[name] = module.get_delta_weight("merged").detach()
    return deltas


def note(message: str) -> None:
    """Progress on stderr, so a long run can be followed in its log while the table waits for the end."""
    print(message, file=sys.stderr, flush=True)


def relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    num = sum(float((ours[k] - theirs[k]).double().square().sum()) for k in theirs)
    den = sum(float(theirs[k].double().square().sum()) for k in theirs)
    return (num / den) ** 0.5


def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM, which (unlike getrusage's ru_maxrss) starts afresh at exec,
    so the parent's memory does not leak into the child's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_full(folders: list[str], threads: int) -> None:
    """Run in a subprocess: merge every layer with svd, print time and peak RSS as JSON."""
    torch.set_num_threads(threads)
    from loramgr.merge import MergeOptions, combine

    baseline = peak_rss_mb()
    adapters = [load(Path(f), Path(f).name) for f in folders]
    start = time.perf_counter()
    merged = combine(adapters, MergeOptions(method="svd", weights=(0.5, 0.5), rank=RANK))
    elapsed = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        start_save = time.perf_counter()
        merged.save_pretrained(out)
        save_s = time.perf_counter() - start_save
    peak = peak_rss_mb()
    print(json.dumps({
        "seconds": elapsed, "save_seconds": save_s, "modules": len(merged.modules),
        "peak_rss_mb": peak, "rss_after_imports_mb": baseline,
    }))


STREAM_CHILD = """
import json, sys, time
from pathlib import Path
from loramgr.adapter import LoraAdapter
from loramgr.formats.peft import read_peft_folder
from loramgr.merge.operations import combine
from loramgr.merge.options import MergeOptions

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

folders, output = [Path(f) for f in sys.argv[1:3]], Path(sys.argv[3])
adapters = [LoraAdapter(read_peft_folder(f), f, label=f.name) for f in folders]
baseline = peak_mb()
start, cpu = time.perf_counter(), time.process_time()
combine(adapters, MergeOptions(method="svd", weights=(0.5, 0.5), rank=16), output=output)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                  "peak_rss_mb": peak_mb(), "after_imports_mb": baseline,
                  "torch": "torch" in sys.modules,
                  "output_mb": (output / "adapter_model.safetensors").stat().st_size / 2**20}))
"""


def checkout_env(checkout: Path, home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    if home is not None:
        env["LORAMGR_HOME"] = str(home)
    return env


def stream_peak(checkout: Path, folders: list[Path], output: Path) -> dict[str, float]:
    """Part 3 in a fresh process running ``checkout``'s code."""
    done = subprocess.run([sys.executable, "-c", STREAM_CHILD, *map(str, folders), str(output)],
                          env=checkout_env(checkout), cwd=output.parent, check=True, capture_output=True, text=True)
    shutil.rmtree(output, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``command``, process start to exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def command_times(checkout: Path, folders: dict[int, list[Path]], root: Path,
                  repeat: int) -> dict[str, tuple[float, float]]:
    """Part 4: ``loramgr combine --method svd`` per layer count, and ``python -c pass``: median wall and
    CPU seconds."""
    loramgr = [sys.executable, "-c", "from loramgr.cli.main import main; main()"]
    # every child runs in ``root``: ``python -c`` puts its working directory first on sys.path
    out = {"python -c pass": medians([timed([sys.executable, "-c", "pass"], dict(os.environ), root)
                                      for _ in range(repeat)])}
    for layers, (a, b) in folders.items():
        home = root / f"home-{checkout.name}-{layers}"
        env = checkout_env(checkout, home)
        for folder, name in ((a, "a"), (b, "b")):
            subprocess.run([*loramgr, "install", str(folder), "--name", name], env=env, cwd=root, check=True,
                           capture_output=True)
        runs = [timed([*loramgr, "combine", "a", "b", "--method", "svd", "--rank", "16", "--name", f"m{i}"], env, root)
                for i in range(repeat)]
        out[f"combine --method svd, {layers} layers"] = medians(runs)
        shutil.rmtree(home, ignore_errors=True)
    return out


def scale_main(args: argparse.Namespace) -> None:
    here = Path(__file__).resolve().parent.parent
    checkouts = {"this checkout": here} | ({"before": Path(args.before).resolve()} if args.before else {})
    shapes = SHAPES_BY_MODEL[args.shape]
    with tempfile.TemporaryDirectory(prefix="bench-merge-scale-") as tmp:
        root = Path(tmp)
        big = [write_adapter(root / f"{args.shape}-{s}", args.layers, seed=s, shapes=shapes) for s in (1, 2)]
        peaks = {label: stream_peak(path, big, root / "out") for label, path in checkouts.items()}
        note(f"peaks: {peaks}")
        for folder in big:
            shutil.rmtree(folder)
        folders = {n: [write_adapter(root / f"7b-{n}-{s}", n, seed=s) for s in (1, 2)] for n in (2, args.layers)}
        times = {label: command_times(path, folders, root, args.repeat) for label, path in checkouts.items()}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print(f"svd to rank 16 of two rank-16 adapters, {args.layers} {args.shape}-shaped layers, into a folder:\n")
    print("| code | merge wall (s) | merge CPU (s) | peak RSS (MB) | after imports (MB) | output (MB) | torch |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, run in peaks.items():
        print(f"| {label} | {run['seconds']:.2f} | {run['cpu_seconds']:.2f} | {run['peak_rss_mb']:.0f} | "
              f"{run['after_imports_mb']:.0f} | {run['output_mb']:.0f} | {'yes' if run['torch'] else 'no'} |")
    print(f"\nwhole commands, median of {args.repeat}, process start to exit (wall s / CPU s):\n")
    print("| command | " + " | ".join(checkouts) + " |")
    print("|---|" + "---:|" * len(checkouts))
    for command in next(iter(times.values())):
        cells = [f"{times[label][command][0]:.2f} / {times[label][command][1]:.2f}" for label in checkouts]
        print(f"| {command} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32, help="layers of the loramgr-only run")
    parser.add_argument("--skip-peft", action="store_true", help="skip the (slow, ~10 min) PEFT runs")
    parser.add_argument("--scale", action="store_true", help="the streamed-merge figures (parts 3 and 4)")
    parser.add_argument("--shape", choices=sorted(SHAPES_BY_MODEL), default="7b", help="layer shapes of part 3")
    parser.add_argument("--before", help="another loramgr checkout to measure parts 3 and 4 against")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_full(args.child, args.threads)
        return
    if args.scale:
        scale_main(args)
        return
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = Path(tmp)
        small = [write_adapter(root / f"two-layers-{s}", 2, seed=s) for s in (1, 2)]
        svd_s, svd_ours = loramgr_merge(small, "svd", None)
        note(f"loramgr svd, 2 layers: {svd_s:.3f} s")
        ties_s, ties_ours = loramgr_merge(small, "ties", 0.5)
        note(f"loramgr ties, 2 layers: {ties_s:.3f} s")
        if not args.skip_peft:
            peft_svd_s, svd_peft = peft_merge(small, 2, "svd", None)
            note(f"PEFT svd, 2 layers: {peft_svd_s:.1f} s")
            rows.append(("2 layers, svd to rank 16", svd_s, peft_svd_s, relative_difference(svd_ours, svd_peft)))
            del svd_peft
            peft_ties_s, ties_peft = peft_merge(small, 2, "ties_svd", 0.5)
            note(f"PEFT ties_svd, 2 layers: {peft_ties_s:.1f} s")
            rows.append(("2 layers, ties density 0.5 to rank 16", ties_s, peft_ties_s,
                         relative_difference(ties_ours, ties_peft)))
        else:
            rows.append(("2 layers, svd to rank 16", svd_s, None, None))
            rows.append(("2 layers, ties density 0.5 to rank 16", ties_s, None, None))
        full = [write_adapter(root / f"full-{s}", args.layers, seed=s) for s in (1, 2)]
        child = subprocess.run(
            [sys.executable, __file__, "--threads", str(args.threads), "--child", *map(str, full)],
            check=True, capture_output=True, text=True,
        )
        full_run = json.loads(child.stdout.strip().splitlines()[-1])

    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}\n")
    print("| case | loramgr (s) | PEFT 0.21 (s) | speed-up | rel. diff of ΔW |")
    print("|---|---:|---:|---:|---:|")
    for case, ours, theirs, diff in rows:
        if theirs is None:
            print(f"| {case} | {ours:.3f} | - | - | - |")
        else:
            print(f"| {case} | {ours:.3f} | {theirs:.1f} | {theirs / ours:,.0f}x | {diff:.2e} |")
    print(f"\n{args.layers} layers ({full_run['modules']} modules), loramgr svd to rank 16: "
          f"{full_run['seconds']:.2f} s (+{full_run['save_seconds']:.2f} s to save), "
          f"peak RSS {full_run['peak_rss_mb']:.0f} MB (after imports {full_run['rss_after_imports_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
