"""`loramux serve` as a real process: SIGTERM with live streams drains them,
refuses new requests and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc


def _wait_for(path, proc, timeout=60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.1)
    raise AssertionError("server did not start")


def test_sigterm_drains_live_streams_refuses_new_ones_and_exits_0(tiny_llama_dir, adapter_root, tmp_path):
    port_file = tmp_path / "ports"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loramux.cli", "serve", "--model", str(tiny_llama_dir),
         "--adapter-root", str(adapter_root), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--port-file", str(port_file), "--grace-seconds", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        port = int(_wait_for(port_file, proc).split()[0])
        address = f"127.0.0.1:{port}"
        request = pb.GenerateRequest(prompt="fox", adapter="x", sampling=pb.SamplingParams(max_tokens=240, ignore_eos=True))
        streams, started = {}, threading.Barrier(4)

        def stream(k):
            with grpc.insecure_channel(address) as ch:
                tokens, result = 0, None
                for i, msg in enumerate(pb_grpc.InferenceStub(ch).GenerateStream(request, timeout=120)):
                    if i == 0:
                        started.wait()
                    tokens += len(msg.token_ids)
                    result = msg.result if msg.HasField("result") else result
                streams[k] = (tokens, result)

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        started.wait()  # every stream has produced a token
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        with grpc.insecure_channel(address) as ch:
            try:
                pb_grpc.InferenceStub(ch).Generate(request, timeout=10)
                raise AssertionError("a new request was accepted while draining")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            try:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.RpcError as e:  # already gone: also not serving
                assert e.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        assert len(streams) == 3
        for tokens, result in streams.values():
            assert result is not None and result.finish_reason == pb.FINISH_REASON_LENGTH
            assert tokens == result.usage.completion_tokens >= 200
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_past_the_grace_cuts_streams_with_a_last_message_and_exits_in_time(
    tiny_llama_dir, adapter_root, tmp_path
):
    """More work than the grace period allows: the process still exits within the
    grace (interpreter exit included), and every request still in flight gets
    UNAVAILABLE saying so; a stream first gets a last message with what it got."""
    grace = 4.0
    port_file = tmp_path / "ports"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loramux.cli", "serve", "--model", str(tiny_llama_dir),
         "--adapter-root", str(adapter_root), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--port-file", str(port_file), "--grace-seconds", str(grace),
         "--max-batch-rows", "1", "--max-waiting", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        address = f"127.0.0.1:{int(_wait_for(port_file, proc).split()[0])}"
        request = pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(max_tokens=240, ignore_eos=True))
        outcomes, first = {}, threading.Event()

        def stream(k):
            with grpc.insecure_channel(address) as ch:
                messages = []
                try:
                    for msg in pb_grpc.InferenceStub(ch).GenerateStream(request, timeout=120):
                        messages.append(msg)
                        first.set()
                    outcomes[k] = ("OK", messages, "")
                except grpc.RpcError as e:
                    outcomes[k] = (e.code(), messages, e.details())

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(24)]
        for t in threads:
            t.start()
        assert first.wait(60)
        time.sleep(0.3)  # the rest are queued behind the one running row
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        exited = time.monotonic() - t0
        for t in threads:
            t.join(timeout=30)
        assert exited <= grace + 1.5, f"exit took {exited:.1f} s with a {grace:.0f} s grace"
        cut = [o for o in outcomes.values() if o[0] == grpc.StatusCode.UNAVAILABLE]
        assert len(outcomes) == 24 and cut, {k: o[0] for k, o in outcomes.items()}
        assert all(o[0] in ("OK", grpc.StatusCode.UNAVAILABLE) for o in outcomes.values())
        for _, messages, details in cut:
            if "shut down before this request finished" not in details:
                assert "shutting down" in details  # refused at the door, nothing started
                continue
            last = messages[-1]
            assert last.HasField("result") and last.result.finish_reason == pb.FINISH_REASON_CANCELLED
            assert last.result.usage.completion_tokens == sum(len(m.token_ids) for m in messages)
    finally:
        if proc.poll() is None:
            proc.kill()
