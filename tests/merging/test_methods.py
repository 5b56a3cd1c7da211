"""Properties of the merge methods (loramux.merging.methods): identity, linearity,
DARE unbiasedness and reproducibility, TIES sign election against a per-entry
reference written from the paper, trimming counts, SLERP endpoints and norms,
Karcher optimality, coefficient exactness, and every parameter error."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.errors import InvalidArgument
from loramux.merging import METHODS, coefficients, coefficients_from_gram, merge_module, resolve_method
from loramux.merging import methods as M
from loramux.merging.lowrank import Factored, gram

FAST = settings(max_examples=25, deadline=None)

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def task_vectors(draw, n_min=1, n_max=4):
    """n task vectors [d_out, d_in]; "integer" ones have ties and zeros on purpose."""
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 7)))
    n = draw(st.integers(n_min, n_max))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.sampled_from(["normal", "integer"])) == "normal":
        return [torch.randn(shape, generator=g) for _ in range(n)]
    return [torch.randint(-3, 4, shape, generator=g).float() for _ in range(n)]


# float32-representable, and no magnitudes that underflow in a float32 product.
weight = st.floats(-3, 3, width=32).filter(lambda w: w == 0 or abs(w) >= 1e-3)
positive_weight = st.floats(0.05, 3)
density = st.floats(0.05, 1.0)
sign_methods = st.sampled_from(["total", "frequency"])


def _unit(x):
    return x / x.norm()


# ---------------------------------------------------------------------------
# Identity: one adapter with weight 1 (density 1 for the trimming methods)
# ---------------------------------------------------------------------------

IDENTITY_PARAMS = {
    "linear": {},
    "ties": {"density": 1.0},
    "magnitude_prune": {"density": 1.0},
    "dare_linear": {"density": 1.0},
    "dare_ties": {"density": 1.0},
    "della": {"density": 1.0, "epsilon": 0.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.1},
    "karcher": {},
}


def test_every_method_has_an_identity_case():
    assert set(IDENTITY_PARAMS) | {"slerp"} == set(METHODS)


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
@FAST
@given(ds=task_vectors(n_min=1, n_max=1))
def test_single_adapter_weight_one_is_identity(name, ds):
    out = merge_module(name, ds, [1.0], IDENTITY_PARAMS[name], seed=3, module="q_proj")
    assert out.dtype == torch.float32 and out.shape == ds[0].shape
    torch.testing.assert_close(out, ds[0], rtol=1e-6, atol=1e-6)


@FAST
@given(ds=task_vectors(n_min=1, n_max=1), t=st.floats(0, 1))
def test_slerp_of_a_vector_with_itself_is_that_vector(ds, t):
    out = merge_module("slerp", [ds[0], ds[0]], [1.0, 1.0], {"t": t})
    torch.testing.assert_close(out, ds[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------


@FAST
@given(ds=task_vectors(), data=st.data())
def test_linear_is_linear_in_the_weights(ds, data):
    w1 = data.draw(st.lists(weight, min_size=len(ds), max_size=len(ds)))
    w2 = data.draw(st.lists(weight, min_size=len(ds), max_size=len(ds)))
    a, b = data.draw(weight), data.draw(weight)
    lhs = M.linear(ds, [a * x + b * y for x, y in zip(w1, w2)])
    rhs = a * M.linear(ds, w1) + b * M.linear(ds, w2)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_linear_negative_weight_negates_a_task():
    x, y = _randn((3, 4), 0), _randn((3, 4), 1)
    torch.testing.assert_close(M.linear([x, y], [1.0, -1.0]), x - y)
    torch.testing.assert_close(M.linear([x], [-0.5]), -0.5 * x)


def test_linear_normalize_divides_by_the_weight_sum():
    x, y = _randn((3, 4), 0), _randn((3, 4), 1)
    out = M.linear([x, y], [3.0, -1.0], normalize=True)
    torch.testing.assert_close(out, (3 * x - y) / 2)
    with pytest.raises(InvalidArgument, match="non-zero sum"):
        M.linear([x, y], [1.0, -1.0], normalize=True)


def test_half_precision_inputs_accumulate_in_float32():
    xs = [_randn((5, 6), s).to(torch.bfloat16) for s in range(3)]
    out = M.linear(xs, [0.3, 0.3, 0.4])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, M.linear([x.float() for x in xs], [0.3, 0.3, 0.4]))


# ---------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dare_linear_is_unbiased(p):
    """Mean over many seeds → Σ wᵢ ΔWᵢ, within 5 standard errors of the mean
    (per entry, variance of one draw = Σ wᵢ² xᵢ² p/(1−p))."""
    x, y = _randn((3, 5), 0), _randn((3, 5), 1)
    w, n = [0.7, -1.3], 2000
    total = torch.zeros(3, 5, dtype=torch.float64)
    for s in range(n):
        total += merge_module("dare_linear", [x, y], w, {"density": 1 - p}, seed=s, module="m").double()
    expected = (w[0] * x + w[1] * y).double()
    var = (w[0] ** 2 * x.double() ** 2 + w[1] ** 2 * y.double() ** 2) * p / (1 - p)
    assert bool(((total / n - expected).abs() <= 5 * (var / n).sqrt() + 1e-6).all())


def test_dare_drops_and_rescales_by_one_over_density():
    x = _randn((40, 50), 0)
    out = merge_module("dare_linear", [x], [1.0], {"density": 0.25}, seed=1, module="m")
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.25)  # rescale 1/(1−p), p = 0.75
    assert abs(kept.float().mean().item() - 0.25) < 0.03


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della"])
def test_random_methods_are_reproducible_per_seed_adapter_and_module(name):
    x, y = _randn((6, 7), 0), _randn((6, 7), 1)
    params = {"density": 0.5} | ({"epsilon": 0.2} if name == "della" else {})

    def run(seed, module="m", ids=("a", "b"), ds=(x, y), ws=(1.0, 0.5)):
        return merge_module(
            name, list(ds), list(ws), params, seed=seed, module=module, adapter_ids=list(ids)
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert not torch.equal(run(1), run(1, module="other"))
    # An adapter's mask depends on its id, not on its position in the mix.
    solo = run(1, ids=("a", "b"), ws=(1.0, 0.0))
    assert torch.equal(solo, run(1, ids=("b", "a"), ds=(y, x), ws=(0.0, 1.0)))


def test_explicit_generators_match_the_seed_path():
    x, y = _randn((6, 7), 0), _randn((6, 7), 1)
    gens = M.make_generators(5, "layers.0.q_proj", ["a", "b"])
    via_gens = merge_module("dare_ties", [x, y], [1.0, 1.0], {"density": 0.4}, generators=gens)
    via_seed = merge_module(
        "dare_ties", [x, y], [1.0, 1.0], {"density": 0.4},
        seed=5, module="layers.0.q_proj", adapter_ids=["a", "b"],
    )
    assert torch.equal(via_gens, via_seed)


def test_derive_seed_is_a_fixed_function():
    # Pinned values: changing the derivation silently changes every cached DARE merge.
    assert M.derive_seed(0, "a", "m") == M.derive_seed(0, "a", "m")
    assert len({M.derive_seed(s, a, m) for s in (0, 1) for a in ("a", "b") for m in ("m", "n")}) == 8
    assert 0 <= M.derive_seed(2**62, "x" * 100, "model.layers.29.mlp.down_proj") < 2**63


# ---------------------------------------------------------------------------
# TIES and magnitude pruning
# ---------------------------------------------------------------------------


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def ties_reference(ds, ws, dens, sign_method):
    """Per-entry TIES from the paper (arXiv 2306.01708, Alg. 1) in plain Python, with
    weights applied before the election and PEFT's top-k trimming."""
    trimmed = []
    for d in ds:
        flat = d.flatten().tolist()
        k = int(dens * len(flat))
        top = torch.topk(d.abs().flatten(), k).indices.tolist()
        keep = set(range(len(flat))) if dens >= 1 else set(top)
        trimmed.append([v if i in keep else 0.0 for i, v in enumerate(flat)])
    out = []
    for j in range(len(trimmed[0])):
        vals = [w * t[j] for w, t in zip(ws, trimmed)]
        score = sum(vals) if sign_method == "total" else sum(_sign(v) for v in vals)
        elected = 1 if score >= 0 else -1
        agree = [v for v in vals if _sign(v) == elected]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out).reshape(ds[0].shape)


