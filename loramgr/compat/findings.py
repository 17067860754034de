"""What a check finds: one :class:`Finding` per problem, with a severity and a machine-readable code.

Callers decide on codes, never on message text: ``--allow-different-bases`` drops the findings whose
code is in :data:`BASE_MISMATCH_CODES`, and ``loramgr check --json`` prints the code with each finding.
"""

from __future__ import annotations

from dataclasses import dataclass

#: every code a finding can carry, and what it means
CODES: dict[str, str] = {
    "empty": "the adapter has no modules",
    "missing-module": "an adapter module is not in the base model",
    "ambiguous-module": "an adapter module name matches several modules of the base model",
    "duplicate-module": "two adapter modules resolve to the same module of the base model",
    "shape": "an adapter module's factors do not fit the base weight",
    "rank-above-dims": "a rank above min(d_in, d_out): parameters without capacity",
    "base-structure": "made for a base model of another structure",
    "base-content": "made for another fine-tune of the same architecture (content digests or kohya base hash)",
    "base-declared": "the declared base model names differ",
    "no-base": "no base model given: modules and shapes not checked",
    "engine-format": "the engine does not load this file format",
    "engine-type": "the engine does not load this adapter type",
    "engine-rank": "a rank above the engine's limit",
    "engine-modules-to-save": "the engine does not load modules_to_save",
    "engine-bias": "the engine does not load trained biases (bias, lora_bias)",
    "engine-init": "an init_lora_weights that changes the base weights at load (PiSSA, OLoRA, CorDA, LoftQ)",
    "engine-feature": "a PEFT feature the engine refuses (aLoRA, layer_replication, BD-LoRA, QALoRA)",
    "engine-converter-scale": "the engine's own converter would scale some modules wrongly",
    "engine-conv": "the engine does not load LoRA on convolutions",
    "engine-modules": "adapter modules the engine does not apply on the base's architecture (all of them: an error)",
    "engine-modules-unchecked": "which modules the engine applies was not checked (base architecture unknown)",
    "engine-no-lora": "the engine serves no LoRA for the base's architecture",
    "engine-served-name": "the engine compares the declared base name with the served model's name",
    "engine-architecture": "the adapter's base architecture differs from the served one",
    "engine-base-name": "same architecture as the served base, another name",
    "engine-no-base": "a check the engine needs the base model for was not made",
    "non-finite": "a tensor holds NaN or Inf",
    "zero-delta": "every lora_B is zero: the adapter changes nothing",
}

#: findings that say adapters were made for different bases: what ``allow_different_bases`` accepts
BASE_MISMATCH_CODES = frozenset({"base-structure", "base-content", "base-declared"})

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    code: str  # a key of CODES
    adapter: str
    module: str | None
    message: str

    def __post_init__(self) -> None:
        if self.code not in CODES or self.severity not in SEVERITIES:
            raise ValueError(f"unknown finding {self.severity}/{self.code}")

    def __str__(self) -> str:
        where = f"{self.adapter}" + (f" [{self.module}]" if self.module else "")
        return f"{self.severity}: {where}: {self.message}"
