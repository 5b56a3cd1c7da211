"""The peer benchmark's parts that need no vLLM: flags, load plans, the Poisson
schedule, prompts of exact lengths, the HTTP/SSE stream reading (against a
canned byte stream and a fake server on loopback), rounds over a fake system,
starting and stopping server processes (a real `loramux serve` on the tiny
model), CPU accounting and the report table. The run against vLLM itself is
`python -m loramux.benchmarks.peers`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from loramux.benchmarks import peers
from loramux.benchmarks.peers import (
    WORKLOADS, ChunkedDecoder, CpuWindow, Limits, LoramuxPeer, PeerError, PromptBook, RequestSpec, SSEParser,
    add_peers_args, check_args, cpu_summary, find_shared_library, format_cpu_list, format_table,
    loramux_command, loramux_server, parse_completion_event, parse_workloads, plan_load, poisson_schedule,
    post_event_stream, ratios, run_round, server_process, stop_process_group, vllm_command, vllm_env,
    vllm_request,
)
from loramux.benchmarks.serving import RequestSample, RoundStats, summarize
from loramux.errors import InvalidArgument


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_peers_args(p)
    return p.parse_args(list(flags))


# ---- flags ------------------------------------------------------------------------------


def test_defaults_are_valid_and_cover_every_workload():
    args = parse()
    check_args(args)
    assert args.workloads == list(WORKLOADS) and args.rounds == 3 and args.max_tokens == 32
    assert args.adapters == 8 and args.rank == 16


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "2"], "at least 3"),
    (["--rounds", "0", "--quick"], "at least 1"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--prompt-tokens", "8"], "--prompt-tokens"),
    (["--rate", "0"], "poisson"),
    (["--workloads", "1x-adapter", "--adapters", "0"], "need adapters"),
    (["--workloads", "8x4-adapters", "--target", "h:1"], "--adapter-root"),
    (["--rank", "600"], "LoRA ranks"),
    (["--kv-cache-gib", "0"], "--kv-cache-gib"),
    (["--max-rows", "64", "--max-batch-tokens", "32"], "at least --max-rows"),
])
def test_bad_flags_are_refused(flags, message):
    with pytest.raises(InvalidArgument, match=message):
        check_args(parse(*flags))


def test_relaxed_flags_pass():
    check_args(parse("--rounds", "1", "--quick"))
    check_args(parse("--workloads", "1x-base,8x4-base", "--adapters", "0"))  # no adapter needed
    check_args(parse("--workloads", "1x-base", "--target", "h:1"))
    check_args(parse("--workloads", "1x-base", "--rate", "0"))  # rate only matters to poisson


def test_workload_names():
    assert parse_workloads("poisson, 1x-base") == ["poisson", "1x-base"]
    with pytest.raises(InvalidArgument, match="unknown"):
        parse_workloads("1x-base,2x-base")
    with pytest.raises(InvalidArgument, match="twice"):
        parse_workloads("1x-base,1x-base")
    with pytest.raises(InvalidArgument):
        parse_workloads(" , ")
    with pytest.raises(SystemExit):  # argparse reports it as a usage error
        parse("--workloads", "nope")


# ---- load plans ---------------------------------------------------------------------------


def plan(name: str, names=("a", "b", "c"), **kw) -> list[RequestSpec]:
    opts = dict(max_tokens=32, prompt_tokens=40, rate=2.0, duration=10.0, seed=0) | kw
    return plan_load(WORKLOADS[name], list(names), **opts)


def test_closed_loop_plans():
    one = plan("1x-adapter")
    assert [(s.adapter, s.stream, s.prompt_tokens, s.max_tokens, s.at) for s in one] == [("a", 0, 40, 32, None)] * 4
    assert all(s.adapter is None for s in plan("1x-base") + plan("8x4-base"))
    eight = plan("8x4-adapters")
    assert len(eight) == 32 and sorted({s.stream for s in eight}) == list(range(8))
    # Request k = j * 8 + s: stream s's j-th request takes adapter k mod 3.
    by_stream = {s: [r.adapter for r in eight if r.stream == s] for s in range(8)}
    assert by_stream[0] == ["a", "c", "b", "a"] and by_stream[1] == ["b", "a", "c", "b"]
    first_wave = [r.adapter for r in eight[:8]]
    assert first_wave == ["a", "b", "c", "a", "b", "c", "a", "b"]


def test_long_prompt_keeps_its_own_lengths():
    specs = plan("long-prompt", max_tokens=8, prompt_tokens=20)
    assert len(specs) == 8 and {(s.prompt_tokens, s.max_tokens) for s in specs} == {(1024, 128)}
    assert [s.adapter for s in specs] == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert peers.context_needed({"x": specs, "y": plan("1x-base")}) == 1024 + 128


def test_poisson_plan_follows_the_schedule():
    specs = plan("poisson", max_tokens=5)
    schedule = poisson_schedule(2.0, 10.0, 0)
    assert [(s.at, s.prompt_tokens) for s in specs] == schedule
    assert all(s.stream is None and s.max_tokens == 5 for s in specs)
    assert [s.adapter for s in specs[:4]] == ["a", "b", "c", "a"]


def test_adapter_workloads_need_adapters():
    with pytest.raises(InvalidArgument):
        plan("8x4-adapters", names=())
    assert len(plan("8x4-base", names=())) == 32


def test_poisson_schedule_is_reproducible_and_poisson():
    a, b = poisson_schedule(3.0, 200.0, 7), poisson_schedule(3.0, 200.0, 7)
    assert a == b and a != poisson_schedule(3.0, 200.0, 8)
    times = [t for t, _ in a]
    assert times == sorted(times) and 0 < times[0] and times[-1] < 200.0
    assert 540 < len(a) < 660  # 600 expected; the seed fixes the draw
    lengths = [n for _, n in a]
    assert min(lengths) >= 16 and max(lengths) <= 2000 and max(lengths) - min(lengths) > 1500
    assert poisson_schedule(1.0, 5.0, 0, (30, 30))[0][1] == 30
    assert poisson_schedule(0.001, 1.0, 0) == []  # the first arrival falls after the window


# ---- prompts -------------------------------------------------------------------------------


def test_prompts_have_exact_token_counts(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    book = PromptBook(tok)
    for n in (16, 17, 33, 100, 513):
        text = book.text(n, 12345)
        assert len(tok(text)["input_ids"]) == n and text.startswith("12345: ")
    texts = book.texts([RequestSpec(None, 24, 1), RequestSpec(None, 24, 1)])
    assert texts[0] != texts[1] and book.serial == 2
    assert all(len(tok(t)["input_ids"]) == 24 for t in texts)
    with pytest.raises(ValueError):
        book.text(2, 123456789)  # the serial alone is longer


# ---- SSE, chunked transfer, completion events ----------------------------------------------

EVENTS = [
    {"choices": [{"index": 0, "text": " Hello", "token_ids": [11], "prompt_token_ids": [1, 2, 3]}]},
    {"choices": [{"index": 0, "text": " wörld", "token_ids": [12, 13]}]},
    {"choices": [{"index": 0, "text": "", "token_ids": [14], "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
]


def sse_bytes(events=EVENTS, eol=b"\n") -> bytes:
    body = b": a comment line\n"
    for e in events:
        body += b"data: " + json.dumps(e, ensure_ascii=False).encode() + eol + eol
    return body + b"data: [DONE]" + eol + eol


def chunked(body: bytes, size: int = 7) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_parser_byte_by_byte_and_whole(eol):
    raw = sse_bytes(eol=eol)
    expected = [json.dumps(e, ensure_ascii=False) for e in EVENTS] + ["[DONE]"]
    assert SSEParser().feed(raw) == expected
    parser = SSEParser()
    got = [e for i in range(len(raw)) for e in parser.feed(raw[i:i + 1])]
    assert got == expected


def test_sse_parser_fields_and_multiline_data():
    raw = b"event: x\nid: 3\ndata: first\ndata:second\nretry: 5\n\n: ping\n\ndata\n\nda"
    parser = SSEParser()
    assert parser.feed(raw) == ["first\nsecond", ""]
    assert parser.feed(b"ta: tail\n") == [] and parser.feed(b"\n") == ["tail"]


def test_chunked_decoder_streams_the_body():
    body = sse_bytes()
    raw = chunked(body)
    d = ChunkedDecoder()
    assert b"".join(d.feed(raw[i:i + 1]) for i in range(len(raw))) == body and d.done
    d = ChunkedDecoder()
    assert d.feed(raw[:20]) + d.feed(raw[20:]) == body and d.done
    partial = ChunkedDecoder()
    partial.feed(b"a\r\n01234")
    assert not partial.done
    with pytest.raises(ValueError):
        ChunkedDecoder().feed(b"3\r\nabcXY")


def test_completion_events():
    deltas = [parse_completion_event(json.dumps(e)) for e in EVENTS]
    assert [d.tokens for d in deltas] == [1, 2, 1, 0]
    assert deltas[3].prompt_tokens == 3 and deltas[3].completion_tokens == 4 and deltas[0].prompt_tokens is None
    assert parse_completion_event(" [DONE] ") is None
    # Without token ids, each non-empty text delta is one token.
    assert parse_completion_event(json.dumps({"choices": [{"text": "x"}, {"text": ""}]})).tokens == 1
    with pytest.raises(PeerError, match="boom"):
        parse_completion_event(json.dumps({"error": {"message": "boom"}}))


# ---- a fake OpenAI server on loopback ---------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_server(response: bytes, seen: list[bytes]):
    """Answers each connection with `response` in small pieces, recording the request."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        seen.append(head + await reader.readexactly(length))
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):  # the client may hang up first
            for i in range(0, len(response), 50):
                writer.write(response[i:i + 50])
                await writer.drain()
                await asyncio.sleep(0.001)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def http_response(body: bytes, status: str = "200 OK", chunk: bool = True) -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if chunk else b""
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/event-stream\r\n".encode() + framing + b"\r\n"
            + (chunked(body, 13) if chunk else body))


