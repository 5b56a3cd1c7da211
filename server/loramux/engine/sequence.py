"""One request's decoding state: sampler, detokenizer, stop strings, finish rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loramux.engine.sampling import RowSampler
from loramux.engine.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from loramux.adapters.types import LoraAdapter
from loramux.merging.materialize import MergeReport
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
    adapter: LoraAdapter | None = None
    slot_key: str | None = None  # key in the slot pool; None for the base model
    slot: int = NO_SLOT  # device slot while admitted
    merge: MergeReport | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def accept(self, token_id: int) -> TokenEvent:
        """Record a sampled token; return what it adds to the stream."""
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

    def _result_if_done(self) -> GenerationResult | None:
        if self.finish_reason is None:
            return None
        return GenerationResult(
            request_id=self.request_id,
            text="".join(self.text),
            token_ids=list(self.generated),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            merge=self.merge,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
