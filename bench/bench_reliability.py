"""The registry under concurrency and kill -9, on SQLite and PostgreSQL: counts, not timings.

- concurrent installs: ``--workers`` processes start together on a fresh registry (so they also race to
  create and migrate the database); each installs ``--installs`` adapters as automatic versions of one
  shared name, then one adapter under a new name of its own, then the same bytes as ``same==1.0.0``.
  Counted: failed processes, versions lost (a result reported but not listed), orphans (blobs or
  manifests ``gc`` would collect), and whether ``verify`` passes.
- kill -9: ``--kills`` trials each of ``install`` (a ~4 MB adapter), ``combine`` and ``gc``, killed at a
  seeded random moment within one uninterrupted run's duration. After each: every listed version
  verifies, nothing listed before is gone, ``gc`` runs, and the step run again succeeds with nothing
  left for gc. Counted: trials, processes killed mid-run, failures.

PostgreSQL: a throwaway cluster from Debian's binaries (as the tests start it, tests/pgcluster.py),
skipped where they are absent. The report goes to docs/benchmarks/reliability.md (``--out``).

Usage: python bench/bench_reliability.py [--workers 8] [--installs 22] [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-adapter factory and the PostgreSQL cluster of the tests

WORKER = """
import json, sys
from loramgr.installer import InstallOptions, install_source
from loramgr.registry import Registry

registry = Registry.open()
for folder, name, version in json.loads(sys.argv[1]):
    result = install_source(registry, folder, InstallOptions(name=name, version=version))
    print(json.dumps([name, result.version, result.digest, result.created]), flush=True)