@pytest.mark.parametrize("chunk", [True, False])
def test_vllm_request_against_a_fake_server(chunk):
    seen: list[bytes] = []

    async def go(spec):
        async with fake_server(http_response(sse_bytes(), chunk=chunk), seen) as port:
            return await vllm_request("127.0.0.1", port, "base", spec, "one two three")

    sample = asyncio.run(go(RequestSpec("sql", 3, 4)))
    assert sample.tokens == 4 and len(sample.gaps) == 2 and sample.ttft > 0
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1")
    payload = json.loads(body)
    assert payload["model"] == "sql" and payload["max_tokens"] == 4 and payload["ignore_eos"] is True
    assert payload["temperature"] == 0.0 and payload["stream"] is True and payload["return_token_ids"] is True
    with pytest.raises(PeerError, match="prompt tokens"):
        asyncio.run(go(RequestSpec(None, 5, 4)))  # the server counts 3
    with pytest.raises(PeerError, match="made 4 tokens"):
        asyncio.run(go(RequestSpec(None, 3, 6)))


def test_an_error_status_is_reported():
    async def go():
        body = b'{"error": "model bench9 does not exist"}'
        async with fake_server(http_response(body, "404 Not Found"), []) as port:
            return [e async for e in post_event_stream("127.0.0.1", port, "/v1/completions", {})]

    with pytest.raises(PeerError, match="HTTP 404.*bench9"):
        asyncio.run(go())


