"""A tiny in-process gRPC server with canned Inference/Admin answers, for client and
CLI tests. It records every request and its metadata, checks bearer tokens when
given some, and fails on purpose for a few magic prompts:

    "bad"       → INVALID_ARGUMENT before any output
    "fail-mid"  → one chunk streamed, then RESOURCE_EXHAUSTED
    "hang"      → one chunk streamed, then waits until the client cancels (sets
                  Recorder.cancelled)
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc

STREAM_PIECES = ("Hel", "lo", " world")


@dataclass
class Recorder:
    """What the fake server saw: (rpc, request, metadata dict) per call."""

    token: str | None = None
    calls: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def record(self, rpc: str, request, context) -> None:
        metadata = dict(context.invocation_metadata())
        self.calls.append((rpc, request, metadata))
        if self.token and metadata.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def last(self, rpc: str | None = None):
        return next(c for c in reversed(self.calls) if rpc is None or c[0] == rpc)


def resolution_for(request: pb.GenerateRequest) -> pb.Resolution:
    which = request.WhichOneof("selection")
    if which == "adapter":
        return pb.Resolution(kind=pb.Resolution.KIND_ADAPTER, name=request.adapter, cache_hit=True)
    if which == "merge":
        return pb.Resolution(kind=pb.Resolution.KIND_MERGE, name=request.merge, method="ties",
                             rank=16, relative_error=0.01)
    if which == "mix":
        names = ",".join(f"{a.name}={a.weight:g}" for a in request.mix.adapters)
        return pb.Resolution(kind=pb.Resolution.KIND_MIX, name=f"{request.mix.method}({names})",
                             method=request.mix.method, merge_seconds=0.25, rank=12,
                             relative_error=0.002)
    return pb.Resolution(kind=pb.Resolution.KIND_BASE)


def canned_response(request: pb.GenerateRequest, text: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request.request_id or "req-1",
        text=text,
        token_ids=list(range(1, len(STREAM_PIECES) + 1)),
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=4, completion_tokens=len(STREAM_PIECES)),
        timings=pb.Timings(queue_seconds=0.001, time_to_first_token_seconds=0.02, total_seconds=0.1),
        resolution=resolution_for(request),
    )


class FakeInference(pb_grpc.InferenceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder

    def Generate(self, request, context):
        self.rec.record("Generate", request, context)
        if request.prompt == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is bad")
        return canned_response(request, "".join(STREAM_PIECES))

    def GenerateStream(self, request, context):
        self.rec.record("GenerateStream", request, context)
        if request.prompt == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is bad")
        if request.prompt == "hang":
            yield from self._hang(context)
            return
        for i, piece in enumerate(STREAM_PIECES):
            if request.prompt == "fail-mid" and i == 1:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
            yield pb.GenerateStreamResponse(text=piece, token_ids=[i + 1])
        yield pb.GenerateStreamResponse(result=canned_response(request, "".join(STREAM_PIECES)))


    def _hang(self, context):
        # A cancelled RPC may never resume this generator, so the termination
        # callback is what notices; `finished` tells a cancel from running out.
        finished = []
        context.add_callback(lambda: finished or self.rec.cancelled.set())
        yield pb.GenerateStreamResponse(text=STREAM_PIECES[0], token_ids=[1])
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        finished.append(context.is_active())


ADAPTERS = [
    pb.AdapterInfo(name="sql", rank=8, bytes=3 << 20, modules=210, pinned=True,
                   base_model="SmolLM2-135M-Instruct", content_hash="ab" * 32),
    pb.AdapterInfo(name="chat", rank=16, bytes=6 << 20, modules=210,
                   base_model="SmolLM2-135M-Instruct", content_hash="cd" * 32),
]


class FakeAdmin(pb_grpc.AdminServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder
        self.merges: dict[str, pb.MergeInfo] = {}

    def ListAdapters(self, request, context):
        self.rec.record("ListAdapters", request, context)
        return pb.ListAdaptersResponse(adapters=ADAPTERS)

    def LoadAdapter(self, request, context):
        self.rec.record("LoadAdapter", request, context)
        found = [a for a in ADAPTERS if a.name == request.name]
        if not found:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no adapter named {request.name!r}")
        info = pb.AdapterInfo()
        info.CopyFrom(found[0])
        info.pinned = request.keep
        return info

    def UnloadAdapter(self, request, context):
        self.rec.record("UnloadAdapter", request, context)
        return pb.UnloadAdapterResponse()

    def CreateMerge(self, request, context):
        self.rec.record("CreateMerge", request, context)
        if request.name in self.merges and not request.replace:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"merge {request.name!r} exists")
        info = pb.MergeInfo(name=request.name, mix=request.mix, description=request.mix.method,
                            rank=12, relative_error=0.003, merge_seconds=0.5)
        self.merges[request.name] = info
        return info

    def ListMerges(self, request, context):
        self.rec.record("ListMerges", request, context)
        return pb.ListMergesResponse(merges=list(self.merges.values()))

    def DeleteMerge(self, request, context):
        self.rec.record("DeleteMerge", request, context)
        return pb.DeleteMergeResponse()

    def Pin(self, request, context):
        self.rec.record("Pin", request, context)
        label = request.adapter or request.merge or request.mix.method
        return pb.PinResponse(pinned=label, swap_seconds=0.4)

    def Unpin(self, request, context):
        self.rec.record("Unpin", request, context)
        return pb.PinResponse(swap_seconds=0.3)

    def Export(self, request, context):
        self.rec.record("Export", request, context)
        return pb.ExportResponse(path=f"/exports/{request.destination}", bytes=1234, rank=8,
                                 relative_error=0.0)

    def ServerInfo(self, request, context):
        self.rec.record("ServerInfo", request, context)
        return pb.ServerInfoResponse(
            version="0.1.0", base_model="SmolLM2-135M-Instruct", model_fingerprint="f00d",
            device="cpu", dtype="float32", quantization="none",
            adapter_cache=pb.CacheUsage(capacity_bytes=1 << 30, used_bytes=9 << 20, entries=2),
            merge_cache=pb.CacheUsage(capacity_bytes=1 << 29, used_bytes=0, entries=0),
            device_slots=8, device_slots_used=1, max_rank=64, max_batch_rows=32,
            merge_methods=["linear", "ties"],
        )


@dataclass
class FakeServer:
    target: str
    inference: Recorder
    admin: Recorder
    admin_servicer: FakeAdmin


def start_fake_server(*, token=None, admin_token=None, credentials=None, host="127.0.0.1"):
    """(grpc.Server, FakeServer) listening on a free loopback port."""
    inference, admin = Recorder(token), Recorder(admin_token)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    admin_servicer = FakeAdmin(admin)
    pb_grpc.add_InferenceServicer_to_server(FakeInference(inference), server)
    pb_grpc.add_AdminServicer_to_server(admin_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(f"{host}:0")
    else:
        port = server.add_secure_port(f"{host}:0", credentials)
    server.start()
    return server, FakeServer(f"{host}:{port}", inference, admin, admin_servicer)


@pytest.fixture
def fake_server_factory():
    """Call it with start_fake_server's keywords; every server stops after the test."""
    servers = []

    def start(**kwargs) -> FakeServer:
        server, fake = start_fake_server(**kwargs)
        servers.append(server)
        return fake

    yield start
    for server in servers:
        server.stop(grace=None)


@pytest.fixture
def fake_server(fake_server_factory) -> FakeServer:
    return fake_server_factory()
