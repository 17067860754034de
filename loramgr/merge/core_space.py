"""Merges in the adapters' own space: TIES, DARE, TSV, Iso and KnOTS computed from the LoRA factors.

Pure functions on numpy arrays; no files, no adapters. For one module, source t has factors A_t (r_t x n),
B_t (m x r_t) and scale s_t, so ΔW_t = s_t B_t A_t; R = Σ r_t. Nothing here allocates an m x n
matrix: the largest objects are m x R and R x n, and only R x R matrices are decomposed (a tall
stacked matrix X is reached through its Gram matrix XᵀX, one matrix product). The bases and cores are
float64 (the factors are upcast; an m x R float64 matrix of a 32768-row module is 12 MB), KnOTS'
R x n blocks float32; the result is returned in float32.

Core space (Panariello, Marczak et al., NeurIPS 2025, arXiv 2509.17786):

    U_B = left singular vectors of  B_stack = [s_1 B_1 ... s_T B_T]      (m x p, p <= R)
    V_A = right singular vectors of A_stack = [A_1; ...; A_T]            (q x n, q <= R)
    C_t = (U_Bᵀ s_t B_t)(A_t V_Aᵀ)                                       (p x q, the core)
    ΔW  = λ U_B f({C_t}, {w_t}) V_A,   as a LoRA: B' = U_B f, A' = V_A

Because span(B_t) ⊆ span(U_B) and rowspan(A_t) ⊆ rowspan(V_A), U_B C_t V_A = ΔW_t exactly, so the
weighted sum (``linear``) is lossless. The bases are canonical: singular vectors ordered by singular
value (which depend on the stacked matrices only through B_stack B_stackᵀ and A_stackᵀ A_stack, so
not on the order of the sources), null directions dropped (a zero source, two sources sharing a
direction, R > n), and each vector's sign chosen so that the largest-magnitude entry of its row of
U_Bᵀ B_stack (resp. of A_stack V_Aᵀ) is positive. The element-wise rules (trim by magnitude, random drop,
sign election, disjoint mean) commute with flipping the sign of a basis vector together with the
matching row or column of every core, so the merged ΔW does not depend on that sign choice at all
(the tests compare against a reference that keeps the SVD's arbitrary signs); the sign rule only
makes the returned factors themselves reproducible bit for bit. What the element-wise rules do
depend on is the basis itself, which is why it is the singular basis and not any basis of the span.

KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735) takes the SVD of the concatenation
X = [ΔW_1 ... ΔW_T] (m x Tn) = U Σ [V_1ᵀ ... V_Tᵀ] and merges the per-source blocks Σ V_tᵀ = Uᵀ ΔW_t
(as the authors' code does: the rule sees Σ V_tᵀ, and ΔW = U f({Σ V_tᵀ})). From the factors:
X = B_cat · blockdiag(A_1, ..., A_T) (B_cat = B_stack), and with B_cat's singular basis and thin QRs
A_tᵀ = Q_t R_t the SVD of X is that of a p x R kernel (see :func:`knots_space`).

Weights. TIES, DARE and magnitude pruning take the unweighted cores (or KnOTS blocks) and the weights
exactly as in full space (PEFT merge_utils: trim or drop, elect the sign on the unweighted tensors,
weight, disjoint mean), so the only difference between the spaces is the space. TSV and Iso have no
per-task weights in their papers; here they act on the weighted cores w_t C_t (Iso-C on Σ w_t C_t).

A source whose factors are all zero is left out of the module's merge, as if it lacked the module:
that keeps TSV and Iso well defined (a zero task has no singular vectors) and makes "zero" and
"absent" give the same result, DARE's random stream included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from loramgr.merge import elementwise
from loramgr.merge.lowrank import Factors, choose_rank

#: null directions: σ² <= RTOL · max(rows, cols) · σ_max² for a Gram matrix's eigenvalues, and
#: σ <= RTOL · max(rows, cols) · σ_max for singular values of an R x R matrix (rounding level)
RTOL = float(np.finfo(np.float64).eps)
#: Iso-CTS: fraction of the core's dimension given to the common subspace (the paper's default)
COMMON_SPACE_FRACTION = 0.8

#: the methods of this module and whether each needs density / a random generator / a sign rule
METHODS: dict[str, tuple[bool, bool, bool]] = {
    #              density, generator, majority_sign
    "linear": (False, False, False),
    "ties": (True, False, True),
    "magnitude_prune": (True, False, False),
    "dare_linear": (True, True, False),
    "dare_ties": (True, True, True),
    "tsv": (False, False, False),
    "iso_c": (False, False, False),
    "iso_cts": (False, False, False),
    "knots_ties": (True, False, True),
    "knots_dare": (True, True, True),
}

Matrix = NDArray[Any]
Source = tuple[Matrix, Matrix, float]  # (A_t, B_t, s_t)


@dataclass(frozen=True)
class Basis:
    """An orthonormal basis of the column space of a tall stacked matrix X (m x R), kept factored as
    X @ p with p = W Σ⁻¹ (R x k) from the eigen-decomposition of the Gram matrix XᵀX = W Σ² Wᵀ:
    X W Σ⁻¹ are X's left singular vectors. Only R x R matrices are decomposed; the m-sized work is
    one matrix product for the Gram matrix and one for whatever is expressed in the basis."""

    q: Matrix  # the stacked matrix X
    p: Matrix

    def matrix(self) -> Matrix:
        """The m x k basis itself."""
        return self.q @ self.p

    def times(self, small: Matrix) -> Matrix:
        """basis @ small (small: k x c), without forming the basis."""
        product: Matrix = self.q @ (self.p @ small)
        return product


@dataclass(frozen=True)
class CoreSpace:
    """The canonical bases of one module and each source's core: ΔW_t = U_B @ cores[t] @ V_A."""

    left: Basis  # U_B = left.matrix(), m x p
    right: Basis  # V_Aᵀ = right.matrix(), n x q
    cores: list[Matrix]  # C_t = (U_Bᵀ s_t B_t)(A_t V_Aᵀ), p x q, unweighted
    weights: list[float]

    @property
    def u_b(self) -> Matrix:
        return self.left.matrix()

    @property
    def v_a(self) -> Matrix:
        return self.right.matrix().T

    def weighted_cores(self) -> list[Matrix]:
        """M_t = w_t C_t."""
        return [w * c for w, c in zip(self.weights, self.cores, strict=True)]


