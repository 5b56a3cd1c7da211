"""Serving benchmark: loramux over gRPC vs the server a user writes with PEFT.

    loramux bench [--clients 8] [--adapters 8] [--rounds 3] [--mix-fraction 0.25] ...
    python -m loramux.benchmarks.serving ...

Load: `--clients` concurrent gRPC streams (one asyncio task each, issuing its
`--requests` one after another), adapters assigned round robin, greedy with
ignore_eos so every request makes exactly `--max-tokens` tokens. By default a
server is started in this process (default model or `--model`, float32, CPU) with
`--adapters` random rank-`--rank` adapters; `--target HOST:PORT` loads a running
one instead.

Baseline, same process and run: one PeftModel holding the same adapters, shared by
`--clients` threads through a lock; each request does `set_adapter` + `generate`
(mixes: an `add_weighted_adapter(..., "cat")` adapter made once, i.e. the exact
ΔW sum, like loramux's linear mix).

Rounds interleave (loramux, baseline, loramux, ...) so machine noise hits both;
reported figures are medians over rounds. Per round: tokens/s = generated tokens /
wall time; TTFT = request sent → first token received (baseline: request start,
including the wait for the model lock, → first token from a streamer); ITL = gaps
between a request's successive tokens, as the client sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loramux.benchmarks.decode import PROMPT, make_adapters
from loramux.cliargs import add_base_model_args, module_main
from loramux.config import ModelConfig
from loramux.errors import InvalidArgument

if TYPE_CHECKING:
    from loramux.service.main import ServerThread

COMMAND = "python -m loramux.benchmarks.serving"
GOAL_RATIO = 4.0


# ---- what the clients send -------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The weights one request asks for: one adapter, or a 50/50 linear mix of two."""

    adapter: str | None = None
    mix: tuple[str, str] | None = None

    @property
    def label(self) -> str:
        return self.adapter if self.mix is None else f"mix__{self.mix[0]}__{self.mix[1]}"

    def client_options(self) -> dict:
        """Keyword options of loramux_client's generate/stream."""
        if self.mix is None:
            return {"adapter": self.adapter}
        from loramux_client import Mix

        return {"mix": Mix({name: 0.5 for name in self.mix}, method="linear")}


def plan_requests(names: list[str], clients: int, requests: int, mix_fraction: float) -> list[list[Selection]]:
    """plan[c][j]: what client c sends as its j-th request.

    Global request k = j * clients + c takes adapter k mod M, so requests in flight
    together use different adapters; exactly round(mix_fraction * total) of them
    (spread evenly) send a mix of adapters k and k+1 instead.
    """
    if mix_fraction > 0 and len(names) < 2:
        raise InvalidArgument("--mix-fraction needs at least 2 adapters")
    plan: list[list[Selection]] = [[] for _ in range(clients)]
    for j in range(requests):
        for c in range(clients):
            k, m = j * clients + c, len(names)
            is_mix = int((k + 1) * mix_fraction) > int(k * mix_fraction)
            plan[c].append(Selection(mix=(names[k % m], names[(k + 1) % m])) if is_mix
                           else Selection(adapter=names[k % m]))
    return plan


def distinct(plan: list[list[Selection]]) -> list[Selection]:
    return list(dict.fromkeys(s for row in plan for s in row))


# ---- measurements ------------------------------------------------------------------


@dataclass
class RequestSample:
    """One finished request as its client saw it (seconds)."""

    ttft: float
    gaps: list[float]  # between successive tokens
    tokens: int


@dataclass
class RoundStats:
    tokens: int
    wall_seconds: float
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[RequestSample], wall_seconds: float) -> "RoundStats":
        return cls(sum(s.tokens for s in samples), wall_seconds,
                   [s.ttft for s in samples], [g for s in samples for g in s.gaps])

    def figures(self) -> dict[str, float | None]:
        return {
            "tokens_per_s": self.tokens / self.wall_seconds,
            "ttft_p50_ms": _percentile_ms(self.ttfts, 50),
            "ttft_p99_ms": _percentile_ms(self.ttfts, 99),
            "itl_p50_ms": _percentile_ms(self.gaps, 50),
            "itl_p99_ms": _percentile_ms(self.gaps, 99),
            "tokens": self.tokens,
            "wall_s": self.wall_seconds,
        }


def _percentile_ms(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) * 1e3 if xs else None


def summarize(rounds: list[RoundStats]) -> dict:
    """Median over rounds of each round's figures, plus the rounds themselves."""
    per_round = [r.figures() for r in rounds]
    median = {k: None if any(f[k] is None for f in per_round) else statistics.median(f[k] for f in per_round)
              for k in per_round[0]}
    return {**median, "rounds": per_round}


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# ---- loramux over gRPC ---------------------------------------------------------------


