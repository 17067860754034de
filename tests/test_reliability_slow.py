"""Real processes against one registry, on SQLite and on PostgreSQL: many installers at once, and kill -9
at random points (seeded, bounded trials) of install, combine and gc. Nothing may fail, nothing may be
lost, nothing may be left that gc would not collect, and every listed version must verify.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from factories import write_peft_adapter

pytestmark = pytest.mark.slow

WORKERS = 8
INSTALLS_PER_WORKER = 5
TRIALS_PER_STEP = 3
MODULES = {"model.layers.0.self_attn.q_proj": (16, 16, 4)}


_WORKER = textwrap.dedent("""
    import json, sys
    from loramgr.installer import InstallOptions, install_source
    from loramgr.registry import Registry

    registry = Registry.open()  # every worker opens the (empty) database at once: one migrates
    for folder, name, version in json.loads(sys.argv[1]):
        result = install_source(registry, folder, InstallOptions(name=name, version=version))
        print(json.dumps([name, result.version, result.digest, result.created]), flush=True)
""")


def state() -> tuple[list[tuple[str, str, str]], list[str], bool]:
    """(name, version, digest) listed, what gc would collect but temporary files, and whether all verify."""
    from loramgr.registry import Registry, plan_gc, verify

    registry = Registry.open()
    try:
        rows = [(r.name, r.version, r.digest) for r in registry.list_versions()]
        orphans = [f"{i.what} {i.label}" for i in plan_gc(registry).items if i.what != "temp"]
        return rows, orphans, verify(registry).ok
    finally:
        registry.close()


def test_many_processes_install_at_once(database: str, tmp_path: Path) -> None:
    jobs = []
    for worker in range(WORKERS):
        mine = [(str(write_peft_adapter(tmp_path / f"w{worker}-{i}", MODULES, seed=100 * worker + i)), "shared", None)
                for i in range(INSTALLS_PER_WORKER)]
        mine.insert(1, (str(write_peft_adapter(tmp_path / f"own{worker}", MODULES, seed=5000 + worker)),
                        f"own-{worker}", None))  # a name created while the others install
        same = write_peft_adapter(tmp_path / "same", MODULES, seed=9999)
        mine.insert(2, (str(same), "same", "1.0.0"))  # identical bytes from every worker
        jobs.append(mine)
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(job)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for job in jobs]
    outputs = [w.communicate(timeout=600) for w in workers]
    errors = [err for w, (_, err) in zip(workers, outputs) if w.returncode != 0]
    assert errors == []
    results = [json.loads(line) for out, _ in outputs for line in out.splitlines()]
    assert len(results) == WORKERS * (INSTALLS_PER_WORKER + 2)

    rows, orphans, intact = state()
    shared = sorted(((v, d) for n, v, d in rows if n == "shared"), key=lambda r: int(r[0].split(".")[1]))
    assert [v for v, _ in shared] == [f"0.{i}.0" for i in range(1, WORKERS * INSTALLS_PER_WORKER + 1)]
    assert sorted(d for _, d in shared) == sorted(d for n, _, d, _ in results if n == "shared")  # none lost
    assert sorted(n for n, _, _ in rows if n.startswith("own-")) == [f"own-{w}" for w in range(WORKERS)]
    same = [r for r in results if r[0] == "same"]
    assert [r[3] for r in same].count(True) == 1 and {r[2] for r in same} == {same[0][2]}
    assert orphans == [] and intact


def _run(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "loramgr", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))


def _loramgr(*args: str) -> str:
    process = _run(*args)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out


@pytest.mark.parametrize("step", ["install", "combine", "gc"])
def test_kill_9_at_random_points_loses_nothing(database: str, tmp_path: Path, step: str) -> None:
    rng = random.Random(f"kill-9-{step}")
    big = {f"model.layers.{i}.self_attn.q_proj": (512, 512, 64) for i in range(16)}  # 4 MB of weights
    for name, seed in (("a", 1), ("b", 2)):
        folder = write_peft_adapter(tmp_path / name, big, seed=seed)
        _loramgr("install", str(folder), "--name", name, "--version", "1.0")

    def command(trial: int) -> list[str]:
        if step == "install":
            folder = write_peft_adapter(tmp_path / f"new{trial}", big, seed=100 + trial)
            return ["install", str(folder), "--name", "new"]
        if step == "combine":
            return ["combine", "a==1.0", "b==1.0", "--weights", f"0.{trial + 1},0.5", "--name", "mix"]
        folder = write_peft_adapter(tmp_path / f"gone{trial}", big, seed=200 + trial)
        _loramgr("install", str(folder), "--name", "gone")
        _loramgr("remove", "gone", "--all")  # its blobs and manifest are for gc to delete
        return ["gc"]

    args = command(-1)
    started = time.monotonic()
    _loramgr(*args)  # one uninterrupted run: how long the step takes
    duration = time.monotonic() - started
    interrupted = 0
    for trial in range(TRIALS_PER_STEP):
        args = command(trial)
        before, _, _ = state()
        process = _run(*args)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            interrupted += 1
        process.communicate(timeout=60)
        rows, _, intact = state()
        assert intact, f"trial {trial}: a listed version does not verify"
        assert set(before) <= set(rows) and len(rows) - len(before) <= 1  # nothing lost, nothing half-added
        _loramgr("gc")
        _loramgr(*args)  # the interrupted step runs again to completion
        rows, orphans, intact = state()
        assert intact and orphans == []
    print(f"{database.split(':')[0]} {step}: {TRIALS_PER_STEP} trials, {interrupted} killed mid-run, 0 failures")