@FAST
@given(ds=task_vectors(), data=st.data(), dens=density, sign_method=sign_methods)
def test_ties_matches_the_per_entry_reference(ds, data, dens, sign_method):
    # Weights k/8: products with the integer inputs are exact in float32, so an exact
    # zero sum ("total" tie → +) is zero in both the float32 method and the reference.
    eighths = st.integers(-24, 24).map(lambda k: k / 8)
    ws = data.draw(st.lists(eighths, min_size=len(ds), max_size=len(ds)))
    out = M.ties(ds, ws, density=dens, majority_sign_method=sign_method)
    torch.testing.assert_close(out, ties_reference(ds, ws, dens, sign_method), rtol=1e-5, atol=1e-5)


def test_ties_total_and_frequency_elect_differently():
    # One entry, three tasks: 5, −1, −1. Sum is +3 → "total" keeps 5; two of three
    # signs are − → "frequency" keeps the mean of −1 and −1.
    ds = [torch.tensor([[5.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])]
    ws = [1.0, 1.0, 1.0]
    assert M.ties(ds, ws, density=1.0, majority_sign_method="total").tolist() == [[5.0, 0.0]]
    assert M.ties(ds, ws, density=1.0, majority_sign_method="frequency").tolist() == [[-1.0, 0.0]]


def test_ties_elects_on_weighted_values_and_means_over_count():
    # Unweighted sum 2 − 1 > 0, weighted sum 2 − 3 < 0: the weighted vote wins (−3),
    # and the mean divides by the number of agreeing tasks (1), not their weights.
    ds = [torch.tensor([[2.0, 1.0]]), torch.tensor([[-1.0, 1.0]])]
    out = M.ties(ds, [1.0, 3.0], density=1.0)
    assert out.tolist() == [[-3.0, 2.0]]  # second entry: (1 + 3) / 2
    # A negated task votes with its effective sign.
    negated = [torch.tensor([[1.0]]), torch.tensor([[-2.0]])]
    assert M.ties(negated, [1.0, -1.0], density=1.0).item() == 1.5


@FAST
@given(ds=task_vectors(n_min=1, n_max=1), dens=density)
def test_magnitude_prune_keeps_int_density_n_largest(ds, dens):
    x = torch.randperm(ds[0].numel()).float().add(1).reshape(ds[0].shape)  # distinct, non-zero
    out = M.magnitude_prune([x], [1.0], density=dens)
    k = ds[0].numel() if dens >= 1 else int(dens * x.numel())  # PEFT's k = int(density · n)
    assert int((out != 0).sum()) == k
    largest = set(x.flatten().argsort(descending=True)[:k].tolist())
    assert set(out.flatten().nonzero().flatten().tolist()) == largest


def test_trim_count_uses_floor_of_the_float_product():
    # int(0.29 · 100) == 28 in floating point; PEFT keeps 28 entries and so do we.
    x = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)
    assert int((M.magnitude_prune([x], [1.0], density=0.29) != 0).sum()) == 28


