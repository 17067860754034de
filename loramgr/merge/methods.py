"""The merge methods, registered by name in :data:`METHODS`.

Adding a method is registering one entry at the end of this module: the options check, the CLI's
``--method`` help and its error hints, the docs generator and recipes all read this registry. An entry
declares the method-specific options it reads (``parameters``) and the ones it cannot do without
(``required``); :meth:`MergeOptions.validate <loramgr.merge.options.MergeOptions.validate>` refuses a
method-specific option given to a method that does not declare it, so nothing is silently ignored.

Three kinds of method merge one module:

- a *factored* method (linear, svd) turns the sources' (c_i, A_i, B_i) into factors directly,
  without ever forming the d_out x d_in delta;
- an *element-wise* method (:class:`Elementwise`: TIES, DARE, magnitude pruning, one configurable
  class) applies its rule in one of two spaces (``space``): in *core space* (the default) to the
  R x R cores of the sources in the canonical bases of their stacked factors
  (:mod:`loramgr.merge.core_space`), so the result is a LoRA exactly and no dense delta exists; in
  *full space* to the dense deltas ΔW_i = s_i B_i A_i entry by entry (PEFT's ``ties_svd``
  semantics), followed by a lossy re-rank of the dense result;
- a *core-space* method (:class:`CoreSpaceMethod`: TSV-M, Iso-C, Iso-CTS, KnOTS) exists in core
  space only.

Either way the engine calls :meth:`MergeMethod.merge_module` once per module and gets factors back.

Importing this module imports neither numpy nor torch (the CLI checks its options before any tensor
library is loaded); the maths modules, on numpy arrays, are imported inside the methods that run
them. torch is imported only for DARE in full space, whose masks are torch's random stream (PEFT's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import numpy as np
    import torch
    from numpy.typing import NDArray

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
    factors: list[tuple[NDArray[np.float32], NDArray[np.float32]]]  # (A_i, B_i) in float32
    max_rank: int  # min(d_in, d_out): no result can have a higher rank

    def deltas(self) -> ModuleDeltas:
        """ΔW_i = s_i B_i A_i, unweighted: element-wise methods weight after pruning, as PEFT does."""
        from loramgr.merge.dense import ModuleDeltas

        return ModuleDeltas(self.scales, self.factors)

    def ranks(self) -> list[int]:
        return [int(a.shape[0]) for a, _ in self.factors]

    def scaled_parts(self, scale: float) -> list[tuple[float, NDArray[np.float32], NDArray[np.float32]]]:
        """(λ w_i s_i, A_i, B_i) per source, for the factored sums."""
        return [(scale * c, a, b) for c, (a, b) in zip(self.coefs, self.factors, strict=True)]

    def sources(self) -> list[tuple[NDArray[np.float32], NDArray[np.float32], float]]:
        """(A_i, B_i, s_i) per source, as core_space takes them (unweighted: the weights act on the cores)."""
        return [(a, b, s) for s, (a, b) in zip(self.scales, self.factors, strict=True)]


@dataclass(frozen=True)
class MergeMethod:
    """Base of the registered methods: a name, the options it uses, and how it merges a module."""

    name: str
    summary: str
    #: the method-specific options (MergeOptions fields) this method reads
    parameters: frozenset[str] = field(default=frozenset(), kw_only=True)
    #: those of them it cannot run without
    required: frozenset[str] = field(default=frozenset(), kw_only=True)

    #: the spaces the method can run in, its default first (see ``MergeOptions.space``); empty for
    #: methods whose result does not depend on a space (linear, svd), which then refuse ``space``
    spaces: ClassVar[tuple[str, ...]] = ()
    #: True: one source with weight 1 comes out as its own delta, so merging it alone copies it
    copies_single_source: ClassVar[bool] = False
    #: the rank of the result when neither rank nor energy is given, in words (for --help)
    rank_default: ClassVar[str] = "sum of source ranks"

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        """The merged factors of one module, scale baked in (ΔW = b @ a)."""
        raise NotImplementedError

    def factored(self, options: MergeOptions) -> bool:
        """True when, with ``options``, only factor-sized matrices are formed (the engine then runs
        on one thread, where these small operations are fastest); False when dense d_out x d_in
        deltas are."""
        return False

    def default_rank(self, ranks: list[int]) -> int:
        """Rank of a re-ranked result when neither rank nor energy is given."""
        return sum(ranks)


@dataclass(frozen=True)
class ExactSum(MergeMethod):
    """Σ w_i ΔW_i exactly, by concatenating the factors; re-ranked like :class:`OptimalRank` on request."""

    copies_single_source: ClassVar[bool] = True
    rank_default: ClassVar[str] = "exact"

    def factored(self, options: MergeOptions) -> bool:
        return True

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        from loramgr.merge.lowrank import concat_factors, rerank_factors

        exact = concat_factors(job.scaled_parts(options.scale))
        if options.rank is None and options.energy is None:
            return exact
        return rerank_factors(exact.a, exact.b, rank=options.rank, energy=options.energy)


@dataclass(frozen=True)
class OptimalRank(MergeMethod):
    """The optimal rank-r approximation of Σ w_i ΔW_i, computed from the factors."""

    copies_single_source: ClassVar[bool] = True
    rank_default: ClassVar[str] = "largest source rank"

    def factored(self, options: MergeOptions) -> bool:
        return True

    def default_rank(self, ranks: list[int]) -> int:
        # PEFT's default for its "svd" combination: the largest source rank
        return max(ranks)

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        from loramgr.merge.lowrank import concat_factors, rerank_factors

        exact = concat_factors(job.scaled_parts(options.scale))
        rank = options.rank
        if rank is None and options.energy is None:
            rank = self.default_rank(job.ranks())
        return rerank_factors(exact.a, exact.b, rank=rank, energy=options.energy)


@dataclass(frozen=True)
class CoreSpaceMethod(MergeMethod):
    """A method computed in the adapters' own space by :func:`loramgr.merge.core_space.merge_module`
    under its own name: TSV-M, Iso-C, Iso-CTS, KnOTS-TIES, KnOTS-DARE. The result is a LoRA exactly
    (rank at most Σ r_i), truncated exactly from the core when ``rank`` or ``energy`` is given."""

    spaces: ClassVar[tuple[str, ...]] = ("core",)
    rank_default: ClassVar[str] = "exact, at most the sum of source ranks"

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", self.parameters | {"space"})

    def factored(self, options: MergeOptions) -> bool:
        return True

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        return merge_in_core_space(self.name, job, options)


def merge_in_core_space(rule: str, job: ModuleJob, options: MergeOptions) -> Factors:
    """One module through :func:`loramgr.merge.core_space.merge_module` with ``rule``: DARE's masks
    from :func:`core_generator`, λ = ``options.scale``, the exact truncation to
    ``rank`` / ``energy``. Reads only the job's factors: no dense delta is formed."""
    from loramgr.merge import core_space

    needs_generator = core_space.METHODS[rule][1]
    rank = options.rank
    if rank is None and options.energy is None and sum(job.ranks()) > job.max_rank:
        rank = job.max_rank  # ΔW has rank <= min(d_in, d_out), so this truncation is exact
    return core_space.merge_module(
        rule, job.sources(), job.weights, density=options.density, majority_sign=options.majority_sign,
        generator=core_generator(options, job.name) if needs_generator else None, scale=options.scale,
        rank=rank, energy=options.energy,
    )


