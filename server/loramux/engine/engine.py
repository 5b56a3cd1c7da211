"""The engine facade: one resident model, many adapters, continuous batching over
a paged KV cache.

The parts own their state: the scheduler (waiting FIFO, running rows, admission,
preemption), the model runner (packed step inputs, forward, sampling), the pin
controller (epochs, swaps) and the resolver (selection → adapter, compensation).
`Engine` wires them and is what the service, CLI and tests call. `step()` runs on
one engine thread; `submit()` and `cancel()` may be called from any thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loramux.adapters.slots import SlotPool
from loramux.adapters.store import AdapterInfo, AdapterStore
from loramux.config import EngineConfig
from loramux.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loramux.engine.kv_cache import KvCache
from loramux.engine.model_runner import ModelRunner
from loramux.engine.pins import PinController, Swap
from loramux.engine.resolver import Resolver
from loramux.engine.sampling import RowFailure, RowSampler
from loramux.engine.scheduler import Chunk, Limits, Scheduler
from loramux.engine.sequence import Sequence
from loramux.engine.types import (
    FAILURE_NUMERIC,
    RESOLVED_ADAPTER,
    RESOLVED_MERGE,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from loramux.errors import FailedPrecondition, InvalidArgument, LoramuxError, ResourceExhausted
from loramux.merging.materialize import MergeReport
from loramux.merging.service import MergeService
from loramux.merging.spec import MixSpec
from loramux.model.loader import LoadedModel
from loramux.model.lora_layers import LoraContext

log = logging.getLogger(__name__)

# A long prompt is first tokenized this many characters per allowed token: far
# more than real text has (3-5), so a prompt over the limit is refused from it.
_TYPICAL_CHARS_PER_TOKEN = 8


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        store: AdapterStore,
        pool: SlotPool,
        ctx: LoraContext,
        config: EngineConfig,
        merges: MergeService,
        pins: PinController,
        kv: KvCache,
    ):
        self.loaded, self.config = loaded, config
        self._store, self._pool, self._merges, self._pins, self._kv = store, pool, merges, pins, kv
        self.tokenizer, self.device = loaded.tokenizer, loaded.device
        self.eos_ids = _eos_ids(loaded)
        self.max_len = max_sequence_length(loaded, config.max_seq_len)
        self._max_token_chars = _longest_token_chars(self.tokenizer)
        self.resolver = Resolver(store, merges, pool.max_rank)
        self.scheduler = Scheduler(
            Limits(config.max_batch_rows, config.max_batch_tokens, config.prefill_chunk_tokens),
            kv.allocator, pool,
        )
        self.runner = ModelRunner(loaded.model, kv, pool, ctx, loaded.device)
        self._deferred_release: set[str] = set()
        self.last_step_tokens = 0
        self.row_failures = 0  # rows ended by non-finite logits (their own weights)
        store.subscribe_evictions(self._on_adapter_evicted)
        merges.cache.subscribe(self._on_adapter_evicted)

    # ---- requests (any thread) -------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        received_at: float | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Validate, tokenize and resolve the adapter, then queue the request.

        Errors (bad parameters, unknown adapter, prompt too long) raise here, in the
        caller's thread, before anything touches the running rows. received_at:
        time.monotonic() when the caller got the request (its timings count from
        there, admission and merging included). check: called between units of a
        merge; raises to abandon it (its caller left, or its time is up).
        """
        self.scheduler.submit(self._make_sequence(request, received_at, check))

    def needs_merge(self, request: GenerationRequest) -> bool:
        """The request names a mix or merge that is not merged yet: admitting it
        may take seconds (callers admit it apart from the rest)."""
        return self.resolver.needs_merge(request)

    def cancel(self, request_id: str) -> None:
        """The request stops at the next step boundary (its row is freed then)."""
        self.scheduler.cancel(request_id)

    # ---- pinning ---------------------------------------------------------------

    def pin(self, selection: GenerationRequest) -> float:
        """Fold the adapter, named merge or mix that `selection` names into the base
        weights (exactly, uncompressed); returns seconds spent swapping.

        The swap waits for a step boundary with no row in flight (drain): admission
        pauses, running rows finish on the weights they started with, the weights
        change, admission resumes. No request ever sees two weight sets. Call from
        the engine thread (it drives steps until the swap is done); a server loop
        uses `request_swap` instead.
        """
        return self._drive(self.request_swap(self.exact_deltas(selection), selection_label(selection)))

    def unpin(self) -> float:
        return self._drive(self.request_swap(None, None))

    def request_swap(self, deltas, label: str | None) -> Swap:
        """Queue a pin (deltas) or unpin (None); applied at the next drained step."""
        return self._pins.request(deltas, label)

    @property
    def pinned(self) -> str | None:
        return self._pins.label

    @property
    def pinner(self):
        """The weight pinner (its layers are the base weights, for export)."""
        return self._pins.pinner

    def exact_deltas(self, selection: GenerationRequest):
        return self.resolver.exact_deltas(selection)

    def _drive(self, swap: Swap) -> float:
        while not swap.done.is_set():
            self.step()
        if swap.error is not None:
            raise swap.error
        return swap.seconds

    # ---- operator API (any thread) ---------------------------------------------

    def load_adapter(self, name: str, keep: bool = False):
        return self._store.pin(name) if keep else self._store.load(name)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter from the host cache, the operator's keep included; its
        slot is freed once no row uses it."""
        if any(a.name == name and a.pinned for a in self._store.list()):
            self._store.unpin(name)
        self._store.unload(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._store.list()

    def create_merge(self, name: str, spec: MixSpec, replace_existing: bool = False) -> MergeReport:
        return self._merges.create(name, spec, replace_existing)

    def delete_merge(self, name: str) -> None:
        if self.pinned == f"merge:{name}":
            raise FailedPrecondition(f"merge {name!r} is pinned into the base weights; unpin it first")
        self._merges.delete(name)

    def list_merges(self) -> list[tuple[str, MixSpec, MergeReport | None]]:
        return [(n, s, self._merges.report_of(n)) for n, s in sorted(self._merges.list().items())]

    # ---- state -----------------------------------------------------------------

    # The collaborators, for tests, benchmarks and evaluation; the service reads
    # `info()` and calls the operator methods above instead.
    @property
    def store(self) -> AdapterStore:
        return self._store

    @property
    def merges(self) -> MergeService:
        return self._merges

    @property
    def pool(self) -> SlotPool:
        return self._pool

    @property
    def kv(self) -> KvCache:
        return self._kv

    @property
    def model(self):
        return self.loaded.model

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def usage(self) -> "EngineUsage":
        """Running and waiting requests and the adapters they name."""
        running, waiting = self.scheduler.snapshot()
        return EngineUsage(len(running), len(waiting), _served_names(running), _served_names(waiting))

    def info(self) -> "EngineInfo":
        """One snapshot of everything operators and metrics read (any thread)."""
        host, merges, pool, blocks = self._store.cache, self._merges.cache, self._pool, self._kv.allocator
        spec = self.loaded.spec
        return EngineInfo(
            base_model=spec.name,
            model_fingerprint=spec.fingerprint,
            device=str(self.loaded.device),
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            quantization=self.loaded.quantization,
            pinned=self.pinned,
            usage=self.usage(),
            host_cache=CacheInfo(host.capacity_bytes, host.bytes_used, host.count, host.stats),
            merge_cache=CacheInfo(merges.capacity_bytes, merges.bytes_used, merges.count, merges.stats),
            slots=SlotInfo(pool.num_slots, len(pool.resident()), pool.max_rank, pool.nbytes, pool.stats),
            kv=KvInfo(
                block_size=self._kv.block_size, blocks=blocks.num_blocks, used=blocks.num_used,
                cached=blocks.num_cached, free=blocks.num_free - blocks.num_cached,
                capacity_bytes=self._kv.nbytes, stats=blocks.stats,
            ),
            max_batch_rows=self.config.max_batch_rows,
            max_batch_tokens=self.config.max_batch_tokens,
            last_step_tokens=self.last_step_tokens,
        )

    def abort_all(self) -> list[str]:
        """Drop every running and waiting request (after a failed step, whose state
        can no longer be trusted); returns their ids. Engine thread only."""
        return [s.request_id for s in self.scheduler.abort_all()]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._pins.pending

    # ---- running (engine thread) -----------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion on the calling thread (CLI, tests, benches)."""
        for r in requests:
            self.submit(r)
        results: dict[str, GenerationResult] = {}
        while self.has_work():
            for ev in self.step():
                if ev.result is not None:
                    results[ev.request_id] = ev.result
        return [results[r.request_id] for r in requests]

    @torch.inference_mode()
    def prompt_logits(self, requests: list[GenerationRequest]) -> list[torch.Tensor]:
        """Logits at every prompt position, [T_i, V] float32 per request, from one
        packed forward in which each row uses its own adapter. For scoring
        (perplexity, evaluation) and tests; call it on the engine thread."""
        seqs = [self._make_sequence(r) for r in requests]
        busy = {s.slot for s in self.scheduler.running if s.adapter is not None}
        blocks = self._kv.allocator
        need = sum(blocks.blocks_for(len(s.prompt_ids)) for s in seqs)
        if need > blocks.num_free:
            raise ResourceExhausted(f"scoring needs {need} KV blocks; {blocks.num_free} are free")
        try:
            for s in seqs:
                if s.adapter is not None:
                    s.slot = self._pool.acquire(s.slot_key, s.adapter.modules, busy)
                    busy.add(s.slot)
                s.block_table = blocks.allocate(blocks.blocks_for(len(s.prompt_ids)))
            chunks = [Chunk(s, 0, len(s.prompt_ids)) for s in seqs]
            logits = self.runner.forward(self.runner.prepare(chunks, all_logits=True))  # [N, V]
        finally:
            for s in seqs:
                blocks.free(s.block_table)
        return [t.float() for t in logits.split([len(s.prompt_ids) for s in seqs])]

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One scheduling iteration: drop cancelled rows, apply a drained swap,
        then one packed forward over decode tokens and prompt chunks."""
        events = self.scheduler.drop_cancelled()
        if self._pins.pending and not self.scheduler.in_flight():
            self._pins.apply()
        if not self._pins.pending:
            events += self._rebind_waiting()
        # A request resolved on an RPC thread while the swap above landed is still
        # on the old epoch; the scheduler leaves it for the next step's rebind.
        chunks = self.scheduler.schedule(admit_new=not self._pins.pending, pin_epoch=self._pins.state.epoch)
        self.last_step_tokens = sum(c.count for c in chunks)
        if chunks:
            events += self._run(chunks)
        self._release_deferred()
        return events

    def _run(self, chunks: list[Chunk]) -> list[TokenEvent]:
        for c in chunks:
            if c.seq.started_at is None:
                c.seq.started_at = time.monotonic()
        tokens = self.runner.step(chunks)
        self.scheduler.commit(chunks)
        sampling = [c.seq for c in chunks if c.samples]
        events = [
            seq.fail(tok.message, FAILURE_NUMERIC) if isinstance(tok, RowFailure) else seq.accept(tok)
            for seq, tok in zip(sampling, tokens)
        ]
        self.row_failures += sum(isinstance(t, RowFailure) for t in tokens)
        self.scheduler.remove_finished()
        return events

    def _make_sequence(
        self,
        request: GenerationRequest,
        received_at: float | None = None,
        check: Callable[[], None] | None = None,
    ) -> Sequence:
        received_at = time.monotonic() if received_at is None else received_at
        request.sampling.validate(self.max_len)
        prompt_ids = self._encode(request)
        if len(prompt_ids) >= self.max_len:
            raise InvalidArgument(
                f"prompt has {len(prompt_ids)} tokens; the limit is {self.max_len - 1}"
            )
        self._check_fits(len(prompt_ids), request.sampling.max_new_tokens)
        # One snapshot: a pin landing meanwhile leaves this row on an older epoch,
        # and admission rebinds it.
        pin = self._pins.state
        requested, resolution = self.resolver.resolve(request, pin, check)
        return Sequence(
            request=request,
            prompt_ids=prompt_ids,
            sampler=RowSampler(request.sampling, prompt_ids, self.loaded.spec.vocab_size, self.device),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stopper=StopMatcher(request.sampling.stop),
            eos_ids=self.eos_ids,
            max_len=self.max_len,
            adapter=self.resolver.on_weights(requested, pin),
            requested=requested,
            pin_epoch=pin.epoch,
            resolution=resolution,
            submitted_at=received_at,
        )

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """A row must fit the whole KV cache alone, or preemption could never make
        room for it."""
        tokens = min(prompt_tokens + max_new_tokens, self.max_len)
        blocks = self._kv.allocator
        if blocks.blocks_for(tokens) > blocks.num_blocks:
            raise InvalidArgument(
                f"the prompt plus max_new_tokens need {tokens} tokens of KV cache; the cache holds "
                f"{self._kv.capacity_tokens} (raise --kv-cache-bytes or lower max_new_tokens)"
            )

    def _encode(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidArgument("give exactly one of prompt or messages")
        if request.messages is not None:
            _check_messages(request.messages)
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidArgument("the base model has no chat template; send a prompt")
            self._check_text_size(sum(len(m.get("content", "")) for m in request.messages))
            text = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            ids = self._tokenize(text, add_special_tokens=False)
        else:
            if not request.prompt:
                raise InvalidArgument("prompt is empty")
            self._check_text_size(len(request.prompt))
            ids = self._tokenize(request.prompt)
        if not ids:
            raise InvalidArgument("prompt encodes to no tokens")
        return ids

    def _check_text_size(self, chars: int) -> None:
        """Refuse text that cannot fit before tokenizing it: no token covers more
        characters than the longest vocabulary entry."""
        if chars > self.max_len * self._max_token_chars:
            raise InvalidArgument(
                f"prompt has {chars} characters, more than {self.max_len - 1} tokens can hold"
            )

    def _tokenize(self, text: str, **kw) -> list[int]:
        """Token ids of `text`, refusing a prompt over the limit after tokenizing at
        most a bounded prefix of it (a long prompt costs milliseconds to refuse)."""
        head = self.max_len * _TYPICAL_CHARS_PER_TOKEN
        if len(text) > head:
            # A cut can split one token in two, hence the margin of 2.
            n = len(self.tokenizer(text[:head], **kw)["input_ids"])
            if n >= self.max_len + 2:
                raise InvalidArgument(
                    f"prompt has more than {self.max_len - 1} tokens, the limit"
                )
        return self.tokenizer(text, **kw)["input_ids"]

    def _rebind_waiting(self) -> list[TokenEvent]:
        """Waiting rows resolved before the last pin/unpin get their adapter for the
        weights they will run on; a row that cannot be served ends with an error."""
        pin = self._pins.state
        stale = [s for s in self.scheduler.waiting() if s.pin_epoch != pin.epoch]
        failed: dict[str, tuple[Sequence, str]] = {}
        for seq in stale:
            try:
                seq.adapter, seq.pin_epoch = self.resolver.on_weights(seq.requested, pin), pin.epoch
                if seq.requested is None:  # base or pinned: say which weights answer now
                    seq.resolution = self.resolver.unselected(pin)
            except LoramuxError as e:
                failed[seq.request_id] = (seq, str(e))
        if not failed:
            return []
        self.scheduler.remove_waiting(set(failed))
        return [seq.fail(message) for seq, message in failed.values()]

    # ---- adapter lifecycle -----------------------------------------------------

    def _on_adapter_evicted(self, name: str) -> None:
        """Host cache dropped an adapter: free its device slot now, or once the rows
        using it finish (running requests keep the weights they started with)."""
        self._deferred_release.add(name)

    def _release_deferred(self) -> None:
        if not self._deferred_release:
            return
        names = set(self._deferred_release)
        running, waiting = self.scheduler.snapshot()
        in_use = {s.slot_key for s in running + waiting}
        still_used = set()
        for key in self._pool.resident():
            name = key.split("@", 1)[0]
            if name not in names:
                continue
            if key in in_use:
                still_used.add(name)
            else:
                self._pool.release(key)
        self._deferred_release = (self._deferred_release - names) | still_used


@dataclass(frozen=True)
class EngineUsage:
    """A snapshot of the engine's load. *_adapters: sorted names of the adapters and
    named merges that running / waiting requests use (inline mixes are unnamed)."""

    running: int
    waiting: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


@dataclass(frozen=True)
class CacheInfo:
    capacity_bytes: int
    bytes_used: int
    count: int
    stats: object  # the cache's CacheStats (hits, misses, evictions, loads)


@dataclass(frozen=True)
class SlotInfo:
    num_slots: int
    used: int
    max_rank: int
    nbytes: int
    stats: object  # SlotStats


@dataclass(frozen=True)
class KvInfo:
    """blocks = used + cached + free; cached blocks hold reusable prefixes and are
    reclaimed when no free block is left."""

    block_size: int
    blocks: int
    used: int
    cached: int
    free: int
    capacity_bytes: int
    stats: object  # BlockStats

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by rows (vLLM's kv_cache_usage_perc, 0-1)."""
        return self.used / self.blocks if self.blocks else 0.0


