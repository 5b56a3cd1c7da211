"""The committed skill adapters carry their skill: on a few test items of their task
they score far above the base model (default model, greedy, in-process engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.skills.tasks import make_task

pytestmark = pytest.mark.slow

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"
ITEMS = 6


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineConfig(model=ModelConfig(device="cpu"), adapters=AdapterConfig(roots=[ADAPTERS])))


@pytest.mark.parametrize("task_name,at_least", [("sql", 3), ("json", 4)])
def test_committed_adapter_scores_far_above_the_base(engine, task_name, at_least):
    task = make_task(task_name)
    items = task.examples("test")[:ITEMS]
    sampling = SamplingParams(max_new_tokens=80)
    requests = [GenerationRequest(messages=[dict(m) for m in ex.prompt_messages], sampling=sampling, adapter=adapter)
                for adapter in (task_name, None) for ex in items]
    results = engine.generate(requests)
    tuned = sum(task.score(r.text, ex) for r, ex in zip(results[:ITEMS], items))
    base = sum(task.score(r.text, ex) for r, ex in zip(results[ITEMS:], items))
    assert tuned >= at_least and tuned >= base + 3, (tuned, base)
