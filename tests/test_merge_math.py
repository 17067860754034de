"""The merge maths as pure functions on numpy arrays, checked against dense linear algebra (torch) and
PEFT's merge_utils."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from loramgr.merge import dense, elementwise
from loramgr.merge.lowrank import choose_rank, concat_factors, rerank_dense, rerank_factors


def _random_factors(d_out: int, d_in: int, ranks: list[int], seed: int = 0):
    """(A, B) float32 numpy arrays, drawn from torch's generator."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=gen).numpy(), torch.randn(d_out, r, generator=gen).numpy())
            for r in ranks]


def _deltas(d_out: int, d_in: int, n: int, seed: int = 0) -> list[np.ndarray]:
    return [b @ a for a, b in _random_factors(d_out, d_in, [3 + i for i in range(n)], seed)]


def T(array: np.ndarray) -> torch.Tensor:  # noqa: N802 (a short name for the many conversions below)
    return torch.from_numpy(np.ascontiguousarray(array))


def Ts(arrays: list[np.ndarray]) -> list[torch.Tensor]:  # noqa: N802
    return [T(a) for a in arrays]


def test_concat_is_the_exact_weighted_sum():
    parts = _random_factors(20, 30, [2, 5, 3])
    coefs = [0.5, -1.25, 2.0]
    merged = concat_factors([(c, a, b) for c, (a, b) in zip(coefs, parts, strict=True)])
    expected = sum(c * (T(b).double() @ T(a).double()) for c, (a, b) in zip(coefs, parts, strict=True))
    assert merged.rank == 10
    torch.testing.assert_close(T(merged.b @ merged.a).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("d_out", "d_in", "ranks", "rank"), [(40, 60, [4, 6], 5), (12, 9, [8, 8], 4)])
