"""One bad row never hurts another: poisoned weights, extreme sampling parameters
and prompts over the limit end (or are refused for) that request alone, the other
rows' tokens stay bit-identical, and every count returns to zero."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramux.adapters.types import LoraAdapter, LoraModule
from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, KvCacheConfig, ModelConfig, SlotConfig
from loramux.engine.sampling import NONFINITE_LOGITS, SamplingParams
from loramux.engine.types import FAILURE_NUMERIC, FINISH_ERROR, GenerationRequest
from loramux.errors import FailedPrecondition, InvalidArgument

PROMPTS = ["The quick brown fox", "SELECT name FROM users", "def add(a, b):", '{"name": "Ada"']


def _engine(model_dir, root, **kw):
    return build_engine(EngineConfig(
        model=ModelConfig(path=model_dir),
        adapters=AdapterConfig(roots=[root], max_rank=16),
        slots=SlotConfig(num_slots=4),
        kv_cache=KvCacheConfig(bytes=4 << 20, block_size=4),
        max_batch_rows=8,
        prefill_chunk_tokens=16,
        **kw,
    ))


def _poison(engine, name="poison") -> None:
    """An adapter that slipped past load-time checks: finite factors whose ΔW
    overflows float32 activations (NaN logits). Placed straight in the host cache."""
    x = engine.store.get("x")
    modules = {k: LoraModule(A=m.A, B=m.B * 1e30, scale=m.scale) for k, m in x.modules.items()}
    engine.store.cache.get_or_load(name, lambda: LoraAdapter(name, modules, content_hash=f"{name}-hash"), pin=True)


def _assert_idle(engine):
    kv = engine.info().kv
    assert kv.used == 0 and kv.used + kv.cached + kv.free == kv.blocks
    assert engine.num_running == 0 and engine.num_waiting == 0 and not engine.has_work()


def _req(prompt, adapter=None, **sampling):
    params = SamplingParams(**{"max_new_tokens": 8, "ignore_eos": True, **sampling})
    return GenerationRequest(prompt=prompt, adapter=adapter, sampling=params)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapter_root):
    e = _engine(tiny_llama_dir, adapter_root)
    _poison(e)
    return e


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, adapter_root):
    """Each request alone, on an engine that never saw a poisoned row."""
    e = _engine(tiny_llama_dir, adapter_root)
    cache: dict = {}

    def alone(req: GenerationRequest) -> list[int]:
        key = (req.prompt, req.adapter, req.sampling)
        if key not in cache:
            cache[key] = e.generate([dataclasses.replace(req, request_id=f"ref-{len(cache)}")])[0].token_ids
        return cache[key]

    return alone


@pytest.mark.parametrize("sampled", [False, True])
def test_poisoned_row_fails_alone_and_the_batch_goes_on(engine, reference, sampled):
    sampling = {"temperature": 0.9, "top_p": 0.9, "seed": 7} if sampled else {}
    good = [_req(PROMPTS[0]), _req(PROMPTS[1], "x", **sampling), _req(PROMPTS[2], "y"), _req(PROMPTS[3], "z")]
    bad = _req(PROMPTS[0], "poison", **sampling)
    results = engine.generate(good[:2] + [bad] + good[2:])
    failed = results[2]
    assert failed.finish_reason == FINISH_ERROR and failed.error_kind == FAILURE_NUMERIC
    assert failed.error == NONFINITE_LOGITS and failed.token_ids == []
    assert [r.token_ids for r in results[:2] + results[3:]] == [reference(r) for r in good]
    assert engine.row_failures >= 1
    _assert_idle(engine)


def test_blocks_a_poisoned_row_wrote_serve_the_next_rows_exactly(engine, reference):
    """NaN keys/values left in freed blocks must never reach a later row."""
    for _ in range(3):
        engine.generate([_req(PROMPTS[i % 4] * 3, "poison") for i in range(6)])
    again = [_req(PROMPTS[i % 4] * 3, [None, "x", "y", "z"][i % 4]) for i in range(6)]
    assert [r.token_ids for r in engine.generate(again)] == [reference(r) for r in again]
    _assert_idle(engine)


def test_a_huge_temperature_and_a_subnormal_one_serve_beside_greedy_rows(engine, reference):
    rows = [_req(PROMPTS[0]), _req(PROMPTS[1], temperature=1e-45, seed=1),
            _req(PROMPTS[2], temperature=1e30, seed=2), _req(PROMPTS[3], "x")]
    results = engine.generate(rows)
    assert all(r.finish_reason == "length" for r in results)
    assert results[1].token_ids == reference(_req(PROMPTS[1]))  # a subnormal temperature is greedy
    assert [results[0].token_ids, results[3].token_ids] == [reference(rows[0]), reference(rows[3])]
    _assert_idle(engine)


def test_resolution_names_the_weights_across_a_pin_and_an_unpin(engine):
    """A base request queued before a pin lands is computed on the pinned weights,
    and says so; one queued while pinned and served after the unpin says base."""
    queued = _req(PROMPTS[0])
    engine.submit(queued)
    engine.request_swap(engine.exact_deltas(GenerationRequest(adapter="x")), "adapter:x")
    got = _drain(engine)[queued.request_id]
    assert (got.resolution.kind, got.resolution.name) == ("pinned", "adapter:x")
    assert got.token_ids == engine.generate([_req(PROMPTS[0])])[0].token_ids
    queued = _req(PROMPTS[0])
    engine.submit(queued)
    engine.request_swap(None, None)
    got = _drain(engine)[queued.request_id]
    assert (got.resolution.kind, got.resolution.name) == ("base", None)
    _assert_idle(engine)


def _drain(engine) -> dict:
    results = {}
    while engine.has_work():
        results.update({ev.request_id: ev.result for ev in engine.step() if ev.result is not None})
    return results


def test_the_pinned_merge_cannot_be_deleted(tiny_llama_dir, adapter_root):
    from loramux.merging.spec import MixSpec

    e = _engine(tiny_llama_dir, adapter_root)
    e.create_merge("xy", MixSpec.build([("x", 0.5), ("y", 0.5)]))
    e.pin(GenerationRequest(merge="xy"))
    with pytest.raises(FailedPrecondition, match="pinned into the base weights; unpin it first"):
        e.delete_merge("xy")
    e.unpin()
    e.delete_merge("xy")


def test_an_oversized_prompt_is_refused_from_a_bounded_prefix(engine):
    """A multi-megabyte prompt is refused after tokenizing at most a few times the
    limit in characters, not tokenized whole."""
    seen: list[int] = []
    tokenizer = engine.tokenizer
    original = type(tokenizer).__call__

    def spy(self, text, *a, **kw):
        seen.append(len(text))
        return original(self, text, *a, **kw)

    type(tokenizer).__call__ = spy
    try:
        with pytest.raises(InvalidArgument, match="tokens"):
            engine.submit(GenerationRequest(prompt="fox jumps " * 400_000))
    finally:
        type(tokenizer).__call__ = original
    assert max(seen, default=0) <= 8 * engine.max_len
    _assert_idle(engine)


# ---- fuzz: the whole request space against a real engine ------------------------

_finite = dict(allow_nan=False, allow_infinity=False)
_sampling = st.fixed_dictionaries({
    "max_new_tokens": st.integers(1, 6),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 1e6, **_finite), st.sampled_from([1e-45, 1e-6, 0.7])),
    "top_k": st.integers(0, 600),
    "top_p": st.one_of(st.just(1.0), st.floats(1e-9, 1.0, **_finite)),
    "repetition_penalty": st.one_of(st.just(1.0), st.floats(1e-2, 1e2, **_finite)),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.sampled_from(["o", "\n", "ELECT", "zz"]), max_size=2).map(tuple),
    "ignore_eos": st.booleans(),
})
_rows = st.lists(
    st.tuples(st.sampled_from(PROMPTS), st.sampled_from([None, "x", "y", "z", "poison"]), _sampling),
    min_size=1, max_size=5,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(rows=_rows)
def test_fuzz_rows_never_change_each_other(engine, reference, rows):
    """Invariant: every healthy row's tokens equal its tokens alone; a poisoned
    row ends with its own error; nothing stays allocated."""
    requests = [GenerationRequest(prompt=p, adapter=a, sampling=SamplingParams(**s)) for p, a, s in rows]
    results = engine.generate(requests)
    for req, res in zip(requests, results):
        if req.adapter == "poison":
            assert res.finish_reason == FINISH_ERROR and res.error_kind == FAILURE_NUMERIC
        else:
            assert res.finish_reason != FINISH_ERROR
            assert res.token_ids == reference(req)
    _assert_idle(engine)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    penalty=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.integers(-(2**31), 2**31),
)
def test_fuzz_any_parameters_are_served_or_refused_cleanly(engine, temperature, top_p, penalty, top_k):
    params = SamplingParams(max_new_tokens=2, temperature=temperature, top_p=top_p,
                            repetition_penalty=penalty, top_k=top_k, seed=3)
    try:
        result = engine.generate([GenerationRequest(prompt=PROMPTS[0], sampling=params)])[0]
    except InvalidArgument:
        pass
    else:
        assert result.finish_reason in ("length", "eos") and 1 <= len(result.token_ids) <= 2
    _assert_idle(engine)
