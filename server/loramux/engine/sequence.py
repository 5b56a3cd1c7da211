"""One request's decoding state: sampler, detokenizer, stop strings, finish rules."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loramux.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loramux.engine.sampling import RowSampler
from loramux.engine.types import (
    FAILURE_PRECONDITION,
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Resolution,
    Timings,
    TokenEvent,
)
from loramux.adapters.types import LoraAdapter
from loramux_kernels import NO_SLOT


@dataclass
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    eos_ids: frozenset[int]
    max_len: int  # prompt + generated tokens may not exceed this
    adapter: LoraAdapter | None = None  # what the row computes with (compensated while pinned)
    requested: LoraAdapter | None = None  # the adapter or merge the request named
    pin_epoch: int = 0  # the engine's pin epoch `adapter` was made for
    slot: int = NO_SLOT  # device slot while admitted
    # KV state (see engine/kv_cache.py): blocks in position order, how many of
    # prompt + generated tokens have their keys/values in them, the hashes of the
    # full computed blocks (prefix cache chain) and the weights' identity.
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_hashes: list = field(default_factory=list)
    admitted_at: int = -1  # admission order among running rows (preemption takes the youngest)
    resolution: Resolution = field(default_factory=Resolution)
    # time.monotonic() stamps: accepted by submit, first forward step, first token.
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None
    cancelled: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the positions this row has (or will have) KV for."""
        return len(self.prompt_ids) + len(self.generated)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + generated."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.generated[start - p : end - p]
        return self.prompt_ids[start:] + self.generated[: end - p]

    @property
    def started(self) -> bool:
        """Some token was generated: the row is mid-flight even when preempted."""
        return bool(self.generated)

    @property
    def kv_identity(self) -> str:
        """What the row's keys/values depend on besides its tokens: its weights
        (adapter or mix content, base) and the pin epoch of the base weights."""
        return f"{self.slot_key or 'base'}|pin{self.pin_epoch}"

    @property
    def slot_key(self) -> str | None:
        """Key in the slot pool (None for the base model). Keyed by content too, so
        a reloaded adapter never reuses a stale slot."""
        return f"{self.adapter.name}@{self.adapter.content_hash}" if self.adapter else None

    def accept(self, token_id: int) -> TokenEvent:
        """Record a sampled token; return what it adds to the stream."""
        if not self.generated:
            self.first_token_at = time.monotonic()
        self.generated.append(token_id)
        self.sampler.observe(token_id)
        params = self.request.sampling
        new_text = ""
        if token_id in self.eos_ids and not params.ignore_eos:
            self.finish_reason = FINISH_EOS
        else:
            new_text, stopped = self.stopper.feed(self.detok.push(token_id))
            if stopped:
                self.finish_reason = FINISH_STOP
        if self.finish_reason is None and (
            len(self.generated) >= params.max_new_tokens
            or len(self.prompt_ids) + len(self.generated) >= self.max_len
        ):
            self.finish_reason = FINISH_LENGTH
        if self.finish_reason not in (None, FINISH_STOP):
            new_text += self.stopper.feed(self.detok.flush())[0] + self.stopper.flush()
        self.text.append(new_text)
        return TokenEvent(self.request_id, new_text, token_id, self._result_if_done())

    def cancel(self) -> TokenEvent:
        self.finish_reason = FINISH_CANCELLED
        return TokenEvent(self.request_id, "", None, self._result_if_done())

    def fail(self, message: str, kind: str = FAILURE_PRECONDITION) -> TokenEvent:
        """End with an error: its adapter cannot be served on new weights, or its
        logits were not finite. Its tokens so far stay in the result."""
        self.finish_reason, self.error, self.error_kind = FINISH_ERROR, message, kind
        return TokenEvent(self.request_id, "", None, self._result_if_done())

    def _result_if_done(self) -> GenerationResult | None:
        if self.finish_reason is None:
            return None
        return GenerationResult(
            request_id=self.request_id,
            text="".join(self.text),
            token_ids=list(self.generated),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            resolution=self.resolution,
            timings=self._timings(),
            error=self.error,
            error_kind=self.error_kind,
        )

    def _timings(self) -> Timings:
        t0, now = self.submitted_at, time.monotonic()
        started = self.started_at if self.started_at is not None else now
        first = self.first_token_at if self.first_token_at is not None else now
        return Timings(queue=started - t0, first_token=first - t0, total=now - t0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
