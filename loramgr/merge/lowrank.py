"""Low-rank algebra of merges: pure functions on factors and matrices, no files, no adapters.

Two ways to reach a rank-r LoRA of a module's merged delta:

- :func:`rerank_factors` when the delta is a product ``B_cat @ A_cat`` (linear, svd, compress): the
  optimal (Eckart-Young) truncation is computed from orthonormal bases of the factors (through their
  R x R Gram matrices) and the SVD of a small core, in O((d_in + d_out) R^2 + R^3) instead of the
  dense SVD's O(d_out d_in min(d_out, d_in)).
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

#: null directions of a Gram matrix: eigenvalues at most this times max(rows, cols) times the largest
NULL_RTOL = float(np.finfo(np.float64).eps)
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

    With orthonormal bases of the column spaces, b_cat = U_B C_B and a_cat^T = U_A C_A (C: the factors'
    coordinates, k x R), ΔW = U_B (C_B C_A^T) U_A^T; the SVD U S V^T of the small core gives ΔW's SVD
    (U_B U) S (U_A V)^T. The bases come from the R x R Gram matrices in float64 (:func:`column_basis`),
    two matrix products instead of two thin QRs (numpy's QR of 11008 x 32 takes 20x the Gram's time);
    everything from the Gram matrices to the products giving the new factors is float64, so the result's
    error is float32 rounding.
    """
    b64, a64 = b_cat.astype(np.float64), a_cat.astype(np.float64)
    p_b, c_b = column_basis(b64)
    p_a, c_a = column_basis(a64.T)
    u, s, vh = np.linalg.svd(c_b @ c_a.T, full_matrices=False)
    if not s.size:  # a zero delta (no non-null direction on one side): a zero LoRA of rank 1
        return Factors(a=np.zeros((1, a_cat.shape[1]), dtype=np.float32),
                       b=np.zeros((b_cat.shape[0], 1), dtype=np.float32))
    energies = s * s
    total = float(energies.sum())
    keep = choose_rank(energies, total, rank, energy)
    kept = float(energies[:keep].sum()) / total if total > 0 else 1.0
    b_small, a_small = _split_sqrt(u[:, :keep], s[:keep], vh[:keep])
    b = b64 @ (p_b @ b_small)
    a = (a_small @ p_a.T) @ a64
    return Factors(a=np.ascontiguousarray(a, dtype=np.float32), b=np.ascontiguousarray(b, dtype=np.float32),
                   kept_energy=min(kept, 1.0))


def column_basis(stacked: Matrix) -> tuple[Matrix, Matrix]:
    """An orthonormal basis of the column space of a tall m x R matrix X (float64), kept factored:
    (p, c) with basis = X @ p (m x k) and X = basis @ c (c = Σ Wᵀ, k x R), from the eigen-decomposition
    XᵀX = W Σ² Wᵀ. Directions with σ² <= m · eps · σ_max² (the Gram matrix's rounding level) are null
    and dropped; the kept ones are accurate to eps · (σ_max / σ)², far below float32 rounding."""
    eigenvalues, vectors = np.linalg.eigh(stacked.T @ stacked)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    top = float(eigenvalues[0]) if eigenvalues.size else 0.0
    keep = int((eigenvalues > NULL_RTOL * max(stacked.shape) * top).sum()) if top > 0 else 0
    sigma = np.sqrt(eigenvalues[:keep])
    return vectors[:, :keep] / sigma, sigma[:, None] * vectors[:, :keep].T


def randomized_svd(matrix: NDArray[np.float32], q: int, *, seed: int, niter: int = POWER_ITERATIONS
                   ) -> tuple[Matrix, Matrix, Matrix]:
    """A rank-``q`` randomized SVD (Halko, Martinsson and Tropp 2011, algorithm 4.4: a Gaussian test
    matrix from a generator seeded with ``seed``, ``niter`` power iterations, each product
    re-orthonormalised), so a merge gives byte-identical results for the same inputs. Returns U (m x k),
    S (k), Vᵀ (k x n), k <= q (fewer only when the matrix has numerically fewer directions)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    test = rng.standard_normal((matrix.shape[1], q), dtype=np.float32)
    basis = _orthonormal(matrix @ test)
    for _ in range(niter):
        basis = _orthonormal(matrix.T @ basis)
        basis = _orthonormal(matrix @ basis)
    u_small, s, vh = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def _orthonormal(tall: NDArray[np.float32]) -> NDArray[np.float32]:
    """An orthonormal basis of the columns of a tall float32 matrix, through its Gram matrix in float64
    (:func:`column_basis`): one product, where numpy's thin QR takes 20x as long at these shapes. Each
    power iteration multiplies once before this, so the directions' spread stays that of the matrix's
    spectrum, well inside float64's reach; directions below it are dropped as null."""
    tall64 = tall.astype(np.float64)
    p, _ = column_basis(tall64)
    return (tall64 @ p).astype(np.float32)


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
