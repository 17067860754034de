"""Two real processes installing into one (fresh) registry at the same time: no error, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import write_peft_adapter

from loramgr.registry import Registry, verify

INSTALLS_PER_WORKER = 2


pytestmark = pytest.mark.slow  # subprocesses and servers: outside the everyday loop


def _worker_script(folders: list[Path], same: Path) -> str:
    install = f"{sys.executable} -m loramgr install"
    steps = [f"{install} {folder} --name shared" for folder in folders]
    steps.insert(1, f"{install} {same} --name same --version 1.0.0")  # both workers: identical bytes
    return " && ".join(steps)


def test_two_processes_install_at_once(tmp_path, loramgr_home):
    folders = {
        worker: [
            write_peft_adapter(tmp_path / f"w{worker}-{i}", {"layers.0.q": (8, 8, 2)}, seed=100 * worker + i)
            for i in range(INSTALLS_PER_WORKER)
        ]
        for worker in (0, 1)
    }
    same = write_peft_adapter(tmp_path / "same", {"layers.0.q": (8, 8, 2)}, seed=999)
    env = dict(os.environ, LORAMGR_HOME=str(loramgr_home))
    # started together on a fresh home: both also race to create and migrate the database
    workers = [
        subprocess.Popen(["sh", "-c", _worker_script(folders[w], same)], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in (0, 1)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
        assert "Error" not in out + err and "locked" not in err

    lines = [line for out, _ in outputs for line in out.splitlines()]
    created = [line for line in lines if line.startswith("installed shared==")]
    assert len(created) == 2 * INSTALLS_PER_WORKER
    same_lines = sorted(line.split(" (")[0] for line in lines if "same==1.0.0" in line)
    assert same_lines == ["already installed as same==1.0.0", "installed same==1.0.0"]

    registry = Registry.open()
    try:
        rows = registry.list_versions()
        shared = [r for r in rows if r.name == "shared"]
        # every install got its own version: auto-versioning is serialised by the database lock
        assert [r.version for r in shared] == [f"0.{i}.0" for i in range(1, 2 * INSTALLS_PER_WORKER + 1)]
        assert len({r.digest for r in shared}) == 2 * INSTALLS_PER_WORKER
        assert [(r.name, r.version) for r in rows if r.name == "same"] == [("same", "1.0.0")]
        # each worker's installs are in its own order
        for worker in (0, 1):
            sources = [registry.show(f"shared=={r.version}").source for r in shared]
            mine = [s for s in sources if Path(s).name.startswith(f"w{worker}-")]
            assert mine == [str(f) for f in folders[worker]]
        report = verify(registry)
        assert report.ok and report.checked == 2 * INSTALLS_PER_WORKER + 2  # weights each, one config, same's
    finally:
        registry.close()
    assert list((loramgr_home / "tmp").iterdir()) == []
