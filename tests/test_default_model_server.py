"""End to end on the embedded default model: a real server on loopback, the real
Python client, concurrent streams with an adapter, a mix and none; the results
equal the engine's in-process results."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, MergeConfig, ModelConfig, ServerConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.merging.spec import MixSpec
from loramux.model.loader import ensure_default_model
from loramux.service.main import ServerThread
from loramux_client import Client, Mix
from tests.conftest import make_adapter

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name three primary colours."}]
TOKENS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    default_dir = ensure_default_model(ModelConfig().cache_dir)
    root = tmp_path_factory.mktemp("default-adapters")
    make_adapter(default_dir, root / "a", r=16, alpha=32, seed=21, std=0.02)
    make_adapter(default_dir, root / "b", r=8, alpha=8, seed=22, std=0.02, targets=("q_proj", "v_proj"))
    # A dense (dare_ties) mix at rank 64 loses far more than the default 1 % budget, which
    # would refuse it: at most √(1 − 64/576) ≈ 0.94 of it is lost, so 0.99 serves it.
    cfg = EngineConfig(model=ModelConfig(device="cpu"), adapters=AdapterConfig(roots=[root]),
                       merges=MergeConfig(error_budget=0.99))
    server = ServerThread(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1), lambda: build_engine(cfg)).start()
    yield cfg, server
    server.stop()


def test_streams_with_adapter_mix_and_none_equal_in_process(setup):
    cfg, server = setup
    selections = {"none": {}, "a": {"adapter": "a"}, "b": {"adapter": "b"},
                  "mix": {"mix": Mix({"a": 0.7, "b": 0.5}, method="dare_ties", params={"density": 0.6}, seed=3)}}
    engine_sel = {**selections, "mix": {"mix": MixSpec.build([("a", 0.7), ("b", 0.5)], "dare_ties", {"density": 0.6}, 3)}}
    engine = build_engine(cfg)
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    want = engine.generate([GenerationRequest(messages=CHAT, sampling=sampling, **s) for s in engine_sel.values()])
    want = {k: r for k, r in zip(selections, want)}

    def run(key):
        with Client(server.address) as client:
            chunks = list(client.stream(messages=CHAT, max_tokens=TOKENS, ignore_eos=True, **selections[key]))
        return "".join(c.text for c in chunks), chunks[-1].result

    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(selections, pool.map(run, selections)))
    for key, (text, result) in got.items():
        assert list(result.token_ids) == want[key].token_ids, key
        assert text == result.text == want[key].text, key
    assert got["mix"][1].resolution.kind == "mix" and got["mix"][1].resolution.method == "dare_ties"
    assert len({tuple(r.token_ids) for _, r in got.values()}) > 1  # the adapters matter
