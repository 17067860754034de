"""The one options type of a merge, shared by the Python API, the CLI and recipes, and its one check.

The CLI generates its click options from the fields of :class:`MergeOptions` (each field's help is
:func:`option_help`), and a recipe stores :meth:`MergeOptions.to_dict`, so a flag, a keyword argument
and a recipe key cannot drift apart. :meth:`MergeOptions.validate` holds every rule about options;
the engine and the registry-level combine and compress call it before reading anything, so the CLI
and the Python API refuse a bad option with the same one-line error, which spells the option as its
CLI flag (``--density``). What each method accepts comes from its entry in
:data:`loramgr.merge.methods.METHODS`.

This module must not import torch: the CLI builds its options and checks them before loading it.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from loramgr.errors import MergeOptionError, NothingToMergeError
from loramgr.merge.methods import METHODS, MergeMethod, method_options, methods_in, methods_using

#: output dtypes a merge can write, by the names safetensors and ModuleSpec.dtype use
DTYPES = ("float32", "float16", "bfloat16", "float64")
MAJORITY_SIGN_METHODS = ("total", "frequency")
#: where a rule is applied: to the sources' cores in the canonical bases of their stacked factors
#: ("core", the result is a LoRA exactly), or to the dense deltas entry by entry ("full")
SPACES = ("core", "full")


def flag(option: str) -> str:
    """The CLI spelling of an option: ``majority_sign`` -> ``--majority-sign``."""
    return "--" + option.replace("_", "-")


def as_flags(values: dict[str, Any]) -> str:
    """Options as the command line that gives them: ``{"density": 0.5, "strict": True}`` ->
    ``--density 0.5 --strict`` (a false switch or a None value is left out, weights joined by commas)."""
    words: list[str] = []
    for option, value in values.items():
        if value is None or value is False:
            continue
        if value is True:
            words.append(flag(option))
        elif isinstance(value, list | tuple):
            words.append(f"{flag(option)} {','.join(f'{v:g}' if _is_real(v) else str(v) for v in value)}")
        else:
            words.append(f"{flag(option)} {value:g}" if _is_real(value) else f"{flag(option)} {value}")
    return " ".join(words)


@dataclass(frozen=True)
class MergeOptions:
    """How to combine adapters: the method and its parameters (see docs/merge-methods.md).

    Help texts may name ``{methods}``, ``{rank_defaults}``, ``{uses[OPTION]}`` and ``{in_space[SPACE]}``:
    they are filled in
    from the registry of methods (:func:`option_help`), so a new method appears everywhere at once.
    """

    method: str = field(default="linear", metadata={"help": "merge method: {methods}"})
    weights: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "one weight per adapter, in order (default 1.0 each); negative subtracts"},
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "global scaling coefficient λ of the merged delta (default 1)",
                  "example": "e.g. --scale 0.5 halves the merged delta"},
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "rank of the result per module (default: {rank_defaults})",
                  "example": "e.g. --rank 8"},
    )
    energy: float | None = field(
        default=None,
        metadata={"help": "per module, keep the smallest rank holding this fraction (0, 1] of the "
                  "Frobenius energy (with rank: at most that rank)",
                  "example": "e.g. --energy 0.9 keeps 90%"},
    )
    density: float | None = field(
        default=None,
        metadata={"help": "fraction (0, 1] of each delta's entries kept ({uses[density]})",
                  "example": "e.g. --density 0.5 keeps half"},
    )
    majority_sign: str = field(
        default="total",
        metadata={"help": "sign election of {uses[majority_sign]}: total (sign of the summed mass) or "
                  "frequency (count)"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "random seed of the drop masks of {uses[seed]} (default 0, recorded in the result)"},
    )
    space: str | None = field(
        default=None,
        metadata={"help": "where the rule of {uses[space]} applies: core (default: on the adapters' own "
                  "factors, the result is a LoRA exactly) or full (on the dense deltas, then re-ranked: PEFT's "
                  "ties_svd semantics; only {in_space[full]})"},
    )
    strict: bool = field(
        default=False,
        metadata={"help": "refuse modules that only some adapters target (default: absent counts as zero)"},
    )
    allow_different_bases: bool = field(
        default=False,
        metadata={"help": "combine adapters that declare different base models"},
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the written factors: float32, float16, bfloat16 (default: the sources')"},
    )

    def __post_init__(self) -> None:
        # Recipes and the CLI hand lists; a frozen, hashable options object wants a tuple.
        # Numbers become floats (so a recipe records 1.0, not 1); anything else is left for validate().
        if isinstance(self.weights, list | tuple):
            object.__setattr__(self, "weights", tuple(float(w) if _is_real(w) else w for w in self.weights))
        if _is_real(self.scale):
            object.__setattr__(self, "scale", float(self.scale))

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-able form for recipes and lineage; ``None`` fields are left out (TOML has no null)."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeOptions:
        """Inverse of :meth:`to_dict`; unknown keys are refused so a typo in a recipe is not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MergeOptionError(
                f"unknown merge option(s) {', '.join(unknown)}",
                option=unknown[0],
                hint=f"known options: {', '.join(sorted(known))}",
            )
        return cls(**data)

    def validate(self, n_adapters: int, operation: str = "combine") -> MergeMethod:
        """Check every option for a merge of ``n_adapters`` sources; return the method to run.

        Raises :class:`~loramgr.errors.MergeOptionError` naming the option as its CLI flag, or
        :class:`~loramgr.errors.NothingToMergeError` when there is no source. Reads no adapter.
        """
        if n_adapters < 1:
            raise NothingToMergeError(f"no adapters to {operation}", operation=operation,
                                      hint="give at least one adapter")
        method = METHODS.get(self.method) if isinstance(self.method, str) else None
        if method is None:
            raise MergeOptionError(
                f"{flag('method')} {self.method!r} is not a merge method", option="method", value=self.method,
                hint=f"use one of {', '.join(METHODS)}",
            )
        for option in sorted(method_options()):
            value = getattr(self, option)
            if value is None and option in method.required:
                raise missing_option(method, option)
            if value is not None and value != _default(option) and option not in method.parameters:
                raise MergeOptionError(
                    f"method {method.name} does not use {flag(option)} (got {value})", option=option, value=value,
                    hint=f"drop {flag(option)}, or use a method that does: {', '.join(methods_using(option))}",
                )
        for option, check in _VALUE_CHECKS.items():
            value = getattr(self, option)
            if value is not None:
                check(option, value)
        if self.weights is not None:
            check_weights(self.weights, n_adapters)
        if self.space is not None and self.space not in method.spaces:
            raise MergeOptionError(
                f"method {method.name} runs in {' or '.join(method.spaces)} space only, not {flag('space')} "
                f"{self.space}", option="space", value=self.space,
                hint=f"drop {flag('space')}, or use a method that runs in {self.space} space: "
                f"{', '.join(methods_in(self.space))}",
            )
        return method

    def with_defaults(self, n_adapters: int, method: MergeMethod) -> MergeOptions:
        """The options as actually applied: weights filled in, a seed-using method's seed fixed to 0,
        the space of a method that has one fixed to its default (core)."""
        weights = self.weights if self.weights is not None else (1.0,) * n_adapters
        seed = 0 if self.seed is None and "seed" in method.parameters else self.seed
        space = method.spaces[0] if self.space is None and method.spaces else self.space
        return replace(self, weights=weights, seed=seed, space=space)


