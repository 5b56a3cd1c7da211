"""Merge methods on task vectors, per target module, in float32 (design.md, "Merges
work on ΔW").

Every method is a small pure function of the task vectors ΔWᵢ of ONE target module
(all one shape, e.g. [d_out, d_in], all on one device, any floating dtype), their
weights wᵢ (finite, may be negative) and its parameters. It returns a new float32
tensor of that shape on that device and never modifies its inputs. Bad input raises
`InvalidArgument`; no method returns NaN or inf for finite input.

`METHODS` is the registry (mergekit style): name → `MergeMethod`. Callers go through
`resolve_method` (validates parameters, fills defaults) and `merge_module`.

linear, slerp and karcher are linear combinations of their inputs
(`low_rank_exact`): their coefficients cᵢ, with result Σ cᵢ ΔWᵢ, come from the Gram
matrix Gᵢⱼ = <ΔWᵢ, ΔWⱼ>_F alone (`coefficients_from_gram`), so they also run on
factored inputs without forming a dense ΔW; the dense functions use the same path.

Randomness (DARE, DELLA) comes only from the `torch.Generator`s passed in, one per
input; `make_generators` derives them from (seed, adapter id, module name).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import ctypes

import numpy as np
import torch

from loramux.errors import InvalidArgument
from loramux_kernels import native

# |cos θ| above 1 − this → lerp instead of slerp. Same threshold as mergekit's slerp
# (dot_threshold=0.9995): below it, sin θ ≥ 0.03 and the slerp weights are well
# conditioned; above it lerp and slerp differ by O(θ²) ≤ 5e-4 relative.
COLLINEAR_EPS = 5e-4
# A norm at most this fraction of the largest input norm counts as zero.
ZERO_NORM_REL = 1e-12
# Karcher: an input (nearly) antipodal to the current mean has no defined log map.
_ANTIPODAL_SIN = 1e-12
# Gram matrix of dense inputs is accumulated over chunks of this many elements.
_GRAM_CHUNK = 1 << 20
# Elementwise passes over big task vectors run on blocks of this many entries (per
# input) so that a pass's successor reads from cache.
_BLOCK = 1 << 16


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_inputs(deltas, weights) -> tuple[list[torch.Tensor], list[float]]:
    """Validate the task vectors and weights shared by every method."""
    if not isinstance(deltas, (list, tuple)) or len(deltas) == 0:
        raise InvalidArgument("a merge needs a non-empty list of task vectors")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(deltas):
        n_w = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise InvalidArgument(f"got {len(deltas)} task vectors but {n_w} weights")
    for i, w in enumerate(weights):
        if not _is_real(w) or not math.isfinite(w):
            raise InvalidArgument(f"weight {i} must be a finite number, got {w!r}")
    first = deltas[0]
    for i, d in enumerate(deltas):
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise InvalidArgument(f"task vector {i} must be a floating-point tensor")
        if d.shape != first.shape or d.numel() == 0:
            raise InvalidArgument(
                f"task vectors must share one non-empty shape: {i} is {tuple(d.shape)}, "
                f"0 is {tuple(first.shape)}"
            )
        if d.device != first.device:
            raise InvalidArgument(f"task vectors must share one device: {d.device} vs {first.device}")
        if not _all_finite(d):
            raise InvalidArgument(f"task vector {i} contains NaN or inf")
    return list(deltas), [float(w) for w in weights]


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in x. One read pass: any NaN or inf makes the sum non-finite;
    a non-finite sum of finite entries (overflow) is re-checked entry by entry."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def _check_gram(gram, n: int) -> torch.Tensor:
    """Gram matrix as a symmetric [n, n] float64 CPU tensor with a non-negative diagonal."""
    try:
        g = torch.as_tensor(gram).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgument(f"Gram matrix must be an [{n}, {n}] array of numbers") from None
    if g.shape != (n, n):
        raise InvalidArgument(f"Gram matrix must be [{n}, {n}], got {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise InvalidArgument("Gram matrix contains NaN or inf")
    g = (g + g.t()) / 2
    g.diagonal().clamp_(min=0.0)
    return g


def _check_generators(generators, n: int) -> list[torch.Generator]:
    if not isinstance(generators, (list, tuple)) or len(generators) != n:
        raise InvalidArgument(f"a random method needs one torch.Generator per input ({n})")
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise InvalidArgument("generators must be torch.Generator objects")
    return list(generators)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _weights_like(weights: list[float], stacked: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32, device=stacked.device)  # [N]
    return w.view(-1, *([1] * (stacked.dim() - 1)))  # [N, 1, ..., 1]


def _combine(deltas: list[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """Σ cᵢ ΔWᵢ accumulated in float32; zero coefficients are skipped exactly."""
    out = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
    for d, c in zip(deltas, coeffs):
        if c != 0.0:
            out.add_(d.to(torch.float32), alpha=c)
    return out


def gram_matrix(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gᵢⱼ = <ΔWᵢ, ΔWⱼ>_F as a [N, N] float64 CPU tensor.

    Accumulated in float64 over chunks, so angles near 0 are resolved to ~1e-8 rad
    (float32 would blur them to ~3e-4) without a float64 copy of the inputs.
    For factored inputs use `loramux.merging.lowrank.gram` instead.
    """
    flat = [d.reshape(-1) for d in deltas]  # N × [D]
    dtype = torch.float32 if flat[0].device.type == "mps" else torch.float64
    g = torch.zeros(len(flat), len(flat), dtype=dtype, device=flat[0].device)
    for start in range(0, flat[0].numel(), _GRAM_CHUNK):
        block = torch.stack([f[start : start + _GRAM_CHUNK].to(dtype) for f in flat])  # [N, c]
        g += block @ block.t()
    return g.to(device="cpu", dtype=torch.float64)


def _zero_norms(norms: torch.Tensor) -> torch.Tensor:
    """Which norms count as zero: ≤ ZERO_NORM_REL × the largest (all, if all are 0)."""
    scale = float(norms.max()) if norms.numel() else 0.0
    return norms <= ZERO_NORM_REL * scale


# ---------------------------------------------------------------------------
# Sparsification of one task vector (float32 in, float32 out)
# ---------------------------------------------------------------------------


