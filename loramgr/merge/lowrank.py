"""Low-rank algebra of merges: pure functions on factors and matrices, no files, no adapters.

Two ways to reach a rank-r LoRA of a module's merged delta:

- :func:`rerank_factors` when the delta is a product ``B_cat @ A_cat`` (linear, svd, compress): the
  optimal (Eckart-Young) truncation is computed from thin QRs of the factors and the SVD of a small
  core, in O((d_in + d_out) R^2 + R^3) instead of the dense SVD's O(d_out d_in min(d_out, d_in)).
- :func:`rerank_dense` when the delta only exists as a dense matrix (TIES, DARE, magnitude pruning,
  which are element-wise): an exact SVD for small matrices, a seeded randomized SVD for large ones.

Both return the new factors and the kept fraction of Frobenius energy, which callers report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Matrix = NDArray[Any]

#: a dense matrix whose smaller side is at most this is decomposed exactly (cheap enough, no risk)
EXACT_SVD_MAX_DIM = 512
#: randomized SVD: extra columns beyond the rank and power iterations. Power iterations sharpen a
#: flat spectrum (TIES/DARE results are near full rank); 4 keeps the kept energy within 0.5% of the
#: exact truncation's on such matrices (tests/test_merge_math.py checks it).
OVERSAMPLE = 16
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class Factors:
    """A module's LoRA factors with the scale baked in: ΔW = b @ a (scale 1)."""

    a: NDArray[np.float32]  # rank x in
    b: NDArray[np.float32]  # out x rank
    kept_energy: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def concat_factors(parts: list[tuple[float, NDArray[np.float32], NDArray[np.float32]]]) -> Factors:
    """Exact Σ c_i B_i A_i as one LoRA of rank Σ r_i: B = [c_1 B_1 ...], A = [A_1; ...].

    ``parts`` holds (c_i, A_i, B_i) with c_i = w_i · s_i, so each source keeps its own scale.
    """
    a = np.concatenate([a for _, a, _ in parts], axis=0)
    b = np.concatenate([np.float32(coef) * b for coef, _, b in parts], axis=1)
    return Factors(a=a, b=b, kept_energy=1.0)


def choose_rank(energies: Matrix, total: float, rank: int | None, energy: float | None) -> int:
    """Number of leading singular values to keep.

    ``energies`` are the squared singular values in decreasing order, ``total`` the Frobenius energy of
    the whole matrix (it may exceed ``energies.sum()`` when only some singular values are known).
    ``rank`` caps the result; ``energy`` asks for the smallest rank holding that fraction of ``total``.
    Never less than 1, because a PEFT module needs r >= 1.
    """
    available = int(energies.size)
    cap = available if rank is None else min(rank, available)
    if energy is None:
        return max(1, cap)
    if total <= 0.0:  # a zero delta: any fraction of nothing is kept by one (zero) component
        return 1
    cumulative = np.cumsum(energies.astype(np.float64))
    # a relative slack of 1e-12 so that energy=1.0 does not demand rounding noise
    reached = np.flatnonzero(cumulative >= energy * total * (1.0 - 1e-12))
    needed = int(reached[0]) + 1 if reached.size else available
    return max(1, min(needed, cap))


def _split_sqrt(u: Matrix, s: Matrix, vh: Matrix) -> tuple[Matrix, Matrix]:
    """B = U sqrt(S), A = sqrt(S) V^T: balanced factors, so neither carries the whole magnitude
    (that keeps fp16/bf16 outputs away from overflow and underflow)."""
    root = np.sqrt(s)
    return u * root, root[:, None] * vh


def rerank_factors(
    a_cat: NDArray[np.float32], b_cat: NDArray[np.float32], *, rank: int | None, energy: float | None
) -> Factors:
    """Optimal rank-r approximation of ``b_cat @ a_cat`` without forming it.

    b_cat = Q_B R_B and a_cat^T = Q_A R_A, so ΔW = Q_B (R_B R_A^T) Q_A^T; the SVD U S V^T of the small
    core gives ΔW's SVD (Q_B U) S (Q_A V)^T. The thin QRs run in float32 (Householder QR is backward
    stable: errors of order eps32 · ||B||, below the float32 output's own rounding); the core and its
    SVD in float64, where the singular values and the energy split are decided.
    """
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, s, vh = np.linalg.svd(r_b.astype(np.float64) @ r_a.astype(np.float64).T, full_matrices=False)
    energies = s * s
    total = float(energies.sum())
    keep = choose_rank(energies, total, rank, energy)
    kept = float(energies[:keep].sum()) / total if total > 0 else 1.0
    b_small, a_small = _split_sqrt(u[:, :keep], s[:keep], vh[:keep])
    b = q_b @ b_small.astype(np.float32)
    a = (q_a @ a_small.T.astype(np.float32)).T
    return Factors(a=np.ascontiguousarray(a), b=np.ascontiguousarray(b), kept_energy=min(kept, 1.0))


def randomized_svd(matrix: NDArray[np.float32], q: int, *, seed: int, niter: int = POWER_ITERATIONS
                   ) -> tuple[Matrix, Matrix, Matrix]:
    """A rank-``q`` randomized SVD (Halko, Martinsson and Tropp 2011, algorithm 4.4: a Gaussian test
    matrix from a generator seeded with ``seed``, ``niter`` power iterations re-orthonormalised by QR),
    so a merge gives byte-identical results for the same inputs. Returns U (m x q), S (q), Vᵀ (q x n)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    test = rng.standard_normal((matrix.shape[1], q), dtype=np.float32)
    basis, _ = np.linalg.qr(matrix @ test)
    for _ in range(niter):
        basis, _ = np.linalg.qr(matrix.T @ basis)
        basis, _ = np.linalg.qr(matrix @ basis)
    u_small, s, vh = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def rerank_dense(matrix: Matrix, *, rank: int, energy: float | None, seed: int) -> Factors:
    """Best (exact SVD) or near-best (randomized SVD) rank-``rank`` factors of a dense delta.

    With ``energy`` the rank is the smallest one, at most ``rank``, holding that fraction of the
    Frobenius energy. The kept energy is Σ S_r^2 / ||ΔW||_F^2: for the randomized SVD, U S V^T is the
    projection U U^T ΔW, whose residual is exactly ||ΔW||^2 - Σ S^2, so the figure is not optimistic.
    """
    matrix = matrix.astype(np.float32, copy=False)
    total = float(np.linalg.norm(matrix)) ** 2
    small_side = min(matrix.shape)
    q = min(rank + OVERSAMPLE, small_side)
    if small_side <= EXACT_SVD_MAX_DIM or 2 * q >= small_side:
        u, s, vh = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    else:
        u, s, vh = (x.astype(np.float64) for x in randomized_svd(matrix, q, seed=seed, niter=POWER_ITERATIONS))
    energies = s * s
    keep = choose_rank(energies, total, rank, energy)
    kept = float(energies[:keep].sum()) / total if total > 0 else 1.0
    b, a = _split_sqrt(u[:, :keep], s[:keep], vh[:keep])
    return Factors(a=np.ascontiguousarray(a, dtype=np.float32), b=np.ascontiguousarray(b, dtype=np.float32),
                   kept_energy=min(kept, 1.0))