def _nonnull(s: Matrix, shape: tuple[int, ...]) -> int:
    """How many leading singular values (decreasing) are above the null tolerance."""
    if s.size == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > RTOL * max(shape) * s[0]).sum())


def _column_basis(stacked: Matrix) -> tuple[Basis, Matrix]:
    """The left singular vectors of a tall m x R matrix X with non-null singular value, ordered by
    singular value, signs canonical; also X's columns in that basis, Σ Wᵀ (k x R).

    From the Gram matrix XᵀX = W Σ² Wᵀ (float64): a direction is null when σ² <= m · eps · σ_max²,
    the rounding level of the Gram matrix itself, i.e. σ / σ_max below about 1e-6 for m ~ 10^4 (a
    direction that small changes ΔW by less than float32 rounding). The directions kept are accurate
    to eps · (σ_max / σ)² relative, which is the price of one matrix product instead of a QR."""
    gram = stacked.T @ stacked
    eigenvalues, vectors = np.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    top = float(eigenvalues[0]) if eigenvalues.size else 0.0
    keep = int((eigenvalues > RTOL * max(stacked.shape) * top).sum()) if top > 0 else 0
    sigma = np.sqrt(eigenvalues[:keep])
    coords = sigma[:, None] * vectors[:, :keep].T  # Σ Wᵀ = basisᵀ X
    signs = _canonical(coords)
    return Basis(q=stacked, p=(vectors[:, :keep] / sigma) * signs), coords * signs[:, None]


def _canonical(coordinates: Matrix) -> Matrix:
    """±1 per basis vector: + when the entry of largest magnitude of its row of ``coordinates`` (the
    stacked matrix seen in that basis, σ_i times a right singular vector) is positive, the first such
    entry on a tie. Stacking the sources in another order permutes the entries of each row, so the
    choice does not depend on the order."""
    index = np.abs(coordinates).argmax(axis=1)
    signs = np.sign(np.take_along_axis(coordinates, index[:, None], axis=1))[:, 0]
    signs[signs == 0] = 1.0
    chosen: Matrix = signs
    return chosen


def _usable(sources: Sequence[Source], weights: Sequence[float]) -> tuple[list[Source], list[float]]:
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    kept = [(src, w) for src, w in zip(sources, weights) if bool(np.any(src[0])) and bool(np.any(src[1]))]
    return [s for s, _ in kept], [float(w) for _, w in kept]