def _kth_largest_(buf: torch.Tensor, k: int) -> float:
    """The k-th largest entry of the contiguous float32/64 `buf` (1 ≤ k ≤ numel); may
    reorder `buf`. Linear time on CPU (numpy's introselect, in place), torch.topk
    elsewhere."""
    flat = buf.view(-1)  # [n]
    pos = flat.numel() - k  # 0-based ascending rank of the answer
    if flat.device.type == "cpu":
        a = flat.numpy()
        a.partition(pos)
        return float(a[pos])
    return float(torch.topk(flat, k, largest=True, sorted=False).values.min())


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the floating `values` (finite, 1 ≤ k ≤ numel),
    exactly, as a 0-d tensor of their dtype.

    Semantics: sorted(values.flatten(), descending)[k - 1], duplicates counted.
    Linear time, unlike a sort or a large torch.topk.
    """
    if not 1 <= k <= values.numel():
        raise ValueError(f"k must be in [1, {values.numel()}], got {k}")
    work = torch.float64 if values.dtype == torch.float64 else torch.float32  # exact for both
    buf = values.detach().to(work, copy=True).contiguous()
    return torch.tensor(_kth_largest_(buf, k), dtype=values.dtype, device=values.device)


def _trim_threshold(x: torch.Tensor, k: int, scratch: torch.Tensor | None = None) -> float | None:
    """t with "keep |x| ≥ t" ≡ "keep torch.topk(|x|, k)": for every entry, x kept or
    dropped by the two rules gives the same value. None when only torch.topk can
    say which of several entries tied at t it keeps (a positive |x| tied across the
    cut: rare). scratch: x's shape and dtype (float32/64), contiguous; overwritten
    (allocated when None).

    t = the k-th largest |x| (+inf for k = 0, 0 for k ≥ numel). If t = 0, |x| ≥ 0
    keeps every entry, and the zeros topk may drop are zeros either way.
    """
    n = x.numel()
    if k <= 0:
        return math.inf
    if k >= n:
        return 0.0
    lib = _merge_kernels(x)
    if lib is not None:
        t, n_ge = _native_kth_largest_abs(lib, x, k)
        return 0.0 if t == 0.0 else (t if n_ge == k else None)
    if scratch is None:
        scratch = torch.empty_like(x, memory_format=torch.contiguous_format)
    mag = torch.abs(x, out=scratch).view(-1)  # [n]
    t = _kth_largest_(mag, k)
    if t == 0.0:
        return 0.0
    if mag.device.type == "cpu":
        # After the partition, mag[:n-k] ≤ t ≤ mag[n-k:]; ties across the cut lie left.
        left = mag[: n - k]
        if float(left.max()) < t:
            return t
        return None
    return t if int(torch.count_nonzero(torch.abs(x, out=scratch) >= t)) == k else None


def _topk_keep(x: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Into `out` (x's shape and dtype, contiguous): the 0/1 mask of torch.topk(|x|, k),
    or one equivalent to it (x · mask == x · keep bit for bit, see `_trim_threshold`)."""
    return _keep_mask(x, k, _trim_threshold(x, k, out), out)


def _keep_mask(x: torch.Tensor, k: int, t: float | None, out: torch.Tensor) -> torch.Tensor:
    """`_topk_keep` given t = `_trim_threshold(x, k, ·)`."""
    if t is not None:
        return torch.abs(x, out=out).ge_(t)
    torch.abs(x, out=out)
    # sorted=False selects the same entries (it only skips ordering them), in a quarter of the time.
    top = torch.topk(out.view(-1), k=k, largest=True, sorted=False).indices
    out.view(-1).zero_()[top] = 1.0
    return out


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density · numel) largest-magnitude entries, zero the rest.

    TIES "trim" step (Yadav et al. 2023, arXiv 2306.01708, §3). k and the tie
    breaking (torch.topk) are PEFT's `magnitude_based_pruning`, so results match it
    bit for bit (`_trim_threshold` finds the cut without a sort).
    density ≥ 1 returns the input unchanged.
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())  # PEFT's convention: floor of the float product
    # Magnitudes in float32 (exact for half inputs) or float64: the order topk sees.
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    scratch = torch.empty(delta.shape, dtype=work, device=delta.device)
    return delta * _topk_keep(delta.to(work), k, scratch).to(delta.dtype)


def _dare_keep(
    shape, density: float, generator: torch.Generator, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The DARE keep mask as float 0/1, on the generator's device: exactly
    torch.bernoulli(full(shape, density), generator=generator), and the generator ends
    in the same state. On CPU both draw one uniform u = (32 random bits & 2²⁴−1)·2⁻²⁴
    per entry in order and keep u < float32(density); torch.rand + a compare does it
    without bernoulli's per-entry overhead (tested against torch.bernoulli)."""
    if generator.device.type != "cpu":
        probs = torch.full(shape, density, dtype=torch.float32, device=generator.device)
        return torch.bernoulli(probs, generator=generator)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    return torch.rand(shape, generator=generator, out=out).lt_(density)


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop-and-rescale (Yu et al. 2024, arXiv 2311.03099, eqs. 1–2).

    Semantics: mᵢ ~ Bernoulli(density) (drop with p = 1 − density), out = ΔW ∘ m / (1 − p),
    so E[out] = ΔW. The mask is drawn from `generator` on its own device, as
    `torch.bernoulli(full(shape, density))` — the same draw PEFT makes from the
    global RNG. density ≥ 1 returns the input and draws nothing.
    """
    if density >= 1:
        return delta
    keep = _dare_keep(delta.shape, density, generator).to(delta.device)  # [*shape] in {0, 1}
    return delta * keep / density


def drop_magprune(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024, arXiv 2406.11617, §3.1).

    Semantics: within each row (output unit) rank entries by magnitude, rank 0 the
    smallest; keep probability qᵢ = density − ε + 2ε · rankᵢ / (n − 1) (larger entries
    are dropped less; mean keep probability = density); keep ~ Bernoulli(qᵢ);
    out = ΔW ∘ keep / qᵢ (the paper's 1/(1 − pᵢ) rescale, so E[out] = ΔW).
    Ranks and draw order follow mergekit's `della_magprune`, so masks match it.
    """
    if density >= 1:
        return delta
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)  # [R, n]
    n = rows.shape[1]
    ranks = _row_ranks(rows.abs()).to(torch.float32)  # [R, n]
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    probs = ((density - epsilon) + rank_norm * 2 * epsilon).to(generator.device)  # [R, n]
    if generator.device.type == "cpu":
        # torch.bernoulli(probs) on CPU keeps u < probs for one uniform u per entry, in
        # order, the draw of torch.rand: the same mask without its per-entry overhead.
        keep = torch.rand(probs.shape, generator=generator).lt_(probs).to(delta.device)
    else:
        keep = torch.bernoulli(probs, generator=generator).to(delta.device)
    return (rows * keep / probs.to(delta.device)).reshape(delta.shape)


