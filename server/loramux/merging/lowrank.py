"""Low-rank algebra for merged deltas: exact concatenation, exact compression by QR
of the stacked factors plus an SVD of the small core, and error-bounded compression
of dense deltas. Never a dense m×n SVD on the exact path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Factored:
    """ΔW = B @ A with any scale already folded into B.

    B: [d_out, r] float32, A: [r, d_in] float32.
    """

    B: torch.Tensor  # [d_out, r]
    A: torch.Tensor  # [r, d_in]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:  # [d_out, d_in]
        return self.B @ self.A


def concat(terms: list[tuple[float, Factored]]) -> Factored:
    """Σ c_i B_i A_i as one factored delta of rank Σ r_i (exact)."""
    B = torch.cat([c * f.B for c, f in terms], dim=1)  # [d_out, Σr]
    A = torch.cat([f.A for _, f in terms], dim=0)  # [Σr, d_in]
    return Factored(B, A)


def gram(factors: list[Factored]) -> torch.Tensor:
    """G[i, j] = <ΔW_i, ΔW_j>_F = sum((B_iᵀB_j) ∘ (A_iA_jᵀ)), without forming ΔW.
    Returns [n, n] float64 for stable spherical maths.

    All pairs at once: with the factors stacked (B: [d_out, Σr], A: [Σr, d_in]),
    G = S ((BᵀB) ∘ (AAᵀ)) Sᵀ where S [n, Σr] sums each input's block of rows.
    """
    n = len(factors)
    B = torch.cat([f.B for f in factors], dim=1).double()  # [d_out, R]
    A = torch.cat([f.A for f in factors], dim=0).double()  # [R, d_in]
    products = (B.t() @ B).mul_(A @ A.t())  # [R, R]
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor([f.rank for f in factors]))  # [R]
    S = torch.zeros(n, owner.numel(), dtype=torch.float64)  # [n, R] block membership
    S[owner, torch.arange(owner.numel())] = 1.0
    g = S @ products @ S.t()  # [n, n]
    return (g + g.t()) / 2


@dataclass(frozen=True)
class Compressed:
    """A compressed delta and how much of it was lost.

    rel_error: ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (0 when ΔW is zero).
    needed_rank: the smallest rank whose error is within the budget asked for, with
      no rank cap, where the computed spectrum shows it (exact compression: always;
      dense: only when it is ≤ max_rank), else None.
    """

    factored: Factored
    rel_error: float
    needed_rank: int | None = None


def _truncate(U, S, V, k: int, total_sq: float, needed: int | None = None) -> Compressed:
    """Keep k singular triplets; B = U_k S_k, A = V_kᵀ. Error from the discarded values."""
    kept_sq = float((S[:k].double() ** 2).sum())
    err = math.sqrt(max(total_sq - kept_sq, 0.0) / total_sq) if total_sq > 0 else 0.0
    return Compressed(Factored(U[:, :k] * S[:k], V[:, :k].t().contiguous()), err, needed)


def _smallest_rank(S: torch.Tensor, total_sq: float, budget: float) -> int | None:
    """Smallest k ≥ 1 with discarded energy ≤ budget² · total, keeping the first k of
    the singular values S (descending); None when even all of S leave more out."""
    if total_sq <= 0:
        return 1
    kept = torch.cumsum(S.double() ** 2, 0)
    ok = ((total_sq - kept) <= (budget**2) * total_sq).nonzero()
    return max(1, int(ok[0]) + 1) if ok.numel() else None


def _pick_rank(S: torch.Tensor, total_sq: float, max_rank: int, budget: float) -> int:
    """Smallest k ≤ max_rank with discarded energy ≤ budget² · total (at least 1)."""
    k = _smallest_rank(S, total_sq, budget)
    return max(1, min(S.numel() if k is None else k, max_rank))


def compress_exact(f: Factored, max_rank: int, budget: float = 0.0) -> Compressed:
    """Best rank-≤max_rank approximation of B @ A (Eckart–Young), computed from
    QR(B), QR(Aᵀ) and the SVD of the r×r core R_B R_Aᵀ. With budget > 0, the
    smallest rank whose relative error is within budget is kept."""
    if f.rank <= max_rank and budget == 0.0:
        return Compressed(f, 0.0)
    Qb, Rb = torch.linalg.qr(f.B.double())  # [d_out, r], [r, r]
    Qa, Ra = torch.linalg.qr(f.A.double().t())  # [d_in, r], [r, r]
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t())  # core [r, r]
    total_sq = float((S**2).sum())
    k = _pick_rank(S, total_sq, max_rank, budget)
    needed = _smallest_rank(S, total_sq, budget)  # all r singular values are known
    return _truncate((Qb @ U).float(), S.float(), (Qa @ Vh.t()).float(), k, total_sq, needed)


def _span_basis(Y: torch.Tensor) -> torch.Tensor:
    """A basis [m, w] of span(Y) for Y [m, w], m ≥ w: P·L of Y = P L U, the LU
    factorization with partial pivoting (L unit lower trapezoidal, |Lᵢⱼ| ≤ 1). Power
    iterations only need the span kept well conditioned between products (the LU
    renormalization of Li et al. 2017, ACM TOMS Algorithm 971, fbpca); this costs
    about half a Householder QR, and a singular Y (a zero pivot) still gives a
    full-rank basis containing its span."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(Y)  # rows swapped i ↔ pivots[i] − 1, in order
    L = LU.tril_(-1)
    L.diagonal().fill_(1.0)
    perm = np.arange(Y.shape[0])
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    basis = torch.empty_like(L)
    basis[torch.from_numpy(perm).to(L.device)] = L  # Y[perm] = L U, so Y = basis U
    return basis


