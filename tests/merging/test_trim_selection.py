"""The fast paths of the sparsifying methods against their simple references: exact
k-th largest selection, the top-k trim (torch.topk's choice, ties included), the
in-place TIES election, and DARE masks drawn without torch.bernoulli."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.merging import methods as M

FAST = settings(max_examples=40, deadline=None)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (so -0.0 and 0.0 differ)."""
    return x.contiguous().to(torch.float32).view(torch.int32)


def _inputs(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    if kind == "ties":  # few distinct magnitudes: ties across every cut
        return torch.randint(-3, 4, shape, generator=g).float()
    if kind == "all_equal":
        return torch.full(shape, -0.5)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "half_zero":
        x = torch.randn(shape, generator=g)
        x.view(-1)[: x.numel() // 2] = 0.0
        return x
    if kind == "signed_zeros":
        return torch.randint(-1, 2, shape, generator=g).float() * 0.0  # ±0
    raise AssertionError(kind)


KINDS = ["normal", "ties", "all_equal", "zeros", "half_zero", "signed_zeros"]
SHAPES = [(1, 1), (3, 5), (40, 33), (300, 257)]  # up to ~77k entries
DENSITIES = [1.0, 0.9999, 0.9, 0.5, 0.29, 0.1, 0.013, 1e-4, 1e-9]
# Any `_inputs` kind, shape and seed, plus `data` for a test's own draws (its k).
ANY_INPUT = given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)


def _topk_reference(delta: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude_based_pruning: keep torch.topk(|x|, int(density · n)), multiply."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel())
    keep[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * keep.reshape(delta.shape)


# ---------------------------------------------------------------------------
# k-th largest
# ---------------------------------------------------------------------------


@FAST
@ANY_INPUT
def test_kth_largest_is_the_sorted_entry(kind, shape, seed, data):
    x = _inputs(kind, shape, seed)
    k = data.draw(st.integers(1, x.numel()))
    want = torch.sort(x.reshape(-1), descending=True).values[k - 1]
    got = M.kth_largest(x, k)
    assert got.dtype == x.dtype and got.shape == ()
    assert got.item() == want.item()


def test_kth_largest_ends_and_dtypes():
    x = torch.tensor([3.0, -1.0, 3.0, 2.0, 0.0])
    assert [M.kth_largest(x, k).item() for k in range(1, 6)] == [3.0, 3.0, 2.0, 0.0, -1.0]
    h = x.to(torch.bfloat16)
    assert M.kth_largest(h, 3).dtype == torch.bfloat16 and M.kth_largest(h, 3).item() == 2.0
    close = torch.tensor([1.0, 1.0 + 2.0**-30, 0.5], dtype=torch.float64)  # one float32 value
    assert M.kth_largest(close, 1).item() == 1.0 + 2.0**-30 and M.kth_largest(close, 2).item() == 1.0
    assert torch.equal(x, torch.tensor([3.0, -1.0, 3.0, 2.0, 0.0]))  # input untouched
    for bad in (0, 6):
        with pytest.raises(ValueError):
            M.kth_largest(x, bad)


def test_kth_largest_on_a_large_tensor():
    x = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    for k in (1, 17, x.numel() // 2, x.numel() - 3, x.numel()):
        want = torch.sort(x.reshape(-1), descending=True).values[k - 1]
        assert M.kth_largest(x, k).item() == want.item()


# ---------------------------------------------------------------------------
# Top-k trim: same entries as torch.topk, bit for bit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_trim_magnitude_is_topk_bit_for_bit(kind, shape):
    x = _inputs(kind, shape, seed=10 * KINDS.index(kind) + SHAPES.index(shape))
    for density in DENSITIES:
        got, want = M.trim_magnitude(x, density), _topk_reference(x, density)
        assert torch.equal(_bits(got), _bits(want)), (kind, shape, density)


@FAST
@ANY_INPUT
def test_topk_keep_mask_equals_the_topk_indicator_where_it_matters(kind, shape, seed, data):
    x = _inputs(kind, shape, seed)
    k = data.draw(st.integers(0, x.numel()))
    mask = M._topk_keep(x, k, torch.empty(x.shape))
    keep = torch.zeros(x.numel())
    keep[torch.topk(x.abs().reshape(-1), k=k).indices] = 1
    assert torch.equal(_bits(x * mask), _bits(x * keep.reshape(x.shape)))
    # Entries the mask drops or keeps differently from topk are zeros only.
    differs = mask.reshape(-1) != keep
    assert bool((x.reshape(-1)[differs] == 0).all())


def test_positive_ties_across_the_cut_are_torch_topk_s_choice():
    # Six entries of magnitude 2 and k = 3: which three survive is topk's choice.
    x = torch.tensor([2.0, -2.0, 2.0, 1.0, -2.0, 2.0, 2.0])
    scratch = torch.empty(x.shape)
    assert M._trim_threshold(x, 3, scratch) is None
    got = M.trim_magnitude(x, 3 / 7 + 1e-9)
    assert torch.equal(_bits(got), _bits(_topk_reference(x, 3 / 7 + 1e-9)))
    assert int(torch.count_nonzero(got)) == 3


def test_threshold_ends():
    x = torch.tensor([[1.0, -4.0], [0.0, 3.0]])
    s = torch.empty(x.shape)
    assert M._trim_threshold(x, 0, s) == float("inf")
    assert M._trim_threshold(x, 4, s) == 0.0
    assert M._trim_threshold(x, 2, s) == 3.0
    assert M._trim_threshold(x, 4 - 1, s) == 1.0


@FAST
@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**31 - 1),
    density=st.sampled_from(DENSITIES),
    n=st.integers(1, 4),
    data=st.data(),
)
def test_trimmed_weighted_equals_weighting_the_trimmed_inputs(kind, shape, seed, density, n, data):
    ds = [_inputs(kind, shape, seed + i) for i in range(n)]
    ws = data.draw(st.lists(st.sampled_from([0.0, 1.0, -0.5, 0.25, 3.0, -2.0]), min_size=n, max_size=n))
    got = M._trimmed_weighted(ds, ws, density)
    want = torch.stack([_topk_reference(d, density) for d in ds]) * torch.tensor(ws).view(-1, 1, 1)
    assert torch.equal(got, want)  # equal values (a dropped entry is +0 where the reference has ±0)


# ---------------------------------------------------------------------------
# TIES election in place
# ---------------------------------------------------------------------------


def _elect_reference(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """The plain formulation with bool masks."""
    sign = weighted.sign()
    score = weighted.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(score >= 0, 1.0, -1.0)
    agree = sign == elected
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


@FAST
@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from(SHAPES),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["total", "frequency"]),
)
def test_elect_and_mean_equals_the_reference(kind, shape, n, seed, method):
    """The blocked torch formulation sums what the reference sums, in its order:
    equal bit for bit. The native kernel (used when it builds) sums in input order,
    which torch's reduction need not follow: equal to float32 rounding."""
    w = torch.stack([_inputs(kind, shape, seed + i) for i in range(n)])
    before = w.clone()
    want = _elect_reference(w, method)
    with mock.patch.object(M, "_merge_kernels", lambda x: None):
        assert torch.equal(M.elect_and_mean(w, method), want)
    got = M.elect_and_mean(w, method)
    assert torch.equal(w, before)  # the public function does not modify its input
    # Bound on the difference of two float32 summation orders of n terms ≤ scale.
    atol = n * n * 1.2e-7 * (float(w.abs().max()) if w.numel() else 0.0)
    # Where the "total" score itself is within that bound of 0 the election may flip.
    clear = (w.sum(0).abs() > atol) if method == "total" else torch.ones_like(got, dtype=torch.bool)
    torch.testing.assert_close(got[clear], want[clear], rtol=0, atol=atol)
    assert torch.equal((got == 0)[clear], (want == 0)[clear])


# ---------------------------------------------------------------------------
# DARE masks: torch.rand draws what torch.bernoulli draws
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.5, 0.1, 0.9, 0.123456789, 1e-6, 0.999999])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (300, 257)])
def test_dare_keep_is_torch_bernoulli_and_leaves_the_generator_in_step(density, shape):
    a, b = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345)
    want = torch.bernoulli(torch.full(shape, density), generator=a)
    got = M._dare_keep(shape, density, b)
    assert torch.equal(got, want)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_drop_random_matches_the_bernoulli_reference():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    x[0] = 0.0
    for density in (0.3, 0.5, 1.0):
        keep = (
            torch.bernoulli(torch.full(x.shape, density), generator=torch.Generator().manual_seed(9))
            if density < 1
            else torch.ones(x.shape)
        )
        want = x * keep / density if density < 1 else x
        got = M.drop_random(x, density, torch.Generator().manual_seed(9))
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("density", [0.5, 0.2, 1.0])
def test_dropped_weighted_equals_weighting_the_dropped_inputs(density):
    ds = [torch.randn(30, 20, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ws = [0.5, -1.5, 0.0]
    got = M._dropped_weighted(ds, ws, density, [torch.Generator().manual_seed(40 + i) for i in range(3)])
    want = torch.stack(
        [M.drop_random(d, density, torch.Generator().manual_seed(40 + i)) for i, d in enumerate(ds)]
    ) * torch.tensor(ws).view(-1, 1, 1)
    assert torch.equal(_bits(got), _bits(want))


def test_unsorted_topk_selects_what_sorted_topk_selects():
    # _topk_keep's rare fallback uses sorted=False; PEFT (and the reference) sort.
    g = torch.Generator().manual_seed(5)
    for n in (10, 1000, 200_000):
        for levels in (2, 7, 1000):
            x = torch.randint(0, levels, (n,), generator=g).float()
            for k in {1, max(1, n // 64), n // 64 + 1, n // 3, n - 1}:
                a = torch.topk(x, k).indices.sort().values
                b = torch.topk(x, k, sorted=False).indices.sort().values
                assert torch.equal(a, b), (n, levels, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_trim_magnitude_keeps_the_input_dtype(dtype):
    x = torch.randn(40, 33, generator=torch.Generator().manual_seed(2)).to(dtype)
    got, want = M.trim_magnitude(x, 0.3), _topk_reference(x, 0.3).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_float64_inputs_are_trimmed_on_float64_magnitudes():
    # 1 + 2⁻³⁰ and 1 are one float32 value but two float64 ones: topk keeps the larger.
    x = torch.tensor([1.0, 1.0 + 2.0**-30, 0.5], dtype=torch.float64)
    got = M.trim_magnitude(x, 1 / 3 + 1e-9)
    assert got.tolist() == [0.0, 1.0 + 2.0**-30, 0.0]


# ---------------------------------------------------------------------------
# DELLA ranks and draws, breadcrumbs' band: fast paths against the sort-based forms
# ---------------------------------------------------------------------------


@FAST
@ANY_INPUT
def test_row_ranks_are_the_double_argsort(kind, shape, seed, data):
    """Inverse permutation of the row order = argsort of the argsort; rows with tied
    magnitudes keep torch.argsort's tie order (what mergekit's della_magprune sees)."""
    mag = _inputs(kind, shape, seed).abs()
    want = torch.argsort(torch.argsort(mag, dim=1), dim=1)
    assert torch.equal(M._row_ranks(mag), want)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (300, 257)])
def test_magprune_draws_are_torch_bernoulli_of_the_keep_probabilities(shape):
    probs = torch.rand(shape, generator=torch.Generator().manual_seed(4)) * 0.8 + 0.1
    a, b = torch.Generator().manual_seed(77), torch.Generator().manual_seed(77)
    want = torch.bernoulli(probs, generator=a)
    got = torch.rand(probs.shape, generator=b).lt_(probs)
    assert torch.equal(got.float(), want)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def _sorted_band_reference(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """trim_outliers as it was: a full ascending sort, keep positions [n_bottom, n_bottom + k)."""
    n = delta.numel()
    k = int(density * n)
    n_bottom = max(0, n - k - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    keep = torch.zeros(n, dtype=delta.dtype)
    keep[order[n_bottom : n_bottom + k]] = 1
    return delta * keep.reshape(delta.shape)


@FAST
@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**31 - 1),
    density=st.sampled_from(DENSITIES),
    gamma=st.sampled_from([0.0, 0.01, 0.2, 0.6]),
)
def test_breadcrumbs_band_from_order_statistics_equals_the_sort(kind, shape, seed, density, gamma):
    """Ties across a cut fall back to the same sort; otherwise the band is the same
    set (zeros aside, which multiply to the same zeros)."""
    x = _inputs(kind, shape, seed)
    assert torch.equal(_bits(M.trim_outliers(x, density, gamma)), _bits(_sorted_band_reference(x, density, gamma)))


def test_breadcrumbs_band_declines_ties_across_a_cut():
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, -2.0])  # |x| ascending: .5 1 2 2 2 3
    assert M._band_keep(x, 2, 2) is None  # positions 2, 3 of the three tied 2s
    assert M._band_keep(x, 1, 4) is not None  # 1 2 2 2: the whole tie group
