"""The engine: one resident model, many adapters, continuous batching of decode steps.

Single-threaded by design: `step()` runs on one engine thread; `submit()` and
`cancel()` may be called from any thread and only touch a locked queue.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from loramux.adapters.slots import SlotPool
from loramux.adapters.store import AdapterStore
from loramux.adapters.types import LoraAdapter
from loramux.config import EngineConfig
from loramux.engine.batch import concat_caches, left_pad, positions, select_rows
from loramux.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from loramux.engine.sampling import RowSampler, sample_next
from loramux.engine.sequence import Sequence
from loramux.engine.types import (
    RESOLVED_ADAPTER,
    RESOLVED_BASE,
    RESOLVED_MERGE,
    RESOLVED_MIX,
    RESOLVED_PINNED,
    GenerationRequest,
    GenerationResult,
    Resolution,
    TokenEvent,
)
from loramux.errors import FailedPrecondition, InvalidArgument, LoramuxError, ResourceExhausted
from loramux.merging.compensation import compensated_adapter
from loramux.merging.lowrank import Factored
from loramux.merging.pinning import WeightPinner
from loramux.merging.service import MergeService
from loramux.model.loader import LoadedModel
from loramux.model.lora_layers import LoraContext
from loramux_kernels import NO_SLOT, plan_step

log = logging.getLogger(__name__)


@dataclass
class RunningBatch:
    """Rows decoding together. cache rows and mask rows follow `seqs` order."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] 1 on real tokens, 0 on left padding
    next_ids: torch.Tensor  # [B] the token each row feeds next


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        store: AdapterStore,
        pool: SlotPool,
        ctx: LoraContext,
        config: EngineConfig,
        merges: MergeService,
        pinner: WeightPinner,
    ):
        self.loaded, self.store, self.pool, self.ctx, self.config = loaded, store, pool, ctx, config
        self.merges, self.pinner = merges, pinner
        self._pending_swap: _Swap | None = None
        # Replaced (never mutated) by every pin/unpin, so a request resolved on
        # another thread reads one consistent weight state.
        self._pin_state = _PinState()
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.eos_ids = _eos_ids(loaded)
        self.max_len = _max_len(loaded, config.max_seq_len)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._batch: RunningBatch | None = None
        self._deferred_release: set[str] = set()
        store.subscribe_evictions(self._on_adapter_evicted)
        merges.cache.subscribe(self._on_adapter_evicted)

    # ---- requests (any thread) -------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Validate, tokenize and resolve the adapter, then queue the request.

        Errors (bad parameters, unknown adapter, prompt too long) raise here, in the
        caller's thread, before anything touches the running batch.
        """
        seq = self._make_sequence(request)
        with self._lock:
            self._waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        """The request stops at the next step boundary (its row is freed then)."""
        with self._lock:
            self._cancelled.add(request_id)

    def pin(self, selection: GenerationRequest) -> float:
        """Fold the adapter, named merge or mix that `selection` names into the base
        weights (exactly, uncompressed); returns seconds spent swapping.

        The swap waits for a step boundary with no running row (drain): admission
        pauses, running rows finish on the weights they started with, the weights
        change, admission resumes. No request ever sees two weight sets. Call from
        the engine thread (it drives steps until the swap is done); a server loop
        uses `request_swap` instead.
        """
        return self._drive(self.request_swap(self.exact_deltas(selection), selection_label(selection)))

    def unpin(self) -> float:
        return self._drive(self.request_swap(None, None))

    def _drive(self, swap: "_Swap") -> float:
        while not swap.done.is_set():
            self.step()
        if swap.error is not None:
            raise swap.error
        return swap.seconds

    def request_swap(self, deltas, label: str | None) -> "_Swap":
        """Queue a pin (deltas) or unpin (None); applied at the next drained step."""
        self.pinner.check_supported()
        swap = _Swap(deltas, label)
        with self._lock:
            if self._pending_swap is not None:
                raise FailedPrecondition("another pin or unpin is in progress")
            self._pending_swap = swap
        return swap

    @property
    def pinned(self) -> str | None:
        return self.pinner.label

    def exact_deltas(self, selection: GenerationRequest):
        """Uncompressed ΔW per module of the adapter, named merge or mix that
        `selection` names (what pinning folds in and export writes)."""
        if selection.adapter is not None:
            adapter = self.store.get(selection.adapter)
            return {n: Factored(m.B.float() * m.scale, m.A.float()) for n, m in adapter.modules.items()}
        spec = self.merges.get(selection.merge) if selection.merge else selection.mix
        if spec is None:
            raise InvalidArgument("pin needs an adapter, a merge name or a mix")
        return self.merges.exact_deltas(spec)

    def _apply_pending_swap(self) -> None:
        swap = self._pending_swap
        if swap is None or self._batch is not None:
            return
        try:
            if swap.deltas is None:
                swap.seconds = self.pinner.unpin()
            else:
                swap.seconds = self.pinner.pin(swap.deltas, swap.label)
        except Exception as e:  # reported to the caller, the engine goes on
            swap.error = e
        factors, refusal = self._compensation_for(swap.deltas)
        self._pin_state = _PinState(self._pin_state.epoch + 1, self.pinner.label, factors, refusal)
        with self._lock:
            self._pending_swap = None
        swap.done.set()

    def _compensation_for(self, deltas) -> tuple[dict | None, str | None]:
        if not self.pinner.pinned:
            return None, None
        if self.pinner.quantized:
            return None, (
                "the base is quantized (re-quantizing with the merge moved every weight), "
                "so adapters cannot be served exactly on top of it"
            )
        if not all(isinstance(d, Factored) for d in deltas.values()):
            return None, "its ΔW is dense (not low rank), so it cannot be subtracted exactly per request"
        return deltas, None

    def _on_weights(self, requested: LoraAdapter | None, pin: "_PinState") -> LoraAdapter | None:
        """What a row must add so it computes W + ΔW_requested on the weights of `pin`:
        `requested` itself, or requested − P while a merge P is pinned."""
        if requested is None or pin.label is None:
            return requested
        if pin.factors is None:
            raise FailedPrecondition(
                f"{pin.label} is pinned and {pin.refusal}; requests naming an "
                "adapter, merge or mix are refused until it is unpinned"
            )
        pin_id = f"pin{pin.epoch}"
        return self.merges.cache.get_or_load(
            f"{requested.name}~{pin_id}",
            lambda: compensated_adapter(requested, pin.factors, pin_id, self.pool.max_rank),
        )

    def _rebind_waiting(self) -> list[TokenEvent]:
        """Waiting rows resolved before the last pin/unpin get their adapter for the
        weights they will run on; a row that cannot be served ends with an error."""
        with self._lock:
            stale = [s for s in self._waiting if s.pin_epoch != self._pin_state.epoch]
        pin = self._pin_state
        failed: dict[str, tuple[Sequence, str]] = {}
        for seq in stale:
            try:
                seq.adapter, seq.pin_epoch = self._on_weights(seq.requested, pin), pin.epoch
            except LoramuxError as e:
                failed[seq.request_id] = (seq, str(e))
        if not failed:
            return []
        with self._lock:
            self._waiting = collections.deque(s for s in self._waiting if s.request_id not in failed)
        return [seq.fail(message) for seq, message in failed.values()]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._batch.seqs) if self._batch else 0

    def usage(self) -> "EngineUsage":
        """Running and waiting requests and the adapters they name. Call on the
        engine thread (it reads the running batch)."""
        with self._lock:
            waiting = list(self._waiting)
        running = list(self._batch.seqs) if self._batch else []
        return EngineUsage(len(running), len(waiting), _served_names(running), _served_names(waiting))

    def abort_all(self) -> list[str]:
        """Drop every running and waiting request (after a failed step, whose batch
        state can no longer be trusted); returns their ids. Engine thread only."""
        with self._lock:
            seqs = list(self._waiting) + (self._batch.seqs if self._batch else [])
            self._waiting.clear()
            self._cancelled.clear()
        self._batch = None
        return [s.request_id for s in seqs]

    def has_work(self) -> bool:
        return bool(self._waiting) or self._batch is not None or self._pending_swap is not None

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
        batched forward in which each row uses its own adapter. For scoring
        (perplexity, evaluation) and tests; call it on the engine thread."""
        seqs = [self._make_sequence(r) for r in requests]
        busy = self._busy_slots()
        for s in seqs:
            if s.adapter is not None:
                s.slot = self.pool.acquire(s.slot_key, s.adapter.modules, busy)
                busy.add(s.slot)
        ids, mask = left_pad([s.prompt_ids for s in seqs], self.tokenizer.pad_token_id, self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, cache, [s.slot for s in seqs], keep=0)
        return [logits[i, -len(s.prompt_ids):].float() for i, s in enumerate(seqs)]

    # ---- the step loop (engine thread) -----------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One scheduling iteration: drop cancelled rows, admit and prefill waiting
        requests, then decode one token for every running row."""
        events = self._drop_cancelled()
        self._apply_pending_swap()
        if self._pending_swap is None:
            events += self._rebind_waiting()
        admitted = [] if self._pending_swap is not None else self._admit()
        if admitted:
            events += self._prefill(admitted)
        if self._batch is not None:
            events += self._decode()
        self._release_deferred()
        return events

    def _make_sequence(self, request: GenerationRequest) -> Sequence:
        request.sampling.validate(self.max_len)
        prompt_ids = self._encode(request)
        if len(prompt_ids) >= self.max_len:
            raise InvalidArgument(
                f"prompt has {len(prompt_ids)} tokens; the limit is {self.max_len - 1}"
            )
        # One snapshot: a pin landing meanwhile leaves this row on an older epoch,
        # and admission rebinds it.
        pin = self._pin_state
        requested, resolution = self._resolve_selection(request, pin)
        return Sequence(
            request=request,
            prompt_ids=prompt_ids,
            sampler=RowSampler(request.sampling, prompt_ids, self.loaded.spec.vocab_size, self.device),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stopper=StopMatcher(request.sampling.stop),
            eos_ids=self.eos_ids,
            max_len=self.max_len,
            adapter=self._on_weights(requested, pin),
            requested=requested,
            pin_epoch=pin.epoch,
            resolution=resolution,
        )

    def _resolve_selection(
        self, request: GenerationRequest, pin: "_PinState"
    ) -> tuple[LoraAdapter | None, Resolution]:
        """(adapter or virtual merged adapter, how it was found) for the request."""
        chosen = [x for x in (request.adapter, request.merge, request.mix) if x is not None]
        if len(chosen) > 1:
            raise InvalidArgument("give at most one of adapter, merge or mix")
        if request.adapter is not None:
            hit = request.adapter in self.store.cache
            adapter = self.store.get(request.adapter)
            return adapter, Resolution(RESOLVED_ADAPTER, request.adapter, hit)
        if request.merge is not None:
            adapter, report = self.merges.resolve(self.merges.get(request.merge))
            return adapter, Resolution(RESOLVED_MERGE, request.merge, report.cache_hit, report)
        if request.mix is not None:
            adapter, report = self.merges.resolve(request.mix)
            return adapter, Resolution(RESOLVED_MIX, request.mix.describe(), report.cache_hit, report)
        if pin.label is not None:
            return None, Resolution(RESOLVED_PINNED, pin.label)
        return None, Resolution(RESOLVED_BASE)

    def _encode(self, request: GenerationRequest) -> list[int]:
        if (request.prompt is None) == (request.messages is None):
            raise InvalidArgument("give exactly one of prompt or messages")
        if request.messages is not None:
            _check_messages(request.messages)
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidArgument("the base model has no chat template; send a prompt")
            text = self.tokenizer.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if not request.prompt:
                raise InvalidArgument("prompt is empty")
            ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise InvalidArgument("prompt encodes to no tokens")
        return ids

    def _drop_cancelled(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return []
            waiting = [s for s in self._waiting if s.request_id in cancelled]
            self._waiting = collections.deque(
                s for s in self._waiting if s.request_id not in cancelled
            )
        events = [s.cancel() for s in waiting]
        if self._batch is not None:
            for seq in self._batch.seqs:
                if seq.request_id in cancelled and not seq.finished:
                    events.append(seq.cancel())
            self._remove_finished()
        return events

    def _busy_slots(self) -> set[int]:
        return {s.slot for s in self._batch.seqs} if self._batch else set()

    def _admit(self) -> list[Sequence]:
        """Take waiting requests FIFO while rows and device slots allow. A request
        whose adapter cannot get a slot waits; it is retried first next step."""
        room = self.config.max_batch_rows - self.num_running
        admitted: list[Sequence] = []
        busy = self._busy_slots()
        with self._lock:
            while self._waiting and len(admitted) < room:
                seq = self._waiting[0]
                if seq.adapter is not None:
                    try:
                        seq.slot = self.pool.acquire(seq.slot_key, seq.adapter.modules, busy)
                    except ResourceExhausted:
                        break  # FIFO: later requests do not overtake it
                    busy.add(seq.slot)
                self._waiting.popleft()
                admitted.append(seq)
        return admitted

    def _forward(self, ids, mask, cache, slots: list[int], keep: int = 1) -> torch.Tensor:
        """One model forward with each row's adapter (NO_SLOT for none).

        Returns logits [B, V] of the last position, or [B, T, V] when keep=0."""
        b, t = ids.shape
        token_slots = torch.tensor(slots, dtype=torch.long, device=self.device)
        token_slots = token_slots.repeat_interleave(t)  # [B*T], row-major like x
        self.ctx.plan = plan_step(token_slots, self.pool.rank, self.pool.dtype)
        try:
            out = self.model(
                input_ids=ids,
                # No padding (one row, equal lengths): let attention take its causal
                # fast path instead of materializing a 4-D mask every step.
                attention_mask=None if bool(mask.all()) else mask,
                position_ids=positions(mask, t),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        finally:
            self.ctx.plan = None
        return out.logits[:, -1] if keep == 1 else out.logits

    def _prefill(self, seqs: list[Sequence]) -> list[TokenEvent]:
        started = time.monotonic()
        for s in seqs:
            s.started_at = started
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad([s.prompt_ids for s in seqs], pad, self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, cache, [s.slot for s in seqs])
        events = self._sample_and_accept(seqs, logits)
        next_ids = torch.tensor([s.generated[-1] for s in seqs], device=self.device)
        if self._batch is None:
            self._batch = RunningBatch(seqs, cache, mask, next_ids)
        else:
            b = self._batch
            b.cache, b.mask = concat_caches(b.cache, b.mask, cache, mask)
            b.seqs = b.seqs + seqs
            b.next_ids = torch.cat([b.next_ids, next_ids])
        self._remove_finished()
        return events

    def _decode(self) -> list[TokenEvent]:
        b = self._batch
        b.mask = torch.cat([b.mask, b.mask.new_ones(b.mask.shape[0], 1)], dim=1)
        slots = [s.slot for s in b.seqs]
        logits = self._forward(b.next_ids.unsqueeze(1), b.mask, b.cache, slots)
        events = self._sample_and_accept(b.seqs, logits)
        b.next_ids = torch.tensor([s.generated[-1] for s in b.seqs], device=self.device)
        self._remove_finished()
        return events

    def _sample_and_accept(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        tokens = sample_next(logits, [s.sampler for s in seqs])
        return [s.accept(tok) for s, tok in zip(seqs, tokens)]

    def _remove_finished(self) -> None:
        b = self._batch
        if b is None:
            return
        keep = [i for i, s in enumerate(b.seqs) if not s.finished]
        if len(keep) == len(b.seqs):
            return
        if not keep:
            self._batch = None
            return
        idx = torch.tensor(keep, device=self.device)
        b.cache, b.mask = select_rows(b.cache, b.mask, idx)
        b.seqs = [b.seqs[i] for i in keep]
        b.next_ids = b.next_ids.index_select(0, idx)

    # ---- adapter lifecycle -----------------------------------------------------

    def _on_adapter_evicted(self, name: str) -> None:
        """Host cache dropped an adapter: free its device slot now, or once the rows
        using it finish (running requests keep the weights they started with)."""
        with self._lock:
            self._deferred_release.add(name)

    def _release_deferred(self) -> None:
        with self._lock:
            if not self._deferred_release:
                return
            names = set(self._deferred_release)
            in_use = {s.slot_key for s in self._batch.seqs} if self._batch else set()
            in_use |= {s.slot_key for s in self._waiting}
        still_used = set()
        for key in self.pool.resident():
            name = key.split("@", 1)[0]
            if name not in names:
                continue
            if key in in_use:
                still_used.add(name)
            else:
                self.pool.release(key)
        with self._lock:
            self._deferred_release = (self._deferred_release - names) | still_used


@dataclass(frozen=True)
class _PinState:
    """The base weights' pin: epoch (bumped by every pin/unpin), the pinned label,
    P's factors when other adapters can be served exactly on top of it, else why not."""

    epoch: int = 0
    label: str | None = None
    factors: dict[str, Factored] | None = None
    refusal: str | None = None


@dataclass(frozen=True)
class EngineUsage:
    """A snapshot of the engine's load. *_adapters: sorted names of the adapters and
    named merges that running / waiting requests use (inline mixes are unnamed)."""

    running: int
    waiting: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


def _served_names(seqs: list[Sequence]) -> tuple[str, ...]:
    kinds = (RESOLVED_ADAPTER, RESOLVED_MERGE)
    return tuple(sorted({s.resolution.name for s in seqs if s.resolution.kind in kinds}))


@dataclass
class _Swap:
    """A queued pin (deltas set) or unpin (deltas None) and its outcome."""

    deltas: dict | None
    label: str | None
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0
    error: Exception | None = None


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


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return frozenset(i for i in ids if i is not None)


def _max_len(loaded: LoadedModel, configured: int) -> int:
    cfg = loaded.model.config
    limit = min(configured, getattr(cfg, "max_position_embeddings", configured) or configured)
    # Rows share a left-padded cache; beyond a sliding window the layers would crop
    # it, so sequences are capped at the window and every layer stays a plain cache.
    window = getattr(cfg, "sliding_window", None)
    return min(limit, window) if window else limit
