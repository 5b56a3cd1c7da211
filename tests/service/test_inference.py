"""Inference over a real gRPC server on loopback: results equal the engine's
in-process results, for an adapter, a mix and none, in concurrent streams."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from loramux.app import build_engine
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.merging.spec import MixSpec
from loramux_api.v1 import loramux_pb2 as pb
from tests.service.conftest import tiny_engine_config

PROMPT = "The quick brown fox"
TOKENS = 8


def _request(**selection) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=TOKENS, ignore_eos=True), **selection
    )


def _mix_pb() -> pb.Mix:
    mix = pb.Mix(method="ties", adapters=[pb.WeightedAdapter(name="x", weight=0.7),
                                           pb.WeightedAdapter(name="y", weight=0.5)])
    mix.params["density"].number = 0.5
    return mix


@pytest.fixture(scope="module")
def in_process(tiny_llama_dir, adapter_root):
    """The same requests run by an engine in this process (the reference)."""
    engine = build_engine(tiny_engine_config(tiny_llama_dir, adapter_root))
    sampling = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    mix = MixSpec.build([("x", 0.7), ("y", 0.5)], "ties", {"density": 0.5})
    selections = {"none": {}, "x": {"adapter": "x"}, "y": {"adapter": "y"}, "mix": {"mix": mix}}
    results = engine.generate([GenerationRequest(prompt=PROMPT, sampling=sampling, **s) for s in selections.values()])
    return {k: r.token_ids for k, r in zip(selections, results)}


def _stream(inference, request) -> tuple[list[int], pb.GenerateResponse]:
    tokens, result = [], None
    for msg in inference.GenerateStream(request):
        tokens += msg.token_ids
        if msg.HasField("result"):
            result = msg.result
    return tokens, result


def test_concurrent_streams_equal_in_process_results(inference, in_process):
    requests = {"none": _request(), "x": _request(adapter="x"), "y": _request(adapter="y"),
                "mix": _request(mix=_mix_pb())}
    with ThreadPoolExecutor(8) as pool:
        futures = {k: pool.submit(_stream, inference, r) for k, r in list(requests.items()) * 2}
        got = {k: f.result() for k, f in futures.items()}
    for key, (tokens, result) in got.items():
        assert tokens == in_process[key] == list(result.token_ids), key
        assert result.finish_reason == pb.FINISH_REASON_LENGTH
        assert result.usage.completion_tokens == TOKENS and result.usage.prompt_tokens > 0
        t = result.timings
        assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds
    assert got["x"][1].resolution.kind == pb.Resolution.KIND_ADAPTER
    mix = got["mix"][1].resolution
    assert mix.kind == pb.Resolution.KIND_MIX and mix.method == "ties" and mix.rank > 0
    assert mix.relative_error >= 0


def test_unary_generate_equals_stream(inference, in_process):
    r = inference.Generate(_request(adapter="x"))
    assert list(r.token_ids) == in_process["x"]
    assert r.resolution.name == "x" and r.resolution.cache_hit  # streamed above


def test_chat_messages_and_caller_request_id(inference):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hello")])
    r = inference.Generate(pb.GenerateRequest(chat=chat, request_id="mine-1",
                                              sampling=pb.SamplingParams(max_tokens=3)))
    assert r.request_id == "mine-1" and r.usage.completion_tokens <= 3


def test_named_merge_is_served_like_the_inline_mix(inference, admin, in_process):
    info = admin.CreateMerge(pb.CreateMergeRequest(name="xy-ties", mix=_mix_pb()))
    assert info.rank > 0 and info.description.startswith("ties(")
    r = inference.Generate(_request(merge="xy-ties"))
    assert list(r.token_ids) == in_process["mix"]
    assert r.resolution.kind == pb.Resolution.KIND_MERGE and r.resolution.cache_hit
    listed = admin.ListMerges(pb.ListMergesRequest()).merges
    assert [m.name for m in listed] == ["xy-ties"] and listed[0].rank == info.rank
    assert listed[0].relative_error == info.relative_error and listed[0].mix.method == "ties"
    admin.DeleteMerge(pb.DeleteMergeRequest(name="xy-ties"))
    assert not admin.ListMerges(pb.ListMergesRequest()).merges
