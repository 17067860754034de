"""Tiny adapters and models built in code, for every test module (no downloads).

- :func:`write_peft_adapter`: a hand-built PEFT folder with chosen per-module shapes and ranks.
- :func:`tiny_llama` / :func:`tiny_gpt2` / :func:`tiny_bert`: small transformers models from configs.
- :func:`peft_adapter_from_model`: a PEFT-made adapter (random non-zero B) saved to a folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

PEFT_PREFIX = "base_model.model."


def write_peft_adapter(
    folder: str | Path,
    modules: dict[str, tuple[int, int, int]],
    *,
    alpha: float = 16.0,
    rank: int | None = None,
    use_rslora: bool = False,
    alpha_pattern: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    base_model: str = "tiny-base",
    target_modules: list[str] | str | None = None,
    extra_config: dict[str, Any] | None = None,
    tensors_override: dict[str, torch.Tensor] | None = None,
    readme: str | None = None,
) -> Path:
    """Write a PEFT adapter folder. ``modules`` maps module path -> (in_features, out_features, rank).

    The config's ``r`` is ``rank`` (default: the most common rank) and modules with another rank go
    into ``rank_pattern``, as PEFT writes them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    ranks = [r for (_, _, r) in modules.values()]
    default_rank = rank if rank is not None else max(set(ranks), key=ranks.count)
    rank_pattern = {name: r for name, (_, _, r) in modules.items() if r != default_rank}
    for name, (d_in, d_out, r) in modules.items():
        a = torch.randn(r, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, r, generator=gen) / r**0.5
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    if tensors_override:
        tensors.update(tensors_override)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": default_rank,
        "lora_alpha": alpha,
        "target_modules": target_modules if target_modules is not None else leaves,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern or {},
        "use_rslora": use_rslora,
        "use_dora": False,
        "base_model_name_or_path": base_model,
        "revision": None,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    config.update(extra_config or {})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    config = LlamaConfig(**(settings | overrides))
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return BertModel(config).eval()


def peft_adapter_from_model(
    model: torch.nn.Module,
    folder: str | Path,
    *,
    r: int = 4,
    alpha: float = 8.0,
    target_modules: list[str] | None = None,
    seed: int = 0,
    base_model: str = "tiny-llama",
    **lora_kwargs: Any,
) -> Path:
    """Make an adapter with PEFT itself (B randomised so ΔW != 0) and save it to ``folder``."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules or ["q_proj", "v_proj"],
        lora_dropout=0.0,
        **lora_kwargs,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)
    return Path(folder)


def run_cli(*args: str, code: int = 0) -> Any:
    """Invoke the loramgr CLI in-process and check its exit code; returns click's Result."""
    from click.testing import CliRunner

    from loramgr.cli.main import cli

    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result


def one_line_error(*args: str) -> str:
    """Run a command that must fail the way a user can act on: exit 1, one line on the terminal."""
    output = run_cli(*args, code=1).output.strip()
    assert output.startswith("Error: ") and "\n" not in output, output
    return output


def sample_input(seed: int = 0, vocab: int = 128, length: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=gen)


#: a loramgr command in a fresh interpreter that prints, last, whether torch was imported
NO_TORCH = """
import sys
from loramgr.cli.main import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    print("TORCH" if "torch" in sys.modules else "NO TORCH")
"""


def run_without_torch(*args: str) -> Any:
    """Run ``loramgr ARGS`` in a fresh interpreter; returns the CompletedProcess, whose last stdout line
    says whether torch was imported ("NO TORCH" / "TORCH")."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True)
