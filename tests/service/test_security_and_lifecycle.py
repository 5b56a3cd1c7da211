"""Bearer tokens, TLS / mutual TLS, health, reflection and configuration."""

from __future__ import annotations

import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loramux.config import ServerConfig, load_toml
from loramux.errors import InvalidArgument
from loramux.service.main import Secrets
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc
from tests.service.conftest import start_server, tiny_engine_config

HELLO = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=2))


def _bearer(token):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def secured(tiny_llama_dir, adapter_root):
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root), Secrets("api-secret", "admin-secret"))
    yield srv
    srv.stop()


def test_tokens_guard_inference_and_admin_separately(secured):
    with grpc.insecure_channel(secured.address) as ch:
        inference, admin = pb_grpc.InferenceStub(ch), pb_grpc.AdminStub(ch)
        for call, md in [(lambda md: inference.Generate(HELLO, metadata=md), None),
                         (lambda md: inference.Generate(HELLO, metadata=md), _bearer("wrong")),
                         (lambda md: list(inference.GenerateStream(HELLO, metadata=md)), _bearer("admin-secret")),
                         (lambda md: admin.ServerInfo(pb.ServerInfoRequest(), metadata=md), _bearer("api-secret"))]:
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in err.value.details()
        assert inference.Generate(HELLO, metadata=_bearer("api-secret")).usage.completion_tokens >= 1
        assert admin.ServerInfo(pb.ServerInfoRequest(), metadata=_bearer("admin-secret")).device == "cpu"
        # Refusals are counted like any other outcome.
        text = urllib.request.urlopen(f"http://127.0.0.1:{secured.server.metrics_port}/metrics").read().decode()
        for rpc, n in [("Generate", 2), ("GenerateStream", 1), ("ServerInfo", 1)]:
            assert f'loramux_requests_total{{code="UNAUTHENTICATED",rpc="{rpc}"}} {n}.0' in text, rpc
        # Probes reach health without a token.
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="loramux.v1.Inference"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_both_services(tiny_server):
    with grpc.insecure_channel(tiny_server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
    assert {"loramux.v1.Inference", "loramux.v1.Admin", "grpc.health.v1.Health"} <= names


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=loramux-test-ca", cwd=d)
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)
        (d / f"{who}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    return d


def test_mutual_tls(tiny_llama_dir, adapter_root, pki):
    srv = start_server(tiny_engine_config(tiny_llama_dir, adapter_root), tls_cert=pki / "server.pem",
                       tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem")
    try:
        ca = (pki / "ca.pem").read_bytes()
        good = grpc.ssl_channel_credentials(ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
        with grpc.secure_channel(srv.address, good) as ch:
            assert pb_grpc.InferenceStub(ch).Generate(HELLO, timeout=30).usage.completion_tokens >= 1
        with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(ca)) as ch:  # no client cert
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferenceStub(ch).Generate(HELLO, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(srv.address) as ch:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError):
                pb_grpc.InferenceStub(ch).Generate(HELLO, timeout=10)
    finally:
        srv.stop()


def test_toml_config_is_validated_with_clear_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[server]\nport = 6000\nmax_waiting = 3\n[adapters]\nroots = ["/tmp"]\nmax_rank = 16\n'
                    '[engine]\nmax_batch_rows = 4\n[merges]\nerror_budget = 0.05\n')
    engine, server = load_toml(good)
    assert server.port == 6000 and server.max_waiting == 3 and engine.max_batch_rows == 4
    assert engine.adapters.max_rank == 16 and str(engine.adapters.roots[0]) == "/tmp"
    assert engine.merges.error_budget == 0.05
    cases = {
        "[servr]\nport = 1\n": "unknown section",
        "[server]\nprot = 1\n": "unknown key",
        "[server]\nport = \"x\"\n": "port",
        "[server\n": "not valid TOML",
    }
    for text, words in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(InvalidArgument, match=words):
            load_toml(bad)
    with pytest.raises(InvalidArgument, match="tls_cert"):
        ServerConfig(tls_key=good).validate()
    with pytest.raises(InvalidArgument, match="port"):
        ServerConfig(port=70000).validate()


def test_engine_and_kv_cache_settings_from_toml_and_flags(tmp_path):
    import argparse

    from loramux.service.main import add_serve_args, serve_configs

    cfg = tmp_path / "engine.toml"
    cfg.write_text('[engine]\nmax_batch_tokens = 512\nprefill_chunk_tokens = 32\n'
                   '[kv_cache]\nbytes = 100000000\nblock_size = 8\nprefix_caching = false\n')
    engine, _ = load_toml(cfg)
    assert (engine.max_batch_tokens, engine.prefill_chunk_tokens) == (512, 32)
    assert (engine.kv_cache.bytes, engine.kv_cache.block_size, engine.kv_cache.prefix_caching) == (100000000, 8, False)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    engine, _ = serve_configs(p.parse_args(["--config", str(cfg), "--max-batch-tokens", "1024", "--kv-block-size", "32"]))
    assert engine.max_batch_tokens == 1024 and engine.kv_cache.block_size == 32  # flags win
    assert engine.prefill_chunk_tokens == 32 and engine.kv_cache.prefix_caching is False  # the file's
    for text, words in {"[kv_cache]\nprefix_caching = 1\n": "prefix_caching",
                        "[kv_cache]\nblock_size = 0\n": "block_size",
                        "[engine]\nmax_batch_tokens = 4\n": "max_batch_tokens"}.items():
        cfg.write_text(text)
        with pytest.raises(InvalidArgument, match=words):
            load_toml(cfg)[0].validate()