async def _stream_one(client, prompt: str, sel: Selection, max_tokens: int) -> RequestSample:
    sent = time.perf_counter()
    token_times: list[float] = []
    tokens = 0
    async for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                     **sel.client_options()):
        if chunk.token_ids:
            token_times.append(time.perf_counter())
            tokens += len(chunk.token_ids)
    if not token_times:
        raise RuntimeError(f"a request for {sel.label} produced no tokens")
    return RequestSample(token_times[0] - sent, _gaps(token_times), tokens)


async def _loramux_round(target: str, token: str | None, plan: list[list[Selection]],
                         prompt: str, max_tokens: int) -> RoundStats:
    from loramux_client import AsyncClient

    # One channel per client, connected before the clock starts.
    clients = [AsyncClient(target, token=token) for _ in plan]
    try:
        await asyncio.gather(*(c.wait_ready(timeout=30) for c in clients))

        async def run_client(client, sels: list[Selection]) -> list[RequestSample]:
            return [await _stream_one(client, prompt, s, max_tokens) for s in sels]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(run_client(c, sels) for c, sels in zip(clients, plan)))
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return RoundStats.of([s for samples in per_client for s in samples], wall)


def loramux_round(target: str, token: str | None, plan, prompt: str, max_tokens: int) -> RoundStats:
    return asyncio.run(_loramux_round(target, token, plan, prompt, max_tokens))


# ---- the PEFT baseline ---------------------------------------------------------------


def _token_clock():
    """A transformers streamer that timestamps every generated token (generate()'s
    first put is the prompt, which it skips)."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if self._prompt_seen:
                self.times.append(time.perf_counter())
            self._prompt_seen = True

        def end(self) -> None:
            pass

    return TokenClock()


class PeftBaseline:
    """What a user's naive multi-adapter server does: one PeftModel with every
    adapter loaded, one lock, and per request `set_adapter(name)` + `generate`."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path], device: str, dtype: str, prompt: str):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loramux.model.loader import resolve_device, resolve_dtype

        dev = resolve_device(device)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
        (first, path), *rest = adapters.items()
        self.model = PeftModel.from_pretrained(base, path, adapter_name=first).eval()
        for name, path in rest:
            self.model.load_adapter(path, adapter_name=name)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        enc = self.tokenizer(prompt, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.lock = threading.Lock()
        self._torch = torch

    def add_mixes(self, selections: list[Selection]) -> None:
        """Build each mix once, as the exact ΔW sum ("cat") of its adapters."""
        for sel in selections:
            if sel.mix is not None and sel.label not in self.model.peft_config:
                self.model.add_weighted_adapter(list(sel.mix), [0.5, 0.5], sel.label, combination_type="cat")

    def request(self, sel: Selection, max_tokens: int) -> RequestSample:
        start = time.perf_counter()
        clock = _token_clock()
        with self.lock, self._torch.inference_mode():
            self.model.set_adapter(sel.label)
            out = self.model.generate(
                input_ids=self.ids, attention_mask=self.mask, do_sample=False,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens,  # same lengths as ignore_eos
                pad_token_id=self.pad_id, streamer=clock,
            )
        return RequestSample(clock.times[0] - start, _gaps(clock.times), out.shape[1] - self.ids.shape[1])

    def round(self, plan: list[list[Selection]], max_tokens: int) -> RoundStats:
        """One thread per client, each issuing its requests one after another."""
        results: list[list[RequestSample]] = [[] for _ in plan]
        errors: list[BaseException] = []
        go = threading.Barrier(len(plan) + 1)

        def run_client(c: int) -> None:
            go.wait()
            try:
                results[c] = [self.request(s, max_tokens) for s in plan[c]]
            except BaseException as e:  # surfaced on the main thread
                errors.append(e)

        threads = [threading.Thread(target=run_client, args=(c,), name=f"bench-peft-{c}") for c in range(len(plan))]
        for t in threads:
            t.start()
        go.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if errors:
            raise errors[0]
        return RoundStats.of([s for samples in results for s in samples], wall)


# ---- set-up: adapters and the server under test -------------------------------------


@dataclass
class Setup:
    target: str
    names: list[str]
    plan: list[list[Selection]]  # plan[c][j]: client c's j-th request
    adapter_dirs: dict[str, Path] | None  # None: only names are known (--target, --no-baseline)
    base_dir: Path | None  # HF directory the baseline loads


def _adapter_dirs(args: argparse.Namespace) -> dict[str, Path] | None:
    """Existing adapters the flags name (name → PEFT directory); None when none."""
    if args.adapter_dir:
        dirs = {Path(p).name: Path(p) for p in args.adapter_dir}
        if len(dirs) != len(args.adapter_dir):
            raise InvalidArgument("--adapter-dir directories must have distinct names")
    elif args.adapter_root is not None:
        root = Path(args.adapter_root)
        names = _names(args) or sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
        dirs = {n: root / n for n in names}
    else:
        return None
    missing = [str(p) for p in dirs.values() if not (p / "adapter_config.json").is_file()]
    if missing or not dirs:
        raise InvalidArgument(f"not PEFT adapter directories: {missing or 'none found'}")
    return dirs


def _names(args: argparse.Namespace) -> list[str]:
    return [n for n in (args.adapter_names or "").split(",") if n]


def _adapter_rank(path: Path) -> int:
    cfg = json.loads((path / "adapter_config.json").read_text())
    return max([int(cfg.get("r", 8)), *map(int, (cfg.get("rank_pattern") or {}).values())])


def _default_base_dir(args: argparse.Namespace) -> Path:
    from loramux.model.loader import ensure_default_model

    return Path(args.model) if args.model else ensure_default_model(args.model_cache)


def _start_server(args: argparse.Namespace, dirs: dict[str, Path], plan) -> ServerThread:
    """An in-process server on a loopback port: device and dtype from the flags,
    unquantized, no metrics, a slot per distinct selection, a row per client."""
    from loramux.app import build_engine
    from loramux.config import AdapterConfig, EngineConfig, ServerConfig, SlotConfig
    from loramux.service.main import ServerThread

    rank = max(_adapter_rank(p) for p in dirs.values())
    mixes = any(s.mix for s in distinct(plan))
    engine_cfg = EngineConfig(
        model=ModelConfig(path=args.model, cache_dir=args.model_cache, device=args.device,
                          dtype=args.dtype, quantization="none"),
        # A linear mix of two adapters is exact at rank r_a + r_b.
        adapters=AdapterConfig(roots=sorted({p.parent for p in dirs.values()}), max_rank=rank * (2 if mixes else 1)),
        slots=SlotConfig(num_slots=max(SlotConfig.num_slots, len(distinct(plan)))),
        max_batch_rows=max(EngineConfig.max_batch_rows, args.clients),
    ).validate()
    server_cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5).validate()
    return ServerThread(server_cfg, lambda: build_engine(engine_cfg))


