"""protobuf ⇄ client dataclasses, in one place for the sync and the async client."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from loramux_api.v1 import loramux_pb2 as pb

from loramux_client.types import (
    AdapterInfo,
    CacheUsage,
    ExportResult,
    Generation,
    MergeInfo,
    Mix,
    ParamValue,
    PinResult,
    Resolution,
    ServerInfo,
    StreamChunk,
)

# ---------------------------------------------------------------------------
# to protobuf
# ---------------------------------------------------------------------------


def param_to_pb(value: ParamValue) -> pb.ParamValue:
    """bool → flag (checked before int: bool is an int in Python), int → integer,
    float → number, str → text."""
    if isinstance(value, bool):
        return pb.ParamValue(flag=value)
    if isinstance(value, int):
        return pb.ParamValue(integer=value)
    if isinstance(value, float):
        return pb.ParamValue(number=value)
    if isinstance(value, str):
        return pb.ParamValue(text=value)
    raise TypeError(f"a mix parameter is a bool, int, float or str, got {type(value).__name__}: {value!r}")


def mix_to_pb(mix: Mix) -> pb.Mix:
    return pb.Mix(
        adapters=[pb.WeightedAdapter(name=n, weight=w) for n, w in mix.adapters],
        method=mix.method,
        params={k: param_to_pb(v) for k, v in mix.params.items()},
        seed=mix.seed,
    )


def messages_to_pb(messages: Iterable[Mapping[str, str]]) -> pb.ChatMessages:
    out = pb.ChatMessages()
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) != {"role", "content"}:
            raise ValueError(f"message {i} must be a dict with exactly 'role' and 'content', got {m!r}")
        out.messages.add(role=m["role"], content=m["content"])
    return out


def selection(**choices) -> dict:
    """The one set choice among adapter= / merge= / mix= (/ pinned_model=) as pb
    constructor kwargs; {} when none is set. More than one is a ValueError."""
    given = {k: v for k, v in choices.items() if v is not None and v is not False}
    if len(given) > 1:
        raise ValueError(f"give at most one of {', '.join(choices)}; got {', '.join(given)}")
    if "mix" in given:
        given["mix"] = mix_to_pb(Mix.coerce(given["mix"]))
    return given


def sampling_to_pb(*, max_tokens=None, temperature=None, top_k=None, top_p=None,
                   repetition_penalty=None, seed=None, stop=(), ignore_eos=False) -> pb.SamplingParams:
    """Only the options that are not None are set; the rest keep proto presence unset."""
    optional = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, seed=seed)
    if isinstance(stop, str):
        stop = (stop,)
    return pb.SamplingParams(**{k: v for k, v in optional.items() if v is not None},
                             stop=list(stop), ignore_eos=ignore_eos)


def generate_request(prompt: str | None = None, *, messages=None, adapter=None, merge=None, mix=None,
                     request_id=None, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from GenerateOptions (see types.GenerateOptions).
    Exactly one of prompt / messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    text = {"prompt": prompt} if prompt is not None else {"chat": messages_to_pb(messages)}
    return pb.GenerateRequest(
        **text,
        **selection(adapter=adapter, merge=merge, mix=mix),
        sampling=sampling_to_pb(**sampling),
        request_id=request_id or "",
    )


def required_selection(**choices) -> dict:
    chosen = selection(**choices)
    if not chosen:
        raise ValueError(f"give one of {', '.join(choices)}")
    return chosen


# ---------------------------------------------------------------------------
# from protobuf
# ---------------------------------------------------------------------------


def _enum_label(enum, value: int, prefix: str) -> str:
    """FINISH_REASON_EOS → "eos"; KIND_MIX → "mix"."""
    return enum.Name(value).removeprefix(prefix).lower()


def _from_fields(cls, msg, **overrides):
    """cls built from the same-named fields of msg, with `overrides` for the rest."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in overrides]
    return cls(**{n: getattr(msg, n) for n in names}, **overrides)


def param_from_pb(value: pb.ParamValue) -> ParamValue:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise ValueError("a mix parameter value is empty")
    return getattr(value, kind)


def mix_from_pb(mix: pb.Mix) -> Mix:
    return Mix(
        adapters=[(a.name, a.weight) for a in mix.adapters],
        method=mix.method or "linear",
        params={k: param_from_pb(v) for k, v in mix.params.items()},
        seed=mix.seed,
    )


def resolution_from_pb(r: pb.Resolution) -> Resolution:
    return _from_fields(Resolution, r, kind=_enum_label(pb.Resolution.Kind, r.kind, "KIND_"))


def generation_from_pb(r: pb.GenerateResponse) -> Generation:
    return Generation(
        request_id=r.request_id,
        text=r.text,
        token_ids=tuple(r.token_ids),
        finish_reason=_enum_label(pb.FinishReason, r.finish_reason, "FINISH_REASON_"),
        prompt_tokens=r.usage.prompt_tokens,
        completion_tokens=r.usage.completion_tokens,
        queue_seconds=r.timings.queue_seconds,
        ttft_seconds=r.timings.time_to_first_token_seconds,
        total_seconds=r.timings.total_seconds,
        resolution=resolution_from_pb(r.resolution),
    )


def stream_chunk_from_pb(r: pb.GenerateStreamResponse) -> StreamChunk:
    result = generation_from_pb(r.result) if r.HasField("result") else None
    return StreamChunk(text=r.text, token_ids=tuple(r.token_ids), result=result)


def adapter_info_from_pb(r: pb.AdapterInfo) -> AdapterInfo:
    # Servers before the field listed cached adapters only.
    return _from_fields(AdapterInfo, r, cached=r.cached if r.HasField("cached") else True)


def adapter_list_from_pb(r: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [adapter_info_from_pb(a) for a in r.adapters]


def merge_info_from_pb(r: pb.MergeInfo) -> MergeInfo:
    return _from_fields(MergeInfo, r, mix=mix_from_pb(r.mix))


def merge_list_from_pb(r: pb.ListMergesResponse) -> list[MergeInfo]:
    return [merge_info_from_pb(m) for m in r.merges]


def pin_result_from_pb(r: pb.PinResponse) -> PinResult:
    return PinResult(pinned=r.pinned or None, swap_seconds=r.swap_seconds)


def export_result_from_pb(r: pb.ExportResponse) -> ExportResult:
    return _from_fields(ExportResult, r)


def server_info_from_pb(r: pb.ServerInfoResponse) -> ServerInfo:
    return _from_fields(
        ServerInfo, r,
        pinned=r.pinned or None,
        adapter_cache=_from_fields(CacheUsage, r.adapter_cache),
        merge_cache=_from_fields(CacheUsage, r.merge_cache),
        merge_methods=tuple(r.merge_methods),
    )


def nothing(_response) -> None:
    return None