def _stacks(sources: list[Source]) -> tuple[Matrix, Matrix]:
    """B_stack = [s_1 B_1 ... s_T B_T] (m x R) and A_stackᵀ = [A_1ᵀ ... A_Tᵀ] (n x R), float64."""
    b_stack = np.concatenate([b.astype(np.float64) * scale for _, b, scale in sources], axis=1)
    a_stack_t = np.concatenate([a.astype(np.float64) for a, _, _ in sources], axis=0).T
    return b_stack, a_stack_t


def core_bases(sources: Sequence[Source], weights: Sequence[float]) -> CoreSpace:
    """U_B, V_A and the cores C_t of one module, from the factors (A_t, B_t, s_t) of its sources.

    Sources with all-zero factors are left out (see the module docstring). The bases do not depend
    on the weights: the weights act on the cores, through the merge rule.
    """
    sources, weights = _usable(sources, weights)
    if not sources:
        raise ValueError("no source has a non-zero delta on this module")
    b_stack, a_stack_t = _stacks(sources)
    left, b_coords = _column_basis(b_stack)  # p x R: U_Bᵀ s_t B_t, side by side
    right, a_coords = _column_basis(a_stack_t)  # q x R: V_A A_tᵀ, side by side
    cores, start = [], 0
    for a, _, _ in sources:
        stop = start + a.shape[0]
        cores.append(b_coords[:, start:stop] @ a_coords[:, start:stop].T)
        start = stop
    return CoreSpace(left=left, right=right, cores=cores, weights=weights)


# ----------------------------------------------------------------------------------------------
# rules on the cores


def _polar(x: Matrix) -> Matrix:
    """The orthonormal factor of the polar decomposition (Procrustes: the nearest matrix with
    orthonormal columns), P Qᵀ from X = P S Qᵀ. When X is rank-deficient (tasks sharing a direction)
    that factor is not unique; the partial isometry P_r Q_rᵀ over X's non-null singular values is,
    and is what is used."""
    p, s, qh = np.linalg.svd(x, full_matrices=False)
    keep = _nonnull(s, tuple(x.shape))
    isometry: Matrix = p[:, :keep] @ qh[:keep]
    return isometry


