"""Our merge methods against PEFT's own implementations (peft.utils.merge_utils) on the
same stacked task vectors.

DARE: PEFT draws `torch.bernoulli(full_like(ΔWᵢ, density))` from the global RNG, one
input after the other. Seeding the global RNG with s and passing ONE generator seeded
with s for every input (the same object N times) makes our draws the same stream in the
same order, so the masks — and results — are identical.

Where PEFT's semantics differ from design.md, a `test_differs_*` test pins the
difference and says why.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils as peft

from loramux.errors import InvalidArgument
from loramux.merging import methods as M
from tests.merging.test_methods import task_vectors

FAST = settings(max_examples=25, deadline=None)

weight = st.floats(-3, 3, width=32).filter(lambda w: w == 0 or abs(w) >= 1e-3)
positive_weight = st.floats(0.0625, 3, width=32)
density = st.floats(0.05, 1.0)
sign_method = st.sampled_from(["total", "frequency"])
# Equal weights that scale exactly (powers of two): PEFT sums unweighted values, we sum
# weighted ones, and where the true sum is 0 (integer inputs, DARE's 1/density) any
# other weight can round the two sums to opposite signs of ~1e-7.
equal_weight = st.sampled_from([0.25, 0.5, 1.0, 2.0])




def _w(ws):
    return torch.tensor(ws, dtype=torch.float32)


def _peft(fn, *args, **kwargs):
    with warnings.catch_warnings():  # PEFT warns at density 1 ("no pruning")
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_seeded(seed, fn, *args, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _peft(fn, *args, **kwargs)


def _shared_generator(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [g] * n


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Equal where the semantics agree
# ---------------------------------------------------------------------------


@FAST
@given(ds=task_vectors(), data=st.data())
def test_linear_equals_peft_task_arithmetic(ds, data):
    ws = data.draw(st.lists(weight, min_size=len(ds), max_size=len(ds)))
    _close(M.linear(ds, ws), peft.task_arithmetic(ds, _w(ws)))


@FAST
@given(ds=task_vectors(), data=st.data(), dens=density)
def test_magnitude_prune_equals_peft(ds, data, dens):
    ws = data.draw(st.lists(weight, min_size=len(ds), max_size=len(ds)))
    _close(M.magnitude_prune(ds, ws, density=dens), _peft(peft.magnitude_prune, ds, _w(ws), dens))


@FAST
@given(ds=task_vectors(), w=equal_weight, dens=density, method=sign_method)
def test_ties_equals_peft_with_equal_positive_weights(ds, w, dens, method):
    ws = [w] * len(ds)
    ours = M.ties(ds, ws, density=dens, majority_sign_method=method)
    _close(ours, _peft(peft.ties, ds, _w(ws), dens, method))


@FAST
@given(ds=task_vectors(), data=st.data(), dens=density)
def test_ties_frequency_equals_peft_with_any_positive_weights(ds, data, dens):
    # A positive weight never changes a sign, so the "frequency" vote is the same.
    ws = data.draw(st.lists(positive_weight, min_size=len(ds), max_size=len(ds)))
    ours = M.ties(ds, ws, density=dens, majority_sign_method="frequency")
    _close(ours, _peft(peft.ties, ds, _w(ws), dens, "frequency"))


@FAST
@given(ds=task_vectors(), data=st.data(), dens=density, seed=st.integers(0, 2**31 - 1))
def test_dare_linear_equals_peft_with_the_same_masks(ds, data, dens, seed):
    ws = data.draw(st.lists(weight, min_size=len(ds), max_size=len(ds)))
    ours = M.dare_linear(ds, ws, density=dens, generators=_shared_generator(seed, len(ds)))
    _close(ours, _peft_seeded(seed, peft.dare_linear, ds, _w(ws), dens))


@FAST
@given(ds=task_vectors(), w=equal_weight, dens=density, method=sign_method, seed=st.integers(0, 2**31))
def test_dare_ties_equals_peft_with_the_same_masks(ds, w, dens, method, seed):
    ws = [w] * len(ds)
    gens = _shared_generator(seed, len(ds))
    ours = M.dare_ties(ds, ws, density=dens, majority_sign_method=method, generators=gens)
    _close(ours, _peft_seeded(seed, peft.dare_ties, ds, _w(ws), dens, method))


def test_dare_rescale_is_not_a_no_op_in_either():
    # The defect LoRAX/TGI had (rescale computed and dropped) would make the kept
    # entries equal to the inputs; both must divide by density.
    x = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))
    ours = M.dare_linear([x], [1.0], density=0.5, generators=_shared_generator(7, 1))
    theirs = _peft_seeded(7, peft.dare_linear, [x], _w([1.0]), 0.5)
    kept = ours != 0
    _close(ours[kept], 2 * x[kept])
    _close(ours, theirs)


# ---------------------------------------------------------------------------
# Pinned differences from PEFT
# ---------------------------------------------------------------------------


def test_differs_ties_total_elects_on_weighted_values():
    # design.md / brief: "total" is the sign of the WEIGHTED sum. PEFT elects on the
    # unweighted trimmed values and applies weights afterwards, so a heavily weighted
    # task can be outvoted by a lightly weighted one. Entry: 2·w=1 vs −1·w=3.
    ds = [torch.tensor([[2.0]]), torch.tensor([[-1.0]])]
    ws = [1.0, 3.0]
    assert _peft(peft.ties, ds, _w(ws), 1.0, "total").item() == 2.0  # PEFT: + wins (2 − 1 > 0)
    assert M.ties(ds, ws, density=1.0, majority_sign_method="total").item() == -3.0  # 2 − 3 < 0


def test_differs_ties_with_negative_weights():
    # Task negation (w < 0): we vote with the effective sign wᵢ·ΔWᵢ, so the negated
    # task agrees with the one it points along; PEFT votes on the raw ΔWᵢ and then
    # weights, mixing signs inside its "agreeing" set.
    ds = [torch.tensor([[1.0]]), torch.tensor([[-2.0]])]
    ws = [1.0, -1.0]
    for method in ("total", "frequency"):
        assert M.ties(ds, ws, density=1.0, majority_sign_method=method).item() == 1.5  # mean of 1 and 2
    assert _peft(peft.ties, ds, _w(ws), 1.0, "total").item() == 2.0  # elects −, keeps −2·(−1)
    assert _peft(peft.ties, ds, _w(ws), 1.0, "frequency").item() == 1.0  # tie → +, keeps 1


def test_differs_dare_density_zero_is_an_error_not_nan():
    # PEFT divides by density after a Bernoulli(0) mask: 0/0 = NaN everywhere.
    # design.md: "density ≤ 0 is an error, not NaN".
    ds = [torch.randn(3, 4), torch.randn(3, 4)]
    assert bool(_peft_seeded(0, peft.dare_linear, ds, _w([1.0, 1.0]), 0.0).isnan().all())
    with pytest.raises(InvalidArgument, match="density"):
        M.dare_linear(ds, [1.0, 1.0], density=0.0, generators=_shared_generator(0, 2))


def test_differs_magnitude_density_zero_is_an_error_not_zeros():
    # PEFT keeps k = 0 entries and returns zeros; a merge that silently returns
    # nothing is a configuration mistake, so we refuse density 0 for every method.
    ds = [torch.randn(3, 4)]
    assert bool((_peft(peft.magnitude_prune, ds, _w([1.0]), 0.0) == 0).all())
    with pytest.raises(InvalidArgument, match="density"):
        M.magnitude_prune(ds, [1.0], density=0.0)


def test_differs_density_above_one_is_an_error_not_a_warning():
    # PEFT warns and skips pruning; we refuse a density outside (0, 1].
    ds = [torch.randn(3, 4)]
    with pytest.warns(UserWarning, match="no pruning"):
        peft.ties(ds, _w([1.0]), 1.5)
    with pytest.raises(InvalidArgument, match="density"):
        M.ties(ds, [1.0], density=1.5)


def test_differs_randomness_is_per_input_generator_not_global():
    # PEFT uses (and advances) the global RNG; we never touch it, so serving traffic
    # that samples tokens cannot change a merge, and vice versa.
    ds = [torch.randn(5, 5), torch.randn(5, 5)]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    M.dare_ties(ds, [1.0, 1.0], density=0.5, generators=M.make_generators(0, "m", ["a", "b"]))
    assert torch.equal(before, torch.random.get_rng_state())