# ---- rounds over a fake system --------------------------------------------------------------


class FakePeer:
    """Answers every request after `delay` s with one token per requested token."""

    name = "fake"
    pid = None

    def __init__(self, delay: float):
        self.delay = delay
        self.log: list[tuple[float, RequestSpec, str, int]] = []

    @contextlib.asynccontextmanager
    async def sender(self, pool):
        self.pool = pool
        t0 = time.perf_counter()

        async def send(spec, prompt, slot):
            self.log.append((time.perf_counter() - t0, spec, prompt, slot))
            await asyncio.sleep(self.delay)
            return RequestSample(self.delay, [0.001] * (spec.max_tokens - 1), spec.max_tokens)

        yield send


def test_closed_loop_round_runs_streams_concurrently_in_order():
    specs = plan("8x4-adapters", max_tokens=3)
    prompts = [f"p{i}" for i in range(len(specs))]
    peer = FakePeer(0.02)
    stats = run_round(peer, specs, prompts)
    assert stats.tokens == 32 * 3 and len(stats.ttfts) == 32 and peer.pool == 8
    assert 0.06 < stats.wall_seconds < 0.5  # 4 waves of 8 concurrent requests, not 32 in a row
    stream3 = [(spec, prompt) for _, spec, prompt, slot in peer.log if slot == 3]
    assert [p for _, p in stream3] == [prompts[k] for k in (3, 11, 19, 27)]
    assert all(spec.stream == 3 for spec, _ in stream3)


