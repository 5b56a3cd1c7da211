"""Cancellation, deadlines, admission limits and operator churn under traffic:
nothing leaks, nothing unrelated fails, and the server keeps answering."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest

from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc
from tests.service.conftest import start_server, tiny_engine_config

LONG = pb.SamplingParams(max_tokens=200, ignore_eos=True)


def _gauges(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_idle(server, timeout=15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        g = _gauges(server)
        if (
            g["loramux_requests_running"] == g["loramux_requests_waiting"] == g["vllm:kv_cache_usage_perc"] == 0
            and server.server.state.runner.outstanding == 0
        ):
            return g  # no row, no owned KV block left behind
        time.sleep(0.05)
    raise AssertionError(f"server did not go idle: {_gauges(server)}")


def _prompt_answer_seconds(inference) -> float:
    t0 = time.monotonic()
    r = inference.Generate(pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=4)), timeout=10)
    assert r.usage.completion_tokens >= 1
    return time.monotonic() - t0


def test_200_streams_cancelled_mid_generation_free_everything(tiny_server, inference):
    adapters = ["x", "y", "z", None]

    async def one(stub, i):
        sel = {"adapter": adapters[i % 4]} if adapters[i % 4] else {}
        call = stub.GenerateStream(pb.GenerateRequest(prompt=f"fox {i}", sampling=LONG, **sel))
        got = 0
        async for msg in call:
            got += len(msg.token_ids)
            if got >= 2:
                call.cancel()
                return got
        return got

    async def run():
        async with grpc.aio.insecure_channel(tiny_server.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            return await asyncio.gather(*(one(stub, i) for i in range(200)), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, int) and 2 <= r < 200 for r in results), results[:5]
    _wait_idle(tiny_server)
    engine = tiny_server.server.state.engine
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert _prompt_answer_seconds(inference) < 5


def test_deadline_exceeded_frees_the_rows(tiny_server, inference):
    def one():
        with pytest.raises(grpc.RpcError) as err:
            list(inference.GenerateStream(pb.GenerateRequest(prompt="fox", sampling=LONG), timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _wait_idle(tiny_server)
    assert _prompt_answer_seconds(inference) < 5


def test_full_queue_answers_resource_exhausted_and_recovers(tiny_llama_dir, adapter_root):
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root, max_batch_rows=2), max_waiting=2)
    try:
        async def run():
            async with grpc.aio.insecure_channel(srv.address) as ch:
                stub = pb_grpc.InferenceStub(ch)
                calls = [stub.Generate(pb.GenerateRequest(prompt="fox", sampling=LONG)) for _ in range(12)]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(run())
        ok = [r for r in results if isinstance(r, pb.GenerateResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(ok) + len(refused) == 12 and len(ok) >= 4 and refused
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert all("limit" in r.details() for r in refused)
        _wait_idle(srv)
        with grpc.insecure_channel(srv.address) as ch:
            assert _prompt_answer_seconds(pb_grpc.InferenceStub(ch)) < 5
    finally:
        srv.stop()


def test_operator_churn_while_8_clients_generate_fails_no_request(tiny_server, inference, admin):
    """load / unload / pin / unpin / merges in a loop; every generation succeeds and
    its tokens equal the same request's tokens on a quiet server."""
    sampling = pb.SamplingParams(max_tokens=6, ignore_eos=True)
    mix = pb.Mix(adapters=[pb.WeightedAdapter(name="x", weight=0.5), pb.WeightedAdapter(name="z", weight=0.5)])
    selections = [{}, {"adapter": "x"}, {"adapter": "y"}, {"adapter": "z"}, {"mix": mix}]
    want = {i: list(inference.Generate(pb.GenerateRequest(prompt="fox", sampling=sampling, **s)).token_ids)
            for i, s in enumerate(selections) if i}
    stop, failures, counts = threading.Event(), [], [0] * 8

    def client(k):
        i = 0
        while not stop.is_set() or i < 3:
            idx = (k + i) % len(selections)
            try:
                r = inference.Generate(pb.GenerateRequest(prompt="fox", sampling=sampling, **selections[idx]), timeout=60)
                if idx and list(r.token_ids) != want[idx]:
                    failures.append(f"wrong tokens for {selections[idx]}")
            except grpc.RpcError as e:
                failures.append(f"{e.code()}: {e.details()}")
            counts[k] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        for cycle in range(6):
            admin.LoadAdapter(pb.LoadAdapterRequest(name="x", keep=cycle % 2 == 0))
            admin.Pin(pb.PinRequest(adapter="y"))
            admin.CreateMerge(pb.CreateMergeRequest(name="churn", mix=mix, replace=True))
            admin.Unpin(pb.UnpinRequest())
            admin.Pin(pb.PinRequest(merge="churn"))
            admin.UnloadAdapter(pb.UnloadAdapterRequest(name="x"))
            admin.Unpin(pb.UnpinRequest())
            admin.DeleteMerge(pb.DeleteMergeRequest(name="churn"))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert sum(counts) >= 24
    _wait_idle(tiny_server)