def _leading(matrix: Matrix, count: int) -> tuple[Matrix, Matrix, Matrix]:
    """The first ``count`` singular triplets of ``matrix`` that are not null."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    keep = min(count, _nonnull(s, tuple(matrix.shape)))
    return u[:, :keep], s[:keep], vh[:keep]


def _orthogonalised(us: list[Matrix], ss: list[Matrix], vhs: list[Matrix], isotropic: bool) -> Matrix:
    """U⊥ diag(S) V⊥ᵀ from concatenated triplets, each side orthogonalised by Procrustes."""
    u = np.concatenate(us, axis=1)
    s = np.concatenate(ss)
    vh = np.concatenate(vhs, axis=0)
    if s.size == 0:
        return np.zeros((us[0].shape[0], vhs[0].shape[1]), dtype=np.float64)
    if isotropic:
        s = np.full_like(s, float(s.mean()))
    merged: Matrix = (_polar(u) * s) @ _polar(vh.T).T
    return merged


def tsv(cores: list[Matrix]) -> Matrix:
    """TSV-M (Gargiulo et al., CVPR 2025): each task keeps its top ⌊d / T⌋ singular triplets
    (d = min of the core's sides), the stacked U's and V's are each replaced by their Procrustes
    orthogonalisation, and ΔW = U⊥ diag(Σ) V⊥ᵀ. Null triplets are not kept: their vectors are
    arbitrary and would rotate the other tasks' vectors through the orthogonalisation."""
    per_task = min(cores[0].shape) // len(cores)
    triplets = [_leading(c, per_task) for c in cores]
    return _orthogonalised([t[0] for t in triplets], [t[1] for t in triplets], [t[2] for t in triplets], False)


def iso_c(cores: list[Matrix]) -> Matrix:
    """Iso-C (Marczak et al., ICML 2025): the SVD of Σ_t M_t with every (non-null) singular value
    replaced by their mean."""
    total = np.sum(cores, axis=0)
    u, s, vh = _leading(total, min(total.shape))
    return _orthogonalised([u], [s], [vh], True)


def iso_cts(cores: list[Matrix], common_fraction: float = COMMON_SPACE_FRACTION) -> Matrix:
    """Iso-CTS (Marczak et al., ICML 2025): the top directions of Σ_t M_t (a ``common_fraction`` of
    d, adjusted so the rest divides evenly among the T tasks) plus, per task, the top directions of
    M_t with the common left subspace projected out; both sides orthogonalised by Procrustes and the
    spectrum made isotropic (the mean of all kept singular values)."""
    d, tasks = min(cores[0].shape), len(cores)
    common = int(d * common_fraction)
    task_total = round((d - common) / tasks) * tasks
    common = d - task_total
    per_task = task_total // tasks
    total = np.sum(cores, axis=0)
    u_c, s_c, vh_c = _leading(total, common)
    us, ss, vhs = [], [], []
    for core in cores:
        u, s, vh = _leading(core - u_c @ (u_c.T @ core), per_task)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    return _orthogonalised([*us, u_c], [*ss, s_c], [*vhs, vh_c], True)


def _density(density: float | None) -> float:
    if density is None:
        raise ValueError("density is required")
    return float(density)


def _generator(generator: np.random.Generator | None) -> np.random.Generator:
    if generator is None:
        raise ValueError("a seeded generator is required for DARE")
    return generator


def drop(tensor: Matrix, density: float, generator: np.random.Generator) -> Matrix:
    """DARE: keep each entry with probability ``density`` (uniform float32 draw < density, from
    ``generator``, row-major) and rescale the survivors by 1 / density. The same distribution as
    merge_utils' torch.bernoulli masks, and the same draws whatever the tensor's dtype. (Full space
    keeps torch.bernoulli, to reproduce PEFT's own masks.)"""
    if density >= 1.0:
        return tensor
    keep = generator.random(tensor.shape, dtype=np.float32) < density
    dropped: Matrix = tensor * keep / tensor.dtype.type(density)
    return dropped


def _elementwise(method: str, tensors: list[Matrix], weights: list[float], density: float | None,
                 majority_sign: str, generator: np.random.Generator | None) -> Matrix:
    """The rules shared with full space, applied to cores or KnOTS blocks (PEFT merge_utils semantics)."""
    if method == "linear":
        return elementwise.weighted_sum(tensors, weights)
    if method == "ties":
        trimmed = [elementwise.magnitude_prune_one(t, _density(density)) for t in tensors]
        return elementwise.disjoint_merge(trimmed, weights, majority_sign)
    if method == "magnitude_prune":
        return elementwise.weighted_sum([elementwise.magnitude_prune_one(t, _density(density)) for t in tensors],
                                          weights)
    if method == "dare_linear":
        generator = _generator(generator)
        return elementwise.weighted_sum([drop(t, _density(density), generator) for t in tensors], weights)
    if method == "dare_ties":
        generator = _generator(generator)
        dropped = [drop(t, _density(density), generator) for t in tensors]
        return elementwise.disjoint_merge(dropped, weights, majority_sign)
    raise ValueError(f"unknown core-space method {method!r}")


# ----------------------------------------------------------------------------------------------
# KnOTS


@dataclass(frozen=True)
class KnotsSpace:
    """U (m x p) and the per-source blocks Σ V_tᵀ = Uᵀ ΔW_t (p x n) of the concatenation's SVD."""

    u: Basis
    blocks: list[Matrix]
    weights: list[float]


def _block_diagonal(blocks: list[Matrix]) -> Matrix:
    """The block-diagonal matrix of ``blocks``."""
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), dtype=blocks[0].dtype)
    row = col = 0
    for block in blocks:
        out[row : row + block.shape[0], col : col + block.shape[1]] = block
        row, col = row + block.shape[0], col + block.shape[1]
    return out


def knots_space(sources: Sequence[Source], weights: Sequence[float]) -> KnotsSpace:
    """The SVD of X = [ΔW_1 ... ΔW_T] from the factors, null directions dropped, signs canonical.

    X = B_cat · blockdiag(A_t) with B_cat = U_B Σ_B Wᵀ (core_bases' left basis) and A_tᵀ = Q_t R_t
    (thin QR), so X = U_B K blockdiag(Q_tᵀ) with K = Σ_B Wᵀ blockdiag(R_tᵀ) (p x R); K = P S Zᵀ gives
    U = U_B P, and the per-source blocks Σ V_tᵀ = Uᵀ ΔW_t = Pᵀ (U_Bᵀ s_t B_t) A_t.
    """
    sources, weights = _usable(sources, weights)
    if not sources:
        raise ValueError("no source has a non-zero delta on this module")
    b_cat, _ = _stacks(sources)
    left, b_coords = _column_basis(b_cat)
    r_ts = [np.linalg.qr(a.astype(np.float64).T)[1] for a, _, _ in sources]
    kernel = b_coords @ _block_diagonal([r.T for r in r_ts])
    p, s, _ = np.linalg.svd(kernel, full_matrices=False)
    width = sum(a.shape[1] for a, _, _ in sources)
    p = p[:, : _nonnull(s, (b_cat.shape[0], width))]
    p = p * _canonical(p.T @ kernel)
    coords = p.T @ b_coords  # Uᵀ s_t B_t side by side (k x R)
    blocks, start = [], 0
    for a, _, _ in sources:
        stop = start + a.shape[0]
        # Σ V_tᵀ = Uᵀ s_t B_t A_t, k x n: as large as the factors A_t, so float32 like them (the rule
        # makes several passes over these blocks; float64 would double that traffic)
        blocks.append(coords[:, start:stop].astype(np.float32) @ a.astype(np.float32))
        start = stop
    return KnotsSpace(u=Basis(q=left.q, p=left.p @ p), blocks=blocks, weights=weights)


