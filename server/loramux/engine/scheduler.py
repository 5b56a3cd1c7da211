"""The scheduler: the waiting FIFO, the running rows, cancellation, and what each
forward step computes.

A row's work is always "compute the keys/values of positions [num_computed,
num_tokens) of prompt + generated, then sample at the last one": a prompt is a long
run, decode is a run of one, and a preempted row (its blocks taken back) simply
starts again from whatever prefix the cache still holds. Each step packs every
decoding row's one token first, then chunks of prompts, under a token budget:
`max_batch_tokens` when nothing decodes, and while rows decode
`prefill_chunk_tokens` in all (decode tokens included), so a long prompt is
prefilled over many short steps and never stalls the running streams for long.

Admission is FIFO: a row waits for a device slot for its adapter, free KV blocks
for its first chunk and a free row, and no later request overtakes it. When blocks
run out for a running row, the youngest running row is preempted (vLLM's recompute
policy): its blocks are freed and it goes back to the front of the queue with its
tokens kept.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

from loramux.adapters.slots import SlotPool
from loramux.engine.kv_cache import BlockAllocator, block_hashes
from loramux.engine.sequence import Sequence
from loramux.engine.types import TokenEvent
from loramux.errors import ResourceExhausted


# While rows decode, prompts still get at least this many tokens a step.
MIN_PREFILL_TOKENS = 8


@dataclass
class Chunk:
    """Positions [start, start + count) of `seq` computed in this step."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the row's last token: the step samples its next one."""
        return self.start + self.count == self.seq.num_tokens


@dataclass(frozen=True)
class Limits:
    max_rows: int
    max_batch_tokens: int
    prefill_chunk_tokens: int