def _row_ranks(mag: torch.Tensor) -> torch.Tensor:
    """[R, n] int64: each entry's ascending rank within its row of `mag` [R, n]
    (magnitudes: finite, ≥ 0, no -0.0), what argsort(argsort(mag, dim=1), dim=1)
    gives (mergekit's della_magprune).

    The ranks are the inverse permutation of the row sort order (a scatter, not a
    second sort). On CPU, for float32, the order comes from numpy's (SIMD) sort of
    int64 keys (the bits of |x|, which order like the values, above the column
    index), which any sort matches on rows of distinct values; rows with tied
    values take torch.argsort's order, so ties are broken as before.
    """
    R, n = mag.shape
    if mag.device.type == "cpu" and mag.dtype == torch.float32:
        bits = max(1, (n - 1).bit_length())  # for the column index
        keys = mag.contiguous().view(torch.int32).to(torch.int64)  # [R, n], ≥ 0: |x| ≥ 0
        keys.bitwise_left_shift_(bits).bitwise_or_(torch.arange(n))
        ordered = torch.from_numpy(np.sort(keys.numpy(), axis=1))  # [R, n] ascending keys
        values = ordered >> bits  # [R, n]
        tied = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().flatten()  # rows with ties
        order = ordered.bitwise_and_((1 << bits) - 1)  # [R, n] the columns, ascending |x|
        if tied.numel():
            order[tied] = torch.argsort(mag[tied], dim=1)
    else:
        order = torch.argsort(mag, dim=1)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(n, device=mag.device).expand(R, n))