@dataclass(frozen=True)
class Elementwise(MergeMethod):
    """Prune each delta, then combine the pruned deltas: TIES, DARE and magnitude pruning.

    ``prune``: "magnitude" keeps each delta's top ``density`` fraction of entries by magnitude;
    "random" is DARE's drop with probability 1 - density and 1 / density rescale (seeded by
    ``seed``). ``elect_signs``: TIES' sign election (``majority_sign``) and disjoint mean instead of
    the weighted sum. The options a configuration reads follow from these two choices.

    In core space (the default) the rule acts on the sources' R x R cores
    (:func:`merge_in_core_space`); in full space on the dense deltas (:meth:`merge_dense`), re-ranked.
    """

    prune: Literal["magnitude", "random"] = field(default="magnitude", kw_only=True)
    elect_signs: bool = field(default=False, kw_only=True)

    spaces: ClassVar[tuple[str, ...]] = ("core", "full")
    rank_default: ClassVar[str] = ("exact in core space (at most the sum of source ranks), the sum of source ranks "
                                   "in full space")

    def __post_init__(self) -> None:
        used = {"density", "space"} | ({"seed"} if self.prune == "random" else set())
        used |= {"majority_sign"} if self.elect_signs else set()
        object.__setattr__(self, "parameters", frozenset(used))
        object.__setattr__(self, "required", frozenset({"density"}))

    def factored(self, options: MergeOptions) -> bool:
        return options.space != "full"

    def merge_module(self, job: ModuleJob, options: MergeOptions) -> Factors:
        """Core space: the rule on the cores, exact. Full space: the element-wise merge of the dense
        deltas, re-ranked (lossily: the kept energy is reported)."""
        from loramgr.merge.elementwise import module_seed
        from loramgr.merge.lowrank import rerank_dense

        if options.space != "full":
            return merge_in_core_space(self.name, job, options)
        merged = self.merge_dense(job, options)
        if options.scale != 1.0:
            merged *= merged.dtype.type(options.scale)
        rank = options.rank or min(self.default_rank(job.ranks()), job.max_rank)
        return rerank_dense(merged, rank=rank, energy=options.energy, seed=module_seed(0, job.name, "rerank"))

    def merge_dense(self, job: ModuleJob, options: MergeOptions) -> NDArray[np.float32]:
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
    """The generator of one module's DARE masks in full space, seeded from (seed, module name): a torch
    generator, so that the masks are the ones PEFT draws after ``torch.manual_seed`` of that seed."""
    import torch

    from loramgr.merge.elementwise import module_seed

    seed = options.seed if options.seed is not None else 0
    return torch.Generator().manual_seed(module_seed(seed, module))


