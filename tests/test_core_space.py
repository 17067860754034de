"""Core-space and KnOTS merges (loramgr.merge.core_space) against dense implementations of the papers.

The reference here builds everything densely and independently of the library: ΔW_t = s_t B_t A_t as
m x n matrices, U_B and V_A from full torch.linalg.svd of the stacked factors (with whatever signs
the SVD picks), cores U_Bᵀ ΔW_t V_Aᵀ from the dense deltas, TIES and magnitude pruning from PEFT's
own peft.utils.merge_utils (DARE: the drop written here, then PEFT's sign election and disjoint
merge), TSV / Iso / KnOTS written out from the papers' reference code, and the merged delta
reconstructed densely. The library computes from the factors only, on numpy arrays; the reference
is torch, independent of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from loramgr.merge import core_space
from loramgr.merge.elementwise import module_seed

F64 = torch.float64
EPS = torch.finfo(F64).eps
SEED, MODULE = 11, "model.layers.3.self_attn.q_proj"


# ---------------------------------------------------------------------------------------------
# the dense reference


def dense_delta(source) -> torch.Tensor:
    a, b, scale = source
    return scale * b.to(F64) @ a.to(F64)


def nonnull(s: torch.Tensor, shape) -> torch.Tensor:
    return s > EPS * max(shape) * s[0]


def dense_bases(sources):
    b_stack = torch.cat([s * b.to(F64) for _, b, s in sources], dim=1)
    a_stack = torch.cat([a.to(F64) for a, _, _ in sources], dim=0)
    u, s, _ = torch.linalg.svd(b_stack, full_matrices=False)
    u_b = u[:, nonnull(s, b_stack.shape)]
    _, s, vh = torch.linalg.svd(a_stack, full_matrices=False)
    v_a = vh[nonnull(s, a_stack.shape)]
    return u_b, v_a


def polar(x):
    """Procrustes; for a rank-deficient x the partial isometry on its range (the unique choice)."""
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    keep = nonnull(s, x.shape)
    return p[:, keep] @ qh[keep]


def top(matrix, k):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(k, int(nonnull(s, matrix.shape).sum()))
    return u[:, :k], s[:k], vh[:k]


def ref_tsv(cores):
    k = int(min(cores[0].shape) * (1 / len(cores)) + 1e-9)
    parts = [top(c, k) for c in cores]
    u = torch.cat([p[0] for p in parts], 1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], 0)
    return torch.linalg.multi_dot((polar(u), torch.diag(s), polar(vh.T).T))


def ref_iso_c(cores):
    u, s, vh = top(sum(cores), min(cores[0].shape))
    return u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh


def ref_iso_cts(cores, fraction=0.8):
    d, t = min(cores[0].shape), len(cores)
    common = int(d * fraction)
    task_total = round((d - common) / t) * t
    common = d - task_total
    per_task = task_total // t
    u_c, s_c, vh_c = top(sum(cores), common)
    parts = [top(c - u_c @ u_c.T @ c, per_task) for c in cores] + [(u_c, s_c, vh_c)]
    u = torch.cat([p[0] for p in parts], 1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], 0)
    return torch.linalg.multi_dot((polar(u), torch.diag(torch.full_like(s, float(s.mean()))), polar(vh.T).T))


def dare_drop(tensors, density, seed):
    """DARE's drop and rescale, one uniform float32 draw per entry (row-major) from the per-module
    generator (numpy's PCG64 seeded with module_seed), in order."""
    generator = np.random.Generator(np.random.PCG64(module_seed(seed, MODULE)))
    draws = [torch.from_numpy(generator.random(tuple(t.shape), dtype=np.float32)) for t in tensors]
    return [t * (u < density) / density for t, u in zip(tensors, draws)]


def peft_rule(method, tensors, weights, density, seed=None):
    """PEFT merge_utils on stacked tensors (DARE: PEFT's combination after the drop above)."""
    w = torch.tensor(weights, dtype=F64)
    tensors = [t.to(F64) for t in tensors]
    if method == "ties":
        return merge_utils.ties(tensors, w, density, "total")
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, w, density)
    if method == "dare_linear":
        return merge_utils.task_arithmetic(dare_drop(tensors, density, seed), w)
    if method == "dare_ties":
        stacked = torch.stack(dare_drop(tensors, density, seed))
        signs = merge_utils.calculate_majority_sign_mask(stacked, "total")
        return merge_utils.disjoint_merge(stacked * w[:, None, None], signs)
    raise AssertionError(method)


