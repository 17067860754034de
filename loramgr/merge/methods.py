"""The merge methods, registered by name in :data:`METHODS`.

Adding a method is registering one entry at the end of this module: the options check, the CLI's
``--method`` help and its error hints, the docs generator and recipes all read this registry. An entry
declares the method-specific options it reads (``parameters``) and the ones it cannot do without
(``required``); :meth:`MergeOptions.validate <loramgr.merge.options.MergeOptions.validate>` refuses a
method-specific option given to a method that does not declare it, so nothing is silently ignored.

Two kinds of method merge one module:

- a *factored* method (linear, svd) turns the sources' (c_i, A_i, B_i) into factors directly,
  without ever forming the d_out x d_in delta;
- an *element-wise* method (:class:`Elementwise`: TIES, DARE, magnitude pruning, one configurable
  class) forms the dense deltas ΔW_i = s_i B_i A_i, merges them entry by entry and re-ranks the
  dense result.

Either way the engine calls :meth:`MergeMethod.merge_module` once per module and gets factors back.

Importing this module does not import torch (the CLI checks its options before any tensor library
is loaded); the maths modules are imported inside the methods that run them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

    from loramgr.merge.dense import ModuleDeltas
    from loramgr.merge.lowrank import Factors
    from loramgr.merge.options import MergeOptions


@dataclass(frozen=True)
class ModuleJob:
    """Everything a method needs to merge one module: its name and the present sources' parts."""

    name: str
    coefs: list[float]  # w_i · s_i of the sources that have this module, in source order
    weights: list[float]  # w_i of those sources
    scales: list[float]  # s_i of those sources
    factors: list[tuple[torch.Tensor, torch.Tensor]]  # (A_i, B_i) in float32
    max_rank: int  # min(d_in, d_out): no result can have a higher rank

    def deltas(self) -> ModuleDeltas:
        """ΔW_i = s_i B_i A_i, unweighted: element-wise methods weight after pruning, as PEFT does."""
        from loramgr.merge.dense import ModuleDeltas

        return ModuleDeltas(self.scales, self.factors)

    def ranks(self) -> list[int]:
        return [a.shape[0] for a, _ in self.factors]


@dataclass(frozen=True)
class MergeMethod:
    """Base of the registered methods: a name, the options it uses, and how it merges a module."""

    name: str
    summary: str
    #: the method-specific options (MergeOptions fields) this method reads
    parameters: frozenset[str] = field(default=frozenset(), kw_only=True)
    #: those of them it cannot run without
    required: frozenset[str] = field(default=frozenset(), kw_only=True)

    #: True: only factor-sized matrices are formed (the engine then runs on one thread, where these
    #: small operations are fastest); False: dense d_out x d_in deltas are formed
    factored: ClassVar[bool] = False
    #: True: one source with weight 1 comes out as its own delta, so merging it alone copies it
    copies_single_source: ClassVar[bool] = False
    #: the rank of the result when neither rank nor energy is given, in words (for --help)
    rank_default: ClassVar[str] = "sum of source ranks"

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        """The merged factors of one module, scale baked in (ΔW = b @ a)."""
        raise NotImplementedError

    def default_rank(self, ranks: list[int]) -> int:
        """Rank of a re-ranked result when neither rank nor energy is given."""
        return sum(ranks)


@dataclass(frozen=True)
class ExactSum(MergeMethod):
    """Σ w_i ΔW_i exactly, by concatenating the factors; re-ranked like :class:`OptimalRank` on request."""

    factored: ClassVar[bool] = True
    copies_single_source: ClassVar[bool] = True
    rank_default: ClassVar[str] = "exact"

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        from loramgr.merge.lowrank import concat_factors, rerank_factors

        exact = concat_factors([(c, a, b) for c, (a, b) in zip(job.coefs, job.factors, strict=True)])
        if options.rank is None and options.energy is None:
            return exact
        return rerank_factors(exact.a, exact.b, rank=options.rank, energy=options.energy)


