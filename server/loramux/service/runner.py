"""The engine thread and its bridge to asyncio.

The engine is single-threaded: one thread calls `engine.step()` while there is work
and sleeps otherwise. RPC handlers run on the asyncio loop; they submit requests
through small thread pools (tokenizing, reading an adapter from disk or merging a
mix can take a while and must not block the loop), then read their request's
events from an asyncio queue that the engine thread fills after every step.

Admission work runs in lanes so that slow work never queues fast work: `admit`
(validate, tokenize, resolve an adapter), `merge` (requests whose mix is not
merged yet: at most `merge_workers` at once, each bounded by `merge_timeout` and
abandoned when its caller leaves) and `admin` (operator calls). The runner is the
one owner of admission accounting: a request counts from submit until its final
event, whatever ends it.

Threads and OpenMP: the engine thread is the only one that runs torch (and the
native kernels) on several threads. GNU OpenMP gives every thread that starts a
parallel region a team of worker threads of its own, kept while that thread
lives; once the process holds more such workers than there are cores, every
worker stops spinning between regions and sleeps, and each of the hundreds of
parallel regions in a decode step then waits for its workers to wake. One extra
team (the model loaded on a pooled thread, or a merge in a lane) made the
server's decode steps 1.7-2x slower than the same steps in-process. So lanes run
torch single-threaded, the model is loaded on a thread that ends with the load,
and the engine thread sets its own count, ENGINE_THREADS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

import torch

from loramux.engine.engine import Engine, EngineUsage
from loramux.engine.types import FAILURE_NUMERIC, FINISH_CANCELLED, GenerationRequest, GenerationResult, TokenEvent
from loramux.errors import FailedPrecondition, LoramuxError, ResourceExhausted, Unavailable
from loramux.service.metrics import Metrics

log = logging.getLogger(__name__)

_IDLE_POLL_SECONDS = 0.5
# torch's thread count as the process started (OMP_NUM_THREADS, else the cores):
# what the engine thread and the model load use.
ENGINE_THREADS = torch.get_num_threads()


def use_threads(n: int) -> None:
    """This thread runs torch on `n` threads. torch sets a thread's count from a
    process-wide default at the thread's first use, and set_num_threads in any
    thread changes that default: so the first use comes first, then the count."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def _lane(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool whose threads run torch single-threaded (no OpenMP team of their own)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=use_threads, initargs=(1,))


async def run_alone(fn: Callable):
    """fn() on a thread of its own with ENGINE_THREADS torch threads, awaited; the
    thread ends with fn and takes its OpenMP team with it (the model load)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result, error) -> None:
        if done.done():  # the awaiting coroutine was cancelled
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        use_threads(ENGINE_THREADS)
        try:
            result, error = fn(), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="loramux-load", daemon=True).start()
    return await done


class EngineFailure(LoramuxError):
    """A step raised; every request that was in the engine ends with this."""


class NumericFailure(FailedPrecondition):
    """The row's own weights produced non-finite logits; only that row ended."""


class ShutdownCut(Unavailable):
    """The grace period ended before the request finished. `result` holds what it
    had generated (streams send it as their last message)."""

    def __init__(self, message: str, result: GenerationResult):
        super().__init__(message)
        self.result = result


class _CallerLeft(Exception):
    """Raised into admission work whose caller is gone; nobody sees it."""


class AdmissionCheck:
    """Called by long admission work (merges) between units of work: raises when
    the caller left, the server is cutting requests, or the deadline passed."""

    def __init__(self, runner: "EngineRunner", deadline: float | None):
        self._runner, self.deadline = runner, deadline
        self.left = False

    def __call__(self) -> None:
        if self.left:
            self._abandon("caller_left")
            raise _CallerLeft()
        if self._runner.cutting:
            self._abandon("shutdown")
            raise Unavailable("the server is shutting down; retry on another replica")
        if self.deadline is not None and time.monotonic() > self.deadline:
            self._abandon("timeout")
            raise FailedPrecondition(
                f"merging this mix took longer than the server allows "
                f"({self._runner.limits.merge_timeout:g} s, --merge-timeout-seconds); create it once "
                "as a named merge (Admin.CreateMerge) and name it in requests, or pin it "
                "(exact, no per-request merge)"
            )

    def _abandon(self, reason: str) -> None:
        self._runner.metrics.merges_abandoned.labels(reason).inc()


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
    """max_outstanding: requests accepted and not yet finished (running + waiting,
      admission included), beyond which submit answers RESOURCE_EXHAUSTED.
    admission_workers: threads that validate, tokenize and resolve adapters.
    merge_workers: mixes merged at once (requests whose mix is not cached yet).
    merge_timeout: seconds a request may spend waiting for and running its merge.
    admin_workers: threads for operator calls (loads, named merges, exports).
    """

    max_outstanding: int
    admission_workers: int = 2
    merge_workers: int = 1
    merge_timeout: float = 30.0
    admin_workers: int = 2