@FAST
@given(ds=task_vectors(), data=st.data(), dens=density)
def test_magnitude_prune_is_weighted_sum_of_trimmed(ds, data, dens):
    ws = data.draw(st.lists(weight, min_size=len(ds), max_size=len(ds)))
    expected = sum(w * M.trim_magnitude(d, dens) for w, d in zip(ws, ds))
    torch.testing.assert_close(M.magnitude_prune(ds, ws, density=dens), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# DELLA and Breadcrumbs
# ---------------------------------------------------------------------------


def test_della_with_zero_epsilon_is_dare_ties():
    ds = [_randn((5, 8), s) for s in range(3)]
    ws, ids = [1.0, 0.5, 2.0], ["a", "b", "c"]
    a = M.della(ds, ws, density=0.4, epsilon=0.0, generators=M.make_generators(1, "m", ids))
    b = M.dare_ties(ds, ws, density=0.4, generators=M.make_generators(1, "m", ids))
    torch.testing.assert_close(a, b)


def test_della_drop_is_unbiased_and_keeps_large_entries_more_often():
    x = torch.linspace(0.1, 2.0, 20).reshape(1, 20)  # one row, magnitude rank = position
    n = 3000
    kept = torch.zeros(1, 20)
    total = torch.zeros(1, 20, dtype=torch.float64)
    for s in range(n):
        out = M.drop_magprune(x, 0.5, 0.3, torch.Generator().manual_seed(s))
        kept += out != 0
        total += out.double()
    q = 0.2 + 0.6 * torch.arange(20) / 19  # keep probabilities density ± epsilon
    assert bool(((kept / n - q).abs() < 0.04).all())
    sd = (x.double() ** 2 * (1 - q) / q / n).sqrt()
    assert bool(((total / n - x.double()).abs() <= 5 * sd + 1e-6).all())


def test_breadcrumbs_drops_outliers_and_small_entries():
    x = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)  # distinct magnitudes 1..100
    out = M.breadcrumbs([x], [2.0], density=0.5, gamma=0.1)
    kept = sorted(int(v) for v in (out[out != 0] / 2).tolist())
    assert kept == list(range(41, 91))  # 40 smallest and the 10 largest dropped
    # gamma + density > 1: fewer outliers go so that int(density · n) survive.
    out = M.breadcrumbs([x], [1.0], density=0.95, gamma=0.1)
    assert sorted(int(v) for v in out[out != 0].tolist()) == list(range(1, 96))


