"""Our spherical and sparsifying methods against mergekit 0.1.5's own code.

mergekit is a test-only dependency installed without its dependencies
(`pip install --no-deps mergekit==0.1.5`): the functions used here import only torch,
typing_extensions and pydantic. Skipped when it is absent.

Compared: `merge_methods/slerp.py::slerp`, `merge_methods/nuslerp.py::nuslerp`,
`merge_methods/karcher.py::karcher_merge_tensors` and `sparsify.py`'s
`della_magprune`, `magnitude_outliers` and `bernoulli`. Differences are pinned in
`test_differs_*` with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

mk_slerp = pytest.importorskip("mergekit.merge_methods.slerp")
mk_nuslerp = pytest.importorskip("mergekit.merge_methods.nuslerp")
mk_karcher = pytest.importorskip("mergekit.merge_methods.karcher")
mk_sparsify = pytest.importorskip("mergekit.sparsify")

from loramux.merging import methods as M  # noqa: E402

FAST = settings(max_examples=25, deadline=None)


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _mergekit_slerp(a, b, t):
    # mergekit's slerp treats dim 0 as a batch of independent tensors: one row here.
    return mk_slerp.slerp(torch.tensor([t]), a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)


def _cos(a, b):
    return float(a.flatten().double() @ b.flatten().double() / (a.double().norm() * b.double().norm()))


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max())))


pair = st.tuples(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["random", "near", "far", "collinear", "antipodal"]),
    st.floats(0.1, 10),
)


def _make_pair(seed, kind, scale):
    a = _randn((5, 7), seed)
    noise = _randn((5, 7), seed + 1)
    b = {
        "random": noise,
        "near": a + 0.02 * noise,  # inside mergekit's lerp threshold
        "far": -a + 0.5 * noise,
        "collinear": 2.0 * a,
        "antipodal": -a,
    }[kind]
    return a, scale * b


@FAST
@given(p=pair, t=st.floats(0, 1))
def test_slerp_equals_mergekit(p, t):
    a, b = _make_pair(*p)
    # The branch choice at exactly |cos| = 0.9995 may flip on float32 vs float64 rounding.
    assume(abs(abs(_cos(a, b)) - (1 - M.COLLINEAR_EPS)) > 1e-5)
    _close(M.slerp([a, b], [1.0, 1.0], t=t), _mergekit_slerp(a, b, t))


@FAST
@given(seed=st.integers(0, 2**31 - 1), t=st.floats(0, 1))
def test_slerp_equals_mergekit_nuslerp_flattened(seed, t):
    a, b = _randn((4, 6), seed), _randn((4, 6), seed + 1)
    assume(abs(_cos(a, b)) < 0.99)  # nuslerp lerps only at |cos| ≈ 1 − 1e-16
    _close(M.slerp([a, b], [1.0, 1.0], t=t), mk_nuslerp.nuslerp(t, a, b, flatten=True))


def test_differs_slerp_zero_norm_input_is_lerp():
    # mergekit treats a zero vector as orthogonal (its norm is replaced by 1, so cos = 0,
    # θ = π/2): slerp(0, b, t) = sin(tπ/2)·b. An angle to the zero vector is undefined;
    # the brief asks for lerp, t·b, which is also what every t = 0/1-consistent limit of
    # shrinking a towards 0 along lerp gives.
    b, z, t = _randn((3, 4), 0), torch.zeros(3, 4), 0.3
    _close(_mergekit_slerp(z, b, t), math.sin(t * math.pi / 2) * b)
    _close(M.slerp([z, b], [1.0, 1.0], t=t), t * b)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), spread=st.floats(0.2, 2.0))
def test_karcher_equal_weights_equals_mergekit(seed, n, spread):
    # mergekit's registered `karcher` method calls karcher_merge_tensors with equal
    # weights 1/N whatever the configured weights are; compare on exactly that.
    center = _randn((4, 6), seed)
    ds = [center + spread * _randn((4, 6), seed + 1 + i) for i in range(n)]
    ws = [1.0 / n] * n
    theirs = mk_karcher.karcher_merge_tensors(ds, ws, max_iter=10, tol=1e-5)
    _close(M.karcher(ds, ws, max_iter=10, tol=1e-5), theirs, rtol=1e-4)


@FAST
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_karcher_weighted_equals_mergekit_function(seed, data):
    # The underlying function does take weights (alphas); with weights summing to 1
    # its norm Σ αᵢ‖ΔWᵢ‖ equals ours.
    n = data.draw(st.integers(2, 4))
    raw = data.draw(st.lists(st.floats(0.1, 1.0), min_size=n, max_size=n))
    ws = [w / sum(raw) for w in raw]
    ds = [_randn((3, 5), seed + i) + 0.5 for i in range(n)]
    theirs = mk_karcher.karcher_merge_tensors(ds, ws, max_iter=10, tol=1e-5)
    _close(M.karcher(ds, ws, max_iter=10, tol=1e-5), theirs, rtol=1e-4)


def test_karcher_converged_result_does_not_depend_on_the_iteration_cap():
    ds = [_randn((4, 6), s) for s in range(4)]
    ws = [0.4, 0.3, 0.2, 0.1]
    theirs = mk_karcher.karcher_merge_tensors(ds, ws, max_iter=200, tol=1e-7)
    _close(M.karcher(ds, ws), theirs, rtol=1e-4)


@FAST
@given(seed=st.integers(0, 2**31 - 1), dens=st.floats(0.2, 0.8), eps_frac=st.floats(0.0, 0.99))
def test_della_masks_equal_mergekit_rescale_differs(seed, dens, eps_frac):
    x = _randn((6, 9), seed)
    eps = eps_frac * min(dens, 1 - dens)
    assume(dens + eps < 1 and dens - eps > 0)  # mergekit needs the open interval
    g = torch.Generator().manual_seed(seed)
    ours = M.drop_magprune(x, dens, eps, g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        theirs = mk_sparsify.della_magprune(x, dens, eps, rescale_norm=None)
    assert torch.equal(ours != 0, theirs != 0)
    # Pinned difference: with its default rescale mergekit matches the L1 norm of the
    # whole tensor; the DELLA paper (and we) rescale each survivor by 1/qᵢ, which keeps
    # every entry unbiased. Here: ours = x·mask/q with q = density ± eps by rank.
    ranks = x.abs().argsort(dim=1).argsort(dim=1).float()
    q = (dens - eps) + ranks / (x.shape[1] - 1) * 2 * eps
    _close(ours, theirs / q)


@FAST
@given(seed=st.integers(0, 2**31 - 1), dens=st.floats(0.05, 1.0), gamma=st.floats(0.0, 0.5))
def test_breadcrumbs_mask_equals_mergekit(seed, dens, gamma):
    x = _randn((7, 8), seed)
    theirs = mk_sparsify.magnitude_outliers(x, dens, rescale_norm=None, gamma=gamma)
    assert torch.equal(M.trim_outliers(x, dens, gamma), theirs)
    y = _randn((7, 8), seed + 1)
    theirs_y = mk_sparsify.magnitude_outliers(y, dens, rescale_norm=None, gamma=gamma)
    expected = 0.7 * theirs - 0.2 * theirs_y
    _close(M.breadcrumbs([x, y], [0.7, -0.2], density=dens, gamma=gamma), expected)


def test_differs_dare_rescale_is_one_over_density():
    # Same Bernoulli mask as mergekit's `bernoulli` sparsifier; mergekit's dare methods
    # then rescale to match the L1 norm (RescaleNorm.l1), the DARE paper (arXiv
    # 2311.03099, eq. 2) and we by 1/(1−p) per entry, which makes E[out] = ΔW exactly.
    x = _randn((10, 10), 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        theirs = mk_sparsify.bernoulli(x, 0.4, rescale_norm=mk_sparsify.RescaleNorm.l1)
    ours = M.drop_random(x, 0.4, torch.Generator().manual_seed(11))
    assert torch.equal(ours != 0, theirs != 0)
    kept = ours != 0
    _close(ours[kept], x[kept] / 0.4)
    assert not torch.allclose(ours, theirs)
