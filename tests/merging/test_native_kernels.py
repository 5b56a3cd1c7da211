"""The native merge kernels (csrc/merge_cpu.c) give the torch formulation's results:
the same selection bit for bit, the same sums up to float32 summation order."""

import pytest
import torch

from loramux.merging import methods as M
from loramux_kernels import native


@pytest.fixture
def lib():
    lib = native.load("merge_cpu")
    if lib is None:
        pytest.skip("the native kernels do not build here (no C compiler)")
    return lib


@pytest.fixture
def torch_only(monkeypatch):
    """Run `methods` on its torch formulation (what the kernels must reproduce)."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(M, "_merge_kernels", lambda x: None)
            return fn(*args, **kwargs)

    return run


def _vectors(seed: int, n: int, shape=(300, 257)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("values", ["gaussian", "integers", "with_zeros"])
def test_kth_largest_abs_is_exact_with_ties_and_zeros(lib, values):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_001, generator=g)
    if values == "integers":  # many equal magnitudes, both signs
        x = torch.randint(-5, 6, (10_001,), generator=g).float()
    elif values == "with_zeros":
        x[::3] = 0.0
        x[1::7] = -0.0
    ordered = x.abs().sort(descending=True).values
    for k in (1, 2, 17, 5000, 9999, 10_001):
        t, n_ge = M._native_kth_largest_abs(lib, x, k)
        assert t == float(ordered[k - 1])
        assert n_ge == int((x.abs() >= t).sum())


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
def test_fused_ties_equals_the_torch_formulation_bit_for_bit(lib, torch_only, sign_method, density):
    deltas = _vectors(1, 4)
    weights = [0.7, -0.3, 1.2, 0.25]
    assert M._fused_ties(deltas, weights, density, sign_method) is not None  # the kernel ran
    got = M.ties(deltas, weights, density=density, majority_sign_method=sign_method)
    want = torch_only(M.ties, deltas, weights, density=density, majority_sign_method=sign_method)
    _same_up_to_summation_order(got, want, deltas, weights)


def _same_up_to_summation_order(got, want, deltas, weights):
    """The kernel adds the agreeing values in input order; torch's reduction may
    not: the same trim and election, sums equal to float32 rounding."""
    n = len(deltas)
    scale = max(float(d.abs().max()) * abs(w) for d, w in zip(deltas, weights))
    torch.testing.assert_close(got, want, rtol=0, atol=n * n * 1.2e-7 * scale)
    assert torch.equal(got == 0, want == 0)


def test_ties_across_the_trim_cut_fall_back_to_topk(lib, torch_only):
    """Integer-valued inputs tie at the cut: only topk's choice is PEFT's, so the
    fused kernel declines and the torch path answers."""
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randint(-3, 4, (64, 64), generator=g).float() for _ in range(3)]
    assert M._fused_ties(deltas, [1.0, 1.0, 1.0], 0.5, "total") is None
    got = M.ties(deltas, [1.0, 1.0, 1.0], density=0.5)
    assert torch.equal(got, torch_only(M.ties, deltas, [1.0, 1.0, 1.0], density=0.5))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_native_elect_and_mean_equals_torch_for_dare_ties(lib, torch_only, sign_method):
    deltas = _vectors(4, 3, shape=(129, 1031))
    args = dict(density=0.4, majority_sign_method=sign_method)

    def run():
        gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
        return M.dare_ties(deltas, [1.0, 0.5, -0.8], generators=gens, **args)

    # DARE rescales by 1/density before the election: that is the scale of the sums.
    _same_up_to_summation_order(run(), torch_only(run), deltas, [1.0 / 0.4, 0.5 / 0.4, 0.8 / 0.4])


def test_magnitude_prune_uses_the_native_threshold_and_matches(lib, torch_only):
    deltas = _vectors(5, 3)
    got = M.magnitude_prune(deltas, [0.5, 0.5, 1.0], density=0.3)
    assert torch.equal(got, torch_only(M.magnitude_prune, deltas, [0.5, 0.5, 1.0], density=0.3))