# ---------------------------------------------------------------------------
# SLERP
# ---------------------------------------------------------------------------


@FAST
@given(ds=task_vectors(n_min=2, n_max=2), data=st.data())
def test_slerp_endpoints_are_exactly_the_inputs(ds, data):
    w = data.draw(st.lists(weight, min_size=2, max_size=2))
    assert torch.equal(M.slerp(ds, [1.0, 1.0], t=0.0), ds[0])
    assert torch.equal(M.slerp(ds, [1.0, 1.0], t=1.0), ds[1])
    torch.testing.assert_close(M.slerp(ds, w, t=0.0), w[0] * ds[0])
    torch.testing.assert_close(M.slerp(ds, w, t=1.0), w[1] * ds[1])


@FAST
@given(s1=st.integers(0, 10**6), s2=st.integers(0, 10**6), t=st.floats(0, 1))
def test_slerp_of_unit_vectors_is_unit_and_at_angle_t_theta(s1, s2, t):
    a, b = _unit(_randn((4, 6), s1)), _unit(_randn((4, 6), s2 + 10**7))
    out = M.slerp([a, b], [1.0, 1.0], t=t)
    assert abs(out.norm().item() - 1) < 1e-5
    theta = math.acos(max(-1.0, min(1.0, float(a.flatten() @ b.flatten()))))
    got = math.acos(max(-1.0, min(1.0, float(out.flatten() @ a.flatten()))))
    assert abs(got - t * theta) < 1e-3
    torch.testing.assert_close(out, M.slerp([b, a], [1.0, 1.0], t=1 - t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0 + 1e-5])
def test_slerp_collinear_and_antipodal_fall_back_to_lerp(factor):
    a = _randn((3, 4), 0)
    b = factor * a
    out = M.slerp([a, b], [1.0, 1.0], t=0.3)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, 0.7 * a + 0.3 * b)


