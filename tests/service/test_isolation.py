"""Against a real server on loopback: a poisoned or extreme request ends alone and
its batch-mates get the tokens they get on a quiet server; mixes are merged in
their own lane, bounded, and abandoned when their caller leaves; malformed bytes
and odd credentials get clear answers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import pytest

from loramux.adapters.types import LoraAdapter, LoraModule
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc
from tests.service.conftest import start_server, tiny_engine_config
from tests.service.test_robustness import _wait_idle

STEADY = pb.SamplingParams(max_tokens=8, ignore_eos=True)


def _poison(server) -> None:
    """An adapter whose weights slipped past the load checks and overflow float32."""
    store = server.server.state.engine.store
    x = store.get("x")
    modules = {k: LoraModule(A=m.A, B=m.B * 1e30, scale=m.scale) for k, m in x.modules.items()}
    store.cache.get_or_load("poison", lambda: LoraAdapter("poison", modules, "poison-hash"), pin=True)


def _mix(*weights, method="linear", **params) -> pb.Mix:
    mix = pb.Mix(method=method, adapters=[pb.WeightedAdapter(name=n, weight=w) for n, w in weights])
    for k, v in params.items():
        mix.params[k].number = v
    return mix


VICTIMS = [
    pb.GenerateRequest(prompt="fox", sampling=STEADY),
    pb.GenerateRequest(prompt="SELECT", adapter="x", sampling=STEADY),
    pb.GenerateRequest(prompt="def", adapter="y", sampling=pb.SamplingParams(max_tokens=8, temperature=0.8, seed=3,
                                                                            ignore_eos=True)),
    pb.GenerateRequest(prompt="{", mix=_mix(("x", 0.5), ("z", 0.5)), sampling=STEADY),
]

POISONS = {
    "subnormal temperature": (pb.SamplingParams(max_tokens=8, temperature=1e-45, ignore_eos=True), {}, grpc.StatusCode.OK),
    "tiny repetition penalty": (
        pb.SamplingParams(max_tokens=8, temperature=1.0, repetition_penalty=1e-38), {}, grpc.StatusCode.INVALID_ARGUMENT
    ),
    "huge mix weight": (STEADY, {"mix": _mix(("x", 1e30), ("y", 1.0))}, grpc.StatusCode.INVALID_ARGUMENT),
    "weights that overflow": (STEADY, {"adapter": "poison"}, grpc.StatusCode.FAILED_PRECONDITION),
    "weights that overflow, sampled": (
        pb.SamplingParams(max_tokens=8, temperature=1.0, seed=1), {"adapter": "poison"}, grpc.StatusCode.FAILED_PRECONDITION
    ),
}


@pytest.fixture(scope="module")
def small_server(tiny_llama_dir, adapter_root):
    """Two rows, two queued: the limits under which leaked places brick a server."""
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root, max_batch_rows=2), max_waiting=6)
    _poison(srv)
    yield srv
    srv.stop()


async def _call(stub, request, timeout=60):
    try:
        return await stub.Generate(request, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e


@pytest.mark.parametrize("case", list(POISONS))
def test_a_poison_request_ends_alone_and_its_batch_mates_are_untouched(small_server, case):
    sampling, selection, code = POISONS[case]
    with grpc.insecure_channel(small_server.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        want = [list(stub.Generate(v).token_ids) for v in VICTIMS]

    async def run():
        async with grpc.aio.insecure_channel(small_server.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            poison = pb.GenerateRequest(prompt="fox", sampling=sampling, **selection)
            calls = [_call(stub, poison) for _ in range(4)] + [_call(stub, v) for v in VICTIMS]
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    for r in results[:4]:
        got = grpc.StatusCode.OK if isinstance(r, pb.GenerateResponse) else r.code()
        assert got == code, r
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            assert "non-finite logits" in r.details() and "other requests are unaffected" in r.details()
    assert [list(r.token_ids) for r in results[4:]] == want
    _wait_idle(small_server)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        assert _row_errors(small_server) >= 4


def _row_errors(server) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('loramux_row_errors_total{kind="numeric"}'))


def test_malformed_request_bytes_get_invalid_argument(small_server):
    with grpc.insecure_channel(small_server.address) as ch:
        for method in ("/loramux.v1.Inference/Generate", "/loramux.v1.Admin/ListAdapters"):
            call = ch.unary_unary(method)  # raw bytes in, raw bytes out
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff\xff\x0f", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "is not a valid loramux.v1." in err.value.details()
            assert "Error" not in err.value.details()  # no Python class names
        stream = ch.unary_stream("/loramux.v1.Inference/GenerateStream")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(b"\x0a\xff\xff\xff\xff\xff", timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert pb_grpc.InferenceStub(ch).Generate(VICTIMS[0]).usage.completion_tokens == 8


# ---- mixes: their own lane, bounded, abandoned when the caller leaves -------------


class _HeldMerges:
    """Holds every merge of a live server's merge service until released, calling
    the request's check as a real merge does between modules."""

    def __init__(self, merges):
        self.merges, self.original = merges, merges.resolve
        self.release, self.entered = threading.Event(), threading.Semaphore(0)
        self.specs = []  # in the order their merges began
        merges.resolve = self

    def __call__(self, spec, check=None):
        self.specs.append(spec)
        self.entered.release()
        while not self.release.wait(0.01):
            if check is not None:
                check()
        return self.original(spec, check=check)

    def restore(self):
        self.release.set()
        self.merges.resolve = self.original