@dataclass(frozen=True)
class OptimalRank(MergeMethod):
    """The optimal rank-r approximation of Σ w_i ΔW_i, computed from the factors."""

    factored: ClassVar[bool] = True
    copies_single_source: ClassVar[bool] = True
    rank_default: ClassVar[str] = "largest source rank"

    def default_rank(self, ranks: list[int]) -> int:
        # PEFT's default for its "svd" combination: the largest source rank
        return max(ranks)

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        from loramgr.merge.lowrank import concat_factors, rerank_factors

        exact = concat_factors([(c, a, b) for c, (a, b) in zip(job.coefs, job.factors, strict=True)])
        rank = options.rank
        if rank is None and options.energy is None:
            rank = self.default_rank(job.ranks())
        return rerank_factors(exact.a, exact.b, rank=rank, energy=options.energy)


@dataclass(frozen=True)
class Elementwise(MergeMethod):
    """Prune each dense delta, then combine the pruned deltas: TIES, DARE and magnitude pruning.

    ``prune``: "magnitude" keeps each delta's top ``density`` fraction of entries by magnitude;
    "random" is DARE's drop with probability 1 - density and 1 / density rescale (seeded by
    ``seed``). ``elect_signs``: TIES' sign election (``majority_sign``) and disjoint mean instead of
    the weighted sum. The options a configuration reads follow from these two choices.
    """

    prune: Literal["magnitude", "random"] = field(default="magnitude", kw_only=True)
    elect_signs: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        used = {"density"} | ({"seed"} if self.prune == "random" else set())
        used |= {"majority_sign"} if self.elect_signs else set()
        object.__setattr__(self, "parameters", frozenset(used))
        object.__setattr__(self, "required", frozenset({"density"}))

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        """The element-wise merge, re-ranked (lossily: the kept energy is reported)."""
        from loramgr.merge.elementwise import module_seed
        from loramgr.merge.lowrank import rerank_dense

        merged = self.merge_dense(job, options)
        rank = options.rank or min(self.default_rank(job.ranks()), job.max_rank)
        return rerank_dense(merged, rank=rank, energy=options.energy, seed=module_seed(0, job.name, "rerank"))

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> torch.Tensor:
        """The dense merged delta of one module."""
        from loramgr.merge import dense
        from loramgr.merge.elementwise import module_seed
        from loramgr.merge.options import missing_option

        if options.density is None:  # validate() refuses this first; a direct call gets the same error
            raise missing_option(self, "density")
        deltas = job.deltas()
        if self.prune == "magnitude":
            # the seed only drives the sample that brackets the magnitude threshold, never the result
            pruned = dense.pruned_by_magnitude(deltas, options.density, module_seed(0, job.name, "threshold"))
        else:
            pruned = dense.pruned_at_random(deltas, options.density, dare_generator(options, job.name))
        majority_sign = options.majority_sign if self.elect_signs else None
        return dense.merge_blocks(deltas, pruned, job.weights, majority_sign)


def dare_generator(options: MergeOptions, module: str) -> torch.Generator:
    """The generator of one module's DARE masks, seeded from (seed, module name)."""
    import torch

    from loramgr.merge.elementwise import module_seed

    seed = options.seed if options.seed is not None else 0
    return torch.Generator().manual_seed(module_seed(seed, module))


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to :data:`METHODS` under its name (a later entry replaces an earlier one)."""
    METHODS[method.name] = method
    return method


def methods_using(option: str) -> list[str]:
    """Names of the registered methods that read ``option``, in registration order."""
    return [name for name, method in METHODS.items() if option in method.parameters]


def method_options() -> set[str]:
    """Every option some method declares: given to a method that does not declare it, it is refused."""
    return {option for method in METHODS.values() for option in method.parameters}


register(ExactSum("linear", "exact Σ w_i ΔW_i by concatenation (rank Σ r_i); re-ranked like svd with rank/energy"))
register(OptimalRank("svd", "optimal rank-r approximation of Σ w_i ΔW_i, from the factors (no dense SVD)"))
register(Elementwise("ties", "TIES: trim to top density by magnitude, elect signs, disjoint mean; then re-rank",
                     prune="magnitude", elect_signs=True))
register(Elementwise("dare_linear", "DARE: random drop (1 - density) and rescale, then weighted sum; then re-rank",
                     prune="random"))
register(Elementwise("dare_ties", "DARE's random drop and rescale, then TIES sign election and disjoint mean; "
                     "then re-rank", prune="random", elect_signs=True))
register(Elementwise("magnitude_prune", "trim each delta to its top density by magnitude, then weighted sum; "
                     "then re-rank", prune="magnitude"))