def compress_dense(
    delta: torch.Tensor, max_rank: int, budget: float, oversample: int = 8, seed: int = 0
) -> Compressed:
    """Low-rank approximation of a dense ΔW [d_out, d_in] meeting a relative
    Frobenius error budget where rank ≤ max_rank allows.

    Randomized range finder (Halko et al. 2011, Alg. 4.4 with 2 power iterations)
    on max_rank + oversample columns, in float32 (it only has to find a good
    subspace; between products the span is kept by an LU basis, `_span_basis`),
    then a float32 QR and a float64 Cholesky step make Q orthonormal to float64
    precision, and QᵀΔW is formed and decomposed in float64. The reported error is
    exact, not an estimate: ‖ΔW − Q U_k U_kᵀ QᵀΔW‖² equals ‖ΔW‖² minus the kept
    energy Σ_{i≤k} S_i², because Q is orthonormal and U_k are singular vectors of
    QᵀΔW (Pythagoras); both energies are float64, which a difference of energies
    needs (float32 cannot resolve it below ~1e-3 relative).

    QᵀΔW [w, d_in] is decomposed through its small Gram matrix (QᵀΔW)(QᵀΔW)ᵀ =
    U S² Uᵀ [w, w] (eigh), A = U_kᵀ QᵀΔW: the same rank-k product as its SVD without
    the wide SVD (several times slower at d_in ≥ 576). B = Q U_k S_k and the rows
    of A have unit norm, as with B = U_k S_k, A = V_kᵀ.
    """
    x = delta.to(torch.float32)  # [d_out, d_in]
    x64 = delta.to(torch.float64)  # [d_out, d_in]
    total_sq = float(torch.dot(x64.reshape(-1), x64.reshape(-1)))
    if total_sq == 0:
        zeros = delta.new_zeros(x.shape[0], 1, dtype=torch.float32)
        return Compressed(Factored(zeros, delta.new_zeros(1, x.shape[1], dtype=torch.float32)), 0.0, 1)
    width = min(max_rank + oversample, *x.shape)
    g = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(x.shape[1], width, generator=g, device=x.device, dtype=torch.float32)  # [d_in, w]
    Q = _span_basis(x @ omega)  # [d_out, w]
    for last in (False, True):  # power iterations sharpen the spectrum's tail
        Y = x @ _span_basis(x.t() @ Q)  # [d_out, w]
        Q = torch.linalg.qr(Y)[0] if last else _span_basis(Y)
    Q = Q.double()  # [d_out, w], orthonormal to float32 precision
    C = torch.linalg.cholesky(Q.t() @ Q)  # QᵀQ = C Cᵀ ≈ I: Q C⁻ᵀ is orthonormal to float64 precision
    Z = torch.linalg.solve_triangular(C, Q.t() @ x64, upper=False)  # (Q C⁻ᵀ)ᵀ ΔW: [w, d_in]
    lam, U = torch.linalg.eigh(Z @ Z.t())  # ascending S², [w, w]
    lam, U = lam.flip(0).clamp_(min=0.0), U.flip(1)
    S = lam.sqrt()  # [w] descending
    k = _pick_rank(S, total_sq, max_rank, budget)
    needed = _smallest_rank(S, total_sq, budget)
    err = math.sqrt(max(total_sq - float(lam[:k].sum()), 0.0) / total_sq)
    A = U[:, :k].t() @ Z  # [k, d_in]
    norms = torch.linalg.vector_norm(A, dim=1)  # [k] = S_k up to rounding
    A = A / torch.where(norms > 0, norms, 1.0).unsqueeze(1)
    B = (Q @ torch.linalg.solve_triangular(C.t(), U[:, :k], upper=True)).mul_(norms)  # Q C⁻ᵀ U_k S_k: [d_out, k]
    return Compressed(Factored(B.float(), A.float()), err, needed if needed is not None and needed <= max_rank else None)
