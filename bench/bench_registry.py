"""The registry's own speed: everyday commands, 100,000 versions of one name, gc, a big install.

- everyday: ``show``, ``list``, ``tag``, ``remove --dry-run``, ``gc --dry-run`` and ``--help`` on a small
  registry, and ``list`` on a new home (which creates the registry), each against ``python -c pass`` in
  the same rounds. Target: under 0.3 s, process start to exit.
- one name: ``--versions`` versions of one adapter, inserted straight into the database with plain SQL;
  ``show NAME``, ``show NAME==VERSION``, ``install`` of a new version, ``list`` and ``list --json``, and
  ``Registry.resolve`` in-process. Target: show, resolve and install under 0.3 s.
- gc: ``loramgr gc`` (and the library's ``execute_gc``) of ``--orphans`` orphan blobs against
  ``find -delete`` of the same tree. Target: within 1.5x.
- install: ``loramgr install`` of a PEFT folder whose weights are about ``--size-gb`` GB, against
  ``sha256sum`` + ``cp`` of the same weights file (the least any content-addressed copy must do).
  Both run as real commands, each after dropping the page cache when this process may
  (``/proc/sys/vm/drop_caches``, root only); otherwise both run warm and the report says so.
  Target: install at most 1.5x the baseline.

Every figure is the median of ``--repeat`` runs (the best is shown too), against temporary
LORAMGR_HOMEs deleted at the end. The report goes to docs/benchmarks/registry.md (``--out``).

Usage: python bench/bench_registry.py [--size-gb 1] [--versions 100000] [--orphans 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

LORAMGR = [sys.executable, "-m", "loramgr"]


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str] | str, env: dict[str, str], *, cold: bool, reset=None) -> float:  # type: ignore[no-untyped-def]
    if reset:
        reset()
    if cold:
        drop_caches()
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_of(repeat: int, fn) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn() for _ in range(repeat))


def write_big_adapter(folder: Path, size_gb: float) -> Path:
    """A valid PEFT folder: rank-64 factors on 4096 x 11008 MLP-like modules until size_gb of float32."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    d_in, d_out, rank = 4096, 11008, 64
    per_module = rank * (d_in + d_out) * 4
    n = max(1, round(size_gb * 2**30 / per_module))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n):
        key = f"base_model.model.model.layers.{i}.mlp.up_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["up_proj"],
              "base_model_name_or_path": "bench-base", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def bench_install(work: Path, env: dict[str, str], size_gb: float, repeat: int) -> dict[str, object]:
    """Baseline and install alternate within each round, so load from other jobs hits both alike."""
    adapter = write_big_adapter(work / "big-adapter", size_gb)
    weights = adapter / "adapter_model.safetensors"
    home = Path(env["LORAMGR_HOME"])
    cold = drop_caches()
    copy = work / "copy.safetensors"
    install = [*LORAMGR, "install", str(adapter), "--name", "big", "--version", "1"]

    def reset_copy() -> None:
        copy.unlink(missing_ok=True)

    def reset_home() -> None:
        shutil.rmtree(home, ignore_errors=True)

    runs: dict[str, list[float]] = {"baseline": [], "baseline_sync": [], "install": [], "reinstall": []}
    for _ in range(repeat):
        runs["baseline"].append(timed(f"sha256sum '{weights}' > /dev/null && cp '{weights}' '{copy}'", env,
                                      cold=cold, reset=reset_copy))
        runs["install"].append(timed(install, env, cold=cold, reset=reset_home))
        runs["reinstall"].append(timed(install, env, cold=cold))
        runs["baseline_sync"].append(timed(f"sha256sum '{weights}' > /dev/null && cp '{weights}' '{copy}' "
                                           f"&& sync '{copy}'", env, cold=cold, reset=reset_copy))
    reset_copy()
    result: dict[str, object] = {"bytes": weights.stat().st_size, "cold": cold}
    for key, values in runs.items():
        result[key] = statistics.median(values)
        result[f"{key}_min"] = min(values)
    return result