def compress_options(*, rank: int | None, energy: float | None, dtype: str | None = None) -> MergeOptions:
    """The options of a compress: the optimal re-rank (``svd``) of one source with weight 1."""
    if rank is None and energy is None:
        raise MergeOptionError(
            f"compress needs {flag('rank')} or {flag('energy')}", option="rank",
            hint=f"{_field('rank').metadata['example']}, or --energy 0.95 to keep 95% of each module's energy",
        )
    return MergeOptions(method="svd", rank=rank, energy=energy, dtype=dtype, weights=(1.0,))


def missing_option(method: MergeMethod, option: str) -> MergeOptionError:
    """The error for a method that cannot run without ``option``."""
    return MergeOptionError(f"method {method.name} needs {flag(option)}", option=option,
                            hint=_field(option).metadata.get("example"))


def check_weights(weights: tuple[float, ...], n_adapters: int) -> None:
    """One finite weight per adapter, not all zero."""
    if not isinstance(weights, tuple):
        raise MergeOptionError(f"{flag('weights')} {weights!r} is not a list of numbers", option="weights",
                               value=weights, hint="e.g. --weights 0.7,0.3")
    check_weight_count(weights, n_adapters)
    if not all(_is_real(w) and math.isfinite(w) for w in weights):
        raise MergeOptionError(f"{flag('weights')} {list(weights)} contain a non-finite value", option="weights",
                               value=list(weights), hint="give finite numbers")
    if all(w == 0 for w in weights):
        raise MergeOptionError("all weights are zero: the result would be an empty adapter", option="weights",
                               value=list(weights), hint="give at least one non-zero weight")