def test_rerank_factors_is_the_optimal_truncation(d_out, d_in, ranks, rank):
    # (12, 9) with R = 16 > min(d_out, d_in): the QRs are then rank-deficient, the result still optimal
    parts = _random_factors(d_out, d_in, ranks, seed=1)
    cat = concat_factors([(1.0, a, b) for a, b in parts])
    dense_delta = (T(cat.b).double() @ T(cat.a).double())
    u, s, vh = torch.linalg.svd(dense_delta, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    out = rerank_factors(cat.a, cat.b, rank=rank, energy=None)
    assert out.rank == rank
    torch.testing.assert_close((T(out.b).double() @ T(out.a).double()), best, rtol=1e-4, atol=1e-4)
    expected_energy = float((s[:rank] ** 2).sum() / (s**2).sum())
    assert out.kept_energy == pytest.approx(expected_energy, rel=1e-6)


def test_rerank_factors_energy_picks_the_smallest_sufficient_rank():
    parts = _random_factors(50, 40, [6, 6], seed=2)
    cat = concat_factors([(1.0, a, b) for a, b in parts])
    s = torch.linalg.svdvals(T(cat.b).double() @ T(cat.a).double())
    fractions = torch.cumsum(s**2, 0) / (s**2).sum()
    needed = int((fractions >= 0.9).nonzero()[0]) + 1
    out = rerank_factors(cat.a, cat.b, rank=None, energy=0.9)
    assert out.rank == needed
    assert out.kept_energy >= 0.9 > float(fractions[needed - 2])
    capped = rerank_factors(cat.a, cat.b, rank=needed - 1, energy=0.9)
    assert capped.rank == needed - 1  # rank caps the energy rule


def test_choose_rank_edges():
    energies = np.array([4.0, 3.0, 2.0, 1.0])
    assert choose_rank(energies, 10.0, None, 1.0) == 4
    assert choose_rank(energies, 10.0, None, 0.4) == 1
    assert choose_rank(energies, 10.0, None, 0.41) == 2
    assert choose_rank(energies, 0.0, None, 0.5) == 1  # a zero delta still needs r >= 1
    assert choose_rank(energies, 10.0, 9, None) == 4


@pytest.mark.slow
def test_randomized_rerank_keeps_energy_within_half_a_percent_of_exact():
    # a TIES result is near full rank with a slowly decaying spectrum: the hard case for a
    # randomized SVD. 600 x 900 is above EXACT_SVD_MAX_DIM, so rerank_dense takes the randomized path.
    deltas = [b @ a for a, b in _random_factors(600, 900, [16, 16, 16], seed=3)]
    merged = elementwise.ties(deltas, [1.0, 0.7, 0.5], 0.3, "total")
    s = torch.linalg.svdvals(T(merged).double())
    for rank in (16, 48):
        exact = float((s[:rank] ** 2).sum() / (s**2).sum())
        out = rerank_dense(merged, rank=rank, energy=None, seed=7)
        assert out.rank == rank
        assert abs(out.kept_energy - exact) <= 0.005 * exact
        # the reported figure is the true one: 1 - residual / total
        residual = float((T(merged).double() - T(out.b).double() @ T(out.a).double()).square().sum())
        assert out.kept_energy == pytest.approx(1 - residual / float(T(merged).double().square().sum()), abs=1e-4)


def test_rerank_dense_is_deterministic_and_leaves_global_rng_alone():
    merged = elementwise.ties(_deltas(600, 700, 2), [1.0, 1.0], 0.5, "total")
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = rerank_dense(merged, rank=8, energy=None, seed=1)
    assert np.array_equal(np.random.get_state()[1], before)
    second = rerank_dense(merged, rank=8, energy=None, seed=1)
    assert np.array_equal(first.a, second.a) and np.array_equal(first.b, second.b)
    other = rerank_dense(merged, rank=8, energy=None, seed=2)
    assert not np.array_equal(first.a, other.a)  # the seed drives the randomized SVD


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_matches_peft(majority_sign):
    deltas = _deltas(24, 40, 3, seed=4)
    weights = [0.7, -0.4, 1.3]
    ours = elementwise.ties(deltas, weights, 0.4, majority_sign)
    theirs = merge_utils.ties(Ts(deltas), torch.tensor(weights), 0.4, majority_sign)
    torch.testing.assert_close(T(ours), theirs, rtol=1e-6, atol=1e-7)


def test_magnitude_prune_matches_peft():
    deltas = _deltas(24, 40, 3, seed=5)
    weights = [0.5, 1.5, -1.0]
    ours = elementwise.magnitude_prune(deltas, weights, 0.3)
    torch.testing.assert_close(T(ours), merge_utils.magnitude_prune(Ts(deltas), torch.tensor(weights), 0.3))


@pytest.mark.parametrize("with_ties", [False, True])
def test_dare_matches_peft_with_the_same_seed(with_ties):
    deltas = _deltas(24, 40, 2, seed=6)
    weights = [0.8, 0.6]
    seed = elementwise.module_seed(42, "model.layers.0.q_proj")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # PEFT draws from the global generator
    if with_ties:
        ours = elementwise.dare_ties(deltas, weights, 0.5, "total", generator)
        theirs = merge_utils.dare_ties(Ts(deltas), torch.tensor(weights), 0.5, "total")
    else:
        ours = elementwise.dare_linear(deltas, weights, 0.5, generator)
        theirs = merge_utils.dare_linear(Ts(deltas), torch.tensor(weights), 0.5)
    torch.testing.assert_close(T(ours), theirs, rtol=1e-6, atol=1e-7)


def test_module_seed_is_a_stable_hash_not_pythons():
    expected = int.from_bytes(hashlib.sha256(b"dare:7:model.layers.3.mlp.up_proj").digest()[:8], "big")
    assert elementwise.module_seed(7, "model.layers.3.mlp.up_proj") == expected & (2**63 - 1)
    assert elementwise.module_seed(7, "a") != elementwise.module_seed(8, "a")


@pytest.mark.parametrize("quantised", [False, True])
def test_blockwise_threshold_path_equals_whole_tensor_pruning(monkeypatch, quantised):
    # shrink the sample so a small module takes the sampled-threshold path; quantised factors make
    # many |ΔW| equal, so the tie rule (first by index) is exercised
    monkeypatch.setattr(dense, "SAMPLE_SIZE", 512)
    monkeypatch.setattr(dense, "BLOCK_ENTRIES", 1000)
    factors = _random_factors(150, 90, [3, 4], seed=8)
    if quantised:
        factors = [(np.round(a), np.round(b)) for a, b in factors]
    module = dense.ModuleDeltas([0.5, 2.0], factors)
    weights = [1.0, -0.5]
    full = [module.full(i) for i in range(2)]
    k = int(0.3 * module.numel)
    threshold = dense.magnitude_threshold(module, 0, k, np.random.default_rng(0))
    assert threshold is not None
    if quantised:
        assert threshold.tied > threshold.ties_to_keep
    torch.testing.assert_close(
        T(dense.ties(module, weights, 0.3, "total", seed=0)), T(elementwise.ties(full, weights, 0.3, "total"))
    )
    torch.testing.assert_close(
        T(dense.magnitude_prune(module, weights, 0.3, seed=0)), T(elementwise.magnitude_prune(full, weights, 0.3))
    )
    if not quantised:  # without ties the kept set is exactly topk's, i.e. PEFT's
        torch.testing.assert_close(
            T(dense.ties(module, weights, 0.3, "total", seed=0)),
            merge_utils.ties(Ts(full), torch.tensor(weights), 0.3, "total"),
        )
