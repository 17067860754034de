"""The one options type of a merge, shared by the Python API, the CLI and recipes.

The CLI generates its click options from the fields of :class:`MergeOptions` (each field carries a
``help`` string in its metadata), and a recipe stores :meth:`MergeOptions.to_dict`, so a flag, a
keyword argument and a recipe key cannot drift apart.

This module must not import torch: ``loramgr --help`` builds its options from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from loramgr.errors import MergeError

#: output dtypes a merge can write, by the names safetensors and ModuleSpec.dtype use
DTYPES = ("float32", "float16", "bfloat16", "float64")
MAJORITY_SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeOptions:
    """How to combine adapters: the method and its parameters (see docs/merge-methods.md)."""

    method: str = field(
        default="linear",
        metadata={"help": "merge method: linear, svd, ties, dare_linear, dare_ties or magnitude_prune"},
    )
    weights: tuple[float, ...] | None = field(
        default=None,
        metadata={"help": "one weight per adapter, in order (default 1.0 each); negative subtracts"},
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "rank of the result per module (svd default: largest source rank; "
                  "ties/dare/magnitude_prune default: sum of source ranks; linear: exact)"},
    )
    energy: float | None = field(
        default=None,
        metadata={"help": "per module, keep the smallest rank holding this fraction (0, 1] of the "
                  "Frobenius energy (with rank: at most that rank)"},
    )
    density: float | None = field(
        default=None,
        metadata={"help": "fraction (0, 1] of each delta's entries kept (ties, dare_*, magnitude_prune)"},
    )
    majority_sign: str = field(
        default="total",
        metadata={"help": "TIES sign election: total (sign of the summed mass) or frequency (count)"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "random seed of DARE's drop masks (default 0, recorded in the result)"},
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
        if self.weights is not None and not isinstance(self.weights, tuple):
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

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
            raise MergeError(
                f"unknown merge option(s) {', '.join(unknown)}",
                hint=f"known options: {', '.join(sorted(known))}",
            )
        values = dict(data)
        if values.get("weights") is not None:
            values["weights"] = tuple(float(w) for w in values["weights"])
        return cls(**values)

    def with_defaults(self, n_adapters: int, uses_seed: bool) -> MergeOptions:
        """The options as actually applied: weights filled in, DARE's seed fixed to 0 when not given."""
        weights = self.weights if self.weights is not None else (1.0,) * n_adapters
        seed = self.seed if self.seed is not None or not uses_seed else 0
        return replace(self, weights=weights, seed=seed)


def check_common(options: MergeOptions) -> None:
    """Range checks that need no adapter: energy, rank, majority sign, dtype, weights' values."""
    if options.energy is not None and not (0.0 < options.energy <= 1.0):
        raise MergeError(f"energy {options.energy} is outside (0, 1]", hint="e.g. --energy 0.9 keeps 90%")
    if options.rank is not None and (isinstance(options.rank, bool) or int(options.rank) != options.rank
                                     or options.rank < 1):
        raise MergeError(f"rank {options.rank} is not a positive integer", hint="give a rank >= 1")
    if options.majority_sign not in MAJORITY_SIGN_METHODS:
        raise MergeError(
            f"majority_sign {options.majority_sign!r} is unknown",
            hint=f"use one of {', '.join(MAJORITY_SIGN_METHODS)}",
        )
    if options.dtype is not None and options.dtype not in DTYPES:
        raise MergeError(f"dtype {options.dtype!r} is unknown", hint=f"use one of {', '.join(DTYPES)}")
    if options.weights is not None:
        bad = [w for w in options.weights if not math.isfinite(w)]
        if bad:
            raise MergeError(f"weights {list(options.weights)} contain a non-finite value",
                             hint="give finite numbers")
        if all(w == 0 for w in options.weights):
            raise MergeError("all weights are zero: the result would be an empty adapter",
                             hint="give at least one non-zero weight")
