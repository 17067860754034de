"""Serving engines' rules for ``loramgr check --engine``: per engine, its options and a list of rules.

A rule is a function of one :class:`Subject` (the adapter, the engine spec, the base it is checked
against and the base it was installed for) that yields findings. Adding a rule for an engine means
writing one such function and adding it to that engine's tuple in :data:`ENGINES`; adding an engine
means one more entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..adapter import AdapterInfo
from ..errors import EngineSpecError
from ..formats.lycoris import TYPE_NAMES
from .basemodel import BaseFingerprint
from .findings import Finding
from .vllm_modules import module_leaf, vllm_lora_modules

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class EngineSpec:
    """A parsed ``--engine`` value such as ``vllm:max-rank=64``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return self.name + (f":{opts}" if opts else "")


@dataclass(frozen=True)
class Subject:
    """What an engine rule looks at."""

    info: AdapterInfo
    label: str
    engine: EngineSpec
    base: BaseFingerprint | None  # the base model checked against (--base), if any
    own_base: BaseFingerprint | None  # the base the adapter was installed for (install --base), if any

    @property
    def kind(self) -> str:
        """The adapter type, DoRA included (a PEFT DoRA adapter has type "lora" and use_dora)."""
        return "dora" if self.info.use_dora else self.info.adapter_type

    def finding(self, severity: str, code: str, message: str, module: str | None = None) -> Finding:
        return Finding(severity, code, self.label, module, f"{self.engine.name}: {message}")


Rule = Callable[[Subject], Iterable[Finding]]


def same_name(a: str, b: str) -> bool:
    """Two base-model names for the same model: equal up to case, a trailing "/" and the owner."""

    def norm(x: str) -> str:
        return x.rstrip("/").lower()

    return norm(a) == norm(b) or norm(a).rsplit("/", 1)[-1] == norm(b).rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------
# rules


def peft_folders_only(s: Subject) -> Iterable[Finding]:
    if s.info.format != "peft":
        yield s.finding("error", "engine-format", f"serves PEFT adapter folders, this is a {s.info.format} file "
                        "(export it with --format peft)")


def no_kohya_files(s: Subject) -> Iterable[Finding]:
    if s.info.format == "kohya":
        yield s.finding("error", "engine-format", "PEFT does not load kohya files; export with --format peft "
                        "--base <model>")


def plain_lora_only(s: Subject) -> Iterable[Finding]:
    if s.kind != "lora":
        yield s.finding("error", "engine-type", f"{TYPE_NAMES.get(s.kind, s.kind)} adapters are not supported")


def peft_loadable(s: Subject) -> Iterable[Finding]:
    """PEFT loads LoRA, DoRA, and LoHa / LoKr in its own folder format (peft_type LOHA / LOKR)."""
    if s.kind in ("lora", "dora") and s.info.format != "kohya":
        return
    if s.kind in ("loha", "lokr") and s.info.format == "peft":
        return
    name = TYPE_NAMES.get(s.kind, s.kind)
    if s.kind in ("loha", "lokr"):
        yield s.finding("error", "engine-type", f"PEFT loads {name} only as a PEFT folder (peft_type "
                        f"{s.kind.upper()}), not as a {s.info.format} file")
    elif s.kind != "lora":
        yield s.finding("error", "engine-type", f"{name} adapters are not supported")


def vllm_max_rank(s: Subject) -> Iterable[Finding]:
    limit = s.engine.options["max-rank"]
    pattern = s.info.config.get("rank_pattern") or {}
    declared = s.info.config.get("r", s.info.rank)
    if declared is not None and int(declared) <= 0:
        yield s.finding("error", "engine-rank", f"rank r={declared} is not a positive integer")
        return
    top = max([m.rank for m in s.info.modules] + [int(v) for v in pattern.values()] + [int(declared or 0)])
    if top > limit:
        need = next((r for r in VLLM_RANKS if r >= top), None)
        hint = f"serve with --max-lora-rank {need}" if need else "vLLM has no max_lora_rank that large"
        worst = max(s.info.modules, key=lambda m: m.rank).name
        yield s.finding("error", "engine-rank", f"rank {top} exceeds max_lora_rank {limit} ({hint})", worst)


