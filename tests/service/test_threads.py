"""The server keeps one OpenMP thread team, the engine thread's: the model loads on
a thread that ends with the load, and admission lanes run torch single-threaded
(a second team makes GNU OpenMP stop spinning and slows every decode step)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from loramux.app import build_engine
from loramux.config import ServerConfig
from loramux.service.main import ServerThread
from loramux.service.runner import ENGINE_THREADS, run_alone
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc
from tests.service.conftest import tiny_engine_config


@pytest.mark.skipif(ENGINE_THREADS < 2, reason="one core: every thread runs torch single-threaded")
def test_only_the_engine_thread_runs_torch_on_several_threads(tiny_llama_dir, adapter_root):
    seen: dict[str, list] = {"load": [], "submit": [], "forward": []}

    def factory():
        seen["load"].append((threading.current_thread(), torch.get_num_threads()))
        engine = build_engine(tiny_engine_config(tiny_llama_dir, adapter_root))
        submit, forward = engine.submit, engine.runner.forward

        def spied_submit(*args, **kwargs):
            seen["submit"].append((threading.current_thread().name, torch.get_num_threads()))
            return submit(*args, **kwargs)

        def spied_forward(*args, **kwargs):
            seen["forward"].append((threading.current_thread().name, torch.get_num_threads()))
            return forward(*args, **kwargs)

        engine.submit, engine.runner.forward = spied_submit, spied_forward
        return engine

    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5).validate()
    with ServerThread(cfg, factory) as server:
        mix = pb.Mix(method="linear", adapters=[pb.WeightedAdapter(name="x", weight=0.5),
                                                 pb.WeightedAdapter(name="y", weight=0.5)])
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for extra in ({}, {"adapter": "x"}, {"mix": mix}):
                stub.Generate(pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(max_tokens=4), **extra),
                              timeout=60)
        (load_thread, load_threads), = seen["load"]
        assert load_threads == ENGINE_THREADS and not load_thread.is_alive()  # its team went with it
        lanes = {name.split("_")[0] for name, _ in seen["submit"]}
        assert lanes == {"loramux-admit", "loramux-merge"}, seen["submit"]
        assert all(n == 1 for _, n in seen["submit"]), seen["submit"]
        assert seen["forward"] and all(t == ("loramux-engine", ENGINE_THREADS) for t in seen["forward"])


def test_a_model_load_that_raises_reaches_the_caller():
    def load():
        raise ValueError("no such model directory")

    with pytest.raises(ValueError, match="no such model directory"):
        asyncio.run(run_alone(load))
    assert asyncio.run(run_alone(lambda: torch.get_num_threads())) == ENGINE_THREADS