def test_slerp_with_a_zero_input_is_lerp():
    a, z = _randn((3, 4), 0), torch.zeros(3, 4)
    torch.testing.assert_close(M.slerp([z, a], [1.0, 1.0], t=0.25), 0.25 * a)
    torch.testing.assert_close(M.slerp([a, z], [1.0, 1.0], t=0.25), 0.75 * a)
    assert torch.equal(M.slerp([z, z], [1.0, 1.0], t=0.5), z)
    torch.testing.assert_close(M.slerp([a, a], [1.0, 0.0], t=0.5), 0.5 * a)  # zero weight = zero vector


# ---------------------------------------------------------------------------
# Karcher
# ---------------------------------------------------------------------------


def _log_map_sum(mean_unit, units, alphas):
    """Σ αᵢ log_m(uᵢ) computed densely: zero at the weighted Karcher mean."""
    m = mean_unit.flatten().double()
    total = torch.zeros_like(m)
    for u, a in zip(units, alphas):
        u = u.flatten().double()
        c = float((m @ u).clamp(-1, 1))
        th = math.acos(c)
        if th > 1e-9:
            total += a * th / math.sin(th) * (u - c * m)
    return total


@FAST
@given(ds=task_vectors(n_min=1, n_max=4), data=st.data())
def test_karcher_is_a_critical_point_with_norm_sum_w_norms(ds, data):
    ds = [d + 0.1 for d in ds]  # no zero vectors
    ws = data.draw(st.lists(positive_weight, min_size=len(ds), max_size=len(ds)))
    units = [_unit(d) for d in ds]
    if any(float(units[0].flatten() @ u.flatten()) < -0.5 for u in units):
        return  # far-apart points: the mean may not be unique; not this property
    out = M.karcher(ds, ws, tol=1e-10, max_iter=500)
    target = sum(w * d.norm().item() for w, d in zip(ws, ds))
    assert abs(out.norm().item() - target) <= 1e-4 * target
    alphas = [w / sum(ws) for w in ws]
    assert _log_map_sum(_unit(out), units, alphas).norm() < 1e-4


@FAST
@given(
    s1=st.integers(0, 10**6), s2=st.integers(0, 10**6), t=st.floats(0, 1),
    r1=st.floats(0.2, 5), r2=st.floats(0.2, 5),
)
def test_karcher_of_two_with_weights_1_minus_t_and_t_is_slerp(s1, s2, t, r1, r2):
    a, b = _unit(_randn((4, 5), s1)), _unit(_randn((4, 5), s2 + 10**7))
    slerped = M.slerp([a, b], [1.0, 1.0], t=t)
    torch.testing.assert_close(M.karcher([a, b], [1 - t, t]), slerped, rtol=1e-4, atol=1e-5)
    # Non-unit inputs: same direction, norm (1−t)‖a‖ + t‖b‖.
    out = M.karcher([r1 * a, r2 * b], [1 - t, t])
    torch.testing.assert_close(_unit(out), _unit(M.slerp([a, b], [1.0, 1.0], t=t)), rtol=1e-4, atol=1e-5)
    assert abs(out.norm().item() - ((1 - t) * r1 + t * r2)) < 1e-4 * (r1 + r2)


def test_karcher_single_input_and_weight_scaling():
    x = _randn((3, 4), 0)
    torch.testing.assert_close(M.karcher([x], [1.0]), x)
    torch.testing.assert_close(M.karcher([x], [2.5]), 2.5 * x)
    torch.testing.assert_close(M.karcher([x, x], [1.0, 1.0]), 2 * x)


def test_karcher_weights_matter():
    ds = [_randn((3, 4), s) for s in range(3)]
    a = M.karcher(ds, [0.8, 0.1, 0.1])
    b = M.karcher(ds, [0.1, 0.1, 0.8])
    assert (a - b).norm() > 0.1 * a.norm()
    # Closer (in angle) to the input with the larger weight.
    cos = lambda u, v: float(_unit(u).flatten() @ _unit(v).flatten())  # noqa: E731
    assert cos(a, ds[0]) > cos(b, ds[0]) and cos(b, ds[2]) > cos(a, ds[2])


