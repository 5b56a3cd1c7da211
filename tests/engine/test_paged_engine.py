"""Engine v2: packed steps over the paged KV cache, chunked prefill, preemption,
prefix caching, and block accounting returning to zero."""

from __future__ import annotations

import pytest

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, KvCacheConfig, ModelConfig, SlotConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.errors import InvalidArgument
from tests.conftest import make_adapter

LONG = "The quick brown fox jumps over the lazy dog. " * 6
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def _engine(model_dir, root, *, kv_blocks=256, block_size=4, chunk=64, batch_tokens=512, **kw):
    probe = build_engine(_config(model_dir, root, 1 << 20, block_size, chunk, batch_tokens, **kw))
    per_block = probe.kv.geometry.bytes_per_token * block_size
    return build_engine(_config(model_dir, root, kv_blocks * per_block, block_size, chunk, batch_tokens, **kw))


def _config(model_dir, root, kv_bytes, block_size, chunk, batch_tokens, prefix_caching=True, rows=8):
    return EngineConfig(
        model=ModelConfig(path=model_dir),
        adapters=AdapterConfig(roots=[root], max_rank=16),
        slots=SlotConfig(num_slots=4),
        kv_cache=KvCacheConfig(bytes=kv_bytes, block_size=block_size, prefix_caching=prefix_caching),
        max_batch_rows=rows,
        max_batch_tokens=batch_tokens,
        prefill_chunk_tokens=chunk,
    )


def _req(prompt, adapter=None, params=GREEDY):
    return GenerationRequest(prompt=prompt, adapter=adapter, sampling=params)


def _run(engine, requests):
    """Submit all, step to the end; results by id and the per-step token events."""
    for r in requests:
        engine.submit(r)
    results, steps = {}, []
    while engine.has_work():
        events = engine.step()
        steps.append({ev.request_id for ev in events if ev.token_id is not None})
        results.update({ev.request_id: ev.result for ev in events if ev.result})
    return results, steps


def _assert_idle(engine):
    kv = engine.info().kv
    assert kv.used == 0 and kv.used + kv.cached + kv.free == kv.blocks
    assert engine.num_running == 0 and engine.num_waiting == 0 and not engine.has_work()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, adapter_root):
    """A roomy engine: every request alone, prefilled in one step."""
    return _engine(tiny_llama_dir, adapter_root, chunk=512, prefix_caching=False)


def _alone(engine, req):
    return engine.generate([_req(req.prompt, req.adapter, req.sampling)])[0].token_ids