@dataclass(frozen=True)
class EngineInfo:
    """Everything Admin, metrics and export read about the engine, at one moment."""

    base_model: str
    model_fingerprint: str
    device: str
    dtype: str
    quantization: str
    pinned: str | None
    usage: EngineUsage
    host_cache: CacheInfo
    merge_cache: CacheInfo
    slots: SlotInfo
    kv: KvInfo
    max_batch_rows: int
    max_batch_tokens: int
    last_step_tokens: int


def _served_names(seqs: list[Sequence]) -> tuple[str, ...]:
    kinds = (RESOLVED_ADAPTER, RESOLVED_MERGE)
    return tuple(sorted({s.resolution.name for s in seqs if s.resolution.kind in kinds}))


def selection_label(selection: GenerationRequest) -> str:
    """A short human label: adapter:NAME, merge:NAME or mix:METHOD(a=w,...)."""
    if selection.adapter is not None:
        return f"adapter:{selection.adapter}"
    if selection.merge is not None:
        return f"merge:{selection.merge}"
    return f"mix:{selection.mix.describe()}" if selection.mix else "none"


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise InvalidArgument("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m:
            raise InvalidArgument(f"message {i} must have a role and content")
        if m["role"] not in ("system", "user", "assistant"):
            raise InvalidArgument(f"message {i} has unknown role {m['role']!r}")
        if not isinstance(m.get("content", ""), str):
            raise InvalidArgument(f"message {i} content must be a string")


def _longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token decodes to: the longest
    vocabulary entry (byte-level entries are at least as long as their text)."""
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) if vocab else 1


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return frozenset(i for i in ids if i is not None)


def max_sequence_length(loaded: LoadedModel, configured: int) -> int:
    cfg = loaded.model.config
    limit = min(configured, getattr(cfg, "max_position_embeddings", configured) or configured)
    # Attention here covers every earlier token; beyond a sliding window the model
    # would attend to fewer, so sequences are capped at the window.
    window = getattr(cfg, "sliding_window", None)
    return min(limit, window) if window else limit
