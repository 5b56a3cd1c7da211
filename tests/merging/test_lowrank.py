"""Low-rank algebra against dense linear algebra (the reference)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.merging.lowrank import Factored, compress_dense, compress_exact, concat, gram


def _factored(d_out, d_in, r, seed):
    g = torch.Generator().manual_seed(seed)
    return Factored(torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g))


def test_concat_is_exact_weighted_sum():
    fs = [_factored(30, 20, r, s) for r, s in ((4, 1), (7, 2), (2, 3))]
    ws = [0.5, -1.25, 2.0]
    got = concat(list(zip(ws, fs)))
    assert got.rank == 13
    want = sum(w * f.dense() for w, f in zip(ws, fs))
    torch.testing.assert_close(got.dense(), want, rtol=1e-5, atol=1e-4)


def test_gram_matches_dense_inner_products():
    fs = [_factored(16, 12, r, s) for r, s in ((3, 4), (5, 5), (1, 6))]
    g = gram(fs)
    for i, a in enumerate(fs):
        for j, b in enumerate(fs):
            assert g[i, j].item() == pytest.approx(float((a.dense().double() * b.dense().double()).sum()), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(r=st.integers(2, 12), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_exact_compression_error_is_the_discarded_singular_values(r, k, seed):
    f = _factored(40, 24, r, seed)
    c = compress_exact(f, max_rank=k)
    S = torch.linalg.svdvals(f.dense().double())  # dense SVD only as the oracle
    keep = min(k, r)
    want = math.sqrt(float((S[keep:] ** 2).sum() / (S**2).sum()))
    assert c.factored.rank == keep
    assert c.rel_error == pytest.approx(want, abs=1e-6)
    actual = float(torch.linalg.norm(f.dense().double() - c.factored.dense().double()) / torch.linalg.norm(f.dense().double()))
    assert actual == pytest.approx(want, abs=1e-5)


def test_exact_compression_with_budget_picks_smallest_rank():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(50, 6, generator=g))[0]
    V = torch.linalg.qr(torch.randn(30, 6, generator=g))[0]
    s = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.01, 0.001])
    f = Factored(U * s, V.t().contiguous())
    c = compress_exact(f, max_rank=6, budget=0.02)
    assert c.factored.rank == 3 and c.rel_error <= 0.02
    assert compress_exact(f, max_rank=6, budget=0.0).rel_error == 0.0


def test_dense_compression_reports_its_true_error_and_meets_the_budget():
    f = _factored(64, 48, 5, 7)
    noise = 1e-3 * torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    d = f.dense() + noise
    c = compress_dense(d, max_rank=16, budget=0.01)
    actual = float(torch.linalg.norm(d - c.factored.dense()) / torch.linalg.norm(d))
    assert c.rel_error == pytest.approx(actual, abs=1e-5)
    assert c.rel_error <= 0.01 and c.factored.rank == 5
    capped = compress_dense(d, max_rank=2, budget=0.0)
    assert capped.factored.rank == 2
    assert capped.rel_error == pytest.approx(float(torch.linalg.norm(d - capped.factored.dense()) / torch.linalg.norm(d)), abs=1e-5)


def test_zero_delta_compresses_to_zero():
    c = compress_dense(torch.zeros(8, 6), max_rank=4, budget=0.01)
    assert c.rel_error == 0.0 and torch.count_nonzero(c.factored.dense()) == 0


def _rel_err(d, f):
    return float(torch.linalg.norm(d.double() - f.dense().double()) / torch.linalg.norm(d.double()))


def _optimal_rank(d, budget):
    """Smallest k whose Eckart–Young error ≤ budget (dense SVD as the oracle)."""
    S2 = torch.linalg.svdvals(d.double()) ** 2
    tail = S2.sum() - torch.cumsum(S2, 0)
    return int(((tail <= budget**2 * S2.sum()).nonzero()[0]) + 1)


def test_exact_compression_says_which_rank_meets_the_budget():
    f = _factored(50, 40, 12, 3)
    c = compress_exact(f, max_rank=4, budget=1e-3)
    assert c.factored.rank == 4 and c.rel_error > 1e-3
    assert c.needed_rank == _optimal_rank(f.dense(), 1e-3)


def test_dense_compression_reports_the_needed_rank_only_when_within_max_rank():
    f = _factored(64, 48, 5, 7)
    noise = 1e-4 * torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    d = f.dense() + noise
    ok = compress_dense(d, max_rank=16, budget=0.01)
    assert ok.needed_rank == ok.factored.rank == _optimal_rank(d, 0.01) == 5
    short = compress_dense(d, max_rank=3, budget=0.01)
    assert short.factored.rank == 3 and short.rel_error > 0.01 and short.needed_rank is None


@pytest.mark.parametrize("kind", ["few_rows", "rank_one", "duplicate_columns"])
def test_dense_compression_of_degenerate_deltas_is_exact_and_finite(kind):
    """Inputs whose sketches are singular (zero pivots in the power iterations'
    LU bases): the factors stay finite and the reported error is the true one."""
    g = torch.Generator().manual_seed(5)
    d = torch.zeros(80, 60)
    if kind == "few_rows":  # rank 3 from 3 non-zero rows: the sketch has 77 zero rows
        d[[2, 40, 79]] = torch.randn(3, 60, generator=g)
    elif kind == "rank_one":
        d = torch.randn(80, 1, generator=g) @ torch.randn(1, 60, generator=g)
    else:
        d[:, :] = torch.randn(80, 1, generator=g)
    c = compress_dense(d, max_rank=16, budget=1e-6)
    assert torch.isfinite(c.factored.B).all() and torch.isfinite(c.factored.A).all()
    assert c.rel_error <= 1e-6 and _rel_err(d, c.factored) <= 1e-5
    assert c.factored.rank == torch.linalg.matrix_rank(d).item()
