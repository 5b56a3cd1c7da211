"""Engine-facing request and result types (the service converts protobuf to these)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from loramux.engine.sampling import SamplingParams
from loramux.merging.materialize import MergeReport
from loramux.merging.spec import MixSpec

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"

# Why a row ended with FINISH_ERROR (the service maps each to a status code).
FAILURE_PRECONDITION = "precondition"  # its selection cannot be served on the weights now in place
FAILURE_NUMERIC = "numeric"  # its weights produced non-finite logits


@dataclass
class GenerationRequest:
    """One generation. Exactly one of `prompt` or `messages` is set.

    messages: chat turns [{"role": ..., "content": ...}], rendered with the base
      model's chat template.
    At most one adapter selection is set; none of them means the base model (or
    the pinned merge, while one is pinned):
    adapter: name of an adapter.
    merge: name of a merge the operator created.
    mix: an inline mix of adapters.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    adapter: str | None = None
    merge: str | None = None
    mix: MixSpec | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


RESOLVED_BASE = "base"
RESOLVED_PINNED = "pinned"
RESOLVED_ADAPTER = "adapter"
RESOLVED_MERGE = "merge"
RESOLVED_MIX = "mix"


@dataclass(frozen=True)
class Resolution:
    """How a request's weights were found.

    kind: base | pinned (no selection; the pinned merge answered) | adapter |
      merge (a named merge) | mix (an inline mix).
    name: the adapter, merge or pinned label; the mix's description.
    cache_hit: the adapter was in the host cache, or the mix in the merge cache.
    merge: how a merge or mix was served (method, rank, error, seconds).
    """

    kind: str = RESOLVED_BASE
    name: str | None = None
    cache_hit: bool = False
    merge: MergeReport | None = None


@dataclass(frozen=True)
class Timings:
    """Seconds from the moment the engine accepted the request (submit)."""

    queue: float = 0.0  # until its first forward step (prefill) began
    first_token: float = 0.0
    total: float = 0.0


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    resolution: Resolution = field(default_factory=Resolution)
    timings: Timings = field(default_factory=Timings)
    error: str | None = None  # set when finish_reason is "error"
    error_kind: str | None = None  # FAILURE_* when finish_reason is "error"

    @property
    def merge(self) -> MergeReport | None:
        """How a merge or mix was resolved (None for base and plain adapters)."""
        return self.resolution.merge

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class TokenEvent:
    """What one step produced for one request: new text (may be empty while a
    multi-byte character or a possible stop string is held back), and the final
    result when the request finished in this step."""

    request_id: str
    text: str
    token_id: int | None
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None
