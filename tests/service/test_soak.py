"""A bounded soak against a real server: valid and invalid requests, cancels, short
deadlines, slow readers and operator churn at once. Nothing unexpected comes back,
and afterwards every gauge, row, block and place is back to zero with RSS flat.

LORAMUX_SOAK_SECONDS lengthens it (default 25 s)."""

from __future__ import annotations

import math
import os
import random
import threading
import time

import grpc

from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc
from tests.service.conftest import start_server, tiny_engine_config
from tests.service.test_robustness import _wait_idle

SECONDS = float(os.environ.get("LORAMUX_SOAK_SECONDS", "25"))
SAMPLING = pb.SamplingParams(max_tokens=6, ignore_eos=True)
MIX = pb.Mix(adapters=[pb.WeightedAdapter(name="x", weight=0.5), pb.WeightedAdapter(name="z", weight=0.5)])
GOOD = [{"adapter": "x"}, {"adapter": "y"}, {"adapter": "z"}, {"mix": MIX}]
BAD = [
    (pb.GenerateRequest(prompt="hi", adapter="../x", sampling=SAMPLING), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", adapter="ghost", sampling=SAMPLING), grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(prompt="", sampling=SAMPLING), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=math.nan)), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(repetition_penalty=1e-38, temperature=1)),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="fox " * 3000, sampling=SAMPLING), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="hi", merge="never-made", sampling=SAMPLING), grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(prompt="hi", sampling=SAMPLING,
                        mix=pb.Mix(adapters=[pb.WeightedAdapter(name="x", weight=1e30)])),
     grpc.StatusCode.INVALID_ARGUMENT),
]
# Any request may meet a full queue; that is an answer, not a failure.
BUSY = grpc.StatusCode.RESOURCE_EXHAUSTED


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Soak:
    def __init__(self, address: str, want: dict[int, list[int]]):
        self.address, self.want = address, want
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.stop = threading.Event()

    def note(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            actions = [self.good, self.bad, self.cancel_stream, self.slow_reader, self.short_deadline]
            while not self.stop.is_set():
                action = rng.choice(actions)
                try:
                    action(stub, rng)
                except grpc.RpcError as e:
                    if e.code() != BUSY:
                        self.failures.append(f"{action.__name__}: {e.code()} {e.details()}")
                    else:
                        self.note("busy")

    def good(self, stub, rng) -> None:
        i = rng.randrange(len(GOOD))
        r = stub.Generate(pb.GenerateRequest(prompt="fox", sampling=SAMPLING, **GOOD[i]), timeout=60)
        if list(r.token_ids) != self.want[i]:
            self.failures.append(f"wrong tokens for {GOOD[i]}")
        self.note("good")

    def bad(self, stub, rng) -> None:
        request, code = rng.choice(BAD)
        try:
            stub.Generate(request, timeout=30)
            self.failures.append(f"accepted a bad request: {request.prompt[:20]!r}")
        except grpc.RpcError as e:
            if e.code() not in (code, BUSY):
                self.failures.append(f"bad request got {e.code()}: {e.details()}")
        self.note("bad")

    def cancel_stream(self, stub, rng) -> None:
        call = stub.GenerateStream(pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(max_tokens=200),
                                                      **rng.choice(GOOD)), timeout=60)
        for k, _ in enumerate(call):
            if k >= rng.randrange(1, 4):
                call.cancel()
                break
        self.note("cancelled")

    def slow_reader(self, stub, rng) -> None:
        got = 0
        for msg in stub.GenerateStream(pb.GenerateRequest(prompt="fox", sampling=SAMPLING), timeout=60):
            got += len(msg.token_ids)
            time.sleep(0.05)
        if got != SAMPLING.max_tokens:
            self.failures.append(f"slow reader got {got} tokens")
        self.note("slow")

    def short_deadline(self, stub, rng) -> None:
        try:
            stub.Generate(pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(max_tokens=100)),
                          timeout=rng.uniform(0.001, 0.05))
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, BUSY):
                raise
        self.note("deadline")

    def operator(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            admin = pb_grpc.AdminStub(ch)
            cycle = 0
            while not self.stop.is_set():
                try:
                    admin.LoadAdapter(pb.LoadAdapterRequest(name="y", keep=cycle % 2 == 0))
                    admin.CreateMerge(pb.CreateMergeRequest(name="soak", mix=MIX, replace=True))
                    admin.Pin(pb.PinRequest(merge="soak"))
                    admin.Unpin(pb.UnpinRequest())
                    admin.UnloadAdapter(pb.UnloadAdapterRequest(name="y"))
                    admin.DeleteMerge(pb.DeleteMergeRequest(name="soak"))
                except grpc.RpcError as e:
                    self.failures.append(f"operator: {e.code()} {e.details()}")
                cycle += 1
                self.note("churn")


def test_soak_mixed_traffic_and_churn_leaves_nothing_behind(tiny_llama_dir, adapter_root):
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root, max_batch_rows=4), max_waiting=12)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            want = {i: list(stub.Generate(pb.GenerateRequest(prompt="fox", sampling=SAMPLING, **s)).token_ids)
                    for i, s in enumerate(GOOD)}
        soak = _Soak(srv.address, want)
        threads = [threading.Thread(target=soak.client, args=(k,)) for k in range(8)]
        threads.append(threading.Thread(target=soak.operator))
        for t in threads:
            t.start()
        time.sleep(min(5.0, SECONDS / 5))  # warm: caches, slots and allocator arenas filled
        rss_warm = _rss_bytes()
        time.sleep(SECONDS)
        soak.stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not soak.failures, soak.failures[:8]
        assert all(soak.counts.get(k, 0) >= 3 for k in ("good", "bad", "cancelled", "slow", "deadline", "churn")), \
            soak.counts
        gauges = _wait_idle(srv)
        engine = srv.server.state.engine
        assert engine.num_running == engine.num_waiting == 0 and engine.info().kv.used == 0
        assert srv.server.state.runner.outstanding == 0 and gauges["vllm:num_requests_waiting"] == 0
        growth = _rss_bytes() - rss_warm
        assert growth < 200 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB over the soak"
    finally:
        srv.stop()