def register_versions(home: Path, count: int, *, per_adapter: int, start: int = 0) -> None:
    """Insert ``count`` versions (``per_adapter`` per name, 3 modules and 2 files each) straight into the
    database with plain SQL: the real install path is timed separately."""
    from loramgr.adapter import AdapterInfo, ModuleSpec
    from loramgr.registry import Registry
    from loramgr.registry.database import Json
    from registry_schema.version_key import version_key

    registry = Registry.open(home)
    now = datetime.now(UTC)
    specs = [ModuleSpec(f"model.layers.{m}.self_attn.q_proj", 16, 32.0, 4096, 4096, "a", "b") for m in range(3)]
    info = AdapterInfo("peft", "lora", specs, "adapter_model.safetensors", rank=16, alpha=32.0,
                       base_model="meta-llama/Llama-2-7b-hf", n_params=3 * 16 * 8192).to_record()
    adapters, versions, files, modules, tags = [], [], [], [], []
    for i in range(start, start + count):
        adapter_id, version_id = i // per_adapter + 1, i + 1
        if i % per_adapter == 0:
            adapters.append({"id": adapter_id, "name": f"adapter-{adapter_id:05d}",
                             "display_name": f"adapter-{adapter_id:05d}", "created_at": now})
            tags.append({"adapter_id": adapter_id, "tag": "stable", "version_id": version_id})
        n = i % per_adapter
        version = f"{n // 1000}.{n // 10 % 100}.{n % 10}"
        digest = f"sha256:{i:064x}"
        versions.append({
            "id": version_id, "adapter_id": adapter_id, "version": version, "version_key": version_key(version),
            "digest": digest, "format": "peft", "adapter_type": "lora", "rank": 16, "alpha": 32.0,
            "use_rslora": False, "use_dora": False, "base_model_name": "meta-llama/Llama-2-7b-hf", "n_modules": 3,
            "n_params": 3 * 16 * 8192, "size": 1_000_000 + i, "source": f"/runs/{i}", "source_details": Json({}),
            "info": Json(info), "installed_at": now,
        })
        files += [{"version_id": version_id, "path": p, "digest": digest, "size": 1000}
                  for p in ("adapter_config.json", "adapter_model.safetensors")]
        modules += [{"version_id": version_id, "name": f"model.layers.{m}.self_attn.q_proj", "kind": "linear",
                     "rank": 16, "alpha": 32.0, "in_features": 4096, "out_features": 4096, "dtype": "float32"}
                    for m in range(3)]
    with registry.transaction() as tx:
        for table, rows in (("adapters", adapters), ("versions", versions), ("files", files), ("modules", modules),
                            ("tags", tags)):
            columns = list(rows[0])
            tx.execute_many(f"INSERT INTO {table} ({', '.join(columns)}) "
                            f"VALUES ({', '.join(':' + c for c in columns)})", rows)
    registry.close()


def small_adapter(folder: Path, seed: int) -> Path:
    """A tiny valid PEFT folder (one 16x16 rank-4 module), different bytes for each seed."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({
        f"{key}.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
        f"{key}.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32),
    }, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "base_model_name_or_path": "bench-base", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def commands_vs_python(commands: dict[str, list[str]], env: dict[str, str], repeat: int,
                       reset=None) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Median and best wall time of each whole command, alternating with ``python -c pass`` in every round."""
    runs: dict[str, list[float]] = {label: [] for label in ["python -c pass", *commands]}
    for args in commands.values():
        if reset:
            reset()
        timed([*LORAMGR, *args], env, cold=False)  # warm the page cache once
    for _ in range(repeat):
        runs["python -c pass"].append(timed([sys.executable, "-c", "pass"], env, cold=False))
        for label, args in commands.items():
            runs[label].append(timed([*LORAMGR, *args], env, cold=False, reset=reset))
    return {label: (statistics.median(v), min(v)) for label, v in runs.items()}


def bench_everyday(work: Path, env: dict[str, str], repeat: int) -> dict[str, tuple[float, float]]:
    """Whole commands on a small registry (three adapters), each against ``python -c pass``."""
    home = work / "everyday-home"
    env = dict(env, LORAMGR_HOME=str(home))
    for seed, name in enumerate(["sql-chat", "style", "summary"]):
        subprocess.run([*LORAMGR, "install", str(small_adapter(work / f"small-{seed}", seed)), "--name", name],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*LORAMGR, "install", str(small_adapter(work / "small-9", 9)), "--name", "old"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*LORAMGR, "remove", "old"], env=env, check=True, stdout=subprocess.DEVNULL)  # orphans for gc
    commands = {
        "--help": ["--help"], "list": ["list"], "show sql-chat": ["show", "sql-chat"],
        "tag sql-chat stable": ["tag", "sql-chat", "stable"],
        "remove style --dry-run": ["remove", "style", "--dry-run"],
        "gc --dry-run": ["gc", "--dry-run"],
    }
    result = commands_vs_python(commands, env, repeat)
    empty = work / "empty-home"

    def new_home() -> None:
        shutil.rmtree(empty, ignore_errors=True)

    fresh = commands_vs_python({"list (new home: creates the registry)": ["list"]},
                               dict(env, LORAMGR_HOME=str(empty)), repeat, reset=new_home)
    result.update((k, v) for k, v in fresh.items() if k != "python -c pass")
    return result


