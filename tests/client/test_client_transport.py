"""Sync and async clients end to end against the in-test fake server (conftest.py):
metadata, streaming, error mapping, admin calls, TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

import loramux_client as lc
from tests.client.conftest import STREAM_PIECES

TEXT = "".join(STREAM_PIECES)


# --- sync -------------------------------------------------------------------


def test_generate_carries_the_bearer_token_and_returns_a_generation(fake_server_factory):
    fake = fake_server_factory(token="inf-secret")
    with lc.Client(fake.target, token="inf-secret", timeout=10) as client:
        g = client.generate("hi", adapter="sql", temperature=0.5, request_id="r7")
    rpc, request, metadata = fake.inference.last()
    assert rpc == "Generate" and metadata["authorization"] == "Bearer inf-secret"
    assert request.prompt == "hi" and request.adapter == "sql"
    assert request.sampling.HasField("temperature") and not request.sampling.HasField("max_tokens")
    assert (g.request_id, g.text, g.finish_reason, g.completion_tokens) == ("r7", TEXT, "length", 3)
    assert g.resolution == lc.Resolution(kind="adapter", name="sql", cache_hit=True)


def test_stream_yields_pieces_then_the_result(fake_server):
    with lc.Client(fake_server.target) as client:
        chunks = list(client.stream(messages=[{"role": "user", "content": "hi"}],
                                    mix=lc.Mix({"a": 0.6, "b": 0.4}, "ties", {"density": 0.5})))
    assert [c.text for c in chunks[:-1]] == list(STREAM_PIECES)
    assert all(c.result is None for c in chunks[:-1])
    last = chunks[-1].result
    assert last.text == TEXT and last.resolution.kind == "mix" and last.resolution.rank == 12
    request = fake_server.inference.last("GenerateStream")[1]
    assert request.chat.messages[0].content == "hi" and request.mix.params["density"].number == 0.5


def test_server_abort_arrives_as_invalid_argument(fake_server):
    with lc.Client(fake_server.target) as client:
        with pytest.raises(lc.InvalidArgument, match="prompt is bad") as info:
            client.generate("bad")
        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(lc.InvalidArgument):
            list(client.stream("bad"))


def test_error_in_the_middle_of_a_stream_is_mapped(fake_server):
    seen = []
    with lc.Client(fake_server.target) as client:
        with pytest.raises(lc.ResourceExhausted, match="queue is full"):
            for chunk in client.stream("fail-mid"):
                seen.append(chunk.text)
    assert seen == [STREAM_PIECES[0]]


def test_leaving_a_stream_early_cancels_it_on_the_server(fake_server):
    with lc.Client(fake_server.target) as client:
        for chunk in client.stream("hang"):
            assert chunk.text == STREAM_PIECES[0]
            break
        assert fake_server.inference.cancelled.wait(5)


def test_async_stream_closed_early_is_cancelled_on_the_server(fake_server):
    async def scenario():
        async with lc.AsyncClient(fake_server.target) as client:
            chunks = client.stream("hang")
            first = await anext(chunks)
            await chunks.aclose()
            return first

    assert asyncio.run(scenario()).text == STREAM_PIECES[0]
    assert fake_server.inference.cancelled.wait(5)


def test_wrong_token_is_unauthenticated(fake_server_factory):
    fake = fake_server_factory(token="right")
    with lc.Client(fake.target, token="wrong") as client:
        with pytest.raises(lc.Unauthenticated):
            client.generate("hi")


def test_admin_calls_carry_the_admin_token_or_fall_back_to_token(fake_server_factory):
    fake = fake_server_factory(token="inf", admin_token="adm")
    with lc.Client(fake.target, token="inf", admin_token="adm") as client:
        assert [a.name for a in client.list_adapters()] == ["sql", "chat"]
        client.generate("hi")
    assert fake.admin.last()[2]["authorization"] == "Bearer adm"
    assert fake.inference.last()[2]["authorization"] == "Bearer inf"
    with lc.Client(fake.target, token="adm") as client:
        client.server_info()
    assert fake.admin.last()[2]["authorization"] == "Bearer adm"


def test_admin_round_trip(fake_server):
    mix = lc.Mix({"sql": 0.7, "chat": 0.3}, "dare_ties", {"density": 0.4, "normalize": True, "k": 2}, seed=9)
    with lc.Client(fake_server.target) as client:
        assert client.load_adapter("chat", keep=True).pinned is True
        with pytest.raises(lc.NotFound, match="nope"):
            client.load_adapter("nope")
        assert client.unload_adapter("chat") is None
        merge = client.create_merge("m1", mix)
        assert merge.mix == mix and merge.rank == 12
        with pytest.raises(lc.FailedPrecondition):
            client.create_merge("m1", mix)
        assert client.create_merge("m1", {"sql": 1.0}, replace=True).mix.method == "linear"
        assert [m.name for m in client.list_merges()] == ["m1"]
        assert client.delete_merge("m1") is None
        assert client.pin(merge="m1") == lc.PinResult(pinned="m1", swap_seconds=0.4)
        assert client.unpin().pinned is None
        assert client.export("out", pinned_model=True).path == "/exports/out"
        info = client.server_info()
    assert info.adapter_cache.entries == 2 and info.pinned is None and info.merge_methods == ("linear", "ties")
    sent = next(req for rpc, req, _ in fake_server.admin.calls if rpc == "CreateMerge").mix
    assert sent.params["normalize"].WhichOneof("kind") == "flag" and sent.seed == 9
    assert fake_server.admin.last("Export")[1].pinned_model is True


def test_unreachable_server_is_unavailable():
    with lc.Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(lc.Unavailable):
            client.server_info()
        with pytest.raises(lc.Unavailable):
            client.wait_ready(timeout=0.2)


# --- async ------------------------------------------------------------------


def test_async_client_end_to_end(fake_server_factory):
    fake = fake_server_factory(token="t")

    async def scenario():
        async with lc.AsyncClient(fake.target, token="t", timeout=10) as client:
            await client.wait_ready(timeout=5)
            g = await client.generate("hi", merge="m", max_tokens=3)
            chunks = [c async for c in client.stream("hi")]
            with pytest.raises(lc.InvalidArgument, match="prompt is bad"):
                await client.generate("bad")
            with pytest.raises(lc.ResourceExhausted):
                [c async for c in client.stream("fail-mid")]
            info = await client.server_info()
        return g, chunks, info

    g, chunks, info = asyncio.run(scenario())
    assert g.text == TEXT and g.resolution.kind == "merge" and g.resolution.method == "ties"
    assert "".join(c.text for c in chunks) == TEXT and chunks[-1].result.finish_reason == "length"
    assert info.base_model == "SmolLM2-135M-Instruct"
    assert all(md["authorization"] == "Bearer t" for _, _, md in fake.inference.calls)
    assert fake.inference.calls[0][1].sampling.max_tokens == 3


def test_async_wrong_token(fake_server_factory):
    fake = fake_server_factory(admin_token="adm")

    async def scenario():
        async with lc.AsyncClient(fake.target, token="inf") as client:
            await client.list_adapters()

    with pytest.raises(lc.Unauthenticated):
        asyncio.run(scenario())


# --- TLS --------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(name: str, san: str, cwd: Path) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for loramux.test and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    _issue("server", "DNS:loramux.test", d)
    _issue("client", "DNS:client.test", d)
    return d


def test_mutual_tls_with_server_name_override(fake_server_factory, pki):
    read = lambda name: (pki / name).read_bytes()  # noqa: E731
    credentials = grpc.ssl_server_credentials([(read("server.key"), read("server.pem"))],
                                              root_certificates=read("ca.pem"), require_client_auth=True)
    fake = fake_server_factory(credentials=credentials)
    tls = lc.TLSConfig.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.key",
                                  server_name="loramux.test")
    with lc.Client(fake.target, tls=tls, timeout=10) as client:
        assert client.generate("hi").text == TEXT
    no_client_cert = lc.TLSConfig.from_files(pki / "ca.pem", server_name="loramux.test")
    with lc.Client(fake.target, tls=no_client_cert, timeout=10) as client:
        with pytest.raises(lc.Unavailable):
            client.generate("hi")