def dense_reference(method, sources, weights, density=0.4, scale=1.0, seed=SEED):
    present = [(src, w) for src, w in zip(sources, weights) if src[0].any() and src[1].any()]
    sources, weights = [p[0] for p in present], [p[1] for p in present]
    deltas = [dense_delta(s) for s in sources]
    if method.startswith("knots_"):
        n = deltas[0].shape[1]
        u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        keep = nonnull(s, (deltas[0].shape[0], n * len(deltas)))
        u, s, vh = u[:, keep], s[keep], vh[keep]
        blocks = [torch.diag(s) @ vh[:, i * n:(i + 1) * n] for i in range(len(deltas))]
        rule = "ties" if method == "knots_ties" else "dare_ties"
        return scale * u @ peft_rule(rule, blocks, weights, density, seed)
    u_b, v_a = dense_bases(sources)
    cores = [u_b.T @ d @ v_a.T for d in deltas]
    weighted = [w * c for w, c in zip(weights, cores)]
    if method == "tsv":
        merged = ref_tsv(weighted)
    elif method == "iso_c":
        merged = ref_iso_c(weighted)
    elif method == "iso_cts":
        merged = ref_iso_cts(weighted)
    else:
        merged = peft_rule(method, cores, weights, density, seed if method.startswith("dare") else None)
    return scale * u_b @ merged @ v_a


# ---------------------------------------------------------------------------------------------
# inputs


def random_sources(out_features, in_features, ranks, *, seed=0, rslora=(False,) * 3, alphas=None):
    gen = torch.Generator().manual_seed(seed)
    alphas = alphas or [2.0 * r for r in ranks]
    sources = []
    for r, alpha, rs in zip(ranks, alphas, rslora):
        a = torch.randn(r, in_features, generator=gen) / in_features**0.5
        b = torch.randn(out_features, r, generator=gen) / r**0.5
        sources.append((a, b, alpha / (r**0.5 if rs else r)))
    return sources


def merged_delta(factors):
    return factors.b.to(F64) @ factors.a.to(F64)


def relative_error(ours, reference):
    return float(torch.linalg.norm(ours - reference) / torch.linalg.norm(reference))


def as_arrays(sources):
    return [(a.numpy(), b.numpy(), scale) for a, b, scale in sources]


def merge(method, sources, weights, **kwargs):
    """core_space.merge_module on the sources as numpy arrays; the factors back as torch tensors."""
    factors = core_space.merge_module(method, as_arrays(sources), weights, **kwargs)
    return SimpleNamespace(a=torch.from_numpy(factors.a), b=torch.from_numpy(factors.b), rank=factors.rank,
                           kept_energy=factors.kept_energy)


def library(method, sources, weights, *, density=0.4, scale=1.0, seed=SEED, **kwargs):
    generator = np.random.Generator(np.random.PCG64(module_seed(seed, MODULE)))
    return merge(method, sources, weights, density=density, scale=scale, generator=generator, **kwargs)


CASES = {
    # mixed ranks, rsLoRA on one source, a negative weight; m, n above R = 16
    "mixed": (lambda: random_sources(40, 36, (3, 5, 8), rslora=(False, True, False)), (0.7, -0.4, 1.1), 1.0),
    # R = 16 > n = 12: V_A has 12 rows, the cores are 16 x 12; global scale 0.6
    "wide": (lambda: random_sources(40, 12, (4, 4, 8), seed=1, rslora=(True, True, True)), (1.0, 0.5, 0.8), 0.6),
}
METHODS = [m for m in core_space.METHODS if m != "linear"]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_matches_dense_reference(method, case):
    make, weights, scale = CASES[case]
    sources = make()
    ours = merged_delta(library(method, sources, list(weights), scale=scale))
    reference = dense_reference(method, sources, list(weights), scale=scale)
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_a_module_some_sources_lack_counts_as_zero(method):
    """A source with zero factors on this module (it lacks the module) gives the same merge as leaving
    it out, DARE's random draws included, and both match the dense reference over the others."""
    sources = random_sources(32, 28, (4, 6, 2), seed=2, rslora=(False, False, True))
    zero = (torch.zeros(8, 28), torch.zeros(32, 8), 2.0)
    with_zero = library(method, [sources[0], zero, sources[1], sources[2]], [0.5, 0.9, -0.3, 0.8])
    without = library(method, sources, [0.5, -0.3, 0.8])
    assert torch.equal(with_zero.a, without.a) and torch.equal(with_zero.b, without.b)
    reference = dense_reference(method, sources, [0.5, -0.3, 0.8])
    assert relative_error(merged_delta(with_zero), reference) < 1e-5


