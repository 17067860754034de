"""Element-wise merges of one module, computed in row blocks straight from the factors.

The element-wise methods (elementwise.py) are defined on whole dense deltas. Running them that way
on a 11008 x 4096 module makes a dozen passes over 180 MB tensors, bounded by memory bandwidth. Here
each ΔW_i = s_i B_i A_i is produced a block of rows at a time ((s_i B_i[rows]) @ A_i), pruned and
merged while the block is in cache, and written once into the merged delta: the same numbers as the
whole-tensor functions, with one dense tensor (the result) instead of n + 3.

The one global quantity, the magnitude threshold of TIES / magnitude pruning (the k-th largest
|ΔW_i|), is found exactly without sorting the whole delta: a random sample brackets it, one pass
counts the entries above the bracket and collects those inside, and a selection runs on that small
band. When the bracket misses, or entries tie at the threshold, it falls back to the whole-tensor
selection, so the kept set is always exactly the k largest (ties broken as in elementwise.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from loramgr.merge import elementwise
from loramgr.merge.threads import single_threaded

if TYPE_CHECKING:
    import torch

F32 = NDArray[Any]  # float32 arrays

#: entries per row block (4 MiB of float32): small enough for the caches, large enough to amortise dispatch
BLOCK_ENTRIES = 1 << 20
#: entries sampled to bracket the magnitude threshold
SAMPLE_SIZE = 1 << 18


class ModuleDeltas:
    """The dense deltas ΔW_i = s_i B_i A_i of one module, produced on demand, never all stored."""

    def __init__(self, scales: list[float], factors: list[tuple[F32, F32]]) -> None:
        self.scaled_b = [np.float32(scale) * b for scale, (_, b) in zip(scales, factors, strict=True)]
        self.a = [a for a, _ in factors]
        self.out_features = int(self.scaled_b[0].shape[0])
        self.in_features = int(self.a[0].shape[1])

    def __len__(self) -> int:
        return len(self.a)

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def full(self, i: int) -> F32:
        return self.scaled_b[i] @ self.a[i]

    def rows(self, i: int, start: int, stop: int) -> F32:
        return self.scaled_b[i][start:stop] @ self.a[i]

    def blocks(self) -> Iterator[tuple[int, int]]:
        step = max(1, BLOCK_ENTRIES // self.in_features)
        for start in range(0, self.out_features, step):
            yield start, min(start + step, self.out_features)

    def sample_magnitudes(self, i: int, generator: np.random.Generator) -> F32:
        index = generator.integers(self.numel, size=SAMPLE_SIZE)
        rows, cols = index // self.in_features, index % self.in_features
        sample: F32 = np.abs(np.einsum("sr,rs->s", self.scaled_b[i][rows], self.a[i][:, cols]))
        return sample


@dataclass
class Threshold:
    """Which entries of ΔW_i magnitude pruning keeps: |x| > value, and the first ``ties_to_keep``
    entries (in row-major order) with |x| == value. Float32 deltas of tens of millions of entries
    often hold the threshold value more than once, so ties need a rule: the whole-tensor
    elementwise.magnitude_prune_one uses the same one."""

    value: float
    ties_to_keep: int
    tied: int

    def keep(self, magnitude: F32) -> F32:
        """The kept mask of the next block; blocks must come in order (it counts the ties kept)."""
        equal = magnitude == self.value
        if self.tied > self.ties_to_keep:
            where = np.flatnonzero(equal)
            equal.reshape(-1)[where[self.ties_to_keep :]] = False
            self.ties_to_keep = max(0, self.ties_to_keep - where.size)
            self.tied = max(0, self.tied - where.size)
        kept: F32 = (magnitude > self.value) | equal
        return kept


def magnitude_threshold(deltas: ModuleDeltas, i: int, k: int, generator: np.random.Generator) -> Threshold | None:
    """The k-th largest |ΔW_i| and how many entries equal to it to keep; None: use the full path."""
    n = deltas.numel
    if n <= 4 * SAMPLE_SIZE:
        return None
    sample = np.sort(deltas.sample_magnitudes(i, generator))
    m = sample.size
    kept_fraction = k / n
    centre = m - kept_fraction * m
    margin = 6.0 * math.sqrt(m * kept_fraction * (1.0 - kept_fraction)) + 64
    low_index, high_index = int(centre - margin), int(centre + margin)
    low = float(sample[low_index]) if low_index >= 0 else 0.0
    high = float(sample[high_index]) if high_index < m else math.inf
    above = 0
    band: list[F32] = []
    with single_threaded():
        for start, stop in deltas.blocks():
            magnitude = np.abs(deltas.rows(i, start, stop))
            above += int((magnitude > high).sum())
            band.append(magnitude[(magnitude >= low) & (magnitude <= high)])
    values = np.concatenate(band)
    need = k - above
    if not 1 <= need <= values.size:
        return None  # the sample's bracket missed the threshold (very unlikely): select on the whole delta
    value = elementwise.kth_largest(values, need)
    strictly_above = above + int((values > value).sum())
    return Threshold(float(value), ties_to_keep=k - strictly_above, tied=int((values == value).sum()))


def pruned_by_magnitude(deltas: ModuleDeltas, density: float, seed: int) -> list[F32 | Threshold]:
    """Per source, its magnitude threshold or, when none was found, its pruned full delta."""
    generator = np.random.Generator(np.random.PCG64(seed))
    k = int(density * deltas.numel)
    out: list[F32 | Threshold] = []
    for i in range(len(deltas)):
        threshold = magnitude_threshold(deltas, i, k, generator) if 0 < k < deltas.numel else None
        if threshold is None:
            out.append(elementwise.magnitude_prune_one(deltas.full(i), density))
        else:
            out.append(threshold)
    return out


def pruned_at_random(deltas: ModuleDeltas, density: float, generator: torch.Generator) -> list[F32 | Threshold]:
    """DARE's pruned deltas. The drop masks are drawn over each whole delta, in source order, exactly
    as merge_utils draws them, so a seed gives PEFT's masks."""
    return [elementwise.random_prune_one(deltas.full(i), density, generator) for i in range(len(deltas))]


