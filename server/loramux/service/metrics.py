"""Prometheus metrics, all in one injected registry.

Events (latencies, tokens, steps, merges, swaps) are recorded as they happen by
the runner and the servicers. State that already lives elsewhere (cache counters,
queue gauges) is read at scrape time by a collector, so the caches never import
prometheus and the numbers can never drift from the truth.

Conventions: one prefix `loramux_`, base units, `_total` counters, histograms for
latency, and only bounded label values (RPC names, status codes, finish reasons,
merge methods, cache tiers). The `vllm:` gauges are the names the Kubernetes
Gateway API Inference Extension reads for adapter-affinity routing.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from loramux.engine.types import GenerationResult

PREFIX = "loramux"

# Seconds, from a fast CPU decode step (tens of ms) to long generations.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """Event metrics. `registry` is owned by the caller (one per server)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

        def hist(name, doc, labels=(), buckets=_LATENCY_BUCKETS):
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=registry, buckets=buckets)

        self.requests = Counter(
            f"{PREFIX}_requests", "RPCs answered, by method and gRPC status code",
            ["rpc", "code"], registry=registry,
        )
        self.finished = Counter(
            f"{PREFIX}_generations_finished", "Generations that ended, by finish reason",
            ["reason"], registry=registry,
        )
        self.e2e = hist("request_duration_seconds", "Generation time from acceptance to the last token")
        self.queue = hist("queue_wait_seconds", "Time from acceptance to the first forward step")
        self.ttft = hist("time_to_first_token_seconds", "Time from acceptance to the first token")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of one request")
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", registry=registry)
        self.step = hist("step_duration_seconds", "Duration of one engine step (prefill and/or decode)")
        self.rows = hist("batch_rows", "Rows decoding together in one step", buckets=_ROW_BUCKETS)
        self.step_tokens = hist("step_tokens", "Tokens one forward step computed (decode plus prefill chunks)",
                                buckets=_TOKEN_BUCKETS)
        self.merge = hist("merge_duration_seconds", "Time to merge a mix (cache misses), by method", ["method"])
        self.merges_abandoned = Counter(
            f"{PREFIX}_merges_abandoned", "Request merges stopped before the end: timeout, caller_left, shutdown",
            ["reason"], registry=registry,
        )
        self.row_errors = Counter(
            f"{PREFIX}_row_errors", "Generations ended with an error of their own while others went on "
            "(numeric: non-finite logits; precondition: selection not servable on the new weights)",
            ["kind"], registry=registry,
        )
        self.swap = hist("pin_swap_duration_seconds", "Time to fold in or restore base weights", ["op"])
        self.pinned = Gauge(
            f"{PREFIX}_pinned_merge_info", "1 for the merge folded into the base weights",
            ["merge"], registry=registry,
        )

    # ---- recorded by the engine thread ----------------------------------------

    def observe_step(self, seconds: float, rows: int, tokens: int) -> None:
        self.step.observe(seconds)
        if rows:
            self.rows.observe(rows)
        if tokens:
            self.step_tokens.observe(tokens)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_result(self, r: GenerationResult) -> None:
        self.finished.labels(r.finish_reason).inc()
        if r.error_kind is not None:
            self.row_errors.labels(r.error_kind).inc()
        self.prompt_tokens.inc(r.prompt_tokens)
        self.generated_tokens.inc(r.completion_tokens)
        t = r.timings
        self.e2e.observe(t.total)
        self.queue.observe(t.queue)
        if r.completion_tokens:
            self.ttft.observe(t.first_token)
        m = r.resolution.merge
        if m is not None and not r.resolution.cache_hit:
            self.merge.labels(m.method).observe(m.seconds)

    # ---- recorded by the servicers ---------------------------------------------

    def observe_rpc(self, rpc: str, code: str) -> None:
        self.requests.labels(rpc, code).inc()

    def observe_swap(self, op: str, seconds: float, pinned: str | None) -> None:
        self.swap.labels(op).observe(seconds)
        self.pinned.clear()
        if pinned:
            self.pinned.labels(pinned).set(1)