def test_open_loop_round_sends_on_schedule():
    specs = [RequestSpec("a", 16, 2, at=t) for t in (0.0, 0.05, 0.15)]
    peer = FakePeer(0.01)
    stats = run_round(peer, specs, ["x", "y", "z"])
    sent = [t for t, *_ in peer.log]
    assert [s.at for _, s, _, _ in peer.log] == [0.0, 0.05, 0.15]
    assert all(abs(t - s.at) < 0.04 for t, s in zip(sent, specs))
    assert stats.tokens == 6 and 0.15 < stats.wall_seconds < 0.5


# ---- vLLM's command line and environment; stopping it ------------------------------------------


def test_cpu_lists_and_libraries():
    assert format_cpu_list([3, 0, 1, 2, 7, 9, 10]) == "0-3,7,9-10" and format_cpu_list({5}) == "5"
    with pytest.raises(InvalidArgument):
        format_cpu_list([])
    listing = ("\t2 libs found in cache\n"
               "\tlibtcmalloc_minimal_debug.so.4 (libc6,x86-64) => /lib/a/libtcmalloc_minimal_debug.so.4\n"
               "\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => /lib/a/libtcmalloc_minimal.so.4\n")
    assert find_shared_library("libtcmalloc_minimal.so.4", listing) == "/lib/a/libtcmalloc_minimal.so.4"
    assert find_shared_library("libtcmalloc.so.4", listing) is None


def test_vllm_env_preloads_what_exists(tmp_path):
    (tmp_path / "lib").mkdir()
    iomp = tmp_path / "lib" / "libiomp5.so"
    iomp.touch()
    tcmalloc = tmp_path / "libtcmalloc_minimal.so.4"
    tcmalloc.touch()
    env = vllm_env(tmp_path, "0-1", 2, {"PATH": "/bin", "LD_PRELOAD": "/x.so"}, str(tcmalloc))
    assert env["LD_PRELOAD"] == f"{tcmalloc}:{iomp}:/x.so"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    iomp.unlink()
    assert vllm_env(tmp_path, "0", 1, {}, "/no/such/lib.so")["LD_PRELOAD"] == ""


def test_limits_fit_the_plans():
    args = parse("--max-seq-len", "1000", "--max-rows", "4", "--kv-cache-gib", "3")
    small = {"1x-base": plan("1x-base")}
    assert peers.limits_for(args, small) == Limits(1000, 2048, 4, 3)
    both = {**small, "long-prompt": plan("long-prompt")}
    assert peers.limits_for(args, both) == Limits(1024 + 128, 2048, 8, 3)


def test_vllm_command(tmp_path):
    adapters = {"a": tmp_path / "a", "b": tmp_path / "b"}
    cmd = vllm_command(tmp_path / "py", tmp_path / "model", "model", adapters, 12, 8123, Limits(4096, 2048, 32, 2))

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path / "model")]
    assert value("--dtype") == "float32" and value("--host") == "127.0.0.1" and value("--port") == "8123"
    assert value("--max-loras") == "2" and value("--max-lora-rank") == "16"
    assert value("--max-model-len") == "4096" and value("--max-num-batched-tokens") == "2048"
    assert value("--max-num-seqs") == "32"
    assert cmd[-2:] == [f"a={adapters['a']}", f"b={adapters['b']}"] and "--enable-lora" in cmd
    assert "--enable-lora" not in vllm_command(tmp_path / "py", tmp_path / "m", "m", {}, 0, 1, Limits(1, 1, 1, 1))


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_escalates_and_takes_the_whole_group():
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    t = time.monotonic()
    stop_process_group(proc, ((signal.SIGINT, 0.3), (signal.SIGTERM, 0.3)))
    assert proc.returncode == -15  # ignored SIGINT, died of SIGTERM
    assert time.monotonic() - t < 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}") and not _zombie(child):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}") or _zombie(child)
    proc.stdout.close()


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z"
    return False


def test_a_server_that_exits_while_starting_is_reported(tmp_path):
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-c", "import sys; print('no model here', flush=True); sys.exit(3)"]
    with pytest.raises(PeerError, match="(?s)demo exited with 3 while starting.*no model here"):
        with server_process("demo", cmd, dict(os.environ), log, lambda: None, 30, ((signal.SIGTERM, 1.0),)):
            pass


# ---- loramux as `loramux serve` --------------------------------------------------------------


