"""Check loramgr's vLLM integration against a real ``vllm serve`` (needs a GPU and ``pip install vllm``).

loramgr's test suite cannot run vLLM (no GPU); it restates vLLM's filesystem resolver and PEFTHelper rules
from vLLM's source. This script closes the loop where a GPU machine is available:

    pip install vllm && pip install -e .          # in one environment, so vLLM sees loramgr's entry point
    python bench/vllm_resolver_check.py           # --port 8765 --timeout 600

It builds a tiny Llama from a config (served with ``--load-format dummy``, no downloads), installs a
PEFT adapter made for it into a temporary LORAMGR_HOME (tagged ``stable``) plus a DoRA one, starts
``vllm serve`` with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``, and checks:

1. the resolver plugin (entry point ``vllm.general_plugins``) answers ``model="sql-chat@1.0.0"`` and
   ``model="sql-chat@stable"`` (HTTP 200), and an unknown ``nope@1.0.0`` and the DoRA adapter are refused;
2. ``loramgr push-to-server`` loads a second version through ``/v1/load_lora_adapter``, and a completion
   with it succeeds;
3. ``loramgr deploy vllm`` output is accepted by vLLM's own filesystem resolver
   (``VLLM_PLUGINS=loramgr,lora_filesystem_resolver``, ``VLLM_LORA_RESOLVER_CACHE_DIR``).

Prints one JSON line per check and exits 1 if any fails. Timing is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVED = "tiny-llama"


def post(url: str, payload: dict[str, object]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def build(root: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(base)
    for name, seed, extra in (("sql-chat-1", 1, {}), ("sql-chat-2", 2, {}), ("dora", 3, {"use_dora": True})):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16,
                                                                    target_modules=["q_proj", "v_proj"], **extra))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
        model.save_pretrained(root / name)
    return base


def loramgr(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "loramgr", *args], check=True, capture_output=True,
                          text=True).stdout


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit("vllm serve did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loramgr-vllm-"))
    os.environ["LORAMGR_HOME"] = str(root / "home")
    base = build(root)
    loramgr("install", str(root / "sql-chat-1"), "--name", "sql-chat", "--version", "1.0.0")
    loramgr("install", str(root / "sql-chat-2"), "--name", "sql-chat", "--version", "2.0.0")
    loramgr("install", str(root / "dora"), "--name", "dora", "--version", "1.0.0")
    loramgr("tag", "sql-chat==1.0.0", "stable")
    cache = root / "fs-cache"
    loramgr("deploy", "vllm", str(cache), "--served-model", SERVED, "sql-chat==2.0.0")
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
           "VLLM_PLUGINS": "loramgr,lora_filesystem_resolver"}
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        ["vllm", "serve", str(base), "--served-model-name", SERVED, "--load-format", "dummy", "--enable-lora",
         "--max-lora-rank", "8", "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "128",
         "--gpu-memory-utilization", "0.3", "--port", str(args.port)], env=env)
    results = []
    try:
        wait_ready(url, server, args.timeout)

        def complete(model: str) -> int:
            status, _ = post(url + "/v1/completions", {"model": model, "prompt": [1, 2, 3, 4], "max_tokens": 4})
            return status

        results.append(("resolver: version", complete("sql-chat@1.0.0") == 200))
        results.append(("resolver: tag", complete("sql-chat@stable") == 200))
        results.append(("resolver: unknown refused", complete("nope@1.0.0") != 200))
        results.append(("resolver: DoRA refused", complete("dora@1.0.0") != 200))
        pushed = loramgr("push-to-server", url, "sql-chat==2.0.0", "--dir", str(root / "pushed"))
        results.append(("push-to-server", pushed.startswith(("loaded", "already loaded"))))
        results.append(("pushed adapter serves", complete("sql-chat@2.0.0") == 200))
    finally:
        server.terminate()
        server.wait(timeout=60)
    for name, ok in results:
        print(json.dumps({"check": name, "ok": ok}))
    return 0 if results and all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
