"""Each client method as data: which service and RPC, the request, how to read the
answer. The sync and the async client both run these, so neither repeats the logic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from loramux_api.v1 import loramux_pb2 as pb

from loramux_client import convert
from loramux_client.types import Mix

INFERENCE = "inference"
ADMIN = "admin"


@dataclass(frozen=True)
class Call:
    """service: INFERENCE or ADMIN (which token it carries); rpc: the stub method;
    parse: response message → client value (per message for streams)."""

    service: str
    rpc: str
    request: Message
    parse: Callable[[Any], Any]


def generate(prompt=None, **options) -> Call:
    return Call(INFERENCE, "Generate", convert.generate_request(prompt, **options),
                convert.generation_from_pb)


def stream(prompt=None, **options) -> Call:
    return Call(INFERENCE, "GenerateStream", convert.generate_request(prompt, **options),
                convert.stream_chunk_from_pb)


def list_adapters() -> Call:
    return Call(ADMIN, "ListAdapters", pb.ListAdaptersRequest(), convert.adapter_list_from_pb)


def load_adapter(name: str, keep: bool = False) -> Call:
    return Call(ADMIN, "LoadAdapter", pb.LoadAdapterRequest(name=name, keep=keep),
                convert.adapter_info_from_pb)


def unload_adapter(name: str) -> Call:
    return Call(ADMIN, "UnloadAdapter", pb.UnloadAdapterRequest(name=name), convert.nothing)


def create_merge(name: str, mix, replace: bool = False) -> Call:
    request = pb.CreateMergeRequest(name=name, mix=convert.mix_to_pb(Mix.coerce(mix)), replace=replace)
    return Call(ADMIN, "CreateMerge", request, convert.merge_info_from_pb)


def list_merges() -> Call:
    return Call(ADMIN, "ListMerges", pb.ListMergesRequest(), convert.merge_list_from_pb)


def delete_merge(name: str) -> Call:
    return Call(ADMIN, "DeleteMerge", pb.DeleteMergeRequest(name=name), convert.nothing)


def pin(adapter=None, merge=None, mix=None) -> Call:
    request = pb.PinRequest(**convert.required_selection(adapter=adapter, merge=merge, mix=mix))
    return Call(ADMIN, "Pin", request, convert.pin_result_from_pb)


def unpin() -> Call:
    return Call(ADMIN, "Unpin", pb.UnpinRequest(), convert.pin_result_from_pb)


def export(destination: str, adapter=None, merge=None, mix=None, pinned_model=False) -> Call:
    source = convert.required_selection(adapter=adapter, merge=merge, mix=mix, pinned_model=pinned_model)
    request = pb.ExportRequest(**source, destination=destination)
    return Call(ADMIN, "Export", request, convert.export_result_from_pb)


def server_info() -> Call:
    return Call(ADMIN, "ServerInfo", pb.ServerInfoRequest(), convert.server_info_from_pb)
