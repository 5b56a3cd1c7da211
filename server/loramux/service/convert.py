"""protobuf ⇄ domain types. Generated code stops here: nothing below the service
layer sees a pb message."""

from __future__ import annotations

import math

from loramux.adapters.store import AdapterInfo
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    RESOLVED_ADAPTER,
    RESOLVED_BASE,
    RESOLVED_MERGE,
    RESOLVED_MIX,
    RESOLVED_PINNED,
    GenerationRequest,
    GenerationResult,
    Resolution,
)
from loramux.errors import InvalidArgument
from loramux.merging.materialize import MergeReport
from loramux.merging.spec import MixSpec
from loramux_api.v1 import loramux_pb2 as pb

MAX_REQUEST_ID_CHARS = 128

_FINISH = {
    FINISH_EOS: pb.FINISH_REASON_EOS,
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_KIND = {
    RESOLVED_BASE: pb.Resolution.KIND_BASE,
    RESOLVED_PINNED: pb.Resolution.KIND_PINNED,
    RESOLVED_ADAPTER: pb.Resolution.KIND_ADAPTER,
    RESOLVED_MERGE: pb.Resolution.KIND_MERGE,
    RESOLVED_MIX: pb.Resolution.KIND_MIX,
}


# ---- requests ----------------------------------------------------------------


def generation_request(msg: pb.GenerateRequest) -> tuple[GenerationRequest, str | None]:
    """(engine request, the caller's request id or None). The engine always gets a
    fresh internal id, so two callers reusing an id can never cancel each other."""
    caller_id = msg.request_id or None
    if caller_id is not None and (len(caller_id) > MAX_REQUEST_ID_CHARS or not caller_id.isprintable()):
        raise InvalidArgument(f"request_id must be printable and at most {MAX_REQUEST_ID_CHARS} characters")
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidArgument("give a prompt or chat messages")
    request = GenerationRequest(
        prompt=msg.prompt if which == "prompt" else None,
        messages=[{"role": m.role, "content": m.content} for m in msg.chat.messages] if which == "chat" else None,
        sampling=sampling_params(msg.sampling),
        **selection(msg),
    )
    return request, caller_id


def selection(msg) -> dict:
    """adapter / merge / mix keyword for GenerationRequest from a message with a
    `selection` oneof (GenerateRequest, PinRequest) or a `source` oneof (Export)."""
    field = msg.WhichOneof("selection") if "selection" in _oneofs(msg) else msg.WhichOneof("source")
    if field == "adapter":
        return {"adapter": msg.adapter}
    if field == "merge":
        return {"merge": msg.merge}
    if field == "mix":
        return {"mix": mix_spec(msg.mix)}
    return {}


def _oneofs(msg) -> set[str]:
    return set(msg.DESCRIPTOR.oneofs_by_name)


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    given = {}
    for pb_name, name in (
        ("max_tokens", "max_new_tokens"),
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("repetition_penalty", "repetition_penalty"),
        ("seed", "seed"),
    ):
        if msg.HasField(pb_name):
            given[name] = getattr(msg, pb_name)
    return SamplingParams(stop=tuple(msg.stop), ignore_eos=msg.ignore_eos, **given)


def mix_spec(msg: pb.Mix) -> MixSpec:
    params = {k: _param_value(k, v) for k, v in msg.params.items()}
    if msg.seed >= 2**63:
        raise InvalidArgument(f"mix seed must be below 2^63, got {msg.seed}")
    return MixSpec.build(
        [(a.name, a.weight) for a in msg.adapters], msg.method or "linear", params, int(msg.seed)
    )


def _param_value(key: str, v: pb.ParamValue):
    kind = v.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"merge parameter {key!r} has no value")
    return getattr(v, kind)


def mix_message(spec: MixSpec) -> pb.Mix:
    msg = pb.Mix(method=spec.method, seed=spec.seed)
    msg.adapters.extend(pb.WeightedAdapter(name=n, weight=w) for n, w in spec.adapters)
    for k, v in spec.params:
        msg.params[k].CopyFrom(_param_message(v))
    return msg


def _param_message(v) -> pb.ParamValue:
    if isinstance(v, bool):
        return pb.ParamValue(flag=v)
    if isinstance(v, int):
        return pb.ParamValue(integer=v)
    if isinstance(v, float):
        return pb.ParamValue(number=v)
    return pb.ParamValue(text=str(v))


# ---- results -----------------------------------------------------------------


def generate_response(result: GenerationResult, caller_id: str | None) -> pb.GenerateResponse:
    t = result.timings
    return pb.GenerateResponse(
        request_id=caller_id or result.request_id,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=_FINISH.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        timings=pb.Timings(
            queue_seconds=t.queue, time_to_first_token_seconds=t.first_token, total_seconds=t.total
        ),
        resolution=resolution_message(result.resolution),
    )


def resolution_message(r: Resolution) -> pb.Resolution:
    msg = pb.Resolution(kind=_KIND[r.kind], name=r.name or "", cache_hit=r.cache_hit)
    if r.merge is not None:
        msg.method = r.merge.method
        msg.merge_seconds = 0.0 if r.cache_hit else r.merge.seconds
        msg.rank = r.merge.rank
        msg.relative_error = _finite(r.merge.rel_error)
    return msg


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -1.0


def adapter_info(a: AdapterInfo) -> pb.AdapterInfo:
    """`cached` is always set: clients read it unset as an older server's true."""
    return pb.AdapterInfo(
        name=a.name, rank=a.rank, bytes=a.nbytes, modules=a.num_modules, pinned=a.pinned,
        base_model=a.base_model_name or "", content_hash=a.content_hash, cached=a.cached,
    )


def merge_info(name: str, spec: MixSpec, report: MergeReport | None) -> pb.MergeInfo:
    msg = pb.MergeInfo(name=name, mix=mix_message(spec), description=spec.describe())
    if report is not None:
        msg.rank, msg.relative_error, msg.merge_seconds = report.rank, _finite(report.rel_error), report.seconds
    return msg


def cache_usage(capacity: int, used: int, entries: int) -> pb.CacheUsage:
    return pb.CacheUsage(capacity_bytes=capacity, used_bytes=used, entries=entries)