@contextlib.contextmanager
def bench_setup(args: argparse.Namespace) -> Iterator[Setup]:
    """Adapters (given, or generated into a temp dir) and the server to load (given
    by --target, or started here); everything is torn down on exit."""
    with contextlib.ExitStack() as stack:
        dirs = _adapter_dirs(args)
        base_dir = None
        if dirs is None and args.target is None:
            base_dir = _default_base_dir(args)
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loramux-bench-")))
            names = make_adapters(base_dir, root, args.adapters, args.rank)
            dirs = {n: root / n for n in names}
        if dirs is None and not (args.no_baseline and _names(args)):
            raise InvalidArgument("with --target, name the served adapters: --adapter-root DIR "
                                  "[--adapter-names a,b] or --adapter-dir PATH (or --adapter-names "
                                  "a,b with --no-baseline)")
        names = list(dirs) if dirs else _names(args)
        plan = plan_requests(names, args.clients, args.requests, args.mix_fraction)
        if not args.no_baseline:
            base_dir = base_dir or _default_base_dir(args)
        target = args.target or stack.enter_context(_start_server(args, dirs, plan)).address
        yield Setup(target, names, plan, dirs, base_dir)


# ---- running and reporting ---------------------------------------------------------


def _warm_up(setup: Setup, prompt: str, baseline: PeftBaseline | None, token: str | None) -> None:
    """Every distinct selection once on each side (adapter loads, slot uploads,
    merges, allocator), outside the measured rounds."""
    sels = distinct(setup.plan)
    loramux_round(setup.target, token, [[s] for s in sels], prompt, 2)
    if baseline is not None:
        baseline.add_mixes(sels)
        for s in sels:
            baseline.request(s, 2)