# ----------------------------------------------------------------------------------------------
# the result as LoRA factors


def _as_factors(left: Basis, middle: Matrix, right: Basis | None, *, rank: int | None,
                energy: float | None) -> Factors:
    """ΔW = left @ middle (@ rightᵀ) as LoRA factors. Without rank/energy: B' = left @ middle,
    A' = rightᵀ (or B' = left, A' = middle when ``right`` is None). With them: the SVD of the small
    ``middle`` gives the exact optimal truncation, since both bases are orthonormal; the kept energy is
    exact, Σ_{j<=k} S_j² / Σ S_j²."""
    if rank is None and energy is None:
        if right is None:
            b, a = left.matrix(), middle
        else:
            b, a = left.times(middle), right.matrix().T
        return Factors(a=_float32(a), b=_float32(b), kept_energy=1.0)
    u, s, vh = np.linalg.svd(middle.astype(np.float64), full_matrices=False)
    energies = s * s
    total = float(energies.sum())
    keep = choose_rank(energies, total, rank, energy)
    kept = float(energies[:keep].sum()) / total if total > 0 else 1.0
    root = np.sqrt(s[:keep])
    b = left.times(u[:, :keep] * root)
    a = root[:, None] * vh[:keep]
    if right is not None:
        a = right.times(a.T).T
    return Factors(a=_float32(a), b=_float32(b), kept_energy=min(kept, 1.0))


def _float32(matrix: Matrix) -> NDArray[np.float32]:
    return np.ascontiguousarray(matrix, dtype=np.float32)


def merge_module(
    method: str,
    sources: Sequence[Source],
    weights: Sequence[float],
    *,
    density: float | None = None,
    majority_sign: str = "total",
    generator: np.random.Generator | None = None,
    scale: float = 1.0,
    rank: int | None = None,
    energy: float | None = None,
) -> Factors:
    """Merge one module's sources in core space (or KnOTS space for ``knots_*``) and return LoRA factors.

    ``sources`` holds (A_t, B_t, s_t); ``scale`` is the global λ multiplying the merged delta;
    ``generator`` draws DARE's masks (seed it per module, e.g. from elementwise.module_seed, so the
    result depends on the seed and the module name only); ``rank``/``energy`` truncate exactly.
    When every source's delta is zero the result is a zero LoRA of rank 1.
    """
    if method not in METHODS:
        raise ValueError(f"unknown core-space method {method!r}")
    if sources and not _usable(sources, weights)[0]:
        # every source's delta is zero here (e.g. PEFT's initialisation, B = 0): so is the merge
        a, b, _ = sources[0]
        return Factors(a=np.zeros((1, a.shape[1]), dtype=np.float32), b=np.zeros((b.shape[0], 1), dtype=np.float32))
    if method.startswith("knots_"):
        space = knots_space(sources, weights)
        rule = "ties" if method == "knots_ties" else "dare_ties"
        merged = _elementwise(rule, space.blocks, space.weights, density, majority_sign, generator)
        return _as_factors(space.u, scale * merged, None, rank=rank, energy=energy)
    core = core_bases(sources, weights)
    if method == "tsv":
        merged = tsv(core.weighted_cores())
    elif method == "iso_c":
        merged = iso_c(core.weighted_cores())
    elif method == "iso_cts":
        merged = iso_cts(core.weighted_cores())
    else:
        merged = _elementwise(method, core.cores, core.weights, density, majority_sign, generator)
    return _as_factors(core.left, scale * merged, core.right, rank=rank, energy=energy)
