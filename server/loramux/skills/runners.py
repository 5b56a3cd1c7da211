"""Who answers an evaluation's prompts: the engine in this process, or a running
server through the Python client. Both answer greedily and report each answer as it
finishes; only the engine can score text (the gRPC API has no log-probabilities)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from loramux.errors import LoramuxError
from loramux.merging.spec import MixSpec

PPL_BATCH = 4  # rows per prompt_logits forward (its logits are [rows, T, vocab] float32)


@dataclass(frozen=True)
class Configuration:
    """What answers: the base model (no adapter), one adapter, or a merge."""

    label: str
    kind: str
    adapter: str | None = None
    mix: MixSpec | None = None

    @property
    def adapters(self) -> tuple[str, ...]:
        if self.mix is not None:
            return tuple(self.mix.names)
        return (self.adapter,) if self.adapter else ()


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict[str, str], ...]
    max_tokens: int


@dataclass(frozen=True)
class Answer:
    """text, or error when the request failed. rank, rel_error: how a merge was
    served (None for the base model and plain adapters)."""

    text: str
    error: str | None = None
    rank: int | None = None
    rel_error: float | None = None


class Runner(Protocol):
    mode: str

    def using(self, config: Configuration) -> AbstractContextManager[tuple[Configuration, dict | None]]:
        """Make `config` answerable; yields (the configuration to send, how it is
        served when the runner decides that itself, else None)."""

    def answer(self, config: Configuration, prompts: Sequence[Prompt],
               on_answer: Callable[[int, Answer], None]) -> None:
        """Answer every prompt greedily; on_answer(index, answer) is called on the
        calling thread as each finishes."""

    def nll(self, config: Configuration, texts: Sequence[str]) -> tuple[float, int] | None:
        """(summed negative log-likelihood, predicted tokens) of `texts`, or None when
        the runner cannot score text."""


class EngineRunner:
    """The engine in this process; call from one thread."""

    mode = "in-process"

    def __init__(self, engine, pin_merges: bool = False):
        self.engine, self.pin_merges = engine, pin_merges

    @contextmanager
    def using(self, config: Configuration) -> Iterator[tuple[Configuration, dict | None]]:
        if not (self.pin_merges and config.mix is not None):
            yield config, None
            return
        from loramux.engine.types import GenerationRequest

        seconds = self.engine.pin(GenerationRequest(mix=config.mix))
        try:  # requests without an adapter now get the merge, exactly
            yield replace(config, mix=None), {"pinned": True, "rank": None, "rel_error": 0.0,
                                              "pin_seconds": round(seconds, 3)}
        finally:
            self.engine.unpin()

    def answer(self, config, prompts, on_answer) -> None:
        from loramux.engine.sampling import SamplingParams
        from loramux.engine.types import FINISH_ERROR, GenerationRequest

        index: dict[str, int] = {}
        for i, p in enumerate(prompts):
            req = GenerationRequest(
                messages=[dict(m) for m in p.messages], adapter=config.adapter, mix=config.mix,
                sampling=SamplingParams(max_new_tokens=p.max_tokens, temperature=0.0))
            try:
                self.engine.submit(req)
            except LoramuxError as e:  # e.g. a prompt longer than the model takes
                on_answer(i, Answer("", error=f"{type(e).__name__}: {e}"))
                continue
            index[req.request_id] = i
        # engine.generate's loop, reporting each answer as it finishes.
        while self.engine.has_work():
            for ev in self.engine.step():
                r = ev.result
                if r is None or ev.request_id not in index:
                    continue
                merge = r.resolution.merge
                on_answer(index[ev.request_id], Answer(
                    r.text, r.error if r.finish_reason == FINISH_ERROR else None,
                    merge.rank if merge else None, merge.rel_error if merge else None))

    def nll(self, config, texts) -> tuple[float, int]:
        import torch

        from loramux.engine.types import GenerationRequest

        total, count = 0.0, 0
        for start in range(0, len(texts), PPL_BATCH):
            chunk = texts[start:start + PPL_BATCH]
            reqs = [GenerationRequest(prompt=t, adapter=config.adapter, mix=config.mix) for t in chunk]
            for text, logits in zip(chunk, self.engine.prompt_logits(reqs)):  # logits: [T, V]
                ids = torch.tensor(self.token_ids(text), device=logits.device)  # [T]
                if len(ids) != logits.shape[0]:
                    raise RuntimeError("prompt_logits and the tokenizer disagree on the length")
                total += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
                count += len(ids) - 1
        return total, count

    def token_ids(self, text: str) -> list[int]:
        """As the engine encodes a plain prompt (Engine._encode)."""
        return self.engine.tokenizer(text)["input_ids"]

    @property
    def max_prompt_tokens(self) -> int:
        return self.engine.max_len - 1


class ServerRunner:
    """A running loramux server through the Python client."""

    mode = "server"

    def __init__(self, client, concurrency: int):
        self.client, self.concurrency = client, concurrency

    @contextmanager
    def using(self, config: Configuration) -> Iterator[tuple[Configuration, dict | None]]:
        yield config, None

    def _one(self, config: Configuration, prompt: Prompt) -> Answer:
        from loramux_client import LoramuxClientError, Mix

        mix = None
        if config.mix is not None:
            m = config.mix
            mix = Mix(adapters=m.adapters, method=m.method, params=dict(m.params), seed=m.seed)
        try:
            g = self.client.generate(messages=[dict(x) for x in prompt.messages], adapter=config.adapter,
                                     mix=mix, max_tokens=prompt.max_tokens, temperature=0.0)
        except LoramuxClientError as e:
            return Answer("", error=f"{e.code_name}: {e.details}")
        served = g.resolution.kind in ("mix", "merge")
        return Answer(g.text, None, g.resolution.rank if served else None,
                      g.resolution.relative_error if served else None)

    def answer(self, config, prompts, on_answer) -> None:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self._one, config, p): i for i, p in enumerate(prompts)}
            for f in as_completed(futures):
                on_answer(futures[f], f.result())

    def nll(self, config, texts) -> None:
        return None