def test_karcher_zero_norm_inputs_add_nothing():
    x, y, z = _randn((3, 4), 0), _randn((3, 4), 1), torch.zeros(3, 4)
    torch.testing.assert_close(M.karcher([x, z, y], [1.0, 5.0, 1.0]), M.karcher([x, y], [1.0, 1.0]))
    assert torch.equal(M.karcher([z, x], [1.0, 0.0]), z)


@pytest.mark.parametrize("ws", [[1.0, -0.5], [0.0, 0.0], [-1.0, -1.0]])
def test_karcher_refuses_negative_or_all_zero_weights(ws):
    with pytest.raises(InvalidArgument, match="non-negative weights"):
        M.karcher([_randn((2, 2), 0), _randn((2, 2), 1)], ws)


def test_karcher_antipodal_inputs_stay_finite():
    x = _randn((3, 4), 0)
    out = M.karcher([x, -x], [0.5, 0.5])
    assert bool(torch.isfinite(out).all())
    assert abs(out.norm().item() - x.norm().item()) < 1e-4 * x.norm().item()


# ---------------------------------------------------------------------------
# Coefficients: Σ cᵢ ΔWᵢ is the dense result, and the Gram of factors gives the same cᵢ
# ---------------------------------------------------------------------------

EXACT = [("linear", {}), ("linear", {"normalize": True}), ("slerp", {"t": 0.3}), ("karcher", {})]


