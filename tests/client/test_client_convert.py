"""loramux_client conversions pb ⇄ dataclasses and error mapping, without a server."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from loramux_api.v1 import loramux_pb2 as pb

import loramux_client as lc
from loramux_client import calls, convert


def test_client_imports_neither_torch_nor_the_server():
    code = "import sys, loramux_client; print(sorted({'torch', 'loramux'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- mixes and parameters ---------------------------------------------------


def test_param_types_survive_a_round_trip_and_bool_is_a_flag():
    params = {"normalize": True, "keep": False, "k": 3, "density": 0.5, "sign": "total"}
    mix = lc.Mix({"sql": 0.6, "chat": -0.4}, method="ties", params=params, seed=7)
    msg = convert.mix_to_pb(mix)
    assert msg.params["normalize"].WhichOneof("kind") == "flag"
    assert msg.params["keep"].WhichOneof("kind") == "flag"
    assert msg.params["k"].WhichOneof("kind") == "integer"
    assert msg.params["density"].WhichOneof("kind") == "number"
    assert msg.params["sign"].WhichOneof("kind") == "text"
    back = convert.mix_from_pb(pb.Mix.FromString(msg.SerializeToString()))
    assert back == mix
    assert type(back.params["normalize"]) is bool and type(back.params["k"]) is int


def test_mix_keeps_adapter_order_from_dict_or_pairs():
    assert lc.Mix({"b": 1, "a": 2}).adapters == (("b", 1.0), ("a", 2.0))
    assert lc.Mix([("b", 1), ("a", 2)]).adapters == (("b", 1.0), ("a", 2.0))
    assert [a.name for a in convert.mix_to_pb(lc.Mix({"b": 1, "a": 2})).adapters] == ["b", "a"]
    assert lc.Mix({"a": 0.5, "b": 0.5}, "ties", {"density": 0.5}).describe() == "ties(a=0.5,b=0.5,density=0.5)"


def test_unsupported_param_type_is_refused():
    with pytest.raises(TypeError, match="list"):
        convert.mix_to_pb(lc.Mix({"a": 1}, params={"x": [1]}))


def test_empty_mix_method_reads_as_linear():
    assert convert.mix_from_pb(pb.Mix(adapters=[pb.WeightedAdapter(name="a", weight=1)])).method == "linear"


# --- requests ---------------------------------------------------------------


def test_unset_sampling_fields_stay_unset():
    req = convert.generate_request("hi", temperature=0.7, seed=0)
    s = req.sampling
    assert s.HasField("temperature") and s.HasField("seed") and s.seed == 0
    for name in ("max_tokens", "top_k", "top_p", "repetition_penalty"):
        assert not s.HasField(name), name
    assert list(s.stop) == [] and s.ignore_eos is False


def test_all_sampling_fields_are_sent():
    req = convert.generate_request("hi", max_tokens=5, temperature=0.0, top_k=40, top_p=0.9,
                                   repetition_penalty=1.1, seed=3, stop=["\n", "END"], ignore_eos=True)
    s = req.sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), s.ignore_eos) == (5, 40, 3, ["\n", "END"], True)
    assert s.HasField("temperature") and s.temperature == 0.0
    assert s.top_p == pytest.approx(0.9) and s.repetition_penalty == pytest.approx(1.1)


def test_single_stop_string_is_not_split_into_characters():
    assert list(convert.generate_request("hi", stop="END").sampling.stop) == ["END"]


def test_messages_become_chat():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    req = convert.generate_request(messages=msgs, adapter="sql", request_id="r1")
    assert req.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert (req.WhichOneof("selection"), req.adapter, req.request_id) == ("adapter", "sql", "r1")


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}])
def test_exactly_one_of_prompt_or_messages(kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        convert.generate_request(**kwargs)


def test_bad_message_shape_is_refused():
    with pytest.raises(ValueError, match="message 0"):
        convert.generate_request(messages=[{"role": "user", "text": "hi"}])


def test_no_selection_means_base_and_two_are_refused():
    assert convert.generate_request("hi").WhichOneof("selection") is None
    with pytest.raises(ValueError, match="at most one"):
        convert.generate_request("hi", adapter="a", merge="m")


def test_mix_given_as_dict_is_a_linear_mix():
    req = convert.generate_request("hi", mix={"a": 0.5, "b": 0.5})
    assert req.WhichOneof("selection") == "mix" and req.mix.method == "linear"


def test_pin_and_export_need_one_source():
    with pytest.raises(ValueError, match="give one of"):
        calls.pin()
    with pytest.raises(ValueError, match="give one of"):
        calls.export("out")
    with pytest.raises(ValueError, match="at most one"):
        calls.export("out", adapter="a", pinned_model=True)
    assert calls.export("out", pinned_model=True).request.WhichOneof("source") == "pinned_model"
    assert calls.pin(mix=lc.Mix({"a": 1})).request.WhichOneof("selection") == "mix"


# --- responses --------------------------------------------------------------


def _response(**kw) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id="r", text="hi", token_ids=[5, 6], finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(prompt_tokens=3, completion_tokens=2),
        timings=pb.Timings(queue_seconds=0.1, time_to_first_token_seconds=0.2, total_seconds=0.3),
        resolution=pb.Resolution(kind=pb.Resolution.KIND_MIX, name="ties(a=1)", method="ties",
                                 merge_seconds=0.5, rank=8, relative_error=0.01),
        **kw,
    )


def test_generation_from_pb():
    g = convert.generation_from_pb(_response())
    assert g == lc.Generation(
        request_id="r", text="hi", token_ids=(5, 6), finish_reason="stop", prompt_tokens=3,
        completion_tokens=2, queue_seconds=0.1, ttft_seconds=0.2, total_seconds=0.3,
        resolution=lc.Resolution(kind="mix", name="ties(a=1)", cache_hit=False, method="ties",
                                 merge_seconds=0.5, rank=8, relative_error=0.01),
    )


@pytest.mark.parametrize("value,label", [(pb.FINISH_REASON_EOS, "eos"), (pb.FINISH_REASON_LENGTH, "length"),
                                         (pb.FINISH_REASON_CANCELLED, "cancelled")])
def test_finish_reason_labels(value, label):
    assert convert.generation_from_pb(pb.GenerateResponse(finish_reason=value)).finish_reason == label


@pytest.mark.parametrize("kind", ["base", "pinned", "adapter", "merge", "mix"])
def test_resolution_kind_labels(kind):
    value = pb.Resolution.Kind.Value(f"KIND_{kind.upper()}")
    assert convert.resolution_from_pb(pb.Resolution(kind=value)).kind == kind


def test_stream_chunk_result_only_when_set():
    assert convert.stream_chunk_from_pb(pb.GenerateStreamResponse(text="a", token_ids=[1])) == \
        lc.StreamChunk(text="a", token_ids=(1,), result=None)
    last = convert.stream_chunk_from_pb(pb.GenerateStreamResponse(result=_response()))
    assert last.result is not None and last.result.text == "hi"


def test_admin_responses_from_pb():
    info = convert.server_info_from_pb(pb.ServerInfoResponse(
        version="1", adapter_cache=pb.CacheUsage(capacity_bytes=10, used_bytes=4, entries=1),
        merge_methods=["linear", "ties"], device_slots=8))
    assert info.pinned is None and info.adapter_cache == lc.CacheUsage(10, 4, 1)
    assert info.merge_cache == lc.CacheUsage(0, 0, 0) and info.merge_methods == ("linear", "ties")
    assert convert.pin_result_from_pb(pb.PinResponse()) == lc.PinResult(pinned=None, swap_seconds=0.0)
    assert convert.pin_result_from_pb(pb.PinResponse(pinned="m")).pinned == "m"
    merge = convert.merge_info_from_pb(pb.MergeInfo(name="m", mix=convert.mix_to_pb(lc.Mix({"a": 1})), rank=4))
    assert merge.mix == lc.Mix({"a": 1}) and merge.rank == 4
    adapters = convert.adapter_list_from_pb(pb.ListAdaptersResponse(adapters=[pb.AdapterInfo(name="a", rank=8)]))
    assert adapters == [lc.AdapterInfo("a", 8, 0, 0, False, "", "")]


# --- errors -----------------------------------------------------------------


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code,cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, lc.InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, lc.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, lc.FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, lc.ResourceExhausted),
    (grpc.StatusCode.UNAVAILABLE, lc.Unavailable),
    (grpc.StatusCode.UNAUTHENTICATED, lc.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, lc.PermissionDenied),
    (grpc.StatusCode.DEADLINE_EXCEEDED, lc.DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, lc.Cancelled),
])
def test_every_status_maps_to_its_class(code, cls):
    err = lc.from_rpc_error(_FakeRpcError(code, "why"))
    assert type(err) is cls and err.code is code and err.details == "why"
    assert isinstance(err, lc.LoramuxClientError)


def test_other_codes_map_to_the_base_class_with_a_readable_name():
    err = lc.from_rpc_error(_FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(err) is lc.LoramuxClientError and err.code_name == "Internal"
    assert str(err) == "Internal: boom"
    assert lc.from_rpc_error(grpc.RpcError()).code is grpc.StatusCode.UNKNOWN


def test_aio_errors_map_the_same_way():
    err = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="no adapter named 'x'")
    mapped = lc.from_rpc_error(err)
    assert type(mapped) is lc.NotFound and mapped.details == "no adapter named 'x'"


def test_tls_config_needs_cert_and_key_together(tmp_path):
    with pytest.raises(ValueError, match="both or neither"):
        lc.TLSConfig(client_cert=b"x")
    (tmp_path / "ca.pem").write_bytes(b"CA")
    assert lc.TLSConfig.from_files(ca=tmp_path / "ca.pem", server_name="s") == lc.TLSConfig(b"CA", None, None, "s")