class StateCollector:
    """Scrape-time gauges and counters read from the live objects.

    `state()` returns the current ServerState-like object or None before the model
    is ready (then only the queue gauges, at 0, are exported)."""

    def __init__(self, state: Callable[[], object | None]):
        self._state = state

    def describe(self):
        return []  # collected lazily; nothing to validate at registration

    def collect(self):
        st = self._state()
        usage = st.runner.usage if st is not None else None
        running = usage.running if usage else 0
        waiting = usage.waiting if usage else 0
        yield _gauge(f"{PREFIX}_requests_running", "Requests decoding in the running batch", running)
        yield _gauge(f"{PREFIX}_requests_waiting", "Requests accepted and not yet running", waiting)
        yield _gauge("vllm:num_requests_running", "Requests running (vLLM-compatible name)", running)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting (vLLM-compatible name)", waiting)
        if st is None:
            return
        info = st.engine.info()
        yield _lora_info(info.slots.num_slots, usage)
        yield from _cache_metrics(info)
        yield from _kv_metrics(info.kv)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _lora_info(max_lora: int, usage) -> GaugeMetricFamily:
    """vLLM's adapter-affinity gauge: labels list the adapters in use, comma
    separated without spaces; the value is the time of the reading."""
    g = GaugeMetricFamily(
        "vllm:lora_requests_info", "Adapters used by running and waiting requests",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )
    g.add_metric(
        [str(max_lora), ",".join(usage.running_adapters), ",".join(usage.waiting_adapters)], time.time()
    )
    return g


def _cache_metrics(info):
    """Hits, misses, evictions, bytes and entries per tier: host (raw adapters),
    merge (merged mixes), device (slots)."""
    host, merge, slots = info.host_cache, info.merge_cache, info.slots
    tiers = {"host": host.stats, "merge": merge.stats, "device": slots.stats}
    for what, doc in (("hits", "Lookups that found the entry"), ("misses", "Lookups that did not"),
                      ("evictions", "Entries evicted to make room")):
        c = CounterMetricFamily(f"{PREFIX}_adapter_cache_{what}", f"{doc}, per cache tier", labels=["tier"])
        for tier, stats in tiers.items():
            c.add_metric([tier], getattr(stats, what))
        yield c
    used = GaugeMetricFamily(f"{PREFIX}_adapter_cache_bytes", "Bytes held, per cache tier", labels=["tier"])
    cap = GaugeMetricFamily(f"{PREFIX}_adapter_cache_capacity_bytes", "Byte capacity, per tier", labels=["tier"])
    count = GaugeMetricFamily(f"{PREFIX}_adapter_cache_entries", "Entries held, per cache tier", labels=["tier"])
    for tier, cache in (("host", host), ("merge", merge)):
        used.add_metric([tier], cache.bytes_used)
        cap.add_metric([tier], cache.capacity_bytes)
        count.add_metric([tier], cache.count)
    used.add_metric(["device"], slots.nbytes)
    cap.add_metric(["device"], slots.nbytes)
    count.add_metric(["device"], slots.used)
    yield from (used, cap, count)
    yield SummaryMetricFamily(
        f"{PREFIX}_adapter_load_seconds", "Time spent reading and validating adapters from disk",
        count_value=host.stats.loads, sum_value=host.stats.load_seconds_total,
    )


def _kv_metrics(kv):
    """The paged KV cache: blocks by state, usage as vLLM names it, prefix-cache
    lookups and hits (in tokens), evictions of cached blocks and preemptions."""
    yield _gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks owned by requests (0-1)", kv.usage)
    blocks = GaugeMetricFamily(f"{PREFIX}_kv_cache_blocks", "KV-cache blocks by state", labels=["state"])
    for state, n in (("used", kv.used), ("cached", kv.cached), ("free", kv.free)):
        blocks.add_metric([state], n)
    yield blocks
    yield _gauge(f"{PREFIX}_kv_cache_capacity_bytes", "Bytes of the KV-cache pool", kv.capacity_bytes)
    s = kv.stats
    for name, doc, value in (
        ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_queries),
        ("prefix_cache_hits", "Prompt tokens whose keys/values the prefix cache held", s.prefix_hits),
        ("kv_cache_evictions", "Cached prefix blocks reclaimed for new tokens", s.evictions),
        ("preemptions", "Running requests whose KV blocks were taken back (recomputed later)", s.preemptions),
    ):
        yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class _MetricsHandler(BaseHTTPRequestHandler):
    registry: CollectorRegistry  # set on the subclass built by serve_metrics

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "metrics are at /metrics")
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # scrapes are not worth a log line each
        pass


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> ThreadingHTTPServer:
    """Serve `registry` at http://host:port/metrics from a daemon thread.

    Always the Prometheus text format: prometheus-client's OpenMetrics output
    rewrites `vllm:` sample names to `vllm_`, which the Gateway API Inference
    Extension would not find."""
    handler = type("Handler", (_MetricsHandler,), {"registry": registry})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="loramux-metrics", daemon=True).start()
    return server