def run_bench(args: argparse.Namespace) -> dict:
    """Set up, warm up, run the interleaved rounds; return the report as a dict."""
    import torch

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    with bench_setup(args) as setup:
        plan = setup.plan
        baseline = None
        if not args.no_baseline:
            baseline = PeftBaseline(setup.base_dir, setup.adapter_dirs, args.device, args.dtype, args.prompt)
        _warm_up(setup, args.prompt, baseline, token)
        ours: list[RoundStats] = []
        theirs: list[RoundStats] = []
        for _ in range(args.rounds):
            ours.append(loramux_round(setup.target, token, plan, args.prompt, args.max_tokens))
            if baseline is not None:
                theirs.append(baseline.round(plan, args.max_tokens))
    report = {
        "command": args.command_line or shlex.join(sys.argv),
        "target": args.target or "in-process",
        "adapters": setup.names,
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "mix_fraction": args.mix_fraction, "rounds": args.rounds,
        "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        # Other processes on the same cores skew both systems; a high figure flags a noisy run.
        "load_avg_1min": os.getloadavg()[0],
        "loramux": summarize(ours),
        "baseline": summarize(theirs) if theirs else None,
    }
    report["ratio"] = (report["loramux"]["tokens_per_s"] / report["baseline"]["tokens_per_s"]
                       if theirs else None)
    return report


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    r = report
    lines = [
        f"command: {r['command']}",
        f"serving: {r['clients']} clients x {r['requests']} requests x {r['max_tokens']} tokens over "
        f"{len(r['adapters'])} adapters (mix fraction {r['mix_fraction']:g}), target {r['target']}, "
        f"{r['device']} {r['dtype']}, torch threads {r['torch_threads']}, median of {r['rounds']} rounds, "
        f"load average {r['load_avg_1min']:.1f} at the end",
        f"{'system':10s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s}  (ms)",
    ]
    for name, key in (("loramux", "loramux"), ("PEFT", "baseline")):
        s = r[key]
        if s is None:
            continue
        lines.append(f"{name:10s} {s['tokens_per_s']:8.1f} {_fmt(s['ttft_p50_ms'], '9.1f')} "
                     f"{_fmt(s['ttft_p99_ms'], '9.1f')} {_fmt(s['itl_p50_ms'], '8.1f')} "
                     f"{_fmt(s['itl_p99_ms'], '8.1f')}")
    if r["ratio"] is not None:
        lines.append(f"throughput loramux / PEFT: {r['ratio']:.2f}x (goal >= {GOAL_RATIO:g}x)")
        lines.append("PEFT TTFT: request start (incl. waiting for the model lock) -> first token "
                     "from a generate() streamer; ITL: gaps between its streamed tokens")
    return "\n".join(lines)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--target", help="HOST:PORT of a running server to load (default: start one here)")
    g.add_argument("--token-file", type=Path, help="bearer token for --target's Inference API")
    g.add_argument("--clients", type=int, default=8, help="concurrent streams (default: %(default)s)")
    g.add_argument("--requests", type=int, default=4, help="requests per client, one after another "
                   "(default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates "
                   "(greedy, ignore_eos; default: %(default)s)")
    g.add_argument("--mix-fraction", type=float, default=0.0, help="share of requests sending a 50/50 "
                   "linear mix of two adapters instead of one (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds per system; medians are "
                   "reported (default: %(default)s)")
    g.add_argument("--prompt", default=PROMPT, help="prompt of every request")
    g.add_argument("--no-baseline", action="store_true", help="skip the PEFT baseline")
    g.add_argument("--json", action="store_true", help="print the report as JSON only")
    g = p.add_argument_group("model and adapters (server started here, and the baseline)")
    add_base_model_args(g, device="cpu", dtype="float32", quantization=False)
    g.add_argument("--adapters", type=int, default=8, help="random adapters to generate when none are "
                   "given (default: %(default)s)")
    g.add_argument("--rank", type=int, default=16, help="rank of generated adapters (default: %(default)s)")
    g.add_argument("--adapter-root", type=Path, help="use existing adapters under this directory")
    g.add_argument("--adapter-names", help="comma-separated adapter names (default: all under --adapter-root)")
    g.add_argument("--adapter-dir", type=Path, action="append", default=[],
                   help="an existing PEFT adapter directory (its name is the adapter name); repeatable")
    p.set_defaults(command_line=None)


def _check(args: argparse.Namespace) -> None:
    if min(args.clients, args.requests, args.max_tokens, args.rounds) < 1:
        raise InvalidArgument("--clients, --requests, --max-tokens and --rounds must be at least 1")
    if not 0.0 <= args.mix_fraction <= 1.0:
        raise InvalidArgument("--mix-fraction must be in [0, 1]")
    if args.adapter_dir and args.adapter_root is not None:
        raise InvalidArgument("give --adapter-root or --adapter-dir, not both")


def cmd_bench(args: argparse.Namespace) -> int:
    _check(args)
    report = run_bench(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog=COMMAND, description=__doc__, add_args=add_bench_args,
                       run=cmd_bench, command=COMMAND)


if __name__ == "__main__":
    sys.exit(main())