def bench_one_name(work: Path, env: dict[str, str], count: int, repeat: int) -> dict[str, tuple[float, float]]:
    """``count`` versions of one name: show, resolve, install and list, as whole commands and in-process."""
    home = work / "one-name-home"
    env = dict(env, LORAMGR_HOME=str(home))
    register_versions(home, count, per_adapter=count)
    name = "adapter-00001"
    out = subprocess.run([*LORAMGR, "list", name], env=env, check=True, capture_output=True, text=True).stdout
    assert len(out.splitlines()) == count + 2, "list did not print every version"
    middle = f"{count // 2 // 1000}.{count // 2 // 10 % 100}.{count // 2 % 10}"
    commands = {f"show {name}": ["show", name], f"show {name}=={middle}": ["show", f"{name}=={middle}"],
                f"list ({count:,} versions)": ["list"], "list --json": ["list", "--json"]}
    result = commands_vs_python(commands, env, repeat)
    installs = [small_adapter(work / f"new-{i}", 100 + i) for i in range(repeat + 1)]
    runs = [timed([*LORAMGR, "install", str(folder), "--name", name], env, cold=False) for folder in installs]
    result[f"install --name {name} (a new version)"] = (statistics.median(runs[1:]), min(runs[1:]))
    code = ("import time; from loramgr.registry import Registry; r = Registry.open(); t = time.perf_counter(); "
            f"[r.resolve(ref) for ref in ('{name}', '{name}=={middle}', '{name}@stable')]; "
            "print((time.perf_counter() - t) / 3)")
    inner = [float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                  text=True).stdout) for _ in range(repeat)]
    result["Registry.resolve (in-process, per reference)"] = (statistics.median(inner), min(inner))
    return result


def make_orphans(blob_dir: Path, count: int) -> None:
    for i in range(count):
        hexdigest = hashlib.sha256(str(i).encode()).hexdigest()
        folder = blob_dir / hexdigest[:2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / hexdigest).write_bytes(b"")