@pytest.mark.parametrize("method", ["ties", "dare_ties", "tsv", "iso_c", "iso_cts", "knots_ties"])
def test_shared_directions_are_dropped_from_the_basis(method):
    """Two sources with the same B (a direction shared, so B_stack has rank R - 4): the null
    directions leave the basis, the cores shrink to 12 x 16, and the merge still matches the dense
    reference (whose basis is the dense SVD's non-null part)."""
    sources = random_sources(40, 36, (4, 4, 8), seed=8)
    shared = (sources[1][0], sources[0][1], sources[0][2])
    sources = [sources[0], shared, sources[2]]
    space = core_space.core_bases(as_arrays(sources), [1.0, 1.0, 1.0])
    assert space.cores[0].shape == (12, 16)
    assert np.allclose(space.u_b.T @ space.u_b, np.eye(12), atol=1e-10)
    weights = [0.9, 0.6, -0.7]
    ours = merged_delta(library(method, sources, weights))
    assert relative_error(ours, dense_reference(method, sources, weights)) < 1e-5


def test_trimming_keeps_what_topk_keeps():
    """The one trimming rule (a k-th-largest threshold, ties dropped from the end) keeps the same entries as
    merge_utils' torch.topk wherever the choice is unique, and exactly k entries when there are ties."""
    from loramgr.merge.elementwise import magnitude_prune_one

    gen = torch.Generator().manual_seed(9)
    tensors = [torch.randn(64, 700, generator=gen), torch.randint(-3, 4, (50, 40), generator=gen).float(),
               torch.randn(16, 16, generator=gen, dtype=F64), torch.randn(32, 32, generator=gen).bfloat16().float()]
    for tensor in tensors:
        for density in (0.01, 0.3, 0.5, 0.97):
            kept = torch.from_numpy(magnitude_prune_one(tensor.numpy(), density))
            k = int(density * tensor.numel())
            assert int((kept != 0).sum()) <= k and torch.equal(kept[kept != 0], tensor[kept != 0])
            flat = tensor.abs().reshape(-1).double()
            if flat.unique().numel() == flat.numel():  # no ties: the top-k set is unique
                top = torch.zeros_like(flat, dtype=torch.bool)
                top[flat.topk(k).indices] = True
                assert torch.equal(kept.reshape(-1) != 0, top)


def test_linear_is_the_exact_weighted_sum():
    sources = random_sources(48, 40, (2, 7, 5), seed=3, rslora=(True, False, False))
    weights = [1.5, -0.25, 0.6]
    merged = merge("linear", sources, weights)
    exact = sum(w * dense_delta(s) for w, s in zip(weights, sources))
    assert merged.rank == 14 and merged.kept_energy == 1.0
    assert relative_error(merged_delta(merged), exact) < 1e-6


def test_bases_are_canonical_whatever_the_source_order():
    """Permuting the sources gives the same bases (A' = V_A up to rounding, signs included) and the
    same merge: the basis depends on the stacked factors' spans and spectra, not on reading order."""
    sources = random_sources(40, 36, (3, 5, 8), seed=4)
    weights = [0.7, 0.4, 1.1]
    order = [2, 0, 1]
    for method in ("ties", "tsv", "iso_cts", "knots_ties"):
        first = library(method, sources, weights)
        second = library(method, [sources[i] for i in order], [weights[i] for i in order])
        if not method.startswith("knots"):
            assert torch.allclose(first.a, second.a, atol=1e-6)
        assert relative_error(merged_delta(second), merged_delta(first)) < 1e-6


