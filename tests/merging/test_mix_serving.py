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
