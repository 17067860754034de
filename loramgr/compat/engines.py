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


def lora_or_peft_dora(s: Subject) -> Iterable[Finding]:
    if s.kind != "lora" and not (s.kind == "dora" and s.info.format != "kohya"):
        yield s.finding("error", "engine-type", f"{TYPE_NAMES.get(s.kind, s.kind)} adapters are not supported")


def vllm_max_rank(s: Subject) -> Iterable[Finding]:
    limit = s.engine.options["max-rank"]
    pattern = s.info.config.get("rank_pattern") or {}
    top = max([m.rank for m in s.info.modules] + [int(v) for v in pattern.values()] + [s.info.rank or 0])
    if top > limit:
        need = next((r for r in VLLM_RANKS if r >= top), None)
        hint = f"serve with --max-lora-rank {need}" if need else "vLLM has no max_lora_rank that large"
        worst = max(s.info.modules, key=lambda m: m.rank).name
        yield s.finding("error", "engine-rank", f"rank {top} exceeds max_lora_rank {limit} ({hint})", worst)


def vllm_config(s: Subject) -> Iterable[Finding]:
    if s.info.config.get("modules_to_save"):
        yield s.finding("error", "engine-modules-to-save",
                        f"modules_to_save {s.info.config['modules_to_save']} is not supported")
    bias = s.info.config.get("bias", "none")
    if bias not in (None, "none"):
        yield s.finding("error", "engine-bias", f"bias {bias!r} is not supported (needs \"none\")")


def vllm_linear_only(s: Subject) -> Iterable[Finding]:
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
        rules=(peft_folders_only, plain_lora_only, vllm_max_rank, vllm_config, vllm_linear_only, vllm_served_name),
        options={"max-rank": int},
        defaults={"max-rank": 16},
        validate=_check_vllm_options,
    ),
    "lorax": Engine(rules=(peft_folders_only, plain_lora_only, same_architecture)),
    "tgi": Engine(rules=(peft_folders_only, plain_lora_only, same_architecture)),
    "llama.cpp": Engine(rules=(peft_folders_only, plain_lora_only, same_architecture, base_needed)),
    "peft": Engine(rules=(no_kohya_files, lora_or_peft_dora)),
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