def test_a_long_prompt_is_chunked_while_others_keep_decoding(tiny_llama_dir, adapter_root, reference):
    engine = _engine(tiny_llama_dir, adapter_root, chunk=8)
    first = [_req("SELECT name FROM", "x"), _req("def add(a, b):", None)]
    for r in first:
        engine.submit(r)
    engine.step()  # both prefilled, decoding from now on
    long = _req(LONG, "y", SamplingParams(max_new_tokens=4, ignore_eos=True))
    prompt_len = len(engine.tokenizer(LONG)["input_ids"])
    assert prompt_len > 40
    results, steps = _run(engine, [long])
    # The long prompt took several steps (8 tokens each) and the decoding rows got a
    # token in every one of them.
    chunked = -(-prompt_len // 8)
    assert all({r.request_id for r in first} <= s for s in steps[: chunked - 1])
    for r in [*first, long]:
        assert results[r.request_id].token_ids == _alone(reference, r)
    _assert_idle(engine)


def test_preempted_rows_recompute_to_the_same_tokens(tiny_llama_dir, adapter_root, reference):
    # 10 blocks of 4 tokens; each row needs up to 5 (7-token prompt + 12 new), so
    # three rows cannot all stay resident.
    engine = _engine(tiny_llama_dir, adapter_root, kv_blocks=10, prefix_caching=False)
    reqs = [_req("SELECT name FROM", "x"), _req("The quick brown", "y"), _req("def add(a, b):", None)]
    results, _ = _run(engine, reqs)
    assert engine.info().kv.stats.preemptions > 0
    for r in reqs:
        assert results[r.request_id].token_ids == _alone(reference, r)
        assert results[r.request_id].finish_reason == "length"
    _assert_idle(engine)


def test_a_row_that_cannot_fit_the_cache_is_refused_up_front(tiny_llama_dir, adapter_root):
    engine = _engine(tiny_llama_dir, adapter_root, kv_blocks=4)
    with pytest.raises(InvalidArgument, match="KV cache"):
        engine.submit(_req("SELECT name FROM", params=SamplingParams(max_new_tokens=40)))
    _assert_idle(engine)


def test_prefix_hits_give_the_same_tokens_as_misses(tiny_llama_dir, adapter_root, reference):
    engine = _engine(tiny_llama_dir, adapter_root)
    stats = engine.info().kv.stats
    req = _req(LONG, "x")
    miss = engine.generate([req])[0]
    hits_before = stats.prefix_hits
    hit = engine.generate([_req(LONG, "x")])[0]
    assert stats.prefix_hits - hits_before >= 40  # most of the prompt came from cache
    assert hit.token_ids == miss.token_ids == _alone(reference, req)
    _assert_idle(engine)


def test_other_weights_never_reuse_cached_kv(tiny_llama_dir, adapter_root):
    engine = _engine(tiny_llama_dir, adapter_root)
    stats = engine.info().kv.stats
    engine.generate([_req(LONG, "x")])
    for selection in ({"adapter": "y"}, {}):
        before = stats.prefix_hits
        engine.generate([GenerationRequest(prompt=LONG, sampling=GREEDY, **selection)])
        assert stats.prefix_hits == before, selection
    before = stats.prefix_hits
    engine.generate([_req(LONG)])  # the base prompt again: now it hits
    assert stats.prefix_hits > before
    engine.pin(GenerationRequest(adapter="z"))
    before = stats.prefix_hits
    engine.generate([_req(LONG)])  # the same tokens on pinned weights: a new epoch
    assert stats.prefix_hits == before
    engine.unpin()
    _assert_idle(engine)


def test_a_changed_adapter_does_not_reuse_its_old_kv(tiny_llama_dir, tmp_path):
    root = tmp_path / "adapters"
    make_adapter(tiny_llama_dir, root / "w", seed=5)
    engine = _engine(tiny_llama_dir, root)
    stats = engine.info().kv.stats
    old = engine.generate([_req(LONG, "w")])[0]
    engine.unload_adapter("w")
    make_adapter(tiny_llama_dir, root / "w", seed=6)  # same name, new weights
    before = stats.prefix_hits
    new = engine.generate([_req(LONG, "w")])[0]
    assert stats.prefix_hits == before
    assert new.token_ids != old.token_ids
    _assert_idle(engine)


def test_blocks_return_after_cancels_in_prefill_decode_and_queue(tiny_llama_dir, adapter_root):
    engine = _engine(tiny_llama_dir, adapter_root, chunk=8, kv_blocks=40, rows=2)
    long = _req(LONG, "x", SamplingParams(max_new_tokens=30, ignore_eos=True))
    decoding = _req("SELECT name FROM", "y", SamplingParams(max_new_tokens=30, ignore_eos=True))
    queued = _req("def add(a, b):", None)
    engine.submit(decoding)
    engine.step()
    engine.submit(long)
    engine.submit(queued)
    engine.step()  # long is mid-prefill, queued waits for a row
    assert engine.num_running == 2 and engine.num_waiting == 1
    assert engine.info().kv.used > 0
    for r in (long, decoding, queued):
        engine.cancel(r.request_id)
    results, _ = _run(engine, [])
    assert {results[r.request_id].finish_reason for r in (long, decoding, queued)} == {"cancelled"}
    _assert_idle(engine)


def test_the_cache_is_written_in_place(tiny_llama_dir, adapter_root):
    engine = _engine(tiny_llama_dir, adapter_root)
    pointers = [t.data_ptr() for t in engine.kv.keys + engine.kv.values]
    engine.generate([_req(LONG, "x"), _req("SELECT", None), _req("def", "y")])
    assert [t.data_ptr() for t in engine.kv.keys + engine.kv.values] == pointers
    _assert_idle(engine)


def test_kv_metrics_in_info(tiny_llama_dir, adapter_root):
    engine = _engine(tiny_llama_dir, adapter_root, kv_blocks=64)
    engine.submit(_req(LONG, "x"))
    engine.step()
    kv = engine.info().kv
    prompt_len = len(engine.tokenizer(LONG)["input_ids"])
    assert kv.blocks == 64 and kv.used == -(-prompt_len // 4)
    assert 0 < kv.usage == kv.used / 64 <= 1
    assert engine.info().last_step_tokens == prompt_len
    _run(engine, [])
    _assert_idle(engine)


def test_a_prompt_longer_than_the_step_budget_alone(tiny_llama_dir, adapter_root, reference):
    # 8 tokens a step and nothing else running: several steps compute prompt
    # chunks only and sample nothing.
    engine = _engine(tiny_llama_dir, adapter_root, chunk=8, batch_tokens=8, rows=4)
    req = _req(LONG, "x")
    results, steps = _run(engine, [req])
    assert sum(1 for s in steps if not s) >= 5  # steps without a token
    assert results[req.request_id].token_ids == _alone(reference, req)
    _assert_idle(engine)