def _block(deltas: ModuleDeltas, pruned: list[F32 | Threshold], i: int, start: int, stop: int) -> F32:
    kept = pruned[i]
    if not isinstance(kept, Threshold):
        return kept[start:stop]
    block = deltas.rows(i, start, stop)
    return block * kept.keep(np.abs(block))


def merge_blocks(
    deltas: ModuleDeltas, pruned: list[F32 | Threshold], weights: list[float], majority_sign: str | None
) -> F32:
    """Σ w_i P_i (majority_sign None) or TIES' disjoint merge of the P_i, block by block.

    ``pruned[i]`` is P_i itself or the threshold that defines it from ΔW_i.
    """
    merged = np.empty((deltas.out_features, deltas.in_features), dtype=np.float32)
    with single_threaded():
        for start, stop in deltas.blocks():
            blocks = [_block(deltas, pruned, i, start, stop) for i in range(len(deltas))]
            if majority_sign is None:
                merged[start:stop] = elementwise.weighted_sum(blocks, weights)
            else:
                merged[start:stop] = elementwise.disjoint_merge(blocks, weights, majority_sign)
    return merged


def ties(deltas: ModuleDeltas, weights: list[float], density: float, majority_sign: str, seed: int) -> F32:
    """elementwise.ties on the module's deltas; ``seed`` only drives the threshold's sample."""
    return merge_blocks(deltas, pruned_by_magnitude(deltas, density, seed), weights, majority_sign)


def magnitude_prune(deltas: ModuleDeltas, weights: list[float], density: float, seed: int) -> F32:
    """elementwise.magnitude_prune on the module's deltas."""
    return merge_blocks(deltas, pruned_by_magnitude(deltas, density, seed), weights, None)