def trim_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2023, arXiv 2312.06795, §3).

    Semantics: drop the int(gamma · n) largest-magnitude entries (outliers) and as many
    of the smallest as needed to keep k = int(density · n); when gamma + density > 1
    fewer outliers are dropped so that k entries survive. No rescale. Same order
    statistics as mergekit's `sparsify.magnitude_outliers`.
    """
    n = delta.numel()
    k = int(density * n)
    n_bottom = max(0, n - k - int(gamma * n))
    keep = _band_keep(delta, n_bottom, k)
    if keep is None:  # ties across a cut: only the sort's order says which are kept
        order = torch.sort(delta.abs().reshape(-1), descending=False).indices  # [n] ascending
        keep = torch.zeros(n, dtype=delta.dtype, device=delta.device)
        keep[order[n_bottom : n_bottom + k]] = 1
    return delta * keep.reshape(delta.shape)


def _band_keep(delta: torch.Tensor, n_bottom: int, k: int) -> torch.Tensor | None:
    """The 0/1 mask keeping the entries at ascending |ΔW| positions
    [n_bottom, n_bottom + k), from the two order statistics at the ends of that
    band (linear time) instead of a sort; None where entries tied with an end lie
    on both sides of a cut (then only the sort's order decides). Zeros kept or
    dropped alike do not matter: the mask only ever multiplies ΔW."""
    n = delta.numel()
    if k <= 0:
        return torch.zeros(delta.shape, dtype=delta.dtype, device=delta.device)
    mag = delta.detach().abs().reshape(-1)  # [n]
    lo = float(kth_largest(mag, n - n_bottom))  # the band's smallest |ΔW|
    hi = float(kth_largest(mag, n - n_bottom - k + 1))  # and its largest
    upto_hi = mag <= hi  # [n]
    if int(torch.count_nonzero(upto_hi)) != n_bottom + k:
        return None
    if lo == 0.0:  # below the band only zeros: keeping them or not is the same product
        return upto_hi.to(delta.dtype)
    from_lo = mag >= lo  # [n]
    if n - int(torch.count_nonzero(from_lo)) != n_bottom:
        return None
    return from_lo.logical_and_(upto_hi).to(delta.dtype)


# ---------------------------------------------------------------------------
# Native CPU kernels (kernels/loramux_kernels/csrc/merge_cpu.c), in fewer passes over
# memory: the same selections (k-th largest, trim, election) exactly, the same sums
# up to float32 summation order. Used for contiguous float32 CPU tensors when the
# kernels build here, the torch formulation otherwise.
# ---------------------------------------------------------------------------

# Whether ties / the election use lmx_ties_merge_f32 (results identical to the torch
# formulation below). Built with -fno-trapping-math its selects vectorize: 2.3-2.5x
# faster than the blocked torch formulation here (AVX-512; two [1536, 576] inputs:
# 3.8 vs 8.8 ms on one thread, 2.1 vs 5.2 ms on two). Without that flag GCC did not
# vectorize it and it measured 4-5x slower. The radix-select threshold kernel is
# used either way.
_NATIVE_COMBINE = True


def _merge_kernels(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    return native.load("merge_cpu")


def _native_kth_largest_abs(lib, x: torch.Tensor, k: int) -> tuple[float, int]:
    """(t = the k-th largest |x|, #{|x| ≥ t}) of a contiguous float32 CPU tensor."""
    t, n_ge = ctypes.c_float(), ctypes.c_int64()
    lib.lmx_kth_largest_abs_f32(
        x.data_ptr(), x.numel(), k, torch.get_num_threads(), ctypes.byref(t), ctypes.byref(n_ge)
    )
    return t.value, n_ge.value


def _native_ties(lib, rows, thresholds, weights, majority_sign_method: str) -> torch.Tensor:
    """TIES over contiguous float32 CPU tensors of one shape, in one pass: vᵢ = dᵢ·wᵢ
    where |dᵢ| ≥ tᵢ (else 0), then `_elect_and_mean_` of the vᵢ (see merge_cpu.c)."""
    out = torch.empty(rows[0].shape, dtype=torch.float32)
    ptrs = torch.tensor([r.data_ptr() for r in rows], dtype=torch.int64)
    t = torch.tensor(thresholds, dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)  # the rounding of _float32_weights
    lib.lmx_ties_merge_f32(
        ptrs.data_ptr(), t.data_ptr(), w.data_ptr(), len(rows), out.numel(),
        int(majority_sign_method == "frequency"), torch.get_num_threads(), out.data_ptr(),
    )
    return out


def _fused_ties(deltas, weights, density: float, majority_sign_method: str) -> torch.Tensor | None:
    """`ties` without materializing the trimmed inputs, or None where the native
    kernels do not apply (not CPU float32, or a tie across a trim cut: topk decides)."""
    rows = [d.to(torch.float32).contiguous() for d in deltas]
    lib = _merge_kernels(rows[0])
    if lib is None:
        return None
    # (callers check _NATIVE_COMBINE; tests call this directly to check the kernel)
    n = rows[0].numel()
    k = n if density >= 1 else int(density * n)
    thresholds = [_trim_threshold(r, k) for r in rows]
    if any(t is None for t in thresholds):
        return None
    return _native_ties(lib, rows, thresholds, weights, majority_sign_method)


# ---------------------------------------------------------------------------
# Sign election and disjoint mean
# ---------------------------------------------------------------------------


def elect_and_mean(weighted: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """TIES "elect" and "disjoint merge" (Yadav et al. 2023, arXiv 2306.01708, §3).

    weighted: [N, *shape] = wᵢ · (sparsified ΔWᵢ).
    Semantics: elected = sign(Σᵢ weightedᵢ) ("total") or sign(Σᵢ sign(weightedᵢ))
    ("frequency"), a tie electing +; out = Σ over agreeing i of weightedᵢ / #agreeing
    (0 where none agree; zeros never agree). This is PEFT's `calculate_majority_sign_mask`
    + `disjoint_merge`, except that PEFT elects on the *unweighted* values; we elect
    on the weighted ones, so a negated task (w < 0) votes with its effective sign.
    """
    return _elect_and_mean_(weighted.clone(memory_format=torch.contiguous_format), majority_sign_method)


def _elect_and_mean_(weighted: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """`elect_and_mean` on a contiguous floating `weighted`, which it may overwrite.

    With e = ±1 the elected sign, an input agrees where wᵢ · e > 0, so
    max(wᵢ · e, 0) is |wᵢ| where it agrees and 0 elsewhere (· e is exact): summed
    over dim 0 of the same [N, *shape] layout and multiplied by e, the same values
    in the same order as the plain formulation (weighted · bool mask), so the same
    result (float sums are symmetric under negation). Block by block, so that each
    step reads from cache.
    """
    lib = _merge_kernels(weighted) if _NATIVE_COMBINE else None
    if lib is not None:  # one native pass (sums in input order); rows kept as they are
        rows = list(weighted.view(weighted.shape[0], -1))
        return _native_ties(lib, rows, [0.0] * len(rows), [1.0] * len(rows), majority_sign_method).view(
            weighted.shape[1:]
        )
    n = weighted.shape[0]
    flat = weighted.view(n, -1)  # [N, D]
    D = flat.shape[1]
    out = torch.empty(D, dtype=weighted.dtype, device=weighted.device)  # [D]
    width = min(_BLOCK, D)
    like = dict(dtype=weighted.dtype, device=weighted.device)
    ones, elected, count = torch.ones(width, **like), torch.empty(width, **like), torch.empty(width, **like)
    signs = torch.empty((n, width), **like)  # [N, block]
    for s in range(0, D, _BLOCK):
        block = flat[:, s : s + _BLOCK]  # [N, b]
        b = block.shape[1]
        e, c, sg = elected[:b], count[:b], signs[:, :b]
        if majority_sign_method == "total":
            torch.sum(block, dim=0, out=e)  # the score Σ wᵢ
        else:
            torch.sum(torch.sign(block, out=sg), dim=0, out=e)  # Σ sign(wᵢ)
        # ±1 by the score's sign; a score of +0 elects + (-0 only when every wᵢ is ±0).
        torch.copysign(ones[:b], e, out=e)
        block.mul_(e).clamp_(min=0.0)  # |wᵢ| where wᵢ agrees, else 0
        torch.sum(torch.sign(block, out=sg), dim=0, out=c)  # number agreeing (exact)
        o = out[s : s + b]
        torch.sum(block, dim=0, out=o).mul_(e).div_(c.clamp_(min=1.0))
    return out.view(weighted.shape[1:])


def _float32_weights(weights: list[float], device) -> list[torch.Tensor]:
    """Each weight as a 0-d float32 tensor: the same rounding as a float32 weight vector."""
    return list(torch.tensor(weights, dtype=torch.float32, device=device).unbind())


def _trimmed_weighted(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """[N, *shape]: wᵢ · trim_magnitude(ΔWᵢ, density) (equal values; zeros may differ in sign)."""
    first = deltas[0]
    out = torch.empty((len(deltas), *first.shape), dtype=torch.float32, device=first.device)
    k = first.numel() if density >= 1 else int(density * first.numel())
    scratch = torch.empty(first.shape, dtype=torch.float32, device=first.device)  # [*shape]
    for d, w, o in zip(deltas, _float32_weights(weights, first.device), out):
        d = d.to(torch.float32)
        t = _trim_threshold(d, k, scratch)
        if t is None:
            torch.mul(d, _keep_mask(d, k, None, scratch), out=o)
        elif t == 0.0:
            o.copy_(d)
        elif t == math.inf:
            o.zero_()
        else:
            # hardshrink(x, λ) zeroes |x| ≤ λ: with λ the float32 just below t, it keeps |x| ≥ t.
            f32 = torch.float32
            below_t = float(torch.nextafter(torch.tensor(t, dtype=f32), torch.tensor(0.0, dtype=f32)))
            d_flat, o_flat = d.reshape(-1), o.view(-1)  # [D]
            for s in range(0, d_flat.numel(), _BLOCK):  # block by block: the product reads from cache
                torch.hardshrink(d_flat[s : s + _BLOCK], below_t, out=o_flat[s : s + _BLOCK]).mul_(w)
            continue
        o.mul_(w)
    return out


def _dropped_weighted(
    deltas: list[torch.Tensor], weights: list[float], density: float, generators: list[torch.Generator]
) -> torch.Tensor:
    """[N, *shape]: wᵢ · drop_random(ΔWᵢ, density, generatorᵢ), written in place (same bits)."""
    first = deltas[0]
    out = torch.empty((len(deltas), *first.shape), dtype=torch.float32, device=first.device)
    scratch = torch.empty(first.shape, dtype=torch.float32)  # [*shape] CPU draws
    for d, w, g, o in zip(deltas, _float32_weights(weights, first.device), generators, out):
        d = d.to(torch.float32)
        if density >= 1:
            torch.mul(d, w, out=o)
            continue
        keep = _dare_keep(d.shape, density, g, out=scratch if g.device.type == "cpu" else None)
        # ((d / density) · m) · w == ((d · m) / density) · w for m ∈ {0, 1}, zero signs included
        torch.div(d, density, out=o).mul_(keep.to(o.device)).mul_(w)
    return out


def _weighted_sum(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(parts)  # [N, *shape]
    return (stacked * _weights_like(weights, stacked)).sum(dim=0)


def _weighted_ties(parts: list[torch.Tensor], weights: list[float], sign_method: str) -> torch.Tensor:
    stacked = torch.stack(parts)  # [N, *shape]
    return _elect_and_mean_(stacked * _weights_like(weights, stacked), sign_method)


# ---------------------------------------------------------------------------
# Coefficient functions (Gram matrix only) for the low-rank-exact methods
# ---------------------------------------------------------------------------


def linear_coefficients(gram, weights: Sequence[float], *, normalize: bool = False) -> list[float]:
    """Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): cᵢ = wᵢ, or wᵢ / Σⱼ wⱼ
    with `normalize`. `gram` is unused (accepted for a uniform signature)."""
    w = [float(x) for x in weights]
    if not normalize:
        return w
    total = math.fsum(w)
    if abs(total) <= 1e-8 * math.fsum(abs(x) for x in w):
        raise InvalidArgument(f"linear with normalize=True needs weights with a non-zero sum, got {w}")
    return [x / total for x in w]


def slerp_coefficients(gram, weights: Sequence[float], *, t: float) -> list[float]:
    """SLERP (Shoemake 1985, "Animating rotation with quaternion curves"; as used for
    model merging by mergekit's `slerp`) of a = w₀ΔW₀ and b = w₁ΔW₁ at factor t.

    Semantics: θ = angle(a, b); c = (w₀ sin((1−t)θ)/sin θ, w₁ sin(tθ)/sin θ), i.e. the
    raw vectors are interpolated with the angle of their directions (mergekit's
    convention), so slerp of two unit vectors is a unit vector. Falls back to lerp
    c = ((1−t)w₀, t·w₁) when |cos θ| > 1 − COLLINEAR_EPS or either vector is zero.
    t = 0 and t = 1 give exactly a and b. gram: [2, 2].
    """
    if len(weights) != 2:
        raise InvalidArgument(f"slerp merges exactly 2 task vectors, got {len(weights)}")
    g = _check_gram(gram, 2)
    w0, w1 = float(weights[0]), float(weights[1])
    # Endpoints are exact in both branches: sin(θ)/sin(θ) == 1 and sin(0) == 0 in IEEE.
    lerp = [(1 - t) * w0, t * w1]
    norms = torch.tensor([abs(w0), abs(w1)], dtype=torch.float64) * g.diagonal().sqrt()  # [2]
    if bool(_zero_norms(norms).any()):
        return lerp
    cos = max(-1.0, min(1.0, w0 * w1 * float(g[0, 1]) / float(norms[0] * norms[1])))
    if abs(cos) > 1 - COLLINEAR_EPS:
        return lerp
    theta = math.acos(cos)
    return [w0 * math.sin((1 - t) * theta) / math.sin(theta), w1 * math.sin(t * theta) / math.sin(theta)]


def _u_norm(u: torch.Tensor, x: torch.Tensor) -> float:
    """‖Σ xᵢ uᵢ‖ from the Gram matrix u of the unit vectors."""
    return math.sqrt(max(float(x @ u @ x), 0.0))


def _karcher_step(u: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, tol: float) -> torch.Tensor:
    """Σᵢ αᵢ log_m(uᵢ) as coefficients over the unit vectors uᵢ, for m = Σ μⱼ uⱼ.

    log_m(uᵢ) = θᵢ/sin θᵢ · (uᵢ − cos θᵢ · m): it stays in the span of the inputs.
    Terms with θᵢ < tol are zero; (nearly) antipodal terms have no defined
    direction and are left out.
    """
    cos = (u @ mu).clamp(-1.0, 1.0)  # [K]
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    use = (theta >= tol) & (sin > _ANTIPODAL_SIN)
    k = torch.where(use, alpha * theta / torch.where(use, sin, 1.0), 0.0)  # [K]
    return k - (k @ cos) * mu


def _karcher_direction(u: torch.Tensor, alpha: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher mean on the unit sphere, as coefficients μ over unit vectors.

    u: [K, K] Gram matrix of the unit vectors, alpha: [K] weights summing to 1.
    Riemannian gradient descent with unit step (Karcher 1977; Buss & Fillmore 2001,
    "Spherical averages and applications to spherical splines and interpolation"),
    started at the normalised weighted average; the same iteration as mergekit's
    `karcher_merge_tensors`, but in coefficient space. Stops when the step is < tol.
    """
    mu = alpha.clone()
    norm = _u_norm(u, mu)
    mu = mu / norm if norm >= tol else torch.nn.functional.one_hot(alpha.argmax(), len(alpha)).double()
    for _ in range(max_iter):
        tau = _karcher_step(u, alpha, mu, tol)
        step = _u_norm(u, tau)
        if step < tol:
            break
        mu = math.cos(step) * mu + math.sin(step) * tau / step  # exp map
        mu = mu / _u_norm(u, mu)
    return mu


def _check_karcher_weights(weights: Sequence[float]) -> None:
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise InvalidArgument(
            "karcher needs non-negative weights with a positive sum (a Fréchet mean "
            f"has no negative masses; negate a task with linear), got {list(weights)}"
        )


def karcher_coefficients(
    gram, weights: Sequence[float], *, max_iter: int = 100, tol: float = 1e-7
) -> list[float]:
    """Weighted N-way spherical mean (Karcher 1977; Fréchet mean on the unit sphere).

    Semantics: uᵢ = ΔWᵢ/‖ΔWᵢ‖; m = argmin over unit x of Σ αᵢ d(x, uᵢ)² with
    αᵢ = wᵢ / Σ w (geodesic distance d); result = (Σᵢ wᵢ ‖ΔWᵢ‖) · m = Σ cᵢ ΔWᵢ.
    Weights must be ≥ 0 with a positive sum (else InvalidArgument). Zero-norm inputs
    add nothing to the direction or the norm; if every input with positive weight is
    zero, the result is zero. One input gives w₀ΔW₀; two inputs with weights
    (1−t, t) give the slerp direction at t. gram: [N, N].
    """
    _check_karcher_weights(weights)
    g = _check_gram(gram, len(weights))
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)  # [N]
    norms = g.diagonal().sqrt()  # [N]
    valid = (~_zero_norms(norms)).nonzero().flatten()  # [K]
    coeffs = torch.zeros_like(w)
    if len(valid) == 0 or float(w[valid].sum()) <= 0:
        return coeffs.tolist()
    alpha = w[valid] / w[valid].sum()  # [K]
    u = g[valid][:, valid] / torch.outer(norms[valid], norms[valid])  # [K, K]
    mu = _karcher_direction(u, alpha, max_iter, tol)  # [K]
    scale = float((w * norms).sum())  # target norm Σ wᵢ‖ΔWᵢ‖
    coeffs[valid] = scale * mu / norms[valid]
    return coeffs.tolist()


# ---------------------------------------------------------------------------
# The methods: dense task vectors in, float32 tensor out
# ---------------------------------------------------------------------------


def linear(deltas, weights, *, normalize: bool = False) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): Σ wᵢ ΔWᵢ, divided by
    Σ wᵢ when `normalize` (InvalidArgument if that sum is 0)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("linear", normalize=normalize)
    return _combine(deltas, linear_coefficients(None, weights, **p))


def ties(deltas, weights, *, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim each ΔWᵢ to its top
    `density` fraction by magnitude, elect a sign per entry on the weighted values,
    return the mean of the agreeing weighted values (see `elect_and_mean`)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("ties", density=density, majority_sign_method=majority_sign_method)
    if _NATIVE_COMBINE:
        fused = _fused_ties(deltas, weights, p["density"], p["majority_sign_method"])
        if fused is not None:
            return fused
    return _elect_and_mean_(_trimmed_weighted(deltas, weights, p["density"]), p["majority_sign_method"])


def magnitude_prune(deltas, weights, *, density: float) -> torch.Tensor:
    """Magnitude pruning then task arithmetic: Σ wᵢ trim(ΔWᵢ) (TIES's trim step,
    arXiv 2306.01708, without sign election; PEFT's `magnitude_prune`)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("magnitude_prune", density=density)
    return _trimmed_weighted(deltas, weights, p["density"]).sum(dim=0)


def dare_linear(deltas, weights, *, density: float, generators) -> torch.Tensor:
    """DARE then task arithmetic (Yu et al. 2024, arXiv 2311.03099):
    Σ wᵢ drop(ΔWᵢ), each drop from its own generator; unbiased: E = Σ wᵢ ΔWᵢ."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("dare_linear", density=density)
    gens = _check_generators(generators, len(deltas))
    return _dropped_weighted(deltas, weights, p["density"], gens).sum(dim=0)


def dare_ties(
    deltas, weights, *, density: float, generators, majority_sign_method: str = "total"
) -> torch.Tensor:
    """DARE then TIES sign election and disjoint mean (Yu et al. 2024, arXiv 2311.03099,
    with Yadav et al. 2023, arXiv 2306.01708)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("dare_ties", density=density, majority_sign_method=majority_sign_method)
    gens = _check_generators(generators, len(deltas))
    dropped = _dropped_weighted(deltas, weights, p["density"], gens)
    return _elect_and_mean_(dropped, p["majority_sign_method"])


def della(
    deltas, weights, *, density: float, epsilon: float, generators, majority_sign_method: str = "total"
) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024, arXiv 2406.11617): MagPrune drop with rescale
    1/qᵢ (`drop_magprune`), then TIES sign election and disjoint mean.
    With epsilon = 0 it is exactly dare_ties (same draws from the same generators)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("della", density=density, epsilon=epsilon, majority_sign_method=majority_sign_method)
    gens = _check_generators(generators, len(deltas))
    dropped = [
        drop_magprune(d.to(torch.float32), p["density"], p["epsilon"], g) for d, g in zip(deltas, gens)
    ]
    return _weighted_ties(dropped, weights, p["majority_sign_method"])


def breadcrumbs(deltas, weights, *, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): Σ wᵢ mask(ΔWᵢ),
    the mask dropping the largest `gamma` fraction and the smallest entries so that a
    `density` fraction survives (`trim_outliers`)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("breadcrumbs", density=density, gamma=gamma)
    masked = [trim_outliers(d.to(torch.float32), p["density"], p["gamma"]) for d in deltas]
    return _weighted_sum(masked, weights)


def slerp(deltas, weights, *, t: float) -> torch.Tensor:
    """Spherical linear interpolation of w₀ΔW₀ and w₁ΔW₁ at t (see `slerp_coefficients`;
    Shoemake 1985). Use weights [1, 1] for the plain two-adapter slerp."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("slerp", t=t)
    if len(deltas) != 2:
        raise InvalidArgument(f"slerp merges exactly 2 task vectors, got {len(deltas)}")
    return _combine(deltas, slerp_coefficients(gram_matrix(deltas), weights, **p))


def karcher(deltas, weights, *, max_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean on the sphere scaled to Σ wᵢ‖ΔWᵢ‖
    (see `karcher_coefficients`; Karcher 1977)."""
    deltas, weights = _check_inputs(deltas, weights)
    p = _params("karcher", max_iter=max_iter, tol=tol)
    return _combine(deltas, karcher_coefficients(gram_matrix(deltas), weights, **p))


# ---------------------------------------------------------------------------
# Parameter validators
# ---------------------------------------------------------------------------


class _BadParam(Exception):
    """Raised by a validator with what it expected; turned into InvalidArgument."""


def _number(value) -> float:
    if not _is_real(value) or not math.isfinite(value):
        raise _BadParam("a finite number")
    return float(value)


def _density(value) -> float:
    x = _number(value)
    if not 0 < x <= 1:
        raise _BadParam("a number in (0, 1]")
    return x


def _unit_interval(value) -> float:
    x = _number(value)
    if not 0 <= x <= 1:
        raise _BadParam("a number in [0, 1]")
    return x


def _fraction(value) -> float:
    x = _number(value)
    if not 0 <= x < 1:
        raise _BadParam("a number in [0, 1)")
    return x


def _positive_small(value) -> float:
    x = _number(value)
    if not 0 < x < 1:
        raise _BadParam("a number in (0, 1)")
    return x


def _iterations(value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= 10_000:
        raise _BadParam("an integer in [1, 10000]")
    return int(value)


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise _BadParam("true or false")
    return value


def _sign_method(value) -> str:
    if not isinstance(value, str) or value not in ("total", "frequency"):
        raise _BadParam("'total' or 'frequency'")
    return value


def _della_range(p: dict) -> None:
    if not (p["density"] - p["epsilon"] > 0 and p["density"] + p["epsilon"] <= 1):
        raise InvalidArgument(
            f"della needs density - epsilon > 0 and density + epsilon <= 1 (keep probabilities), "
            f"got density={p['density']}, epsilon={p['epsilon']}"
        )


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a Param default meaning "the caller must give it"


@dataclass(frozen=True)
class Param:
    """One method parameter: its default (or REQUIRED), a validator returning the
    normalised value (raises _BadParam), and a one-line description."""

    default: object
    check: Callable[[object], object]
    doc: str


@dataclass(frozen=True, eq=False)
class MergeMethod:
    """A registered merge method.

    fn: the dense function, fn(deltas, weights, **params[, generators]) → float32 tensor.
    params: name → Param (read-only mapping).
    paper: citation of the method.
    low_rank_exact: the result is Σ cᵢ ΔWᵢ, with cᵢ from `coefficients_fn`.
    needs_generator: fn takes `generators`, one torch.Generator per input.
    coefficients_fn: (gram [N, N], weights, **params) → list of N floats, or None.
    check: cross-parameter constraint on the validated params, or None.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: Mapping[str, Param]
    paper: str
    low_rank_exact: bool
    needs_generator: bool
    coefficients_fn: Callable[..., list[float]] | None = None
    check: Callable[[dict], None] | None = None


_DENSITY = Param(REQUIRED, _density, "fraction of entries kept, in (0, 1]")
_SIGN = Param("total", _sign_method, "sign election: 'total' (sign of the weighted sum) or 'frequency'")

_TIES = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv 2306.01708"
_DARE = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv 2311.03099"


def _registry(*methods: MergeMethod) -> Mapping[str, MergeMethod]:
    return MappingProxyType({m.name: m for m in methods})


METHODS: Mapping[str, MergeMethod] = _registry(
    MergeMethod(
        "linear",
        linear,
        MappingProxyType({"normalize": Param(False, _flag, "divide by the sum of the weights")}),
        "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv 2212.04089",
        low_rank_exact=True,
        needs_generator=False,
        coefficients_fn=linear_coefficients,
    ),
    MergeMethod(
        "ties",
        ties,
        MappingProxyType({"density": _DENSITY, "majority_sign_method": _SIGN}),
        _TIES,
        low_rank_exact=False,
        needs_generator=False,
    ),
    MergeMethod(
        "magnitude_prune",
        magnitude_prune,
        MappingProxyType({"density": _DENSITY}),
        _TIES + " (trim step only)",
        low_rank_exact=False,
        needs_generator=False,
    ),
    MergeMethod(
        "dare_linear",
        dare_linear,
        MappingProxyType({"density": _DENSITY}),
        _DARE,
        low_rank_exact=False,
        needs_generator=True,
    ),
    MergeMethod(
        "dare_ties",
        dare_ties,
        MappingProxyType({"density": _DENSITY, "majority_sign_method": _SIGN}),
        _DARE + "; " + _TIES,
        low_rank_exact=False,
        needs_generator=True,
    ),
    MergeMethod(
        "della",
        della,
        MappingProxyType(
            {
                "density": _DENSITY,
                "epsilon": Param(REQUIRED, _fraction, "keep probabilities span density ± epsilon"),
                "majority_sign_method": _SIGN,
            }
        ),
        "Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
        "Magnitude-Based Sampling, arXiv 2406.11617",
        low_rank_exact=False,
        needs_generator=True,
        check=_della_range,
    ),
    MergeMethod(
        "breadcrumbs",
        breadcrumbs,
        MappingProxyType(
            {"density": _DENSITY, "gamma": Param(0.01, _fraction, "fraction of largest entries dropped")}
        ),
        "Davari & Belilovsky 2023, Model Breadcrumbs: Scaling Multi-Task Model Merging "
        "with Sparse Masks, arXiv 2312.06795",
        low_rank_exact=False,
        needs_generator=False,
    ),
    MergeMethod(
        "slerp",
        slerp,
        MappingProxyType({"t": Param(REQUIRED, _unit_interval, "interpolation factor in [0, 1]")}),
        "Shoemake 1985, Animating Rotation with Quaternion Curves (SIGGRAPH); mergekit slerp",
        low_rank_exact=True,
        needs_generator=False,
        coefficients_fn=slerp_coefficients,
    ),
    MergeMethod(
        "karcher",
        karcher,
        MappingProxyType(
            {
                "max_iter": Param(100, _iterations, "iteration cap"),
                "tol": Param(1e-7, _positive_small, "stop at a tangent step below this (radians)"),
            }
        ),
        "Karcher 1977, Riemannian center of mass and mollifier smoothing (CPAM 30); "
        "Buss & Fillmore 2001, Spherical averages (ACM TOG 20)",
        low_rank_exact=True,
        needs_generator=False,
        coefficients_fn=karcher_coefficients,
    ),
)


def _lookup(name) -> MergeMethod:
    if isinstance(name, MergeMethod):
        name = name.name
    if not isinstance(name, str) or name not in METHODS:
        raise InvalidArgument(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_method(name, params: Mapping[str, object] | None = None) -> tuple[MergeMethod, dict]:
    """Look up a method by name (or pass a MergeMethod) and validate `params`.

    Returns the method and a new dict with every parameter, defaults filled in.
    InvalidArgument for an unknown method, unknown or missing parameter, or a bad value.
    """
    method = _lookup(name)
    name = method.name
    params = dict(params or {})
    unknown = sorted(set(params) - set(method.params), key=str)
    if unknown:
        accepted = ", ".join(method.params) or "none"
        raise InvalidArgument(f"{name} has no parameter {unknown[0]!r}; it accepts: {accepted}")
    out = {}
    for key, spec in method.params.items():
        if key not in params:
            if spec.default is REQUIRED:
                raise InvalidArgument(f"{name} needs parameter {key!r} ({spec.doc})")
            out[key] = spec.default
            continue
        try:
            out[key] = spec.check(params[key])
        except _BadParam as e:
            got = params[key]
            raise InvalidArgument(f"{name}: parameter {key!r} must be {e}, got {got!r}") from None
    if method.check is not None:
        method.check(out)
    return method, out


def _params(name: str, **params) -> dict:
    return resolve_method(name, params)[1]


# ---------------------------------------------------------------------------
# Seeds, generators, and the two entry points
# ---------------------------------------------------------------------------


def derive_seed(seed: int, adapter_id: str, module: str) -> int:
    """A 63-bit seed for one (merge seed, adapter, module): sha256 of the three, so
    the mask of an adapter in a module does not depend on the rest of the mix or on
    the order of the inputs."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise InvalidArgument(f"seed must be an integer, got {seed!r}")
    if not isinstance(adapter_id, str) or not isinstance(module, str):
        raise InvalidArgument("adapter id and module name must be strings")
    digest = hashlib.sha256(f"loramux-merge\0{int(seed)}\0{adapter_id}\0{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generators(
    seed: int, module: str, adapter_ids: Sequence[str], device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per adapter, seeded with `derive_seed(seed, adapter_id, module)`.

    Masks are reproducible for a given device type; the default, CPU, gives the same
    masks whichever device the task vectors live on (they are moved after drawing).
    """
    if len(set(adapter_ids)) != len(adapter_ids):
        raise InvalidArgument(f"adapter ids must be distinct, got {list(adapter_ids)}")
    return [
        torch.Generator(device=device).manual_seed(derive_seed(seed, a, module)) for a in adapter_ids
    ]


def merge_module(
    method,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Mapping[str, object] | None = None,
    *,
    generators: Sequence[torch.Generator] | None = None,
    seed: int | None = None,
    module: str | None = None,
    adapter_ids: Sequence[str] | None = None,
) -> torch.Tensor:
    """Merge the task vectors of one module: a float32 tensor of their shape.

    method: a name in METHODS or a MergeMethod; params: its parameters (validated,
    defaults filled). Random methods take either `generators` (one per input) or
    `seed` and `module` (and optionally `adapter_ids`, default "0", "1", ...; pass
    adapter content hashes to make masks a function of the merge-cache key).
    Non-random methods ignore generators and seed.
    """
    spec, p = resolve_method(method, params)
    if not spec.needs_generator:
        return spec.fn(list(deltas), list(weights), **p)
    if generators is None:
        if seed is None or module is None:
            raise InvalidArgument(f"{spec.name} is random: pass generators, or seed and module")
        ids = [str(i) for i in range(len(deltas))] if adapter_ids is None else list(adapter_ids)
        if len(ids) != len(deltas):
            raise InvalidArgument(f"got {len(deltas)} task vectors but {len(ids)} adapter ids")
        generators = make_generators(seed, module, ids)
    return spec.fn(list(deltas), list(weights), generators=list(generators), **p)


def check_arity(method, n: int) -> None:
    """InvalidArgument unless `method` (name or MergeMethod) can merge n inputs:
    n ≥ 1, and exactly 2 for slerp. Cheap; call it before any per-module work."""
    spec = _lookup(method)
    if n < 1:
        raise InvalidArgument("a merge needs a non-empty list of task vectors")
    if spec.name == "slerp" and n != 2:
        raise InvalidArgument(f"slerp merges exactly 2 task vectors, got {n}")


def merge_dense(
    method,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: Mapping[str, object] | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """`merge_module` with explicit generators (one per input; ignored by the
    non-random methods)."""
    return merge_module(method, deltas, weights, params, generators=generators)


def coefficients_from_gram(
    method, gram, weights: Sequence[float], params: Mapping[str, object] | None = None
) -> list[float]:
    """cᵢ with merge result = Σ cᵢ ΔWᵢ, from the Gram matrix Gᵢⱼ = <ΔWᵢ, ΔWⱼ>_F only.

    For low_rank_exact methods (linear, slerp, karcher); gram: [N, N] (e.g.
    `lowrank.gram` of factored inputs; linear ignores it and accepts None).
    InvalidArgument for other methods.
    """
    spec, p = resolve_method(method, params)
    if not spec.low_rank_exact:
        raise InvalidArgument(f"{spec.name} is not a linear combination of its inputs")
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise InvalidArgument("a merge needs a non-empty list of weights")
    for i, w in enumerate(weights):
        if not _is_real(w) or not math.isfinite(w):
            raise InvalidArgument(f"weight {i} must be a finite number, got {w!r}")
    return spec.coefficients_fn(gram, [float(w) for w in weights], **p)


def coefficients(method, deltas, weights, params: Mapping[str, object] | None = None) -> list[float]:
    """`coefficients_from_gram` for dense task vectors."""
    deltas, weights = _check_inputs(deltas, weights)
    return coefficients_from_gram(method, gram_matrix(deltas), weights, params)