def _abandoned(server, reason) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    line = f'loramux_merges_abandoned_total{{reason="{reason}"}}'
    return sum(float(t.rsplit(" ", 1)[1]) for t in text.splitlines() if t.startswith(line))


WEIGHTS = (0.1, 0.2, 0.3, 0.4)


def test_base_requests_never_wait_behind_merges_and_a_left_merge_stops(tiny_llama_dir, adapter_root):
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root))
    held = _HeldMerges(srv.server.state.engine.merges)
    try:
        async def run():
            async with grpc.aio.insecure_channel(srv.address) as ch:
                stub = pb_grpc.InferenceStub(ch)
                mixes = [
                    asyncio.ensure_future(_call(stub, pb.GenerateRequest(
                        prompt="fox", sampling=STEADY, mix=_mix(("x", w), ("y", 1 - w), method="ties", density=0.5))))
                    for w in WEIGHTS
                ]
                await asyncio.get_running_loop().run_in_executor(None, held.entered.acquire)
                t0 = time.monotonic()
                base = await _call(stub, VICTIMS[0], timeout=10)
                adapter = await _call(stub, VICTIMS[1], timeout=10)
                waited = time.monotonic() - t0
                assert isinstance(base, pb.GenerateResponse) and isinstance(adapter, pb.GenerateResponse)
                assert not any(m.done() for m in mixes), "the merges were not held"
                # The caller of the merge being held leaves, and one still queued: the
                # held merge must stop, the queued one never start.
                running = WEIGHTS.index(held.specs[0].weights[0])
                left = [running, (running + 1) % len(mixes)]
                for i in left:
                    mixes[i].cancel()
                await asyncio.sleep(0.5)
                held.release.set()
                done = await asyncio.gather(*(m for i, m in enumerate(mixes) if i not in left))
                return waited, done

        waited, done = asyncio.run(run())
        assert waited < 5.0
        assert all(isinstance(r, pb.GenerateResponse) and r.usage.completion_tokens == 8 for r in done), done
        # The time spent waiting for and in the merge is part of the request's time.
        assert all(r.timings.total_seconds >= 0.5 and r.timings.queue_seconds >= 0.5 for r in done)
        assert _abandoned(srv, "caller_left") == 1
        assert len(held.specs) == 3  # the queued one whose caller left never started
        _wait_idle(srv)
    finally:
        held.restore()
        srv.stop()


def test_a_merge_past_its_time_is_refused_with_the_alternatives(tiny_llama_dir, adapter_root):
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root))
    srv.server.state.runner.limits.merge_timeout = 0.3
    held = _HeldMerges(srv.server.state.engine.merges)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(prompt="fox", sampling=STEADY,
                                                 mix=_mix(("x", 0.3), ("y", 0.7), method="ties", density=0.5)))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "named merge" in err.value.details() and "pin" in err.value.details()
            assert _abandoned(srv, "timeout") == 1
            held.restore()
            ok = stub.Generate(pb.GenerateRequest(prompt="fox", sampling=STEADY,
                                                  mix=_mix(("x", 0.3), ("y", 0.7), method="ties", density=0.5)))
            assert ok.usage.completion_tokens == 8 and ok.resolution.merge_seconds >= 0
        _wait_idle(srv)
    finally:
        held.restore()
        srv.stop()


# ---- credentials --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(tiny_llama_dir, adapter_root, scheme):
    from loramux.service.main import Secrets

    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root), Secrets("api-secret", None))
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            ok = stub.Generate(VICTIMS[0], metadata=(("authorization", f"{scheme} api-secret"),))
            assert ok.usage.completion_tokens == 8
            for bad in ("Basic api-secret", f"{scheme}api-secret", "api-secret"):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(VICTIMS[0], metadata=(("authorization", bad),))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


def test_every_finished_request_logs_one_line(small_server, caplog):
    caplog.set_level(logging.INFO, logger="loramux.service.runner")
    with grpc.insecure_channel(small_server.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        ok = stub.Generate(VICTIMS[1])
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt="fox", adapter="poison", sampling=STEADY))
    _wait_idle(small_server)
    lines = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert len(lines) == 2
    good, bad = sorted(lines, key=lambda r: r.status != "OK")
    assert (good.selection, good.status, good.completion_tokens, good.finish) == ("adapter:x", "OK", 8, "length")
    assert good.prompt_tokens == ok.usage.prompt_tokens and 0 < good.ttft_s <= good.total_s
    assert (bad.selection, bad.status, bad.finish) == ("adapter:poison", "NumericFailure", "error")


def test_a_step_that_raises_ends_its_rows_and_the_server_goes_on(small_server):
    """A bug or device fault inside a step (injected here: the forward raises once)
    ends the requests in the engine with INTERNAL; none hangs, every place is
    returned, and the next requests are served."""
    runner = small_server.server.state.engine.runner
    original = runner.forward

    def fail_once(inputs):
        runner.forward = original
        raise RuntimeError("injected device fault")

    runner.forward = fail_once
    try:
        async def run():
            async with grpc.aio.insecure_channel(small_server.address) as ch:
                stub = pb_grpc.InferenceStub(ch)
                return await asyncio.gather(*(_call(stub, v, timeout=30) for v in VICTIMS))

        results = asyncio.run(run())
    finally:
        runner.forward = original
    failed = [r for r in results if not isinstance(r, pb.GenerateResponse)]
    assert failed and all(r.code() == grpc.StatusCode.INTERNAL for r in failed)
    _wait_idle(small_server)
    with grpc.insecure_channel(small_server.address) as ch:
        assert pb_grpc.InferenceStub(ch).Generate(VICTIMS[0]).usage.completion_tokens == 8