def check_weight_count(weights: tuple[float, ...], n_adapters: int) -> None:
    if len(weights) != n_adapters:
        raise MergeOptionError(
            f"{len(weights)} weight(s) for {n_adapters} adapter(s)", option="weights", value=list(weights),
            hint=f"give {flag('weights')} one weight per adapter, in the same order",
        )


def option_help(name: str) -> str:
    """The help text of an option, with the method lists filled in from the registry of methods."""
    rank_defaults: dict[str, list[str]] = {}
    for method in METHODS.values():
        rank_defaults.setdefault(method.rank_default, []).append(method.name)
    names = list(METHODS)
    return str(_field(name).metadata["help"]).format(
        methods=" or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names),
        rank_defaults="; ".join(f"{', '.join(users)}: {text}" for text, users in rank_defaults.items()),
        uses={option: ", ".join(methods_using(option)) for option in method_options()},
        in_space={space: ", ".join(methods_in(space)) for space in SPACES},
    )


def _field(name: str) -> Any:
    return next(f for f in fields(MergeOptions) if f.name == name)


def _default(option: str) -> Any:
    default = _field(option).default
    return None if default is MISSING else default


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_fraction(option: str, value: Any) -> None:
    if not _is_real(value) or not (0.0 < value <= 1.0):
        raise MergeOptionError(f"{flag(option)} {value} is outside (0, 1]", option=option, value=value,
                               hint=_field(option).metadata.get("example"))


def _check_rank(option: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or int(value) != value or value < 1:
        raise MergeOptionError(f"{flag(option)} {value} is not a positive integer", option=option, value=value,
                               hint=f"give {flag(option)} 1 or more")


def _choice(choices: tuple[str, ...]) -> Any:
    def check(option: str, value: Any) -> None:
        if value not in choices:
            raise MergeOptionError(f"{flag(option)} {value!r} is unknown", option=option, value=value,
                                   hint=f"use one of {', '.join(choices)}")

    return check


def _check_scale(option: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value == 0:
        raise MergeOptionError(f"{flag(option)} {value} is not a finite non-zero number", option=option, value=value,
                               hint=_field(option).metadata.get("example"))


def _check_seed(option: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MergeOptionError(f"{flag(option)} {value!r} is not an integer", option=option, value=value,
                               hint="e.g. --seed 7")


def _check_switch(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise MergeOptionError(f"{flag(option)} {value!r} is not true or false", option=option, value=value)


# value checks of the options every method shares, in the order they are reported
_VALUE_CHECKS = {
    "scale": _check_scale,
    "rank": _check_rank,
    "energy": _check_fraction,
    "density": _check_fraction,
    "majority_sign": _choice(MAJORITY_SIGN_METHODS),
    "space": _choice(SPACES),
    "dtype": _choice(DTYPES),
    "seed": _check_seed,
    "strict": _check_switch,
    "allow_different_bases": _check_switch,
}
