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

import torch

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

    a: torch.Tensor  # rank x in
    b: torch.Tensor  # out x rank
    kept_energy: float = 1.0

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def concat_factors(parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> Factors:
    """Exact Σ c_i B_i A_i as one LoRA of rank Σ r_i: B = [c_1 B_1 ...], A = [A_1; ...].

    ``parts`` holds (c_i, A_i, B_i) with c_i = w_i · s_i, so each source keeps its own scale.
    """
    a = torch.cat([a for _, a, _ in parts], dim=0)
    b = torch.cat([coef * b for coef, _, b in parts], dim=1)
    return Factors(a=a, b=b, kept_energy=1.0)


def choose_rank(energies: torch.Tensor, total: float, rank: int | None, energy: float | None) -> int:
    """Number of leading singular values to keep.

    ``energies`` are the squared singular values in decreasing order, ``total`` the Frobenius energy of
    the whole matrix (it may exceed ``energies.sum()`` when only some singular values are known).
    ``rank`` caps the result; ``energy`` asks for the smallest rank holding that fraction of ``total``.
    Never less than 1, because a PEFT module needs r >= 1.
    """
    available = int(energies.numel())
    cap = available if rank is None else min(rank, available)
    if energy is None:
        return max(1, cap)
    if total <= 0.0:  # a zero delta: any fraction of nothing is kept by one (zero) component
        return 1
    cumulative = torch.cumsum(energies.to(torch.float64), dim=0)
    # a relative slack of 1e-12 so that energy=1.0 does not demand rounding noise
    reached = (cumulative >= energy * total * (1.0 - 1e-12)).nonzero()
    needed = int(reached[0].item()) + 1 if reached.numel() else available
    return max(1, min(needed, cap))


def _split_sqrt(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U sqrt(S), A = sqrt(S) V^T: balanced factors, so neither carries the whole magnitude
    (that keeps fp16/bf16 outputs away from overflow and underflow)."""
    root = s.sqrt()
    return u * root, root[:, None] * vh


def rerank_factors(
    a_cat: torch.Tensor, b_cat: torch.Tensor, *, rank: int | None, energy: float | None
) -> Factors:
    """Optimal rank-r approximation of ``b_cat @ a_cat`` without forming it.

    b_cat = Q_B R_B and a_cat^T = Q_A R_A, so ΔW = Q_B (R_B R_A^T) Q_A^T; the SVD U S V^T of the small
    core gives ΔW's SVD (Q_B U) S (Q_A V)^T. The thin QRs run in float32 (Householder QR is backward
    stable: errors of order eps32 · ||B||, below the float32 output's own rounding); the core and its
    SVD in float64, where the singular values and the energy split are decided.
    """
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b.double() @ r_a.double().T, full_matrices=False)
    energies = s * s
    total = float(energies.sum())
    keep = choose_rank(energies, total, rank, energy)
    kept = float(energies[:keep].sum()) / total if total > 0 else 1.0
    b_small, a_small = _split_sqrt(u[:, :keep], s[:keep], vh[:keep])
    b = q_b @ b_small.to(q_b.dtype)
    a = (q_a @ a_small.T.to(q_a.dtype)).T
    return Factors(a=a.contiguous(), b=b.contiguous(), kept_energy=min(kept, 1.0))


def randomized_svd(
    matrix: torch.Tensor, q: int, *, seed: int, niter: int = POWER_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank with a fixed seed, leaving the caller's global RNG untouched.

    torch.svd_lowrank draws its test matrix from the global generator; a merge must give
    byte-identical results for the same inputs and must not disturb the caller's random state.
    Returns U (m x q), S (q), V (n x q).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=niter)


def rerank_dense(matrix: torch.Tensor, *, rank: int, energy: float | None, seed: int) -> Factors:
    """Best (exact SVD) or near-best (randomized SVD) rank-``rank`` factors of a dense delta.

    With ``energy`` the rank is the smallest one, at most ``rank``, holding that fraction of the
    Frobenius energy. The kept energy is Σ S_r^2 / ||ΔW||_F^2: for the randomized SVD, U S V^T is the
    projection U U^T ΔW, whose residual is exactly ||ΔW||^2 - Σ S^2, so the figure is not optimistic.
    """
    matrix = matrix.to(torch.float32)
    total = float(torch.linalg.vector_norm(matrix)) ** 2
    small_side = min(matrix.shape)
    q = min(rank + OVERSAMPLE, small_side)
    if small_side <= EXACT_SVD_MAX_DIM or 2 * q >= small_side:
        u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    else:
        u, s, v = randomized_svd(matrix, q, seed=seed, niter=POWER_ITERATIONS)
        u, s, vh = u.to(torch.float64), s.to(torch.float64), v.to(torch.float64).T
    energies = s * s
    keep = choose_rank(energies, total, rank, energy)
    kept = float(energies[:keep].sum()) / total if total > 0 else 1.0
    b, a = _split_sqrt(u[:, :keep], s[:keep], vh[:keep])
    return Factors(a=a.to(torch.float32).contiguous(), b=b.to(torch.float32).contiguous(),
                   kept_energy=min(kept, 1.0))