class Scheduler:
    """Owns the waiting and running rows. `submit` and `cancel` may be called from
    any thread (they only touch locked state); everything else runs on the engine
    thread."""

    def __init__(self, limits: Limits, blocks: BlockAllocator, slots: SlotPool):
        self.limits, self.blocks, self.slots = limits, blocks, slots
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.running: list[Sequence] = []  # admission order, oldest first
        self._admissions = 0

    # ---- any thread ----------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            self._waiting.append(seq)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def waiting(self) -> list[Sequence]:
        with self._lock:
            return list(self._waiting)

    def snapshot(self) -> tuple[list[Sequence], list[Sequence]]:
        """(running, waiting) as of now."""
        with self._lock:
            return list(self.running), list(self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- engine thread ---------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self.running)

    def in_flight(self) -> bool:
        """Rows that have started on the current weights: running, or preempted and
        waiting to resume (a swap must wait for them)."""
        return bool(self.running) or any(s.started for s in self.waiting())

    def drop_cancelled(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return []
            gone = [s for s in self._waiting if s.request_id in cancelled]
            self._waiting = collections.deque(s for s in self._waiting if s.request_id not in cancelled)
        events = [s.cancel() for s in gone]
        for seq in [s for s in self.running if s.request_id in cancelled and not s.finished]:
            events.append(seq.cancel())
        self.remove_finished()
        return events

    def remove_waiting(self, request_ids: set[str]) -> None:
        with self._lock:
            self._waiting = collections.deque(s for s in self._waiting if s.request_id not in request_ids)

    def remove_finished(self) -> None:
        """Free the blocks of finished running rows and drop them."""
        done = [s for s in self.running if s.finished]
        if not done:
            return
        for seq in done:
            self._release_blocks(seq)
        with self._lock:
            self.running = [s for s in self.running if not s.finished]

    def abort_all(self) -> list[Sequence]:
        """Drop every running and waiting row (their blocks freed); returns them."""
        with self._lock:
            rows = list(self._waiting) + self.running
            self._waiting.clear()
            self._cancelled.clear()
            running, self.running = self.running, []
        for seq in running:
            self._release_blocks(seq)
        return rows

    def schedule(self, admit_new: bool, pin_epoch: int) -> list[Chunk]:
        """The chunks of the next step. admit_new=False (a swap is pending) admits
        only preempted rows, which must finish on the weights they started on.
        A row resolved for another pin epoch than `pin_epoch` (the weights now in
        place) is not admitted: it waits, in order, to be rebound first."""
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        budget = self.limits.max_batch_tokens
        if decoding:
            # While rows stream, a step stays about as short as a decode step:
            # prompts get what is left of `prefill_chunk_tokens` (at least a few).
            budget = min(budget, max(self.limits.prefill_chunk_tokens, len(decoding) + MIN_PREFILL_TOKENS))
        plan = _StepPlan(budget)
        for seq in decoding + prefilling:
            if seq not in self.running or plan.budget == 0:
                continue  # preempted meanwhile, or no room left this step
            take = min(seq.num_tokens - seq.num_computed, plan.budget)
            if self._reserve(seq, take, plan):
                plan.add(Chunk(seq, seq.num_computed, take))
        self._admit(plan, admit_new, pin_epoch)
        return list(plan.chunks.values())

    def commit(self, chunks: list[Chunk]) -> None:
        """After the forward: the chunks' keys/values are in their blocks. Full
        blocks get their prefix hash so later rows can reuse them."""
        bs = self.blocks.block_size
        for c in chunks:
            seq = c.seq
            seq.num_computed = c.start + c.count
            full = seq.num_computed // bs
            if len(seq.block_hashes) >= full:
                continue
            start = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = seq.tokens(0, full * bs)
            new = block_hashes(tokens, bs, seq.kv_identity, start, prev)
            for b, h in enumerate(new, start):
                self.blocks.register(seq.block_table[b], h)
            seq.block_hashes.extend(new)

    # ---- internals ------------------------------------------------------------------

    def _reserve(self, seq: Sequence, take: int, plan: "_StepPlan") -> bool:
        """Blocks for `take` more tokens of a running row, preempting the youngest
        rows while none are free. False when `seq` itself had to go."""
        need = self.blocks.blocks_for(seq.num_computed + take) - len(seq.block_table)
        while need > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        seq.block_table.extend(self.blocks.allocate(need))
        return True

    def _preempt(self, seq: Sequence, plan: "_StepPlan") -> None:
        plan.drop(seq)
        self._release_blocks(seq)
        self.blocks.stats.preemptions += 1
        with self._lock:
            self.running.remove(seq)
            self._waiting.appendleft(seq)  # youngest first, so the oldest ends up in front

    def _release_blocks(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table, seq.num_computed, seq.block_hashes = [], 0, []

    def _admit(self, plan: "_StepPlan", admit_new: bool, pin_epoch: int) -> None:
        """Waiting rows FIFO while rows, budget, device slots and blocks allow."""
        busy = {s.slot for s in self.running if s.adapter is not None}
        while plan.budget > 0 and len(self.running) < self.limits.max_rows:
            with self._lock:
                seq = self._waiting[0] if self._waiting else None
            if seq is None or (not admit_new and not seq.started) or seq.pin_epoch != pin_epoch:
                return
            if seq.adapter is not None:
                try:
                    seq.slot = self.slots.acquire(seq.slot_key, seq.adapter.modules, busy)
                except ResourceExhausted:
                    return  # FIFO: later requests do not overtake it
            if not self._place(seq, plan):
                return
            if seq.adapter is not None:
                busy.add(seq.slot)
            with self._lock:
                self._waiting.popleft()
                self.running.append(seq)
            seq.admitted_at = self._admissions
            self._admissions += 1

    def _place(self, seq: Sequence, plan: "_StepPlan") -> bool:
        """Give a waiting row its cached prefix and the blocks of its first chunk;
        False (nothing taken) when the blocks are not there."""
        bs = self.blocks.block_size
        # The last token is always computed: the step samples from its logits.
        hashes = block_hashes(seq.tokens(0, seq.num_tokens - 1), bs, seq.kv_identity)
        matched = self.blocks.match_prefix(hashes) if self.blocks.prefix_caching else []
        computed = len(matched) * bs
        take = min(seq.num_tokens - computed, plan.budget)
        need = self.blocks.blocks_for(computed + take) - len(matched)
        if need > self.blocks.num_free:
            self.blocks.free(matched)
            return False
        self.blocks.note_lookup(seq.num_tokens - 1, computed)
        seq.block_table = matched + self.blocks.allocate(need)
        seq.block_hashes = hashes[: len(matched)]
        seq.num_computed = computed
        plan.add(Chunk(seq, computed, take))
        return True


class _StepPlan:
    """Chunks chosen so far and the token budget left."""

    def __init__(self, budget: int):
        self.budget = budget
        self.chunks: dict[str, Chunk] = {}

    def add(self, chunk: Chunk) -> None:
        self.chunks[chunk.seq.request_id] = chunk
        self.budget -= chunk.count

    def drop(self, seq: Sequence) -> None:
        chunk = self.chunks.pop(seq.request_id, None)
        if chunk is not None:
            self.budget += chunk.count