def test_loramux_command_is_a_serve_command_line_held_to_the_limits(tiny_llama_dir, adapter_root, tmp_path):
    from loramux.cli import build_parser
    from loramux.service.main import serve_configs

    dirs = {p.name: p for p in sorted(adapter_root.iterdir())}
    for limits in (Limits(1000, 512, 12, 3), Limits(4096, 2048, 32, 2)):  # the latter: serve's own defaults
        cmd = loramux_command(tiny_llama_dir, dirs, 16, limits, tmp_path)
        assert cmd[:4] == [sys.executable, "-m", "loramux.cli", "serve"]
        engine, server = serve_configs(build_parser(command="serve").parse_args(cmd[3:]))
        assert (engine.max_seq_len, engine.max_batch_tokens, engine.max_batch_rows) == (
            limits.max_seq_len, limits.max_batch_tokens, limits.max_rows)
        assert engine.kv_cache.bytes == limits.kv_gib << 30
        model = engine.model
        assert (model.path, model.device, model.dtype, model.quantization) == (tiny_llama_dir, "cpu", "float32",
                                                                               "none")
        assert engine.adapters.roots == [adapter_root] and engine.adapters.max_rank == 16
        assert engine.slots.num_slots >= len(dirs)
        assert (server.host, server.port, server.metrics_port, server.port_file) == (
            "127.0.0.1", 0, -1, tmp_path / "port")


def test_loramux_serve_starts_answers_is_metered_and_stops(tiny_llama_dir, adapter_root, tmp_path):
    from transformers import AutoTokenizer

    book = PromptBook(AutoTokenizer.from_pretrained(tiny_llama_dir))
    dirs = {p.name: p for p in sorted(adapter_root.iterdir())}
    specs = [RequestSpec("x", 16, 4, stream=0), RequestSpec(None, 20, 3, stream=1)]
    t = time.monotonic()
    with loramux_server(tiny_llama_dir, dirs, 16, Limits(256, 64, 2, 1), start_timeout=60,
                        log=tmp_path / "serve.log") as server:
        assert 0 < server.start_seconds < 60 and peers.grpc_serving(f"127.0.0.1:{server.port}")
        peer = LoramuxPeer(f"127.0.0.1:{server.port}", None, server.proc.pid)
        windows: list[CpuWindow] = []
        stats = peers.metered([peer], lambda: run_round(peer, specs, book.texts(specs)), "loramux", windows)
        assert stats.tokens == 7 and len(stats.ttfts) == 2
        assert windows[0].cpu["loramux"] > 0  # the server's own CPU, not this process's
    assert server.proc.returncode == 0  # SIGTERM: drained, exited cleanly
    assert not peers._group_alive(server.proc.pid)
    assert server.report()["start_seconds"] == server.start_seconds and time.monotonic() - t < 60


# ---- CPU accounting -------------------------------------------------------------------------


def test_cpu_summary():
    windows = [
        CpuWindow("loramux", 2.0, {"loramux": 3.0, "vLLM": 0.2}),
        CpuWindow("vLLM", 1.0, {"loramux": 0.5, "vLLM": 1.5}),
        CpuWindow("vLLM", 1.0, {"loramux": 0.1, "vLLM": 2.5}),
    ]
    got = cpu_summary(windows, ["loramux", "vLLM"])
    assert got["loramux"] == {"own": 1.5, "while_peer": pytest.approx(0.3)}
    assert got["vLLM"] == {"own": 2.0, "while_peer": pytest.approx(0.1)}
    assert cpu_summary([CpuWindow("vLLM", 1.0, {"vLLM": 1.0})], ["loramux"])["loramux"] == {
        "own": None, "while_peer": None}


