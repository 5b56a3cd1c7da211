"""Engine-facing request and result types (the service converts protobuf to these)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from loramux.engine.sampling import SamplingParams

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass
class GenerationRequest:
    """One generation. Exactly one of `prompt` or `messages` is set.

    messages: chat turns [{"role": ..., "content": ...}], rendered with the base
      model's chat template.
    adapter: name of an adapter to apply, or None for the base model.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    adapter: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None

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