@dataclass
class _Usage:
    usage: EngineUsage = field(default_factory=lambda: EngineUsage(0, 0, (), ()))
    admitting: int = 0


class EngineRunner:
    def __init__(self, engine: Engine, limits: RunnerLimits, metrics: Metrics):
        self.engine, self.limits, self.metrics = engine, limits, metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lanes = {
            "admit": _lane(limits.admission_workers, "loramux-admit"),
            "merge": _lane(limits.merge_workers, "loramux-merge"),
            "admin": _lane(limits.admin_workers, "loramux-admin"),
        }
        self._checks: dict[str, AdmissionCheck] = {}  # requests in admission work
        self.cutting = False  # shutdown: the grace period is over
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

    async def cut(self, timeout: float) -> None:
        """End every request still in flight: admission work aborts, rows are
        cancelled at the next step and their callers get ShutdownCut with what was
        generated. Waits up to `timeout` s for their final events."""
        self.cutting = True
        with self._lock:
            ids = list(self._tracked)
        for rid in ids:
            self.engine.cancel(rid)
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%d requests did not end within %.1f s of the cut", self.outstanding, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (waiting up to `timeout` s for its step to end)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        for lane in self._lanes.values():
            lane.shutdown(wait=False, cancel_futures=True)

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
        received_at = time.monotonic()
        merging = self.engine.needs_merge(request)
        check = AdmissionCheck(self, received_at + self.limits.merge_timeout if merging else None)
        with self._lock:
            self._checks[request.request_id] = check
        lane = self._lanes["merge" if merging else "admit"]
        try:
            await self._loop.run_in_executor(lane, self.engine.submit, request, received_at, check)
        except BaseException:
            # Cancelled while admitting: stop its merge, and the engine may still
            # queue it, so cancel there too.
            check.left = True
            self.engine.cancel(request.request_id)
            self._untrack(request.request_id)
            raise
        finally:
            with self._lock:
                self._usage.admitting -= 1
                self._checks.pop(request.request_id, None)
        if self.cutting:  # queued after the cut's cancels went out
            self.engine.cancel(request.request_id)
        self._wake.set()
        return RequestStream(request.request_id, queue, self)

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    async def call(self, fn: Callable, *args):
        """Run blocking operator work (loading, merging, exporting) off the loop,
        in its own lane (requests never queue behind it)."""
        return await self._loop.run_in_executor(self._lanes["admin"], fn, *args)

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
        use_threads(ENGINE_THREADS)
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
            r = ev.result
            self.metrics.observe_result(r)
            self._untrack(ev.request_id)
            if r.error is not None:  # its selection could not be served, or its logits overflowed
                item = (NumericFailure if r.error_kind == FAILURE_NUMERIC else FailedPrecondition)(r.error)
            elif self.cutting and r.finish_reason == FINISH_CANCELLED:
                item = ShutdownCut(
                    f"the server shut down before this request finished ({r.completion_tokens} tokens "
                    "were generated); retry on another replica", r,
                )
            _log_result(r, item)
        return tracked.queue, item

    def _fail(self, request_ids: list[str], cause: Exception) -> None:
        err = EngineFailure(f"the engine failed while running this request: {cause!r}")
        for rid in request_ids:
            with self._lock:
                tracked = self._tracked.get(rid)
            if tracked is not None:
                self._untrack(rid)
                self._loop.call_soon_threadsafe(tracked.queue.put_nowait, err)


def _log_result(r: GenerationResult, item: object) -> None:
    """The one INFO line per finished request."""
    status = type(item).__name__ if isinstance(item, Exception) else "OK"
    res = r.resolution
    log.info(
        "request finished",
        extra={
            "id": r.request_id, "selection": f"{res.kind}:{res.name}" if res.name else res.kind,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "finish": r.finish_reason, "ttft_s": round(r.timings.first_token, 4),
            "total_s": round(r.timings.total, 4), "status": status,
        },
    )


def _deliver(deliveries: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)
