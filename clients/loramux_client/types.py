"""Typed values the client takes and returns. Plain frozen dataclasses, no protobuf.

Strings stand in for the proto enums: finish reasons are "eos" | "stop" | "length" |
"cancelled"; resolution kinds are "base" | "pinned" | "adapter" | "merge" | "mix".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Union

ParamValue = Union[bool, int, float, str]


@dataclass(frozen=True)
class Mix:
    """An inline mix of adapters, merged on ΔW by the server.

    adapters: name → weight, as a dict or (name, weight) pairs; kept as pairs in order.
    method: linear (default), ties, dare_linear, dare_ties, magnitude_prune, slerp,
      karcher, della, breadcrumbs (ServerInfo.merge_methods lists what a server has).
    params: method parameters, e.g. {"density": 0.5, "majority_sign_method": "total",
      "normalize": True}; a Python bool travels as a flag, int as an integer, float
      as a number, str as text.
    seed: seeds the random drops of DARE-style methods, so a mix is reproducible.
    """

    adapters: tuple[tuple[str, float], ...]
    method: str = "linear"
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        pairs = self.adapters.items() if isinstance(self.adapters, Mapping) else self.adapters
        object.__setattr__(self, "adapters", tuple((str(n), float(w)) for n, w in pairs))
        object.__setattr__(self, "params", dict(self.params))

    @classmethod
    def coerce(cls, value: "Mix | Mapping[str, float] | Iterable[tuple[str, float]]") -> "Mix":
        """A Mix as given, or a linear Mix of a dict / pairs of adapter weights."""
        return value if isinstance(value, Mix) else cls(adapters=value)

    def describe(self) -> str:
        parts = ",".join(f"{n}={w:g}" for n, w in self.adapters)
        extra = "".join(f",{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({parts}{extra})"


class GenerateOptions(TypedDict, total=False):
    """Keyword options of Client.generate / Client.stream (and the async twins).

    Unset sampling options stay unset on the wire and take the server defaults
    (max_tokens 128, temperature 0 = greedy, top_k 0 = off, top_p 1 = off,
    repetition_penalty 1 = off, seed random).
    messages: chat messages [{"role": "user", "content": "..."}], instead of a prompt.
    adapter / merge / mix: at most one; none means the base model (or the pinned merge).
    request_id: echoed back; the server makes one when empty.
    """

    messages: list[Mapping[str, str]] | None
    adapter: str | None
    merge: str | None
    mix: Mix | Mapping[str, float] | None
    max_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: Iterable[str]
    ignore_eos: bool
    request_id: str | None


@dataclass(frozen=True)
class Resolution:
    """How the server found the weights that answered.

    kind: "base" | "pinned" | "adapter" | "merge" | "mix".
    name: adapter, merge or pinned label; for a mix its description.
    cache_hit: the adapter was in the host cache / the mix in the merge cache.
    method, merge_seconds, rank, relative_error: for merges and mixes; relative_error
      is the served vs exact merged ΔW (Frobenius, worst module).
    """

    kind: str
    name: str = ""
    cache_hit: bool = False
    method: str = ""
    merge_seconds: float = 0.0
    rank: int = 0
    relative_error: float = 0.0


@dataclass(frozen=True)
class Generation:
    """One finished generation.

    finish_reason: "eos" | "stop" | "length" | "cancelled".
    queue_seconds: accepted → first forward step; ttft_seconds: accepted → first
      token; total_seconds: accepted → finished.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    ttft_seconds: float
    total_seconds: float
    resolution: Resolution


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a streamed generation; `result` is set on the last chunk only.
    text may be empty while the server holds back a possible stop string."""

    text: str
    token_ids: tuple[int, ...]
    result: Generation | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter the server knows. pinned: kept in the host cache, never evicted
    (load_adapter(keep=True)); not the same as Admin.Pin. cached: in the host
    cache; an uncached one was found under the adapter roots but not read, so
    only its name is known (rank, bytes, modules 0; base_model, content_hash "")."""

    name: str
    rank: int
    bytes: int
    modules: int
    pinned: bool
    base_model: str
    content_hash: str
    cached: bool = True


@dataclass(frozen=True)
class MergeInfo:
    """A named merge; rank is the served rank, relative_error vs the exact ΔW."""

    name: str
    mix: Mix
    description: str
    rank: int
    relative_error: float
    merge_seconds: float


@dataclass(frozen=True)
class PinResult:
    """pinned: label of the merge now folded into the base; None after unpin."""

    pinned: str | None
    swap_seconds: float


@dataclass(frozen=True)
class ExportResult:
    """Where the server wrote the export (under its export root) and how big it is;
    rank and relative_error describe an exported adapter."""

    path: str
    bytes: int
    rank: int
    relative_error: float


@dataclass(frozen=True)
class CacheUsage:
    capacity_bytes: int
    used_bytes: int
    entries: int


@dataclass(frozen=True)
class ServerInfo:
    """What the server runs and how full it is. pinned is None when nothing is pinned."""

    version: str
    base_model: str
    model_fingerprint: str
    device: str
    dtype: str
    quantization: str
    pinned: str | None
    adapter_cache: CacheUsage  # host LRU of raw adapters
    merge_cache: CacheUsage  # merged mixes
    device_slots: int
    device_slots_used: int
    max_rank: int
    running_requests: int
    waiting_requests: int
    max_batch_rows: int
    merge_methods: tuple[str, ...]


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the channel. PEM bytes; `from_files` reads them from paths.

    root_ca: CA that signed the server certificate (None: the system roots).
    client_cert, client_key: both or neither; set them for mutual TLS.
    server_name: expected name in the server certificate when it differs from the
      host in the target (e.g. connecting by IP).
    """

    root_ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLS client certificate and key go together: give both or neither")

    @classmethod
    def from_files(cls, ca=None, cert=None, key=None, server_name=None) -> "TLSConfig":
        read = lambda p: None if p is None else Path(p).read_bytes()  # noqa: E731
        return cls(read(ca), read(cert), read(key), server_name)