def test_process_cpu_seconds_counts_children_only_in_a_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\nprint(flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # the child has spun its 0.5 s
        pid = os.getpid()
        for seconds in (peers.process_cpu_seconds, peers._proc_tree_cpu):
            assert seconds(pid) - seconds(pid, False) > 0.4
            assert seconds(child.pid) == pytest.approx(seconds(child.pid, False))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_process_cpu_seconds_counts_this_process():
    pid = os.getpid()
    before, before_proc = peers.process_cpu_seconds(pid, False), peers._proc_tree_cpu(pid, False)
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    spun = time.process_time() - t
    assert peers.process_cpu_seconds(pid, False) - before == pytest.approx(spun, abs=0.05)
    assert peers._proc_tree_cpu(pid, False) - before_proc == pytest.approx(spun, abs=0.05)  # /proc: clock ticks


# ---- the report ----------------------------------------------------------------------------


def report(rounds: int = 3) -> dict:
    ours = summarize([RoundStats(100, 1.0, [0.010, 0.030], [0.004, 0.006]) for _ in range(rounds)])
    theirs = summarize([RoundStats(50, 1.0, [0.020, 0.020], [0.008, 0.008]) for _ in range(rounds)])
    empty = summarize([RoundStats(10, 2.0)])
    return {
        "command": "python -m loramux.benchmarks.peers --rounds 3", "model": "/m/smollm2", "dtype": "float32",
        "adapters": ["a", "b"], "rank": 16, "rounds": rounds, "cpus": "0-1", "torch_threads": 2,
        "load_avg_1min": 1.25, "loramux": {"target": None, "start_seconds": 3.2},
        "vllm": {"version": "0.32.0", "start_seconds": 81.5},
        "limits": {"max_seq_len": 4096, "max_batch_tokens": 2048, "max_rows": 32, "kv_gib": 2},
        "workloads": {
            "8x4-adapters": {"requests": 32, "loramux": ours, "vLLM": theirs, "ratio": ratios(ours, theirs)},
            "1x-base": {"requests": 4, "loramux": empty, "vLLM": empty, "ratio": ratios(empty, empty)},
        },
        "cpu": {"loramux": {"own": 1.9, "while_peer": 0.05}, "vLLM": {"own": 1.8, "while_peer": None}},
    }


def test_ratios():
    r = report()["workloads"]["8x4-adapters"]["ratio"]
    assert r["tokens_per_s"] == pytest.approx(2.0) and r["ttft_p50_ms"] == pytest.approx(1.0)
    assert r["itl_p50_ms"] == pytest.approx(0.625)
    assert report()["workloads"]["1x-base"]["ratio"]["ttft_p50_ms"] is None


def test_table():
    lines = format_table(report()).splitlines()
    assert lines[0] == "command: python -m loramux.benchmarks.peers --rounds 3"
    assert "vLLM 0.32.0: started in 81.5 s" in lines[2] and "started in 3.2 s" in lines[2]
    assert lines[3] == "limits, both: 4096 tokens a request, 2048 a step, 32 rows, KV cache 2 GiB"
    rows = [line.split() for line in lines]
    at = next(i for i, r in enumerate(rows) if r[:1] == ["8x4-adapters"])
    assert rows[at] == ["8x4-adapters", "loramux", "32", "100.0", "20.0", "29.8", "5.0", "6.0"]
    assert rows[at + 1] == ["vLLM", "32", "50.0", "20.0", "20.0", "8.0", "8.0"]
    assert rows[at + 2] == ["ratio", "2.00x", "1.00x", "1.49x", "0.62x", "0.75x"]
    assert rows[at + 3][:3] == ["1x-base", "loramux", "4"] and rows[at + 3][4:] == ["-"] * 4
    assert rows[at + 5] == ["ratio", "1.00x", "-", "-", "-", "-"]
    assert "loramux 1.90 (0.05 while the peer runs)" in lines[-1] and "vLLM 1.80 (-" in lines[-1]
    assert "quick" not in lines[1]
    assert "not a result" in format_table(report(rounds=1)).splitlines()[1]
    targeted = report() | {"loramux": {"target": "h:1", "start_seconds": None}}
    assert format_table(targeted).splitlines()[2].endswith("loramux: --target h:1 (CPU not metered)")


def test_resident_memory_is_read_and_reported():
    from loramux.benchmarks.peers import process_tree_rss

    own = process_tree_rss(os.getpid())
    assert 10 * 2**20 < own < 64 * 2**30  # this test process: tens of MiB at least
    lines = format_table(report() | {"rss_bytes": {"loramux": 900 * 2**20, "vLLM": 3 * 2**30}}).splitlines()
    assert lines[-1] == "resident memory after the rounds: loramux 900 MiB, vLLM 3072 MiB"


def test_a_round_waits_until_the_other_systems_are_quiet():
    from types import SimpleNamespace

    from loramux.benchmarks.peers import QUIET_MAX_WAIT_S, wait_quiet

    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both started
        peers = [SimpleNamespace(name="busy", pid=busy.pid), SimpleNamespace(name="idle", pid=idle.pid),
                 SimpleNamespace(name="unmetered", pid=None)]
        assert wait_quiet(peers, "busy") < 1.0  # only the idle one is looked at
        waited = wait_quiet(peers, "idle")  # the busy one spins until ~1.5 s after its start
        assert 0.8 < waited < QUIET_MAX_WAIT_S
    finally:
        busy.kill()
        idle.kill()
