"""Element-wise merges of dense per-module deltas: TIES, DARE, magnitude pruning.

Pure functions on numpy arrays with the semantics of PEFT 0.21's ``peft/utils/merge_utils.py`` (so a
result can be checked against PEFT's own functions), applied to the dense deltas ΔW_i = s_i B_i A_i
of one module, never to the factors (PEFT's non-SVD "ties" prunes A and B separately, which is a
different operation). Differences from merge_utils, none of which changes a result:

- DARE's masks come from an explicit, seeded ``torch.Generator`` instead of the global RNG (the one
  use of torch in a merge, imported only then: it is what reproduces PEFT's masks bit for bit), so a
  module's drop masks depend on (seed, module name) only and not on the order modules are processed in;
- the deltas are reduced one at a time instead of stacked, which saves n - 1 dense copies;
- magnitude pruning keeps exactly k = int(density · numel) entries, like ``torch.topk``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

Delta = NDArray[Any]


def module_seed(seed: int, module: str, purpose: str = "dare") -> int:
    """A 63-bit seed from (seed, module name) by SHA-256: stable across runs and Python processes
    (Python's ``hash()`` of a str is salted per process) and independent of module order."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def magnitude_prune_one(delta: Delta, density: float) -> Delta:
    """Keep the k = int(density · numel) entries of largest magnitude, zero the rest (density 1: no-op).

    The same selection as merge_utils' ``torch.topk``, found as a threshold (the k-th largest
    magnitude, by numpy's introselect). Entries tied with the threshold are kept in index order until
    exactly k are kept; topk leaves the choice among ties unspecified. The one trimming rule of both
    spaces: full space applies it to dense deltas, core space to the R x R cores and KnOTS blocks.
    """
    if density >= 1.0:
        return delta
    magnitude = np.abs(delta).reshape(-1)
    n = magnitude.size
    k = int(density * n)
    if k <= 0:
        return np.zeros_like(delta)
    threshold = kth_largest(magnitude, k)
    keep = magnitude >= threshold
    surplus = int(keep.sum()) - k
    if surplus > 0:  # ties at the threshold: drop the last ones by index
        tied = np.flatnonzero(magnitude == threshold)
        keep[tied[tied.size - surplus :]] = False
    return delta * keep.reshape(delta.shape)


def kth_largest(magnitude: Delta, k: int) -> float:
    """The k-th largest entry of a flat array, exactly."""
    n = magnitude.size
    return float(np.partition(magnitude, n - k)[n - k])


def random_prune_one(delta: Delta, density: float, generator: torch.Generator) -> Delta:
    """DARE: drop each entry with probability 1 - density and rescale survivors by 1 / density. The
    mask is merge_utils' ``torch.bernoulli`` draw over the whole delta, from ``generator``."""
    if density >= 1.0:
        return delta
    import torch

    mask = torch.bernoulli(torch.full(delta.shape, density), generator=generator).numpy()
    pruned: Delta = delta * mask / np.float32(density)
    return pruned


def weighted_sum(deltas: list[Delta], weights: list[float]) -> Delta:
    """Σ w_i ΔW_i, one delta at a time."""
    out = np.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        out += delta * out.dtype.type(weight)
    return out


def disjoint_merge(deltas: list[Delta], weights: list[float], majority_sign: str) -> Delta:
    """TIES' sign election and disjoint mean, as merge_utils.ties does it.

    The sign is elected from the unweighted (pruned) deltas: the sign of their sum ("total") or of the
    sum of their signs ("frequency"), 0 counting as +. Entries of w_i ΔW_i whose own sign agrees are
    summed and divided by how many agreed (at least 1). An entry pruned to 0 never agrees.
    """
    election = np.zeros_like(deltas[0])
    for delta in deltas:
        election += delta if majority_sign == "total" else np.sign(delta)
    # +1 where the election is >= 0, else -1; an entry agrees when it is non-zero with that sign
    majority = np.where(election >= 0, 1.0, -1.0).astype(election.dtype)
    del election
    mixed = np.zeros_like(deltas[0])
    agreeing = np.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = (delta * majority) > 0
        mixed += (delta * agrees) * mixed.dtype.type(weight)
        agreeing += agrees
    return mixed / np.maximum(agreeing, 1.0)


def ties(deltas: list[Delta], weights: list[float], density: float, majority_sign: str) -> Delta:
    """TIES-merging (Yadav et al. 2023): trim to top density by magnitude, elect signs, disjoint mean."""
    return disjoint_merge([magnitude_prune_one(d, density) for d in deltas], weights, majority_sign)


def magnitude_prune(deltas: list[Delta], weights: list[float], density: float) -> Delta:
    """Trim each delta to its top density by magnitude, then Σ w_i ΔW_i."""
    return weighted_sum([magnitude_prune_one(d, density) for d in deltas], weights)


def dare_linear(deltas: list[Delta], weights: list[float], density: float, generator: torch.Generator) -> Delta:
    """DARE (Yu et al. 2024) then Σ w_i ΔW_i; masks drawn in source order from ``generator``."""
    return weighted_sum([random_prune_one(d, density, generator) for d in deltas], weights)


def dare_ties(deltas: list[Delta], weights: list[float], density: float, majority_sign: str,
              generator: torch.Generator) -> Delta:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    pruned = [random_prune_one(d, density, generator) for d in deltas]
    return disjoint_merge(pruned, weights, majority_sign)
