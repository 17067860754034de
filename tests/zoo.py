"""The adapter zoo: tiny models built from configs and the adapters PEFT makes for them, case by case.

Each :class:`Case` is one adapter as a PEFT user makes it (``get_peft_model`` with a ``LoraConfig``, the
trainable parameters randomised so that every part of the adapter moves the output, then
``save_pretrained``). tests/test_zoo.py runs every case through loramgr (install, show, check, apply,
fuse) and holds each result against PEFT loading the same folder into the same model.

Models are tiny (hidden size 16 to 32, two layers) and built once per test module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32)).eval()


def tiny_mixtral() -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    _seeded(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32)).eval()


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def tiny_bert_classifier() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _seeded(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=32, num_labels=3)).eval()


def tiny_t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    _seeded(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=2, decoder_start_token_id=0)).eval()


def tiny_vit_classifier() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    _seeded(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                               num_labels=3)).eval()


def tiny_gemma2_tied() -> torch.nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _seeded(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          max_position_embeddings=32, tie_word_embeddings=True)).eval()


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    _seeded(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()


#: model name -> builder
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": tiny_llama,
    "mixtral": tiny_mixtral,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert_classifier,
    "t5": tiny_t5,
    "vit": tiny_vit_classifier,
    "gemma2": tiny_gemma2_tied,
    "unet": tiny_unet,
}


def sample_inputs(model_name: str, model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for one forward pass of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    if model_name == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen)}
    if model_name == "unet":
        return {"sample": torch.randn(1, 4, 8, 8, generator=gen), "timestep": torch.tensor(3),
                "encoder_hidden_states": torch.randn(1, 5, 8, generator=gen)}
    ids = torch.randint(0, 64, (2, 6), generator=gen)
    if model_name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(0, 64, (2, 4), generator=gen)}
    return {"input_ids": ids}


def output_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The one tensor a model's forward pass yields (logits, or the UNet's sample)."""
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "sample"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0]


@dataclass(frozen=True)
class Case:
    """One adapter: the model it is made on and the LoraConfig keyword arguments PEFT gets."""

    model: str
    name: str
    config: dict[str, Any]
    #: kwargs for save_pretrained (an lm_head target needs save_embedding_layers)
    save: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.name}"


_LLAMA_ATTN = ["q_proj", "v_proj"]
_BERT_ATTN = ["query", "value"]
CASES: list[Case] = [
    Case("llama", "plain", {"r": 4, "lora_alpha": 8, "target_modules": _LLAMA_ATTN}),
    Case("llama", "all-linear-rslora", {"r": 4, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True}),
    Case("llama", "rank-alpha-patterns", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                          "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6},
                                          "alpha_pattern": {"v_proj": 3}}),
    Case("llama", "modules-to-save", {"r": 4, "lora_alpha": 8, "target_modules": _LLAMA_ATTN,
                                      "modules_to_save": ["lm_head"]}),
    Case("llama", "trainable-tokens", {"r": 4, "lora_alpha": 8, "target_modules": _LLAMA_ATTN,
                                       "trainable_token_indices": [1, 5, 9]}),
    Case("llama", "pissa", {"r": 4, "lora_alpha": 4, "target_modules": _LLAMA_ATTN, "init_lora_weights": "pissa"}),
    Case("llama", "olora", {"r": 4, "lora_alpha": 4, "target_modules": _LLAMA_ATTN, "init_lora_weights": "olora"}),
    Case("llama", "dora", {"r": 4, "lora_alpha": 8, "target_modules": _LLAMA_ATTN, "use_dora": True}),
    Case("mixtral", "target-parameters", {"r": 2, "lora_alpha": 4, "target_modules": [],
                                          "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
    Case("mixtral", "attention", {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]}),
    Case("gpt2", "conv1d", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    Case("bert", "seq-cls", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    # BERT's Linear layers have biases (Llama's do not): the bias cases live here
    Case("bert", "bias-lora-only", {"r": 4, "lora_alpha": 8, "target_modules": _BERT_ATTN, "bias": "lora_only"}),
    Case("bert", "bias-all", {"r": 4, "lora_alpha": 8, "target_modules": _BERT_ATTN, "bias": "all"}),
    Case("bert", "lora-bias", {"r": 4, "lora_alpha": 8, "target_modules": _BERT_ATTN, "lora_bias": True}),
    Case("t5", "plain", {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v", "wo"]}),
    Case("vit", "classifier", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                               "modules_to_save": ["classifier"]}),
    Case("vit", "attention", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1"]}),
    Case("gemma2", "tied-lm-head", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]},
         save={"save_embedding_layers": False}),
    Case("unet", "attention", {"r": 2, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}),
    Case("unet", "conv", {"r": 2, "lora_alpha": 2, "target_modules": ["conv1", "conv2", "proj_in"]}),
]


def make_adapter(case: Case, model: torch.nn.Module, folder: Path, seed: int = 0) -> Path:
    """Make ``case``'s adapter with PEFT on a copy of ``model``, every trainable parameter randomised, and save it.

    Initialisations that change the base (PiSSA, OLoRA) are left as PEFT made them: randomising would keep
    the changed base and lose the meaning. Their folders hold adapters for PEFT's modified base weights.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(lora_dropout=0.0, **case.config)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    keeps_init = case.config.get("init_lora_weights") in ("pissa", "olora")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad and not keeps_init:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
            elif keeps_init and "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.peft_config["default"].base_model_name_or_path = f"tiny-{case.model}"
    peft_model.save_pretrained(str(folder), **case.save)
    return folder


#: (case id, operation) -> what main gets wrong there today (issue 10): apply/fuse give another output than
#: PEFT without refusing. The zoo runs them as strict xfails: the change that makes one exact (or refuses it in
#: one line) turns its xfail into a failure until the entry is removed here, so the list only shrinks.
KNOWN_WRONG: dict[tuple[str, str], str] = {}