def core_generator(options: MergeOptions, module: str) -> np.random.Generator:
    """The generator of one module's DARE masks in core space (numpy's PCG64), seeded from (seed, module
    name) like :func:`dare_generator`."""
    import numpy as np

    from loramgr.merge.elementwise import module_seed

    seed = options.seed if options.seed is not None else 0
    return np.random.Generator(np.random.PCG64(module_seed(seed, module)))


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to :data:`METHODS` under its name (a later entry replaces an earlier one)."""
    METHODS[method.name] = method
    return method


def methods_in(space: str) -> list[str]:
    """Names of the registered methods that can run in ``space``, in registration order."""
    return [name for name, method in METHODS.items() if space in method.spaces]


def methods_using(option: str) -> list[str]:
    """Names of the registered methods that read ``option``, in registration order."""
    return [name for name, method in METHODS.items() if option in method.parameters]


def method_options() -> set[str]:
    """Every option some method declares: given to a method that does not declare it, it is refused."""
    return {option for method in METHODS.values() for option in method.parameters}


register(ExactSum("linear", "exact Σ w_i ΔW_i by concatenation (rank Σ r_i); re-ranked like svd with rank/energy"))
register(OptimalRank("svd", "optimal rank-r approximation of Σ w_i ΔW_i, from the factors (no dense SVD)"))
register(Elementwise("ties", "TIES: trim to top density by magnitude, elect signs, disjoint mean",
                     prune="magnitude", elect_signs=True))
register(Elementwise("dare_linear", "DARE: random drop (1 - density) and rescale, then weighted sum",
                     prune="random"))
register(Elementwise("dare_ties", "DARE's random drop and rescale, then TIES sign election and disjoint mean",
                     prune="random", elect_signs=True))
register(Elementwise("magnitude_prune", "trim each delta to its top density by magnitude, then weighted sum",
                     prune="magnitude"))
register(CoreSpaceMethod("tsv", "TSV-M: each source's top singular vectors, orthogonalised across sources"))
register(CoreSpaceMethod("iso_c", "Iso-C: the sum's singular vectors with an isotropic (flat) spectrum"))
register(CoreSpaceMethod("iso_cts", "Iso-CTS: a common and per-source subspaces, isotropic spectrum"))
register(CoreSpaceMethod("knots_ties", "KnOTS: TIES on the sources' blocks of the SVD of [ΔW_1 ... ΔW_n]",
                         parameters=frozenset({"density", "majority_sign"}), required=frozenset({"density"})))
register(CoreSpaceMethod("knots_dare", "KnOTS: DARE then TIES on the blocks of the SVD of [ΔW_1 ... ΔW_n]",
                         parameters=frozenset({"density", "seed", "majority_sign"}), required=frozenset({"density"})))