"""
SMALL = {"model.layers.0.self_attn.q_proj": (16, 16, 4)}
BIG = {f"model.layers.{i}.self_attn.q_proj": (512, 512, 64) for i in range(16)}


def state(env: dict[str, str]) -> dict[str, Any]:
    code = ("import json\nfrom loramgr.registry import Registry, plan_gc, verify\nr = Registry.open()\n"
            "print(json.dumps({'rows': [[v.name, v.version, v.digest] for v in r.list_versions()],"
            " 'orphans': [i.label for i in plan_gc(r).items if i.what != 'temp'], 'intact': verify(r).ok}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def loramgr(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "loramgr", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ok(env: dict[str, str], *args: str) -> None:
    process = loramgr(env, *args)
    _, err = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"loramgr {' '.join(args)}: {err.strip()}")


def concurrent_installs(env: dict[str, str], work: Path, workers: int, installs: int) -> dict[str, Any]:
    from factories import write_peft_adapter

    jobs = []
    same = write_peft_adapter(work / "same", SMALL, seed=999_999)
    for w in range(workers):
        job: list[tuple[str, str, str | None]] = [
            (str(write_peft_adapter(work / f"w{w}-{i}", SMALL, seed=1000 * w + i)), "shared", None)
            for i in range(installs)]
        job += [(str(write_peft_adapter(work / f"own{w}", SMALL, seed=500_000 + w)), f"own-{w}", None),
                (str(same), "same", "1.0.0")]
        jobs.append(job)
    started = time.monotonic()
    processes = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(job)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for job in jobs]
    outputs = [p.communicate(timeout=3600) for p in processes]
    seconds = time.monotonic() - started
    reported = {(r[0], r[1], r[2]) for out, _ in outputs for r in map(json.loads, out.splitlines())}
    after = state(env)
    listed = {tuple(r) for r in after["rows"]}
    return {"processes": workers, "installs": workers * (installs + 2), "seconds": round(seconds, 1),
            "errors": sum(p.returncode != 0 for p in processes), "lost": len(reported - listed),
            "orphans": len(after["orphans"]), "verify": "intact" if after["intact"] else "FAILED"}


def kill_trials(env: dict[str, str], work: Path, step: str, trials: int, rng: random.Random) -> dict[str, Any]:
    from factories import write_peft_adapter

    for name, seed in (("a", 1), ("b", 2)):
        ok(env, "install", str(write_peft_adapter(work / f"{step}-{name}", BIG, seed=seed)), "--name", name,
           "--version", "1.0")

    def command(trial: int) -> list[str]:
        if step == "install":
            return ["install", str(write_peft_adapter(work / f"new{trial}", BIG, seed=100 + trial)), "--name", "new"]
        if step == "combine":
            return ["combine", "a==1.0", "b==1.0", "--weights", f"{trial + 2},1", "--name", "mix"]
        ok(env, "install", str(write_peft_adapter(work / f"gone{trial}", BIG, seed=200 + trial)), "--name", "gone")
        ok(env, "remove", "gone", "--all")
        return ["gc"]

    args = command(-1)
    started = time.monotonic()
    ok(env, *args)
    duration = time.monotonic() - started
    killed = failures = 0
    for trial in range(trials):
        args = command(trial)
        before = {tuple(r) for r in state(env)["rows"]}
        process = loramgr(env, *args)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.communicate(timeout=60)
        try:
            after = state(env)
            rows = {tuple(r) for r in after["rows"]}
            if not after["intact"] or not before <= rows or len(rows - before) > 1:
                raise RuntimeError("lost or half-added versions")
            ok(env, "gc")
            ok(env, *args)
            final = state(env)
            if final["orphans"] or not final["intact"]:
                raise RuntimeError("orphans after the rerun")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failures += 1
            print(f"{step} trial {trial}: {exc}", file=sys.stderr)
    return {"step": step, "trials": trials, "killed": killed, "failures": failures}


def run_database(label: str, url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    from pgcluster import reset

    results: dict[str, Any] = {"database": label}
    with tempfile.TemporaryDirectory(prefix="loramgr-bench-rel-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, LORAMGR_HOME=str(work / "home"), PYTHONPATH=str(ROOT))
        env.pop("LORAMGR_DATABASE_URL", None)
        if url:
            reset(url)
            env["LORAMGR_DATABASE_URL"] = url
        results["concurrent"] = concurrent_installs(env, work, args.workers, args.installs)
        rng = random.Random(args.seed)
        results["kills"] = []
        for step in ("install", "combine", "gc"):
            if url:
                reset(url)
            env["LORAMGR_HOME"] = str(work / f"home-{step}")
            results["kills"].append(kill_trials(env, work, step, args.kills, rng))
    return results


def render(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Reliability: concurrency and kill -9",
        "",
        f"`python bench/bench_reliability.py --workers {args.workers} --installs {args.installs} "
        f"--kills {args.kills} --seed {args.seed}`, {datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores. Counts, not timings: what must be 0 is 0 or the script says so.",
        "",
        "## Processes installing at once (fresh registry: they also race to create and migrate it)",
        "",
        "| database | processes | installs | errors | lost | orphans | verify | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        c = run["concurrent"]
        lines.append(f"| {run['database']} | {c['processes']} | {c['installs']} | {c['errors']} | {c['lost']} | "
                     f"{c['orphans']} | {c['verify']} | {c['seconds']} s |")
    lines += ["", "## kill -9 at a seeded random moment", "",
              "| database | step | trials | killed mid-run | failures |", "|---|---|---|---|---|"]
    for run in runs:
        for k in run["kills"]:
            lines.append(f"| {run['database']} | {k['step']} | {k['trials']} | {k['killed']} | {k['failures']} |")
    lines += ["", "A failure is a listed version that does not verify, a version lost or half-added, a `gc` or "
              "rerun that fails, or anything left for `gc` after the rerun. The same checks run, with fewer "
              "trials, in `tests/test_reliability_slow.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--installs", type=int, default=22, help="automatic versions per worker")
    parser.add_argument("--kills", type=int, default=10, help="trials per step (install, combine, gc)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "reliability.md")
    args = parser.parse_args()
    from pgcluster import cluster_url

    runs = [run_database("SQLite", None, args)]
    url = cluster_url()
    if url is not None:
        runs.append(run_database("PostgreSQL 15", url, args))
    report = render(runs, args)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
