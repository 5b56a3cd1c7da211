"""A real loramux gRPC server on a loopback port around a tiny model."""

from __future__ import annotations

import grpc
import pytest

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig
from loramux.service.main import Secrets, ServerThread
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc


def tiny_engine_config(model_dir, adapter_root, **engine) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=model_dir),
        adapters=AdapterConfig(roots=[adapter_root], max_rank=64),
        **engine,
    )


def start_server(engine_cfg: EngineConfig, secrets: Secrets = Secrets(), **server) -> ServerThread:
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                       grace_seconds=10, **server)
    return ServerThread(cfg.validate(), lambda: build_engine(engine_cfg), secrets).start()


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir, adapter_root, tmp_path_factory):
    export_root = tmp_path_factory.mktemp("exports")
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root), export_root=export_root)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(tiny_server):
    with grpc.insecure_channel(tiny_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def inference(channel):
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def admin(channel):
    return pb_grpc.AdminStub(channel)
