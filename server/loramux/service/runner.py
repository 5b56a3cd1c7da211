"""The engine thread and its bridge to asyncio.

The engine is single-threaded: one thread calls `engine.step()` while there is work
and sleeps otherwise. RPC handlers run on the asyncio loop; they submit requests
through a small thread pool (tokenizing, reading an adapter from disk or merging a
mix can take a while and must not block the loop), then read their request's
events from an asyncio queue that the engine thread fills after every step.
Admission control (the bounded queue, draining) lives here too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from loramux.engine.engine import Engine, EngineUsage
from loramux.engine.types import GenerationRequest, TokenEvent
from loramux.errors import FailedPrecondition, LoramuxError, ResourceExhausted, Unavailable
from loramux.service.metrics import Metrics

log = logging.getLogger(__name__)

_IDLE_POLL_SECONDS = 0.5


class EngineFailure(LoramuxError):
    """A step raised; every request that was in the engine ends with this."""


@dataclass
class _Tracked:
    """A request between submit and its final event, as the engine thread sees it."""

    queue: asyncio.Queue
    last_token_at: float | None = None


@dataclass
class RequestStream:
    """The events of one submitted request, in order; the last has `.result`."""

    request_id: str
    _queue: asyncio.Queue
    _runner: "EngineRunner"
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, Exception):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item

    def cancel(self) -> None:
        """Free the row at the next step (no-op once finished)."""
        if not self.finished:
            self._runner.cancel(self.request_id)


@dataclass
class RunnerLimits:
    """max_outstanding: requests accepted and not yet finished (running + waiting),
    beyond which submit answers RESOURCE_EXHAUSTED."""

    max_outstanding: int
    admission_workers: int = 4


@dataclass
class _Usage:
    usage: EngineUsage = field(default_factory=lambda: EngineUsage(0, 0, (), ()))
    admitting: int = 0


class EngineRunner:
    def __init__(self, engine: Engine, limits: RunnerLimits, metrics: Metrics):
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(limits.admission_workers, thread_name_prefix="loramux-admit")
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._idle: asyncio.Event | None = None
        self._usage = _Usage()
        self.draining = False

    # ---- lifecycle (loop thread) -------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to `timeout` s for accepted ones to finish.
        True when everything finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests (loop thread) --------------------------------------------------

    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and queue `request`; domain errors (bad input, unknown adapter,
        full queue, draining) raise here and nothing is left behind."""
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        request = replace(request, request_id=uuid.uuid4().hex)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._tracked) >= self.limits.max_outstanding:
                raise ResourceExhausted(
                    f"{len(self._tracked)} requests are running or queued, the limit; retry later"
                )
            self._tracked[request.request_id] = _Tracked(queue)
            self._usage.admitting += 1
            self._idle.clear()
        try:
            await self._loop.run_in_executor(self._pool, self.engine.submit, request)
        except BaseException:
            # Cancelled while admitting: the engine may still queue it; cancel too.
            self.engine.cancel(request.request_id)
            self._untrack(request.request_id)
            raise
        finally:
            with self._lock:
                self._usage.admitting -= 1
        self._wake.set()
        return RequestStream(request.request_id, queue, self)

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    async def call(self, fn: Callable, *args):
        """Run blocking operator work (loading, merging, exporting) off the loop."""
        return await self._loop.run_in_executor(self._pool, fn, *args)

    async def swap(self, deltas, label: str | None) -> float:
        """Pin `deltas` under `label` (unpin when None) at the next drained step
        boundary; returns the seconds the swap took."""
        swap = self.engine.request_swap(deltas, label)
        self._wake.set()
        await self._loop.run_in_executor(None, swap.done.wait)
        if swap.error is not None:
            raise swap.error
        return swap.seconds

    @property
    def usage(self) -> EngineUsage:
        """Load as of the last step; requests still being admitted count as waiting."""
        with self._lock:
            u, admitting = self._usage.usage, self._usage.admitting
        return replace(u, waiting=u.waiting + admitting)

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._tracked)

    def _untrack(self, request_id: str) -> None:
        with self._lock:
            self._tracked.pop(request_id, None)
            if not self._tracked:
                self._loop.call_soon_threadsafe(self._idle.set)

    # ---- engine thread -----------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._publish_usage()
                self._wake.wait(_IDLE_POLL_SECONDS)
                self._wake.clear()
                continue
            self._step()

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # a bug or device failure: fail what is in flight, keep serving
            log.exception("engine step failed; aborting the requests in the engine")
            self._fail(self.engine.abort_all(), e)
            return
        self.metrics.observe_step(time.perf_counter() - t0, self.engine.num_running, self.engine.last_step_tokens)
        self._publish_usage()
        now = time.monotonic()
        deliveries = [d for d in (self._dispatch(ev, now) for ev in events) if d is not None]
        if deliveries:
            # One hand-off to the loop per step, not one per event: each wakes it.
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _publish_usage(self) -> None:
        usage = self.engine.usage()
        with self._lock:
            self._usage.usage = usage

    def _dispatch(self, ev: TokenEvent, now: float) -> tuple[asyncio.Queue, object] | None:
        """Account for one event; (queue, item) to deliver, or None."""
        with self._lock:
            tracked = self._tracked.get(ev.request_id)
        if tracked is None:
            if ev.result is None:  # nobody listens (its caller left while admitting)
                self.engine.cancel(ev.request_id)
            return None
        if ev.token_id is not None:
            if tracked.last_token_at is not None:
                self.metrics.observe_inter_token(now - tracked.last_token_at)
            tracked.last_token_at = now
        item: TokenEvent | Exception = ev
        if ev.result is not None:
            self.metrics.observe_result(ev.result)
            self._untrack(ev.request_id)
            if ev.result.error is not None:  # ended before running (see Sequence.fail)
                item = FailedPrecondition(ev.result.error)
        return tracked.queue, item

    def _fail(self, request_ids: list[str], cause: Exception) -> None:
        err = EngineFailure(f"the engine failed while running this request: {cause!r}")
        for rid in request_ids:
            with self._lock:
                tracked = self._tracked.get(rid)
            if tracked is not None:
                self._untrack(rid)
                self._loop.call_soon_threadsafe(tracked.queue.put_nowait, err)


def _deliver(deliveries: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)
