"""Every kind of bad input gets its status code and a message; the server stays
healthy and a normal request right after is answered."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux_api.v1 import loramux_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _gen(prompt="hello", max_tokens=4, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)


def _mix(weights=(("x", 0.5), ("y", 0.5)), method="linear", **params) -> pb.Mix:
    mix = pb.Mix(method=method, adapters=[pb.WeightedAdapter(name=n, weight=w) for n, w in weights])
    for k, v in params.items():
        mix.params[k].number = v
    return mix


@pytest.fixture(scope="module", autouse=True)
def broken_adapters(adapter_root):
    """Malformed adapter directories next to the good ones."""
    bad_json = adapter_root / "broken-config"
    bad_json.mkdir(exist_ok=True)
    (bad_json / "adapter_config.json").write_text("{not json")
    (bad_json / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    pickled = adapter_root / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_config.json").write_text((adapter_root / "x" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")


CASES = {
    "unknown adapter": (_gen(adapter="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "adapter outside the root": (_gen(adapter="../x"), INVALID, "name"),
    "absolute adapter path": (_gen(adapter="/etc/passwd"), INVALID, "name"),
    "malformed adapter config": (_gen(adapter="broken-config"), INVALID, "adapter_config.json"),
    "pickle adapter": (_gen(adapter="pickled"), INVALID, "pickle"),
    "negative max tokens": (_gen(max_tokens=-1), INVALID, "max_new_tokens"),
    "huge max tokens": (_gen(max_tokens=2**31 - 1), INVALID, "max_new_tokens"),
    "zero max tokens": (_gen(max_tokens=0), INVALID, "max_new_tokens"),
    "empty prompt": (_gen(prompt=""), INVALID, "prompt"),
    "no input": (pb.GenerateRequest(), INVALID, "prompt"),
    "prompt longer than the context": (_gen(prompt="fox " * 5000), INVALID, "tokens"),
    "nan temperature": (
        pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=math.nan)), INVALID, "temperature"
    ),
    "top_p zero": (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0.0)), INVALID, "top_p"),
    "unknown chat role": (
        pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])),
        INVALID, "role",
    ),
    "nan mix weight": (_gen(mix=_mix(weights=(("x", math.nan), ("y", 1.0)))), INVALID, "weight"),
    "empty mix": (_gen(mix=pb.Mix(method="linear")), INVALID, "at least one adapter"),
    "mix names an adapter twice": (_gen(mix=_mix(weights=(("x", 1.0), ("x", 1.0)))), INVALID, "twice"),
    "density zero": (_gen(mix=_mix(method="ties", density=0.0)), INVALID, "density"),
    "density above one": (_gen(mix=_mix(method="dare_ties", density=1.5)), INVALID, "density"),
    "density missing": (_gen(mix=_mix(method="ties")), INVALID, "density"),
    "unknown method": (_gen(mix=_mix(method="average-ish")), INVALID, "average-ish"),
    "slerp of three": (_gen(mix=_mix(weights=(("x", 1), ("y", 1), ("z", 1)), method="slerp", t=0.5)), INVALID, "slerp"),
    "mix with an unknown adapter": (_gen(mix=_mix(weights=(("x", 1.0), ("ghost", 1.0)))), grpc.StatusCode.NOT_FOUND, "ghost"),
    "unknown named merge": (_gen(merge="never-made"), grpc.StatusCode.NOT_FOUND, "never-made"),
    "bad request id": (_gen(request_id="x" * 500), INVALID, "request_id"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_status_and_the_server_stays_healthy(case, inference, channel):
    request, code, words = CASES[case]
    for call in (inference.Generate, lambda r: list(inference.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == code, err.value.details()
        assert words.lower() in err.value.details().lower(), err.value.details()
    ok = inference.Generate(_gen())
    assert ok.usage.completion_tokens >= 1
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_oversized_message_is_refused(inference):
    with pytest.raises(grpc.RpcError) as err:
        inference.Generate(_gen(prompt="x" * (5 * 1024 * 1024)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert inference.Generate(_gen()).usage.completion_tokens >= 1


ADMIN_CASES = {
    "load unknown": (lambda a: a.LoadAdapter(pb.LoadAdapterRequest(name="nope")), grpc.StatusCode.NOT_FOUND),
    "load escape": (lambda a: a.LoadAdapter(pb.LoadAdapterRequest(name="../../etc")), INVALID),
    "unload not loaded": (lambda a: a.UnloadAdapter(pb.UnloadAdapterRequest(name="never-loaded")), grpc.StatusCode.NOT_FOUND),
    "merge bad name": (lambda a: a.CreateMerge(pb.CreateMergeRequest(name="a/b", mix=_mix())), INVALID),
    "merge bad density": (
        lambda a: a.CreateMerge(pb.CreateMergeRequest(name="m", mix=_mix(method="ties", density=-1.0))), INVALID
    ),
    "delete unknown merge": (lambda a: a.DeleteMerge(pb.DeleteMergeRequest(name="nope")), grpc.StatusCode.NOT_FOUND),
    "pin nothing": (lambda a: a.Pin(pb.PinRequest()), INVALID),
    "pin unknown": (lambda a: a.Pin(pb.PinRequest(adapter="nope")), grpc.StatusCode.NOT_FOUND),
    "unpin nothing": (lambda a: a.Unpin(pb.UnpinRequest()), grpc.StatusCode.FAILED_PRECONDITION),
    "export escape": (lambda a: a.Export(pb.ExportRequest(adapter="x", destination="../out")), INVALID),
    "export pinned with nothing pinned": (
        lambda a: a.Export(pb.ExportRequest(pinned_model=True, destination="dense")),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
}


@pytest.mark.parametrize("case", list(ADMIN_CASES))
def test_bad_admin_calls_get_their_status(case, admin, inference):
    call, code = ADMIN_CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        call(admin)
    assert err.value.code() == code, err.value.details()
    assert err.value.details()
    assert inference.Generate(_gen(adapter="x")).usage.completion_tokens >= 1