#: the modules_to_save vLLM loads: the heads of classification models
VLLM_MODULES_TO_SAVE = ("classifier", "score")
#: init_lora_weights values that only set the starting factors (a saved adapter is a plain LoRA)
VLLM_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
#: adapter_config.json features vLLM refuses, with the words it uses for them
VLLM_REFUSED_FEATURES = (
    ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
    ("layer_replication", "layer_replication"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
    ("use_qalora", "QALoRA"),
)


def vllm_config(s: Subject) -> Iterable[Finding]:
    config = s.info.config
    unsupported = [m for m in config.get("modules_to_save") or [] if m not in VLLM_MODULES_TO_SAVE]
    if unsupported:
        yield s.finding("error", "engine-modules-to-save", f"modules_to_save {unsupported} is not supported "
                        f"(only {list(VLLM_MODULES_TO_SAVE)}, the heads of classification models)")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        yield s.finding("error", "engine-bias", f"bias {bias!r} is not supported (needs \"none\")")
    if config.get("lora_bias"):
        yield s.finding("error", "engine-bias", "lora_bias (a trained bias on lora_B) is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_PLAIN_INITS:
        yield s.finding("error", "engine-init", f"init_lora_weights={init!r} is not supported: it changes the "
                        "base weights when PEFT loads the adapter")
    for key, feature in VLLM_REFUSED_FEATURES:
        if config.get(key):
            yield s.finding("error", "engine-feature", f"{feature} is not supported ({key} is set)")


def vllm_applied_modules(s: Subject) -> Iterable[Finding]:
    """vLLM applies LoRA only to its model's supported modules (:mod:`loramgr.compat.vllm_modules`): an
    adapter none of whose modules is among them is served as the bare base model without a word."""
    base = s.base or s.own_base
    architecture = base.architecture if base else None
    if architecture is None:
        yield s.finding("info", "engine-modules-unchecked", "which modules vLLM applies was not checked: the base "
                        "model's architecture is not known (pass --base, or install with --base)")
        return
    table = vllm_lora_modules(architecture)
    if table is None:
        yield s.finding("info", "engine-modules-unchecked", f"which modules vLLM applies was not checked: loramgr "
                        f"has no table of vLLM's LoRA modules for {architecture}")
        return
    if not table.supports_lora:
        yield s.finding("error", "engine-no-lora", f"vLLM serves no LoRA for {architecture} (its model class does "
                        "not implement SupportsLoRA)")
        return
    ignored = [m.name for m in s.info.modules if module_leaf(m.name) not in table.applied]
    leaves = ", ".join(sorted({module_leaf(name) for name in ignored}))
    applied = ", ".join(sorted(table.applied))
    if ignored and len(ignored) == len(s.info.modules):
        yield s.finding("error", "engine-modules", f"none of its modules ({leaves}) is one vLLM applies on "
                        f"{architecture} ({applied}): it would serve the bare base model", ignored[0])
    elif ignored:
        yield s.finding("warning", "engine-modules", f"vLLM ignores {len(ignored)} of its {len(s.info.modules)} "
                        f"modules on {architecture} ({leaves}; it applies {applied})", ignored[0])


def linear_only(s: Subject) -> Iterable[Finding]:
    for spec in s.info.modules:
        if spec.kind == "conv":
            yield s.finding("error", "engine-conv", "LoRA on convolutions is not supported (linear layers only)",
                            spec.name)


def vllm_served_name(s: Subject) -> Iterable[Finding]:
    declared, served = s.info.base_model, s.base.name if s.base else None
    if declared and served and not same_name(declared, served):
        yield s.finding("warning", "engine-served-name", "its filesystem resolver compares "
                        f"base_model_name_or_path {declared!r} with the served name {served!r}")


def same_architecture(s: Subject) -> Iterable[Finding]:
    own, base = s.own_base, s.base
    if own is None or base is None:
        return
    if own.architecture and base.architecture and own.architecture != base.architecture:
        yield s.finding("error", "engine-architecture",
                        f"adapter base architecture {own.architecture} differs from {base.architecture}")
    elif s.engine.name != "llama.cpp" and own.name and base.name and own.name != base.name:
        yield s.finding("warning", "engine-base-name", f"same architecture, other base name ({own.name} vs "
                        f"{base.name})")


def no_modules_to_save(s: Subject) -> Iterable[Finding]:
    saved = s.info.config.get("modules_to_save")
    if saved:
        yield s.finding("error", "engine-modules-to-save", f"modules_to_save {list(saved)} cannot be written as a "
                        "LoRA GGUF (full tensors, not lora_A / lora_B)")


def llamacpp_converter_scale(s: Subject) -> Iterable[Finding]:
    """llama.cpp's convert_lora_to_gguf.py writes the one lora_alpha and llama.cpp scales each module by
    alpha / its own rank: rank and alpha patterns, rsLoRA and mixed ranks come out wrong."""
    alpha = s.info.config.get("lora_alpha", s.info.alpha)
    if alpha is None:
        return
    wrong = [(m, (float(alpha) / m.rank) / m.scale) for m in s.info.modules
             if m.rank and m.scale and abs(float(alpha) / m.rank - m.scale) > 1e-6 * abs(m.scale)]
    if wrong:
        module, ratio = max(wrong, key=lambda pair: abs(pair[1] - 1))
        yield s.finding("warning", "engine-converter-scale", f"its convert_lora_to_gguf.py would scale "
                        f"{len(wrong)} module(s) wrongly (by up to x{ratio:.3g}: rank/alpha patterns, rsLoRA or mixed "
                        "ranks); 'loramgr export --format gguf' writes them exactly", module.name)


def base_needed(s: Subject) -> Iterable[Finding]:
    if s.base is None:
        yield s.finding("info", "engine-no-base", "pass a base model to verify every tensor exists in it")


def _check_vllm_options(options: dict[str, Any]) -> None:
    rank = options["max-rank"]
    if rank not in VLLM_RANKS:
        raise EngineSpecError(
            f"engine vllm: max-rank {rank} is not one of vLLM's max_lora_rank choices",
            engine="vllm",
            option="max-rank",
            hint=f"use one of {', '.join(map(str, VLLM_RANKS))}",
        )


@dataclass(frozen=True)
class Engine:
    """One engine: the options its spec takes (name -> type, with defaults) and its rules, in order."""

    rules: tuple[Rule, ...]
    options: Mapping[str, type] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[dict[str, Any]], None] | None = None


ENGINES: dict[str, Engine] = {
    "vllm": Engine(
        rules=(peft_folders_only, plain_lora_only, vllm_max_rank, vllm_config, linear_only, vllm_applied_modules,
               vllm_served_name),
        options={"max-rank": int},
        defaults={"max-rank": 16},
        validate=_check_vllm_options,
    ),
    "sglang": Engine(rules=(peft_folders_only, plain_lora_only, vllm_config, linear_only)),
    "lorax": Engine(rules=(peft_folders_only, plain_lora_only, same_architecture)),
    "tgi": Engine(rules=(peft_folders_only, plain_lora_only, same_architecture)),
    "llama.cpp": Engine(rules=(peft_folders_only, plain_lora_only, no_modules_to_save, linear_only,
                               llamacpp_converter_scale, same_architecture, base_needed)),
    "ollama": Engine(rules=(peft_folders_only, plain_lora_only, no_modules_to_save, linear_only,
                            same_architecture, base_needed)),
    "peft": Engine(rules=(no_kohya_files, peft_loadable)),
}


def parse_engine(spec: str) -> EngineSpec:
    """Parse ``name[:key=value,...]``; unknown engines, options or values raise EngineSpecError."""
    name, _, rest = spec.strip().partition(":")
    name = name.lower()
    if name not in ENGINES:
        raise EngineSpecError(f"unknown engine {name!r}", engine=name, hint=f"use one of {', '.join(ENGINES)}")
    engine = ENGINES[name]
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in engine.options:
            known = ", ".join(f"{k}=N" for k in engine.options) or "no options"
            raise EngineSpecError(f"engine {name}: bad option {item!r}", engine=name, option=key,
                                  hint=f"{name} takes {known}")
        try:
            options[key] = engine.options[key](value)
        except ValueError as exc:
            raise EngineSpecError(f"engine {name}: {key} must be a number, not {value!r}", engine=name,
                                  option=key) from exc
    options = {**engine.defaults, **options}
    if engine.validate is not None:
        engine.validate(options)
    return EngineSpec(name, options)


def engine_findings(subject: Subject) -> list[Finding]:
    """Every finding of the subject's engine's rules, in rule order."""
    return [f for rule in ENGINES[subject.engine.name].rules for f in rule(subject)]