@pytest.mark.parametrize("name,params", EXACT)
@FAST
@given(ds=task_vectors(n_min=2, n_max=4), data=st.data())
def test_coefficients_reproduce_the_dense_result(name, params, ds, data):
    if name == "slerp":
        ds = ds[:2]
    ws = data.draw(st.lists(positive_weight, min_size=len(ds), max_size=len(ds)))
    c = coefficients(name, ds, ws, params)
    assert len(c) == len(ds)
    dense = merge_module(name, ds, ws, params)
    # float32 rounding scales with the result's size: an entry near 0 next to entries
    # of ~15 (karcher's mean of large inputs) carries ~1e-6 of that scale as error.
    scale = max(1.0, dense.norm().item())
    torch.testing.assert_close(sum(ci * d for ci, d in zip(c, ds)), dense, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name,params", EXACT)
def test_coefficients_from_factored_gram_match_dense(name, params):
    g = torch.Generator().manual_seed(0)
    fs = [Factored(torch.randn(12, r, generator=g), torch.randn(r, 9, generator=g)) for r in (2, 4, 3)]
    if name == "slerp":
        fs = fs[:2]
    ws = [0.5, 0.3, 0.2][: len(fs)]
    from_factors = coefficients_from_gram(name, gram(fs), ws, params)
    from_dense = coefficients(name, [f.dense() for f in fs], ws, params)
    assert from_factors == pytest.approx(from_dense, rel=1e-6, abs=1e-9)


def test_coefficients_refuse_dense_only_methods():
    with pytest.raises(InvalidArgument, match="not a linear combination"):
        coefficients_from_gram("ties", torch.eye(2), [1.0, 1.0], {"density": 0.5})
    with pytest.raises(InvalidArgument, match=r"Gram matrix must be \[3, 3\]"):
        coefficients_from_gram("karcher", torch.eye(2), [1.0, 1.0, 1.0])
    with pytest.raises(InvalidArgument, match="Gram matrix"):
        coefficients_from_gram("slerp", None, [1.0, 1.0], {"t": 0.5})
    with pytest.raises(InvalidArgument, match="NaN or inf"):
        coefficients_from_gram("karcher", [[1.0, float("nan")], [0.0, 1.0]], [1.0, 1.0])
    assert coefficients_from_gram("linear", None, [2.0, -1.0]) == [2.0, -1.0]


# ---------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------


def test_registry_flags_and_immutability():
    exact = {n for n, m in METHODS.items() if m.low_rank_exact}
    random = {n for n, m in METHODS.items() if m.needs_generator}
    assert exact == {"linear", "slerp", "karcher"}
    assert random == {"dare_linear", "dare_ties", "della"}
    assert all(m.paper and (m.coefficients_fn is not None) == m.low_rank_exact for m in METHODS.values())
    with pytest.raises(TypeError):
        METHODS["evil"] = METHODS["linear"]  # type: ignore[index]
    with pytest.raises(TypeError):
        METHODS["ties"].params["density"] = None  # type: ignore[index]


def test_resolve_fills_defaults_and_normalises():
    m, p = resolve_method("ties", {"density": 1})
    assert m is METHODS["ties"] and p == {"density": 1.0, "majority_sign_method": "total"}
    assert isinstance(p["density"], float)
    assert resolve_method("karcher", {})[1] == {"max_iter": 100, "tol": 1e-7}


X2 = [torch.ones(2, 3), torch.full((2, 3), 2.0)]

BAD_CALLS = [
    ("ties", X2, [1.0, 1.0], {"density": 0.0}, "in \\(0, 1\\]"),
    ("dare_linear", X2, [1.0, 1.0], {"density": -0.1}, "in \\(0, 1\\]"),
    ("dare_ties", X2, [1.0, 1.0], {"density": 1.5}, "in \\(0, 1\\]"),
    ("magnitude_prune", X2, [1.0, 1.0], {"density": float("nan")}, "finite number"),
    ("ties", X2, [1.0, 1.0], {"density": "0.5"}, "finite number"),
    ("ties", X2, [1.0, 1.0], {"density": True}, "finite number"),
    ("ties", X2, [1.0, 1.0], {}, "needs parameter 'density'"),
    ("ties", X2, [1.0, 1.0], {"density": 0.5, "majority_sign_method": "mean"}, "'total' or 'frequency'"),
    ("slerp", X2, [1.0, 1.0], {"t": -0.1}, "in \\[0, 1\\]"),
    ("slerp", X2, [1.0, 1.0], {"t": 1.1}, "in \\[0, 1\\]"),
    ("slerp", X2 + X2[:1], [1.0, 1.0, 1.0], {"t": 0.5}, "exactly 2"),
    ("slerp", X2[:1], [1.0], {"t": 0.5}, "exactly 2"),
    ("linear", [], [], {}, "non-empty"),
    ("linear", X2, [1.0], {}, "2 task vectors but 1 weights"),
    ("linear", [torch.ones(2, 3), torch.ones(3, 2)], [1.0, 1.0], {}, "share one non-empty shape"),
    ("linear", X2, [1.0, float("nan")], {}, "finite number"),
    ("linear", X2, [1.0, float("inf")], {}, "finite number"),
    ("linear", X2, [1.0, "1"], {}, "finite number"),
    ("linear", [torch.ones(2, 3), torch.full((2, 3), float("nan"))], [1.0, 1.0], {}, "NaN or inf"),
    ("linear", [torch.ones(2, 3, dtype=torch.int64)] * 2, [1.0, 1.0], {}, "floating-point"),
    ("linear", X2, [1.0, 1.0], {"normalize": 1}, "true or false"),
    ("linear", X2, [1.0, 1.0], {"density": 0.5}, "no parameter 'density'"),
    ("ties_svd", X2, [1.0, 1.0], {}, "unknown merge method"),
    ("karcher", X2, [1.0, 1.0], {"max_iter": 0}, "integer in"),
    ("karcher", X2, [1.0, 1.0], {"tol": 0.0}, "in \\(0, 1\\)"),
    ("karcher", X2, [1.0, -1.0], {}, "non-negative weights"),
    ("della", X2, [1.0, 1.0], {"density": 0.5}, "needs parameter 'epsilon'"),
    ("della", X2, [1.0, 1.0], {"density": 0.5, "epsilon": 0.5}, "density - epsilon > 0"),
    ("della", X2, [1.0, 1.0], {"density": 0.9, "epsilon": 0.2}, "density \\+ epsilon <= 1"),
    ("breadcrumbs", X2, [1.0, 1.0], {"density": 0.5, "gamma": 1.0}, "in \\[0, 1\\)"),
]


@pytest.mark.parametrize("name,ds,ws,params,message", BAD_CALLS)
def test_bad_input_is_invalid_argument(name, ds, ws, params, message):
    with pytest.raises(InvalidArgument, match=message):
        merge_module(name, ds, ws, params, seed=0, module="m")


def test_random_methods_need_generators_or_seed():
    with pytest.raises(InvalidArgument, match="pass generators, or seed and module"):
        merge_module("dare_linear", X2, [1.0, 1.0], {"density": 0.5})
    with pytest.raises(InvalidArgument, match="one torch.Generator per input"):
        merge_module("dare_linear", X2, [1.0, 1.0], {"density": 0.5}, generators=[torch.Generator()])
    with pytest.raises(InvalidArgument, match="distinct"):
        merge_module(
            "dare_linear", X2, [1.0, 1.0], {"density": 0.5}, seed=0, module="m", adapter_ids=["a", "a"]
        )
    with pytest.raises(InvalidArgument, match="seed must be an integer"):
        merge_module("dare_linear", X2, [1.0, 1.0], {"density": 0.5}, seed=1.5, module="m")


def test_check_arity_and_merge_dense():
    M.check_arity("ties", 3)
    M.check_arity(METHODS["slerp"], 2)
    with pytest.raises(InvalidArgument, match="exactly 2"):
        M.check_arity("slerp", 3)
    with pytest.raises(InvalidArgument, match="non-empty"):
        M.check_arity("linear", 0)
    with pytest.raises(InvalidArgument, match="unknown merge method"):
        M.check_arity("nope", 2)
    gens = M.make_generators(0, "m", ["a", "b"])
    via_dense = M.merge_dense("dare_linear", X2, [1.0, 2.0], {"density": 0.5}, gens)
    via_seed = merge_module(
        "dare_linear", X2, [1.0, 2.0], {"density": 0.5}, seed=0, module="m", adapter_ids=["a", "b"]
    )
    assert torch.equal(via_dense, via_seed)
    torch.testing.assert_close(M.merge_dense("linear", X2, [1.0, 2.0], None, gens), X2[0] + 2 * X2[1])


def test_pure_functions_validate_their_parameters_too():
    with pytest.raises(InvalidArgument):
        M.ties(X2, [1.0, 1.0], density=0.0)
    with pytest.raises(InvalidArgument):
        M.slerp(X2, [1.0, 1.0], t=2.0)


# One typical call per method: (params, weights for 3 inputs; slerp uses the first 2).
TYPICAL = {
    "linear": ({}, [0.5, -0.2, 0.7]),
    "ties": ({"density": 0.5}, [0.5, -0.2, 0.7]),
    "magnitude_prune": ({"density": 0.5}, [0.5, -0.2, 0.7]),
    "dare_linear": ({"density": 0.5}, [0.5, -0.2, 0.7]),
    "dare_ties": ({"density": 0.5, "majority_sign_method": "frequency"}, [0.5, -0.2, 0.7]),
    "della": ({"density": 0.5, "epsilon": 0.2}, [0.5, -0.2, 0.7]),
    "breadcrumbs": ({"density": 0.5, "gamma": 0.05}, [0.5, -0.2, 0.7]),
    "slerp": ({"t": 0.4}, [1.0, 1.0]),
    "karcher": ({}, [0.5, 0.2, 0.3]),
}


def _typical_call(name, ds):
    params, ws = TYPICAL[name]
    return merge_module(name, ds[: len(ws)], ws, params, seed=1, module="m")


def test_inputs_are_not_modified():
    assert set(TYPICAL) == set(METHODS)
    ds = [_randn((4, 5), s) for s in range(3)]
    before = [d.clone() for d in ds]
    for name in TYPICAL:
        _typical_call(name, ds)
    assert all(torch.equal(a, b) for a, b in zip(ds, before))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_cuda_merge_equals_cpu(name):
    # The seed path draws masks on CPU generators, so a merge is the same on any device.
    ds = [_randn((64, 48), s) for s in range(3)]
    cpu = _typical_call(name, ds)
    gpu = _typical_call(name, [d.cuda() for d in ds])
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
