"""Engine behaviour: continuous batching, cancellation, stops, slots, bad input."""

from __future__ import annotations

import dataclasses

import pytest

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig, SlotConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.errors import InvalidArgument, NotFound

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def _engine(model_dir, root, slots=4, host_bytes=1 << 30, max_rows=32):
    return build_engine(
        EngineConfig(
            model=ModelConfig(path=model_dir),
            adapters=AdapterConfig(roots=[root], max_rank=16, host_cache_bytes=host_bytes),
            slots=SlotConfig(num_slots=slots),
            max_batch_rows=max_rows,
        )
    )


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapter_root):
    return _engine(tiny_llama_dir, adapter_root)


def _req(prompt, adapter=None, params=GREEDY):
    return GenerationRequest(prompt=prompt, adapter=adapter, sampling=params)


def _alone(engine, prompt, adapter=None, params=GREEDY):
    return engine.generate([_req(prompt, adapter, params)])[0]


def _drain(engine):
    results = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.result:
                results[ev.request_id] = ev.result
    return results


def test_rows_joining_mid_flight_match_running_alone(engine):
    first = _req("The quick brown fox", "x", SamplingParams(max_new_tokens=16, ignore_eos=True))
    engine.submit(first)
    engine.step()
    engine.step()
    late = [_req("def add(a, b):", "y"), _req("SELECT name FROM", None), _req("Héllo", "z")]
    for r in late:
        engine.submit(r)
    results = _drain(engine)
    assert results[first.request_id].token_ids == _alone(engine, "The quick brown fox", "x", first.sampling).token_ids
    for r in late:
        assert results[r.request_id].token_ids == _alone(engine, r.prompt, r.adapter).token_ids
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_seeded_sampling_is_batch_independent(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    alone = _alone(engine, "The quick", "x", params)
    batch = engine.generate([_req("def f", "y"), _req("The quick", "x", params), _req("SELECT")])
    assert batch[1].token_ids == alone.token_ids
    other = _alone(engine, "The quick", "x", SamplingParams(max_new_tokens=12, temperature=0.9, seed=8, ignore_eos=True))
    assert other.token_ids != alone.token_ids


def test_cancel_frees_the_row_and_spares_the_others(engine):
    keep = _req("The quick brown", "x", SamplingParams(max_new_tokens=12, ignore_eos=True))
    doomed = _req("SELECT name", "y", SamplingParams(max_new_tokens=50, ignore_eos=True))
    waiting = _req("never runs", "z")
    engine.submit(keep)
    engine.submit(doomed)
    engine.step()
    engine.cancel(doomed.request_id)
    engine.submit(waiting)
    engine.cancel(waiting.request_id)
    results = _drain(engine)
    assert results[doomed.request_id].finish_reason == "cancelled"
    assert len(results[doomed.request_id].token_ids) < 50
    assert results[waiting.request_id].finish_reason == "cancelled"
    assert results[keep.request_id].token_ids == _alone(engine, keep.prompt, "x", keep.sampling).token_ids
    assert not engine.has_work()


def test_stop_string_ends_generation_before_it(engine):
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    full = _alone(engine, "The quick brown fox", "x", params)
    # A 3-character stop whose first occurrence is well inside the text.
    start = next(i for i in range(5, len(full.text) - 3) if full.text.find(full.text[i : i + 3]) == i)
    stop = full.text[start : start + 3]
    res = _alone(engine, "The quick brown fox", "x", dataclasses.replace(params, stop=(stop,)))
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.find(stop)]


def test_chat_messages_use_the_template(engine):
    messages = [{"role": "user", "content": "SELECT name"}]
    chat = engine.generate([GenerationRequest(messages=messages, sampling=GREEDY)])[0]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.prompt_tokens == len(engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert chat.token_ids == _alone(engine, rendered).token_ids


def test_more_adapters_than_slots_wait_and_stay_correct(tiny_llama_dir, adapter_root):
    small = _engine(tiny_llama_dir, adapter_root, slots=2)
    reqs = [_req("The quick", a) for a in ("x", "y", "z", "x", None)]
    got = small.generate(reqs)
    ref = _engine(tiny_llama_dir, adapter_root, slots=4)
    for r, g in zip(reqs, got):
        assert g.token_ids == _alone(ref, r.prompt, r.adapter).token_ids
    assert small.pool.stats.evictions >= 1


def test_unload_mid_request_keeps_its_weights_and_then_frees_the_slot(tiny_llama_dir, adapter_root):
    engine = _engine(tiny_llama_dir, adapter_root)
    expected = _alone(engine, "The quick brown", "x").token_ids
    req = _req("The quick brown", "x")
    engine.submit(req)
    engine.step()
    engine.store.unload("x")
    assert _drain(engine)[req.request_id].token_ids == expected
    assert not any(k.startswith("x@") for k in engine.pool.resident())
    # A later request reads it from disk again.
    assert _alone(engine, "The quick brown", "x").token_ids == expected


def test_host_cache_bound_holds_under_churn(tiny_llama_dir, adapter_root):
    probe = _engine(tiny_llama_dir, adapter_root)
    sizes = {n: probe.store.get(n).nbytes for n in ("x", "y", "z")}
    cap = max(sizes.values()) + min(sizes.values())  # never all three at once
    engine = _engine(tiny_llama_dir, adapter_root, host_bytes=cap)
    expected = {n: _alone(probe, "The quick", n).token_ids for n in sizes}
    for n in ["x", "y", "z", "y", "x", "z", "z", "x"]:
        assert _alone(engine, "The quick", n).token_ids == expected[n]
        assert engine.store.cache.bytes_used <= cap
    assert engine.store.stats.evictions >= 3
    resident = {k.split("@")[0] for k in engine.pool.resident()}
    assert resident <= set(engine.store.cache.names())  # evicted adapters left their slots


@pytest.mark.parametrize(
    "request_kwargs, error, match",
    [
        (dict(prompt=""), InvalidArgument, "empty"),
        (dict(prompt="a", messages=[{"role": "user", "content": "b"}]), InvalidArgument, "exactly one"),
        (dict(), InvalidArgument, "exactly one"),
        (dict(messages=[]), InvalidArgument, "empty"),
        (dict(messages=[{"role": "wizard", "content": "b"}]), InvalidArgument, "role"),
        (dict(prompt="a", adapter="missing"), NotFound, "missing"),
        (dict(prompt="a", adapter="../x"), InvalidArgument, "name"),
        (dict(prompt="a", sampling=SamplingParams(max_new_tokens=0)), InvalidArgument, "max_new_tokens"),
        (dict(prompt="a", sampling=SamplingParams(max_new_tokens=10**9)), InvalidArgument, "max_new_tokens"),
        (dict(prompt="a", sampling=SamplingParams(temperature=-1)), InvalidArgument, "temperature"),
        (dict(prompt="word " * 400), InvalidArgument, "tokens"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(engine, request_kwargs, error, match):
    before = _alone(engine, "The quick", "x")
    with pytest.raises(error, match=match):
        engine.submit(GenerationRequest(**request_kwargs))
    assert not engine.has_work()
    assert _alone(engine, "The quick", "x").token_ids == before.token_ids
