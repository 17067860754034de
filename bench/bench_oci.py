"""Push and pull of a 500 MB adapter to a local OCI registry: loramgr against oras-py on the same files.

Starts Debian's ``docker-registry`` (CNCF distribution) on 127.0.0.1 with storage in a temporary
folder, writes a PEFT adapter of about ``--size-mb`` MB (random bytes, so nothing compresses),
installs it into a temporary LORAMGR_HOME, then, each round on a fresh repository name so every
blob is really sent:

- ``loramgr push`` (:func:`loramgr.oci.push.run_push`) against ``oras-py`` ``push`` of the same files;
- ``loramgr`` fetch (download + sha256 of every layer) and ``loramgr install oci://`` end to end
  (fetch + validation + store + database, into an empty registry) against ``oras-py`` ``pull``
  (download only, no digest check).

Usage: python bench/bench_oci.py [--size-mb 500] [--repeat 3] [--dir /tmp] [--report docs/benchmarks/oci.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ociregistry import OciRegistry, available  # noqa: E402


def write_adapter(folder: Path, size_mb: int) -> Path:
    """A PEFT folder whose weights are ``size_mb`` MB of float32 noise over 4096x4096 q/v projections."""
    folder.mkdir(parents=True)
    d, r = 4096, 64
    per_module = 2 * d * r * 4
    modules = max(1, size_mb * 1024 * 1024 // per_module)
    header, offset, names = {}, 0, []
    for i in range(modules):
        name = f"base_model.model.model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"
        names.append(name)
        for part, shape in (("lora_A", [r, d]), ("lora_B", [d, r])):
            size = 4 * shape[0] * shape[1]
            header[f"{name}.{part}.weight"] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    import numpy as np

    rng = np.random.default_rng(0)
    with open(folder / "adapter_model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        left = offset // 4
        while left:
            n = min(left, 16 << 20)
            out.write((rng.standard_normal(n, dtype=np.float32) * 0.01).tobytes())
            left -= n
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "bench/llama-4096", "bias": "none", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()  # the previous step's dirty pages are written back before, not during, this one
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the temporary files")
    parser.add_argument("--report", default=None, help="write the Markdown report here")
    args = parser.parse_args()
    if not available():
        sys.exit("docker-registry is not installed (apt-get install docker-registry)")
    import oras.client

    work = Path(tempfile.mkdtemp(prefix="bench-oci-", dir=args.dir))
    os.environ["LORAMGR_HOME"] = str(work / "home")
    from loramgr.installer import InstallOptions, install_source
    from loramgr.oci.pull import fetch, install_from_oci
    from loramgr.oci.push import plan_push, run_push
    from loramgr.registry import Registry

    try:
        adapter = write_adapter(work / "adapter", args.size_mb)
        size = sum(f.stat().st_size for f in adapter.iterdir())
        registry = Registry.open()
        install_source(registry, adapter, InstallOptions(name="big", version="1.0.0"))
        rows: dict[str, list[float]] = {k: [] for k in ("loramgr push", "oras push", "loramgr fetch",
                                                         "loramgr install oci://", "oras pull")}
        with OciRegistry(work / "registry") as reg:
            client = oras.client.OrasClient(hostname=reg.host, insecure=True)
            for round_ in range(args.repeat):
                ours, theirs = f"bench/loramgr-{round_}", f"bench/oras-{round_}"
                plan = plan_push(registry, "big==1.0.0", reg.url(ours))
                rows["loramgr push"].append(timed(lambda plan=plan: run_push(plan)))
                cwd = os.getcwd()
                os.chdir(adapter)
                try:
                    rows["oras push"].append(timed(lambda theirs=theirs: client.push(
                        target=f"{reg.host}/{theirs}:1.0.0", files=["adapter_config.json",
                                                                     "adapter_model.safetensors"], quiet=True)))
                finally:
                    os.chdir(cwd)
                out = work / f"oras-out-{round_}"
                rows["oras pull"].append(timed(lambda out=out, ours=ours: client.pull(
                    target=f"{reg.host}/{ours}:1.0.0", outdir=str(out))))
                shutil.rmtree(out)
                folder = work / f"fetch-{round_}"
                rows["loramgr fetch"].append(timed(lambda folder=folder, ours=ours: fetch(
                    reg.url(ours) + ":1.0.0", folder)))
                shutil.rmtree(folder)
                fresh = Registry.open(work / f"home-{round_}")
                rows["loramgr install oci://"].append(timed(lambda fresh=fresh, ours=ours: install_from_oci(
                    fresh, reg.url(ours) + ":1.0.0", InstallOptions())))
                shutil.rmtree(work / f"home-{round_}")
        report = render(rows, size, args)
        print(report)
        if args.report:
            Path(args.report).write_text(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(rows: dict[str, list[float]], size: int, args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in rows.items()}
    mb = size / 1e6
    lines = [
        "# OCI push and pull benchmark",
        "",
        f"`python bench/bench_oci.py` — {mb:.0f} MB PEFT adapter (float32 noise), Debian's docker-registry "
        f"(distribution 2.8) on 127.0.0.1 with filesystem storage, a fresh repository each round, median of "
        f"{args.repeat}. Machine: {platform.machine()}, Python {platform.python_version()}, {platform.system()}, "
        f"{os.cpu_count()} CPUs, registry and client on the same disk.",
        "",
        "| step | median s | min-max s | MB/s |",
        "|---|---|---|---|",
    ]
    for key, values in rows.items():
        lines.append(f"| {key} | {med[key]:.3f} | {min(values):.3f}-{max(values):.3f} | {mb / med[key]:.0f} |")
    lines += [
        "",
        f"Ratio push, loramgr / oras-py: **{med['loramgr push'] / med['oras push']:.2f}**. "
        f"Ratio pull, loramgr fetch / oras-py pull: **{med['loramgr fetch'] / med['oras pull']:.2f}**; "
        f"`loramgr install oci://` end to end / oras-py pull: "
        f"**{med['loramgr install oci://'] / med['oras pull']:.2f}**. Target: within 1.2x.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