def bench_gc(work: Path, env: dict[str, str], count: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Deleting ``count`` orphan blobs: ``loramgr gc`` and the library's execute_gc against ``find -delete``."""
    home = work / "gc-home"
    env = dict(env, LORAMGR_HOME=str(home))
    subprocess.run([*LORAMGR, "install", str(small_adapter(work / "gc-kept", 1)), "--name", "kept"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    blob_dir = home / "blobs" / "sha256"
    plain = work / "plain" / "blobs"
    code = "from loramgr.registry import Registry, execute_gc; execute_gc(Registry.open())"
    runs: dict[str, list[float]] = {"find -delete": [], "loramgr gc": [], "execute_gc (library)": [],
                                    "loramgr gc --dry-run": []}
    for _ in range(repeat):
        make_orphans(plain, count)
        runs["find -delete"].append(timed(["find", str(plain), "-type", "f", "-delete"], env, cold=False))
        make_orphans(blob_dir, count)
        runs["loramgr gc --dry-run"].append(timed([*LORAMGR, "gc", "--dry-run"], env, cold=False))
        runs["loramgr gc"].append(timed([*LORAMGR, "gc"], env, cold=False))
        make_orphans(blob_dir, count)
        runs["execute_gc (library)"].append(timed([sys.executable, "-c", code], env, cold=False))
    assert sum(1 for _ in blob_dir.glob("*/*")) == 2, "gc left orphans or deleted the kept version's blobs"
    return {label: (statistics.median(v), min(v)) for label, v in runs.items()}


def bench_startup(env: dict[str, str], repeat: int) -> dict[str, float]:
    python = median_of(repeat, lambda: timed([sys.executable, "-c", "pass"], env, cold=False))
    sqlalchemy = median_of(repeat, lambda: timed([sys.executable, "-c", "import sqlalchemy.orm"], env, cold=False))
    registry = median_of(repeat, lambda: timed([sys.executable, "-c", "import loramgr.registry.core"], env,
                                               cold=False))
    return {"python": python, "sqlalchemy": sqlalchemy, "registry": registry}


FINDINGS = [
    "## Findings",
    "",
    "- The NaN / Inf check reads the data section once through mmap and tests the exponent bits with numpy in "
    "4 Mi-element chunks (0.1-0.4 s per GB, every float dtype including bfloat16 and float8); install does not "
    "import torch (only `--allow-pickle` does). Loading every tensor and calling `torch.isfinite` instead made "
    "install 5.9x the baseline.",
    "- Blobs are copied into the store in the kernel (`copy_file_range`), fsynced, and hashed from the written copy "
    "(page-cached), so the digest describes exactly the stored bytes. The earlier Python loop that hashed while "
    "writing through 8 MiB buffers took about 6x as long for the copy.",
    "- Every registry query is plain SQL run through one small connection layer "
    "(`loramgr/registry/database.py`): the standard library's sqlite3 for the default SQLite registry, "
    "SQLAlchemy only for another database URL (PostgreSQL) and for migrations. So no everyday command imports "
    "SQLAlchemy (tests/test_registry_scale.py checks it), whose import alone costs the figure shown below. "
    "Before this, `show`, `tag`, `remove` and `gc --dry-run` took about 0.7 s each on a tiny registry.",
    "- A new registry is created from the head schema in one transaction (`registry_schema/sqlite_head.py`, "
    "checked against the migrations by tests/test_schema.py); running every alembic migration took 1-2.5 s.",
    "- `versions.version_key` (migration 0003) stores each version as digits that sort in PEP 440 order, so "
    "`NAME` and `NAME==VERSION` are one indexed lookup and only the chosen version's JSON record is read: "
    "before, `show` of a name with 100,000 versions loaded every version row and its JSON (22 s, 1.15 GB), "
    "and `list` parsed every version string to sort (3-4 s).",
    "- gc lists each blob folder once, takes one set difference with the referenced digests, stats only the "
    "orphans (relative to the open folder) and unlinks them with `unlinkat`, folders in parallel threads: no "
    "query, path walk or Path object per blob (13 s for 100,000 orphans before). The unlinks alone cost what "
    "`find -delete` costs; the listing and the stat for the bytes freed are the rest. `loramgr gc` names the first "
    "10 files and counts the rest (`--verbose` names all); the rest of its figure over the library call is the "
    "process's start-up and imports.",
    "",
]


def table(rows: dict[str, tuple[float, float]], floor: float | None = None) -> list[str]:
    head = ["| command | median s | best s |" + (" median - python |" if floor is not None else ""),
            "|---|---:|---:|" + ("---:|" if floor is not None else "")]
    return head + [f"| `{label}` | {median:.3f} | {best:.3f} |" + (f" {median - floor:.3f} |" if floor is not None
                                                                      else "")
                   for label, (median, best) in rows.items()]


def render(args: argparse.Namespace, install: dict[str, object], everyday: dict[str, tuple[float, float]],
           one_name: dict[str, tuple[float, float]], gc: dict[str, tuple[float, float]],
           startup: dict[str, float]) -> str:
    gb = install["bytes"] / 2**30  # type: ignore[operator]
    ratio = install["install"] / install["baseline"]  # type: ignore[operator]
    ratio_sync = install["install"] / install["baseline_sync"]  # type: ignore[operator]
    cache = ("page cache dropped before every run (`sync; echo 3 > /proc/sys/vm/drop_caches`)" if install["cold"]
             else "page cache NOT dropped (not root): every run is warm")
    floor = everyday["python -c pass"][0]
    find = gc["find -delete"][0]
    lines = [
        "# Registry benchmarks",
        "",
        f"Produced by `python bench/bench_registry.py --size-gb {args.size_gb} --versions {args.versions} "
        f"--orphans {args.orphans} --repeat {args.repeat}` on {datetime.now(UTC):%Y-%m-%d}.",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}. Median of {args.repeat} runs of the real CLI in a subprocess "
        "(process start to exit); "
        f"load average {os.getloadavg()[0]:.1f} when the report was written; on a shared machine single runs "
        "move by up to 2x, and the best of the runs is the least disturbed figure.",
        "",
        "## Everyday commands on a small registry",
        "",
        "Three adapters on the default SQLite registry; `python -c pass` runs in the same rounds.",
        "",
        *table(everyday, floor),
        "",
        "Target: `show`, `list`, `tag`, `remove`, `gc --dry-run` under 0.3 s, process start to exit.",
        "",
        f"## {args.versions:,} versions of one name",
        "",
        "The versions are inserted with plain SQL (the install path is timed below and above).",
        "",
        *table(one_name, floor),
        "",
        "Target: `show`, resolve and install under 0.3 s; `list` fast.",
        "",
        f"## gc of {args.orphans:,} orphan blobs",
        "",
        "Each run deletes a freshly made tree of empty blobs beside one installed version.",
        "",
        "| what | median s | best s | median vs find -delete |",
        "|---|---:|---:|---:|",
        *(f"| `{label}` | {median:.2f} | {best:.2f} | {median / find:.2f}x |" for label, (median, best) in gc.items()),
        "",
        "Target: within 1.5x of `find -delete`.",
        "",
        f"## Install of a {gb:.2f} GB adapter",
        "",
        f"{cache}.",
        "",
        "| what | median s | best s | median vs sha256sum + cp |",
        "|---|---:|---:|---:|",
        f"| `sha256sum` + `cp` of the weights file | {install['baseline']:.2f} | {install['baseline_min']:.2f} "
        "| 1.00x |",
        f"| `sha256sum` + `cp` + `sync` (durable, as install is) | {install['baseline_sync']:.2f} | "
        f"{install['baseline_sync_min']:.2f} | {install['baseline_sync'] / install['baseline']:.2f}x |",  # type: ignore[operator]
        f"| `loramgr install` (new version) | {install['install']:.2f} | {install['install_min']:.2f} | "
        f"**{ratio:.2f}x** ({ratio_sync:.2f}x the durable baseline; best vs best "
        f"{install['install_min'] / install['baseline_min']:.2f}x) |",  # type: ignore[operator]
        f"| `loramgr install` again (same bytes, same version: validate + hash only) | {install['reinstall']:.2f} | "
        f"{install['reinstall_min']:.2f} | {install['reinstall'] / install['baseline']:.2f}x |",  # type: ignore[operator]
        "",
        "Target: at most 1.5x sha256sum + cp. What install does beyond the baseline: Python and library start-up, "
        "scanning every tensor's bytes once to refuse NaN / Inf, fsync of each blob and its folder, the database "
        "commit.",
        "",
        "## Imports",
        "",
        "| command | seconds |",
        "|---|---:|",
        f"| `python -c pass` (the floor) | {startup['python']:.3f} |",
        f"| `python -c 'import sqlalchemy.orm'` (no everyday command pays it) | {startup['sqlalchemy']:.3f} |",
        f"| `python -c 'import loramgr.registry.core'` | {startup['registry']:.3f} |",
        "",
        *FINDINGS,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--versions", type=int, default=100_000, help="versions of one name")
    parser.add_argument("--orphans", type=int, default=100_000, help="orphan blobs for gc")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: the system temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs/benchmarks/registry.md")
    parser.add_argument("--skip-install", action="store_true", help="everything but the big install")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="loramgr-bench-", dir=args.dir))
    env = dict(os.environ, LORAMGR_HOME=str(work / "home"))
    env.pop("LORAMGR_DATABASE_URL", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users run from .pyc files, not a fresh compile of every module
    try:
        startup = bench_startup(env, max(args.repeat, 5))
        print(f"imports: {startup}", flush=True)
        everyday = bench_everyday(work, env, max(args.repeat, 5))
        print(f"everyday: {everyday}", flush=True)
        one_name = bench_one_name(work, env, args.versions, args.repeat)
        print(f"one name: {one_name}", flush=True)
        gc = bench_gc(work, env, args.orphans, args.repeat)
        print(f"gc: {gc}", flush=True)
        install: dict[str, object] = {"bytes": 0, "cold": False}
        for key in ("baseline", "baseline_sync", "install", "reinstall"):
            install[key] = install[f"{key}_min"] = float("nan")
        if not args.skip_install:
            install = bench_install(work, env, args.size_gb, args.repeat)
            print(f"install: {install}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(args, install, everyday, one_name, gc, startup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