def test_dare_seed_reproduces():
    sources = random_sources(40, 36, (4, 4, 4), seed=5)
    weights = [1.0, 1.0, 1.0]
    for method in ("dare_linear", "dare_ties", "knots_dare"):
        first, again = library(method, sources, weights), library(method, sources, weights)
        assert torch.equal(first.a, again.a) and torch.equal(first.b, again.b)
        other_seed = library(method, sources, weights, seed=SEED + 1)
        assert relative_error(merged_delta(other_seed), merged_delta(first)) > 1e-2
        other_module = merge(
            method, sources, weights, density=0.4,
            generator=np.random.Generator(np.random.PCG64(module_seed(SEED, MODULE + ".x"))))
        assert relative_error(merged_delta(other_module), merged_delta(first)) > 1e-2


@pytest.mark.parametrize("method", ["ties", "iso_cts", "knots_dare"])
def test_truncation_is_exact_and_reports_exact_energy(method):
    sources = random_sources(50, 44, (6, 6, 6), seed=6)
    weights = [0.8, 0.6, -0.5]
    full = merged_delta(library(method, sources, weights))
    truncated = library(method, sources, weights, rank=5)
    assert truncated.rank == 5
    residual = float(torch.linalg.norm(full - merged_delta(truncated)) ** 2)
    total = float(torch.linalg.norm(full) ** 2)
    assert abs(truncated.kept_energy - (1 - residual / total)) < 1e-6
    s = torch.linalg.svdvals(full)  # Eckart-Young: the optimal residual is the tail of the spectrum
    assert abs(residual - float((s[5:] ** 2).sum())) < 1e-6 * total
    by_energy = library(method, sources, weights, energy=0.9)
    needed = int((torch.cumsum(s**2, 0) < 0.9 * total).sum()) + 1
    assert by_energy.rank == needed and by_energy.kept_energy >= 0.9


def test_core_space_ties_is_not_full_space_ties():
    """The same rule in a different space is a different operator: on random adapters core-space TIES
    and PEFT's TIES on the dense deltas differ by most of the result's norm."""
    sources = random_sources(256, 256, (16, 16, 16), seed=7)
    weights = [1.0, 1.0, 1.0]
    core = merged_delta(library("ties", sources, weights, density=0.3))
    full = merge_utils.ties([dense_delta(s) for s in sources], torch.tensor(weights, dtype=F64), 0.3, "total")
    difference = relative_error(core, full)
    assert difference > 0.5
    assert torch.linalg.matrix_rank(core) <= 48 < torch.linalg.matrix_rank(full)


@pytest.mark.slow
def test_three_adapters_on_a_32768_square_module_stay_under_1_gib():
    """Every method on a 32768 x 32768 module (a dense delta would be 4 GiB in float32), in a fresh
    process whose peak RSS stays under 1 GiB; linear is checked on a probe vector."""
    script = textwrap.dedent("""
        import json, resource
        import numpy as np
        from loramgr.merge import core_space
        rng = np.random.default_rng(0)
        d = 32768
        f32 = np.float32
        sources = [((rng.standard_normal((16, d), dtype=f32) / d**0.5).astype(f32),
                    (rng.standard_normal((d, 16), dtype=f32) / 4).astype(f32), 2.0) for _ in range(3)]
        weights = [0.5, 0.3, 0.2]
        probe = rng.standard_normal(d)
        exact = sum(w * s * (b.astype(np.float64) @ (a.astype(np.float64) @ probe))
                    for w, (a, b, s) in zip(weights, sources))
        ranks = {}
        for method in core_space.METHODS:
            merged = core_space.merge_module(method, sources, weights, density=0.3,
                                             generator=np.random.default_rng(1))
            assert merged.b.shape[0] == d and merged.a.shape[1] == d and bool(np.isfinite(merged.b).all())
            ranks[method] = merged.rank
            if method == "linear":
                got = merged.b.astype(np.float64) @ (merged.a.astype(np.float64) @ probe)
                linear_error = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"peak": peak, "ranks": ranks, "linear_error": linear_error}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["peak"] < 1 << 30
    assert result["linear_error"] < 1e-6
    assert set(result["ranks"]) == set(core_space.METHODS)
    assert all(1 <= r <= 48 for r in result["ranks"].values())
