"""Which adapter modules vLLM applies, per base architecture: the table ``check --engine vllm`` uses.

vLLM wraps a module with LoRA when it is one of the model's *supported LoRA modules*
(``vllm/lora/utils.py: get_supported_lora_modules``): the last name component of every ``LinearBase``
(and ``FusedMoE``) module of its model class, plus the keys of the class's ``embedding_modules``
(``embed_tokens`` / ``lm_head`` where the class declares them; ``SupportsLoRA`` declares none by
default). vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; the class's
``packed_modules_mapping`` says which adapter modules fill a fused one, and the worker expands it to
the names it expects in an adapter (``WorkerLoRAManager._load_adapter``). An adapter tensor whose
module's last name component is not among those names is ignored with a log line (older versions
refuse the adapter); an adapter none of whose modules is applied is served as the bare base model
(vllm#55193). A model class that does not implement ``SupportsLoRA`` serves no LoRA at all.

The table below restates, for the architectures loramgr knows, what vLLM's model classes
(``vllm/model_executor/models/{llama,mistral,qwen2,qwen3,gemma,gemma2,gemma3,gpt2}.py``) declare.
Architectures not in it are reported as not checked, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: vLLM's fused projections and the adapter modules that fill them (Llama-style models)
_FUSED_QKV_GATE_UP: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
#: the linear layers of a Llama-style decoder layer in vLLM (attention and gated MLP)
_LLAMA_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class VllmLoraModules:
    """What vLLM's model class for one architecture declares for LoRA."""

    linear: tuple[str, ...] = ()  # last name components of its LinearBase modules
    packed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # packed_modules_mapping
    embedding: tuple[str, ...] = ()  # keys of embedding_modules
    supports_lora: bool = True  # the class implements SupportsLoRA

    @property
    def applied(self) -> frozenset[str]:
        """The adapter module names (last component) vLLM applies: supported modules, packed ones expanded."""
        names: set[str] = set()
        for module in (*self.linear, *self.embedding):
            names.update(self.packed.get(module, (module,)))
        return frozenset(names)


_LLAMA = VllmLoraModules(_LLAMA_LINEAR, _FUSED_QKV_GATE_UP, embedding=("embed_tokens", "lm_head"))
_NO_EMBEDDING = VllmLoraModules(_LLAMA_LINEAR, _FUSED_QKV_GATE_UP)

#: transformers architecture (config.json ``architectures[0]``) -> what vLLM applies for it
VLLM_LORA_MODULES: dict[str, VllmLoraModules] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,  # vLLM's MistralForCausalLM is its LlamaForCausalLM
    # Phi-3 checkpoints store q/k/v and gate/up already fused: the packed modules map to themselves
    "Phi3ForCausalLM": VllmLoraModules(_LLAMA_LINEAR, {"qkv_proj": ("qkv_proj",), "gate_up_proj": ("gate_up_proj",)},
                                       embedding=("embed_tokens", "lm_head")),
    "Qwen2ForCausalLM": _NO_EMBEDDING,
    "Qwen3ForCausalLM": _LLAMA,  # embedding_modules added for Qwen3 (LoRA on embed_tokens / lm_head)
    "GemmaForCausalLM": _NO_EMBEDDING,  # Gemma ties lm_head to embed_tokens and applies no embedding LoRA
    "Gemma2ForCausalLM": _NO_EMBEDDING,
    "Gemma3ForCausalLM": _NO_EMBEDDING,
    "GPT2LMHeadModel": VllmLoraModules(supports_lora=False),
}


def vllm_lora_modules(architecture: str | None) -> VllmLoraModules | None:
    """The table entry for ``architecture``; None when the architecture is unknown or not in the table."""
    return VLLM_LORA_MODULES.get(architecture) if architecture else None


def module_leaf(name: str) -> str:
    """The last component of a module name, the part vLLM compares (``model.layers.0.mlp.up_proj`` -> ``up_proj``)."""
    return name.rsplit(".", 1)[-1]
