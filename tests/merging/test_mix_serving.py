"""Mixes served per request: merged on ΔW, cached by content, batched with other rows."""

from __future__ import annotations

import threading

import pytest
import torch

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, MergeConfig, ModelConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.errors import FailedPrecondition, InvalidArgument, NotFound
from loramux.merging.service import MergeService
from loramux.merging.spec import MixSpec

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapter_root):
    # Dense mixes of these adapters lose 0.1-0.4 at rank 32 (modules 64-128 wide): a
    # lenient budget serves them. Refusals over a budget have their own services below.
    return build_engine(
        EngineConfig(
            model=ModelConfig(path=tiny_llama_dir),
            adapters=AdapterConfig(roots=[adapter_root], max_rank=32),
            merges=MergeConfig(error_budget=0.6),
        )
    )


def _service(engine, **merges) -> MergeService:
    """A merge service of its own (own cache, own refusals) over the engine's adapters."""
    cfg = MergeConfig(**merges)
    cfg.validate(32)
    return MergeService(engine.store, cfg)


def _logits(engine, **selection):
    return engine.prompt_logits([GenerationRequest(prompt=PROMPT, **selection)])[0]


def test_linear_mix_matches_peft_cat_merge(engine, tiny_llama_dir, adapter_root):
    """PEFT's add_weighted_adapter(combination_type="cat") is the exact weighted ΔW sum."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter_root / "x", adapter_name="x")
    ref.load_adapter(adapter_root / "y", adapter_name="y")
    ref.add_weighted_adapter(["x", "y"], [0.7, 0.5], "xy", combination_type="cat")
    ref.set_adapter("xy")
    ids = engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0]
    got = _logits(engine, mix=MixSpec.build([("x", 0.7), ("y", 0.5)], "linear"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dense_mix_is_compressed_within_budget_and_reported(engine):
    spec = MixSpec.build([("x", 1.0), ("y", 1.0), ("z", 0.5)], "ties", {"density": 0.5})
    merged, report = engine.merges.resolve(spec)
    assert 0 < report.rel_error <= engine.merges.cfg.error_budget
    assert report.rank == merged.rank <= 32
    # The served rows equal a forward with the served factors; the exact merge is
    # within the reported error of them.
    exact = engine.merges.exact_deltas(spec)
    for name, module in merged.modules.items():
        served = module.B @ module.A
        err = float(torch.linalg.norm(served - exact[name]) / torch.linalg.norm(exact[name]))
        assert err <= report.rel_error + 1e-5


def test_mix_rows_batch_with_adapter_and_base_rows(engine):
    mix = MixSpec.build([("x", 0.5), ("y", 0.5)], "dare_ties", {"density": 0.7}, seed=3)
    reqs = [
        GenerationRequest(prompt=PROMPT, mix=mix),
        GenerationRequest(prompt=PROMPT, adapter="x"),
        GenerationRequest(prompt=PROMPT),
    ]
    together = engine.prompt_logits(reqs)
    for r, t in zip(reqs, together):
        torch.testing.assert_close(t, engine.prompt_logits([r])[0], rtol=1e-5, atol=1e-5)
    assert (together[0] - together[2]).abs().max() > 1e-2


def test_cache_hits_and_single_flight(engine):
    spec = MixSpec.build([("x", 0.3), ("z", 0.9)], "slerp", {"t": 0.4})
    engine.merges.cache.remove(f"mix:{spec.key({a: engine.store.get(a).content_hash for a in spec.names}, engine.merges._serving())}")
    before = engine.merges.cache.stats.loads
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.merges.resolve(spec))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.merges.cache.stats.loads == before + 1
    assert len({id(m) for m, _ in results}) == 1
    assert engine.merges.resolve(spec)[1].cache_hit
    # DARE with another seed is another mix.
    a = engine.merges.resolve(MixSpec.build([("x", 1), ("y", 1)], "dare_linear", {"density": 0.5}, seed=1))[0]
    b = engine.merges.resolve(MixSpec.build([("x", 1), ("y", 1)], "dare_linear", {"density": 0.5}, seed=2))[0]
    assert a.content_hash != b.content_hash


def test_named_merges(engine):
    report = engine.merges.create("xy", MixSpec.build([("x", 1.0), ("y", -0.5)], "linear"))
    assert report.rel_error == 0.0
    assert "xy" in engine.merges.list()
    by_name = _logits(engine, merge="xy")
    inline = _logits(engine, mix=MixSpec.build([("x", 1.0), ("y", -0.5)], "linear"))
    torch.testing.assert_close(by_name, inline)
    res = engine.generate([GenerationRequest(prompt=PROMPT, merge="xy", sampling=SamplingParams(max_new_tokens=4))])[0]
    assert res.merge is not None and res.merge.method == "linear"
    engine.merges.delete("xy")
    with pytest.raises(NotFound, match="xy"):
        engine.submit(GenerationRequest(prompt=PROMPT, merge="xy"))


@pytest.mark.parametrize(
    "selection, error, match",
    [
        (dict(mix=MixSpec.build([("x", 1.0), ("nope", 1.0)])), NotFound, "nope"),
        (dict(mix=MixSpec.build([("x", 1.0)], "ties", {"density": 0.0})), InvalidArgument, "density"),
        (dict(mix=MixSpec.build([("x", 1.0)], "ties", {"density": 1.5})), InvalidArgument, "density"),
        (dict(mix=MixSpec.build([("x", 1.0)], "slerp", {"t": 0.5})), InvalidArgument, "slerp"),
        (dict(mix=MixSpec.build([("x", 1.0)], "frobnicate")), InvalidArgument, "frobnicate"),
        (dict(mix=MixSpec.build([("x", 1.0)], "linear", {"bogus": 1})), InvalidArgument, "bogus"),
        (dict(adapter="x", mix=MixSpec.build([("x", 1.0)])), InvalidArgument, "at most one"),
    ],
)
def test_bad_mixes_are_refused(engine, selection, error, match):
    with pytest.raises(error, match=match):
        engine.submit(GenerationRequest(prompt=PROMPT, **selection))
    assert not engine.has_work()


def test_mix_spec_validation():
    with pytest.raises(InvalidArgument, match="at least one"):
        MixSpec.build([])
    with pytest.raises(InvalidArgument, match="twice"):
        MixSpec.build([("x", 1), ("x", 2)])
    with pytest.raises(InvalidArgument, match="finite"):
        MixSpec.build([("x", float("nan"))])


# ---------------------------------------------------------------------------
# Adapters training different modules: absent ones add nothing (exact at the slot rank)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial_root(tiny_llama_dir, tmp_path_factory):
    """a, b, c (r=16 each) train two of q/k/v each: in a three-way mix every module
    is trained by exactly two of them, rank 16 + 16 = 32, the slot rank."""
    from tests.conftest import make_adapter

    root = tmp_path_factory.mktemp("partial-adapters")
    for name, targets, seed in (("a", ("q_proj", "v_proj"), 11), ("b", ("q_proj", "k_proj"), 12),
                                ("c", ("k_proj", "v_proj"), 13)):
        make_adapter(tiny_llama_dir, root / name, r=16, alpha=32, seed=seed, targets=targets)
    return root


@pytest.fixture(scope="module")
def partial_engine(tiny_llama_dir, partial_root):
    # The default (strict) error budget: an exact mix must not need it.
    return build_engine(
        EngineConfig(model=ModelConfig(path=tiny_llama_dir), adapters=AdapterConfig(roots=[partial_root], max_rank=32))
    )


PARTIAL_WEIGHTS = (("a", 0.7), ("b", -0.4), ("c", 0.9))


def test_mix_of_rank_exactly_the_slot_rank_is_served_exactly(partial_engine):
    """Σ wᵢ ΔWᵢ per module against the dense reference from each adapter's own
    LoraModule: served exactly (no compression), at rank 32."""
    spec = MixSpec.build(PARTIAL_WEIGHTS, "linear")
    merged, report = partial_engine.merges.resolve(spec)
    assert report.rel_error == 0.0 and report.rank == merged.rank == 32
    adapters = [partial_engine.store.get(n) for n, _ in PARTIAL_WEIGHTS]
    modules = set().union(*(a.modules for a in adapters))
    assert set(merged.modules) == modules
    for name in modules:
        want = sum(w * a.modules[name].delta().double() for a, (_, w) in zip(adapters, PARTIAL_WEIGHTS)
                   if name in a.modules)
        got = merged.modules[name]
        assert got.rank == 32, name
        torch.testing.assert_close((got.B @ got.A * got.scale).double(), want, rtol=1e-5, atol=1e-6)


def test_mix_of_rank_exactly_the_slot_rank_equals_peft_cat(partial_engine, tiny_llama_dir, partial_root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), partial_root / "a",
                                    adapter_name="a")
    for name in "bc":
        ref.load_adapter(partial_root / name, adapter_name=name)
    names, weights = zip(*PARTIAL_WEIGHTS)
    ref.add_weighted_adapter(list(names), list(weights), "abc", combination_type="cat")
    ref.set_adapter("abc")
    ids = partial_engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0]
    got = _logits(partial_engine, mix=MixSpec.build(PARTIAL_WEIGHTS, "linear"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_spherical_mixes_treat_an_absent_module_as_a_zero_task_vector(partial_engine):
    """In q_proj a and b both train; in v_proj only a (b's ΔW = 0): slerp is then
    lerp, (1 − t)·ΔW_a, and karcher of (ΔW_a, 0) is ΔW_a scaled to Σ wᵢ‖ΔWᵢ‖ = w_a‖ΔW_a‖."""
    a = partial_engine.store.get("a")
    slerp = partial_engine.merges.exact_deltas(MixSpec.build([("a", 1.0), ("b", 1.0)], "slerp", {"t": 0.3}))
    karcher = partial_engine.merges.exact_deltas(MixSpec.build([("a", 0.6), ("b", 0.4)], "karcher"))
    for name, m in a.modules.items():
        if "v_proj" not in name:
            continue
        assert slerp[name].rank == karcher[name].rank == 16  # b adds no column
        torch.testing.assert_close(slerp[name].dense(), 0.7 * m.delta(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(karcher[name].dense(), 0.6 * m.delta(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Over the error budget: refused, with the numbers and the alternatives; remembered
# ---------------------------------------------------------------------------

TIES_XYZ = MixSpec.build([("x", 1.0), ("y", 1.0), ("z", 0.5)], "ties", {"density": 0.5})


def _first_error(message: str) -> float:
    import re

    return float(re.search(r"relative error ([0-9.e+-]+)", message).group(1))


def test_dense_mix_over_budget_is_refused_with_error_budget_and_alternatives(engine):
    service = _service(engine, error_budget=0.01)
    with pytest.raises(FailedPrecondition) as e:
        service.resolve(TIES_XYZ)
    message = str(e.value)
    module = message.split(": ", 1)[1].split(" compressed", 1)[0]
    achieved = _first_error(message)
    # The achieved error is the real one: at least the Eckart–Young optimum at rank
    # 32 of the exact merged ΔW of that module (dense SVD as the oracle), and near it.
    exact = engine.merges.exact_deltas(TIES_XYZ)[module].double()
    S2 = torch.linalg.svdvals(exact) ** 2
    optimum = float((S2[32:].sum() / S2.sum()).sqrt())
    assert optimum * (1 - 1e-3) <= achieved <= optimum * 1.01 and achieved > 0.01  # printed to 3 digits
    for part in ("error budget 0.01", "more than rank 32", "`loramux pin --mix x=1,y=1,z=0.5 --method ties "
                 "--param density=0.5`", "loramux export DEST --mix", "error_budget", "[merges]", "max_rank"):
        assert part in message, part
    assert service.cache.count == 0  # nothing served, nothing cached


def test_refusal_is_remembered_and_not_merged_again(engine):
    service = _service(engine, error_budget=0.01)
    with pytest.raises(FailedPrecondition) as first:
        service.resolve(TIES_XYZ)
    assert service.cache.stats.loads == 1
    assert service.is_cached(TIES_XYZ)  # answered without a merge
    with pytest.raises(FailedPrecondition) as again:
        service.resolve(TIES_XYZ)
    assert str(again.value) == str(first.value)
    assert service.cache.stats.loads == 1  # no second merge


def test_refusals_are_bounded(engine, monkeypatch):
    from loramux.merging import service as service_module

    monkeypatch.setattr(service_module, "MAX_REFUSALS", 2)
    service = _service(engine, error_budget=0.01)
    specs = [MixSpec.build([("x", 1.0), ("y", 1.0)], "dare_linear", {"density": 0.5}, seed=s) for s in range(3)]
    for spec in specs:
        with pytest.raises(FailedPrecondition):
            service.resolve(spec)
    assert len(service._refusals) == 2 and not service.is_cached(specs[0]) and service.is_cached(specs[2])


def test_exact_mix_over_the_served_rank_is_refused_with_the_rank_it_needs(engine):
    """linear x + y has rank 12 per module; served at rank ≤ 8 it is truncated: the
    message names the smallest rank meeting the budget, from the dense SVD."""
    service = _service(engine, max_rank=8, error_budget=0.01)
    spec = MixSpec.build([("x", 1.0), ("y", 1.0)], "linear")
    with pytest.raises(FailedPrecondition) as e:
        service.resolve(spec)
    message = str(e.value)
    module = message.split(": ", 1)[1].split(" compressed", 1)[0]
    dense = sum(engine.store.get(n).modules[module].delta().double() for n in "xy")
    S2 = torch.linalg.svdvals(dense) ** 2
    tail = S2.sum() - torch.cumsum(S2, 0)
    needed = int((tail <= 0.01**2 * S2.sum()).nonzero()[0]) + 1
    assert 8 < needed <= 12 and f"needs rank {needed}" in message
    assert _first_error(message) == pytest.approx(float((tail[7] / S2.sum()).sqrt()), rel=2e-3)  # 3 digits


def test_named_merge_over_budget_is_refused_at_create(engine):
    service = _service(engine, error_budget=0.01)
    with pytest.raises(FailedPrecondition, match="error budget"):
        service.create("too-lossy", TIES_XYZ)
    assert "too-lossy" not in service.list()


# ---------------------------------------------------------------------------
# Cooperative cancellation: a check between modules
# ---------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_check_runs_before_every_module(engine):
    service = _service(engine, error_budget=0.6)
    calls = []
    spec = MixSpec.build([("x", 0.5), ("z", 0.5)], "ties", {"density": 0.5})
    merged, _ = service.resolve(spec, check=lambda: calls.append(1))
    assert len(calls) == len(merged.modules) == len(engine.store.get("x").modules)


def test_aborted_merge_leaves_nothing_and_a_later_call_merges(engine):
    service = _service(engine, error_budget=0.6)
    spec = MixSpec.build([("x", 0.5), ("y", 0.5)], "dare_ties", {"density": 0.5}, seed=4)
    calls = []

    def stop_at_third():
        calls.append(1)
        if len(calls) == 3:
            raise _Stop("caller left")

    with pytest.raises(_Stop, match="caller left"):
        service.resolve(spec, check=stop_at_third)
    assert len(calls) == 3 and service.cache.count == 0 and not service.is_cached(spec)
    merged, report = service.resolve(spec)  # no refusal, no stale flight: it merges
    assert not report.cache_hit and service.cache.count == 1
    assert service.resolve(spec)[0] is merged


def test_waiter_of_an_aborted_merge_merges_in_its_place(engine):
    """Two callers share one flight; the leader's own check aborts it. The waiter
    (whose caller is still there) must get the merge, not the leader's error."""
    service = _service(engine, error_budget=0.6)
    spec = MixSpec.build([("x", 0.5), ("z", 0.5)], "dare_linear", {"density": 0.5}, seed=8)
    leader_in, waiter_joined = threading.Event(), threading.Event()
    misses_before = service.cache.stats.misses

    def leader_check():
        leader_in.set()
        assert waiter_joined.wait(10)
        # The waiter is in get_or_load once it has counted its miss on our flight.
        for _ in range(1000):
            if service.cache.stats.misses >= misses_before + 2:
                results["joined"] = True
                break
            threading.Event().wait(0.005)
        raise _Stop("leader's caller left")

    results = {}

    def lead():
        try:
            service.resolve(spec, check=leader_check)
        except _Stop as e:
            results["leader"] = e

    def wait():
        assert leader_in.wait(10)
        waiter_joined.set()
        results["waiter"] = service.resolve(spec)

    threads = [threading.Thread(target=lead), threading.Thread(target=wait)]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join(30)
    assert results.get("joined") and isinstance(results["leader"], _Stop)
    merged, report = results["waiter"]
    assert merged.name.startswith("mix:") and service.cache.count == 1
    assert service.cache.stats.loads == 2  # the aborted flight, then the waiter's own merge


def test_waiter_whose_caller_leaves_stops_waiting_and_the_merge_goes_on(engine):
    """The leader merges slowly; the waiter's own check fails while it waits: it gets
    its error at once (not when the merge ends) and the leader still gets the merge."""
    service = _service(engine, error_budget=0.6)
    spec = MixSpec.build([("y", 0.5), ("z", 0.5)], "ties", {"density": 0.5})
    leader_in, waiter_gone = threading.Event(), threading.Event()
    misses_before = service.cache.stats.misses

    def slow_leader_check():
        leader_in.set()
        assert waiter_gone.wait(10)  # every module after the waiter gave up

    waiter_checks = []

    def waiter_check():
        # Called only while waiting on the leader's flight (the waiter never merges).
        waiter_checks.append(1)
        if len(waiter_checks) == 3:
            raise _Stop("waiter's caller left")

    results = {}

    def lead():
        results["leader"] = service.resolve(spec, check=slow_leader_check)

    def wait():
        assert leader_in.wait(10)
        try:
            service.resolve(spec, check=waiter_check)
        except _Stop as e:
            results["waiter"] = e
        finally:
            waiter_gone.set()

    threads = [threading.Thread(target=lead), threading.Thread(target=wait)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(results["waiter"], _Stop) and len(waiter_checks) == 3
    assert service.cache.stats.misses == misses_before + 2  # the waiter joined the flight
    merged, _ = results["leader"]
    assert merged.name.startswith("mix:") and service.cache.count == 1
    assert service.cache.stats.loads == 1
