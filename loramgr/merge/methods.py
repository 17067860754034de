"""The merge methods, one small class each, registered by name in :data:`METHODS`.

A method declares which options it uses (so the engine can refuse a ``density`` given to a method
that ignores it) and merges one module:

- a *factored* method (linear, svd) turns the sources' (c_i, A_i, B_i) into factors directly,
  without ever forming the d_out x d_in delta;
- an *element-wise* method (ties, dare_*, magnitude_prune) gets the dense deltas ΔW_i = s_i B_i A_i
  and returns the dense merged delta, which the engine then re-ranks.

Adding a method is adding a class here and registering it; the CLI and recipes pick it up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from loramgr.merge import dense, elementwise
from loramgr.merge.lowrank import Factors, concat_factors, rerank_factors
from loramgr.merge.options import MergeOptions


@dataclass(frozen=True)
class ModuleJob:
    """Everything a method needs to merge one module: its name and the present sources' parts."""

    name: str
    coefs: list[float]  # w_i · s_i of the sources that have this module, in source order
    weights: list[float]  # w_i of those sources
    scales: list[float]  # s_i of those sources
    factors: list[tuple[torch.Tensor, torch.Tensor]]  # (A_i, B_i) in float32

    def deltas(self) -> dense.ModuleDeltas:
        """ΔW_i = s_i B_i A_i, unweighted: element-wise methods weight after pruning, as PEFT does."""
        return dense.ModuleDeltas(self.scales, self.factors)


class MergeMethod:
    """Base of the registered methods: a name, the options it uses, and how it merges a module."""

    name: ClassVar[str]
    summary: ClassVar[str]
    uses_density: ClassVar[bool] = False
    uses_seed: ClassVar[bool] = False
    uses_majority_sign: ClassVar[bool] = False
    #: True: merge_factors is called; False: merge_dense is called and the engine re-ranks
    factored: ClassVar[bool] = False

    def merge_factors(self, job: ModuleJob, options: MergeOptions) -> Factors:
        raise NotImplementedError

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> torch.Tensor:
        raise NotImplementedError

    def default_rank(self, ranks: list[int]) -> int:
        """Rank of a re-ranked result when neither rank nor energy is given."""
        return sum(ranks)


METHODS: dict[str, MergeMethod] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    METHODS[cls.name] = cls()
    return cls


@register
class Linear(MergeMethod):
    name = "linear"
    summary = "exact Σ w_i ΔW_i by concatenation (rank Σ r_i); re-ranked like svd with rank/energy"
    factored = True

    def merge_factors(self, job: ModuleJob, options: MergeOptions) -> Factors:
        parts = [(c, a, b) for c, (a, b) in zip(job.coefs, job.factors, strict=True)]
        exact = concat_factors(parts)
        if options.rank is None and options.energy is None:
            return exact
        return rerank_factors(exact.a, exact.b, rank=options.rank, energy=options.energy)


@register
class Svd(MergeMethod):
    name = "svd"
    summary = "optimal rank-r approximation of Σ w_i ΔW_i, from the factors (no dense SVD)"
    factored = True

    def default_rank(self, ranks: list[int]) -> int:
        # PEFT's default for its "svd" combination: the largest source rank
        return max(ranks)

    def merge_factors(self, job: ModuleJob, options: MergeOptions) -> Factors:
        exact = concat_factors([(c, a, b) for c, (a, b) in zip(job.coefs, job.factors, strict=True)])
        rank = options.rank
        if rank is None and options.energy is None:
            rank = self.default_rank([a.shape[0] for a, _ in job.factors])
        return rerank_factors(exact.a, exact.b, rank=rank, energy=options.energy)


@register
class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim to top density by magnitude, elect signs, disjoint mean; then re-rank"
    uses_density = True
    uses_majority_sign = True

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> torch.Tensor:
        seed = elementwise.module_seed(0, job.name, "threshold")
        return dense.ties(job.deltas(), job.weights, _density(options), options.majority_sign, seed)


@register
class MagnitudePrune(MergeMethod):
    name = "magnitude_prune"
    summary = "trim each delta to its top density by magnitude, then weighted sum; then re-rank"
    uses_density = True

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> torch.Tensor:
        seed = elementwise.module_seed(0, job.name, "threshold")
        return dense.magnitude_prune(job.deltas(), job.weights, _density(options), seed)


@register
class DareLinear(MergeMethod):
    name = "dare_linear"
    summary = "DARE: random drop (1 - density) and rescale, then weighted sum; then re-rank"
    uses_density = True
    uses_seed = True

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> torch.Tensor:
        generator = dare_generator(options, job.name)
        return dense.dare(job.deltas(), job.weights, _density(options), None, generator)


@register
class DareTies(MergeMethod):
    name = "dare_ties"
    summary = "DARE's random drop and rescale, then TIES sign election and disjoint mean; then re-rank"
    uses_density = True
    uses_seed = True
    uses_majority_sign = True

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> torch.Tensor:
        generator = dare_generator(options, job.name)
        return dense.dare(job.deltas(), job.weights, _density(options), options.majority_sign, generator)


def dare_generator(options: MergeOptions, module: str) -> torch.Generator:
    """The generator of one module's DARE masks, seeded from (seed, module name)."""
    seed = options.seed if options.seed is not None else 0
    return torch.Generator().manual_seed(elementwise.module_seed(seed, module))


def _density(options: MergeOptions) -> float:
    if options.density is None:  # the engine validates options first; this guards direct calls
        raise ValueError("density is required")
    return float(options.density)
