"""``loramgr demo``: the main job end to end on built-in defaults, in seconds, with nothing downloaded.

A small Llama-shaped model is built from a config; two adapters for it (a rank-8 "sql-skill" and a
rank-4 rsLoRA "chat-style" with partly different targets) are written as PEFT folders, installed,
combined exactly, compressed to a per-module rank, combined again with TIES in core space (the
adapters' own low-rank space, so the result is a LoRA exactly), loaded into the model with PEFT, and run. The
loaded outputs are checked against W + ΔW computed independently (fusing the deltas into a copy).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 64, 128, 2, 256
#: the versions the demo registers, each as 1.0.0
NAMES = ("sql-skill", "chat-style", "sql-chat", "sql-chat-small", "sql-chat-ties")


@dataclass
class DemoResult:
    home: Path
    exact_max_error: float  # PEFT-loaded combined adapter vs independently fused W + ΔW
    compressed_relative_error: float  # logits of the compressed adapter vs the exact combination
    seconds: float  # the demo's steps, from opening the registry to the last check
    process_seconds: float | None  # since the process started (imports included); None where unknown


def process_age() -> float | None:
    """Seconds since this process started (from /proc on Linux), or None where that is not known."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def refuse_taken_names(registry: Any) -> None:
    """Refuse, before anything is written, a registry that already holds a version the demo registers."""
    from .errors import ConflictError

    taken = sorted({row.name for row in registry.list_versions()} & set(NAMES))
    if taken:
        raise ConflictError(
            f"{registry.root} already holds the demo's adapters ({', '.join(taken)})",
            hint="run 'loramgr demo' without --home (a new temporary registry), or give a new folder",
        )


def build_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    model.train(False)  # inference mode, as .eval() (which is untyped)
    return model


def write_adapter(folder: Path, model: Any, targets: list[str], *, rank: int, alpha: float, seed: int,
                  use_rslora: bool = False) -> Path:
    """A PEFT adapter folder with seeded random factors for ``model``'s ``targets``."""
    import torch

    from .formats.peft import write_peft_folder

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            d_out, d_in = module.weight.shape
            prefix = f"base_model.model.{name}"
            # decaying row norms give each delta a falling spectrum, as trained adapters have
            decay = torch.tensor([0.5**i for i in range(rank)]).unsqueeze(1)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in**0.5 * decay
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.05
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "use_rslora": use_rslora,
        "base_model_name_or_path": "loramgr-demo/tiny-llama", "task_type": "CAUSAL_LM", "bias": "none",
        "lora_dropout": 0.0, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    return write_peft_folder(folder, config, tensors)


def run(home: Path | None = None, echo: Callable[[str], None] = print) -> DemoResult:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError("the demo loads adapters with PEFT into a transformers model", package="peft",
                                     hint="pip install 'loramgr[peft]'") from exc
    import torch

    from .installer import InstallOptions, install_source
    from .merge import MergeOptions
    from .merge.operations import combine, compress
    from .model.peftmodel import apply
    from .model.weights import fuse
    from .registry import Registry

    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")
    start = time.perf_counter()
    home = home or Path(tempfile.mkdtemp(prefix="loramgr-demo-"))
    registry = Registry.open(home, paths.database_url(home))
    refuse_taken_names(registry)
    echo(f"loramgr demo: registry in {home}")
    model = build_model()
    echo(f"1. built a tiny Llama ({LAYERS} layers, hidden {HIDDEN}): "
         f"{sum(p.numel() for p in model.parameters()):,} parameters")

    # the training runs' folders are only the install's input: the store keeps its own copy
    with tempfile.TemporaryDirectory(prefix="loramgr-demo-adapters-") as runs:
        work = Path(runs)
        sql = write_adapter(work / "sql-skill", model, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=8, alpha=16,
                            seed=1)
        chat = write_adapter(work / "chat-style", model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                             rank=4, alpha=8, seed=2, use_rslora=True)
        for folder, name in ((sql, "sql-skill"), (chat, "chat-style")):
            result = install_source(registry, folder, InstallOptions(name=name, version="1.0.0"))
            shown = registry.show(result.ref)
            echo(f"2. installed {result.ref}: rank {shown.rank}, {shown.n_modules} modules "
                 f"({', '.join(shown.target_modules)}), {result.digest[:19]}")

    combined = combine(["sql-skill==1.0.0", "chat-style==1.0.0"], MergeOptions(method="linear", weights=(0.7, 0.3)),
                       registry=registry, name="sql-chat", version="1.0.0")
    ranks = sorted({m.rank for m in combined.merged.modules})
    shared = sum(1 for m in combined.merged.modules if not m.missing_in)
    echo(f"3. combined 0.7 x sql-skill + 0.3 x chat-style exactly -> sql-chat==1.0.0: "
         f"{len(combined.merged.modules)} modules ({shared} targeted by both), ranks {'/'.join(map(str, ranks))}")
    compressed = compress("sql-chat==1.0.0", energy=0.99, registry=registry, name="sql-chat-small", version="1.0.0")
    small_ranks = [m.rank for m in compressed.merged.modules]
    kept = min(m.kept_energy for m in compressed.merged.modules)
    sizes = [registry.show(ref).size / 1024 for ref in ("sql-chat-small", "sql-chat")]
    echo(f"4. compressed to 99% energy per module -> sql-chat-small==1.0.0: "
         f"ranks {min(small_ranks)}..{max(small_ranks)}"
         f", at least {kept:.1%} of each module's energy kept; size {sizes[0]:.0f} KB vs {sizes[1]:.0f} KB")

    started = time.perf_counter()
    ties = combine(["sql-skill==1.0.0", "chat-style==1.0.0"],
                   MergeOptions(method="ties", density=0.3, weights=(0.7, 0.3)),
                   registry=registry, name="sql-chat-ties", version="1.0.0")
    ties_ranks = sorted({m.rank for m in ties.merged.modules})
    echo(f"5. combined them with TIES (density 0.3) in core space, the default -> sql-chat-ties==1.0.0: ranks "
         f"{'/'.join(map(str, ties_ranks))}, exact, in {time.perf_counter() - started:.2f} s: the rule ran on each "
         "module's small core in the adapters' own space, so the result is a LoRA with nothing re-ranked away")

    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(tokens).logits
        exact = apply(copy.deepcopy(model), registry.open_adapter("sql-chat==1.0.0"))(tokens).logits
        small = apply(copy.deepcopy(model), registry.open_adapter("sql-chat-small==1.0.0"))(tokens).logits
        fused_model = copy.deepcopy(model)
        fuse(fused_model, registry.open_adapter("sql-chat==1.0.0"))
        fused = fused_model(tokens).logits
    exact_error = float((exact - fused).abs().max())
    relative = float((small - exact).norm() / (exact - base_logits).norm())
    echo(f"6. loaded sql-chat into the model with PEFT and ran it: logits moved by "
         f"{float((exact - base_logits).abs().max()):.3f}; max difference from W + ΔW fused independently: "
         f"{exact_error:.1e}")
    echo(f"7. loaded sql-chat-small too: its effect on the logits is within {relative:.1%} of sql-chat's")
    seconds = time.perf_counter() - start
    age = process_age()
    since = f", {age:.1f} s since the process started (most of the rest is importing torch)" if age else ""
    echo(f"done: the steps took {seconds:.1f} s{since}. "
         f"Look around: export LORAMGR_HOME={home}; loramgr list; loramgr show sql-chat")
    return DemoResult(home, exact_error, relative, seconds, age)
