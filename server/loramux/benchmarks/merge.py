"""Merge benchmark: loramux merges vs PEFT `add_weighted_adapter`, side by side in one process.

    python -m loramux.benchmarks.merge [--rounds 3] [--density 0.5] [--slot-rank 16] [--budget 0.01]

Default model (SmolLM2-135M: 30 layers × q/k/v/o/gate/up/down), float32 CPU,
`--adapters` random rank-`--rank` adapters on all seven projections
(`decode.make_adapters`), equal weights 1/N (slerp: the first two, t = 0.5).

Per round and method:
- ours, exact: `materialize.exact_deltas`, the merged ΔW of every module (factored
  for linear/slerp/karcher, dense float32 for ties/dare_ties): what pin and export use;
- ours, served: `materialize.serving_adapter` at rank ≤ `--slot-rank` within
  `--budget` (what a request with a mix gets; achieved rank and error reported);
- PEFT: `add_weighted_adapter` with the matching combination_type on a PeftModel
  holding the same adapters (the produced adapter is deleted after each call).
  PEFT's linear/ties/dare_ties act on A and B separately (factor space), which is
  not the method (design.md); "cat" is its exact linear merge.
Also: exact low-rank compression of the linear mix (rank Σr → `--slot-rank`,
`lowrank.compress_exact`) vs PEFT "svd" with svd_rank = `--slot-rank`; pin and
unpin of the linear mix through an engine; a cached-mix lookup
(`engine.merges.resolve`, second call). Figures are medians over rounds.

    python -m loramux.benchmarks.merge --synthetic [--counts 2,4,8] [--slot-rank 64] [--threads 2]

Dense methods only, no model and no PEFT: random rank-`--rank` adapters built in
memory with the default model's shapes (`SMOLLM2_SHAPES`: q/k/v/o/gate/up/down of
hidden 576, intermediate 1536, 3 KV heads of 64, × 30 layers; A, B ~ N(0, 0.02),
lora_alpha = 2r, as `decode.make_adapters` draws them), `--counts` adapters at a
time, equal weights. Per method and count: the exact merge (`exact_deltas`, what
pin and export use), the served adapter (`serving_adapter` at rank ≤ `--slot-rank`:
the whole compression, whatever its error) and the time to a refusal over
`--budget` (`refuse_over_budget`, what a request gets when the budget is not met:
it stops at the first module over budget).
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loramux.benchmarks.decode import make_adapters
from loramux.config import ModelConfig

COMMAND = "python -m loramux.benchmarks.merge"
OURS_METHODS = ("linear", "ties", "dare_ties", "slerp", "karcher")
# The methods whose result is a dense ΔW (not a combination of the factors).
DENSE_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "della", "breadcrumbs")
# The default model's (SmolLM2-135M) LoRA targets, [d_out, d_in] per layer, and its layers.
SMOLLM2_SHAPES = {
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
SMOLLM2_LAYERS = 30
# Our method → PEFT combination types timed beside it.
PEFT_TYPES = {"linear": ("linear", "cat"), "ties": ("ties",), "dare_ties": ("dare_ties",)}
GOALS = {
    "ties": "exact ≤ PEFT ties",
    "compress": "≥ 10× faster than PEFT svd",
    "pin": "≤ 300 ms",
    "cached": "≤ 1 ms",
}


@dataclass
class Samples:
    """Seconds per round, keyed by figure name; plus the last served (rank, error)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    served: dict[str, tuple[int, float]] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average at start, end

    def add(self, key: str, s: float) -> None:
        self.seconds.setdefault(key, []).append(s)

    def median(self, key: str) -> float | None:
        v = self.seconds.get(key)
        return statistics.median(v) if v else None


def _timed(fn):
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def mix_spec(method: str, names: list[str], density: float):
    from loramux.merging.spec import MixSpec

    if method == "slerp":
        return MixSpec.build([(names[0], 1.0), (names[1], 1.0)], "slerp", {"t": 0.5})
    w = 1.0 / len(names)
    params = {"density": density} if method in DENSE_METHODS else {}
    if method == "della":  # keep probabilities density ± epsilon must stay in (0, 1]
        params["epsilon"] = round(min(0.1, density / 2, (1 - density) / 2), 6)
    return MixSpec.build([(n, w) for n in names], method, params, seed=0)


def synthetic_adapters(n: int, rank: int, shapes=SMOLLM2_SHAPES, layers: int = SMOLLM2_LAYERS):
    """n random rank-`rank` LoraAdapters on every `shapes` module of `layers` layers,
    in memory (A, B ~ N(0, 0.02), scale lora_alpha / r = 2, as decode.make_adapters)."""
    from loramux.adapters.types import LoraAdapter, LoraModule

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        modules = {
            f"model.layers.{layer}.{m}": LoraModule(
                A=torch.randn(rank, d_in, generator=g) * 0.02,  # [r, d_in]
                B=torch.randn(d_out, rank, generator=g) * 0.02,  # [d_out, r]
                scale=2.0,
            )
            for layer in range(layers)
            for m, (d_out, d_in) in shapes.items()
        }
        out.append(LoraAdapter(name=f"bench{i}", modules=modules, content_hash=f"synthetic-{rank}-{i}"))
    return out


def time_synthetic(samples: Samples, adapters, method: str, args) -> None:
    """exact / served / refused seconds of `method` over `adapters` (keys method/N/...)."""
    from loramux.merging import materialize

    spec = mix_spec(method, [a.name for a in adapters], args.density)
    key = f"{method}/{len(adapters)}"
    time_exact_and_served(samples, adapters, spec, key, args)

    def refused():
        try:
            materialize.serving_adapter(
                adapters, spec, "bench", args.slot_rank, args.budget, refuse_over_budget=True
            )
        except materialize.OverBudget:
            return True
        return False

    s, was_refused = _timed(refused)
    samples.add(f"{key}/refused" if was_refused else f"{key}/accepted", s)


def report_synthetic(samples: Samples, args, argv: list[str]) -> str:
    m = samples.median
    lines = [
        f"dense merge benchmark, synthetic rank-{args.rank} adapters with the default model's shapes "
        f"(7 projections × {SMOLLM2_LAYERS} layers, no model), float32 CPU, median of {args.rounds} "
        f"rounds (threads={torch.get_num_threads()})",
        f"command: {COMMAND} {shlex.join(argv)}".rstrip(),
        f"served = serving_adapter at rank ≤ {args.slot_rank} (the whole compression); refused = time "
        f"to refuse over error budget {args.budget} (stops at the first module over it); "
        f"density {args.density}",
        "load average (1 min) at start / end: " + " / ".join(f"{x:.2f}" for x in samples.load),
        "",
        f"{'method':16s} {'N':>2s} {'exact ΔW':>9s} {'served':>9s} {'rank':>5s} {'rel.err':>8s} {'refused':>9s}",
    ]
    for method in [x for x in args.methods.split(",") if x]:
        for n in _counts(args):
            key = f"{method}/{n}"
            if m(f"{key}/exact") is None:
                continue
            rank, err = samples.served.get(key, (0, float("nan")))
            refusal = _fmt_s(m(f"{key}/refused")) if m(f"{key}/refused") is not None else "accepted"
            lines.append(
                f"{method:16s} {n:2d} {_fmt_s(m(f'{key}/exact')):>9s} {_fmt_s(m(f'{key}/served')):>9s} "
                f"{rank:5d} {err:8.4f} {refusal:>9s}"
            )
    return "\n".join(lines)


def _counts(args) -> list[int]:
    return [int(x) for x in args.counts.split(",") if x]


def main_synthetic(args, argv: list[str]) -> None:
    methods = [x for x in args.methods.split(",") if x]
    samples = Samples(load=[os.getloadavg()[0]])
    with torch.no_grad():
        for n in _counts(args):
            adapters = synthetic_adapters(n, args.rank)
            for r in range(args.rounds):
                for method in methods:
                    time_synthetic(samples, adapters, method, args)
                print(f"{n} adapters: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            del adapters
    samples.load.append(os.getloadavg()[0])
    print(report_synthetic(samples, args, argv))


def time_ours(samples: Samples, adapters, names, method, args) -> None:
    spec = mix_spec(method, names, args.density)
    time_exact_and_served(samples, [adapters[n] for n in spec.names], spec, method, args)


def time_exact_and_served(samples: Samples, adapters, spec, key: str, args) -> None:
    """Samples `key`/exact (`exact_deltas`, what pin and export use) and `key`/served
    (`serving_adapter` at rank ≤ --slot-rank within --budget, its rank and error)."""
    from loramux.merging import materialize

    s, deltas = _timed(lambda: materialize.exact_deltas(adapters, spec))
    samples.add(f"{key}/exact", s)
    del deltas
    s, (merged, report) = _timed(
        lambda: materialize.serving_adapter(adapters, spec, "bench", args.slot_rank, args.budget)
    )
    samples.add(f"{key}/served", s)
    samples.served[key] = (report.rank, report.rel_error)
    del merged


def time_peft(samples: Samples, peft_model, names, method, args) -> None:
    w = [1.0 / len(names)] * len(names)
    for ctype in PEFT_TYPES.get(method, ()):
        kw = {"density": args.density} if "ties" in ctype else {}
        s, _ = _timed(
            lambda: peft_model.add_weighted_adapter(names, w, "merged", combination_type=ctype, **kw)
        )
        peft_model.delete_adapter("merged")
        samples.add(f"{method}/peft-{ctype}", s)


def time_compression(samples: Samples, adapters, peft_model, names, args) -> None:
    """The linear mix as an exact rank-`slot_rank` truncation, ΔW computed from the
    factors in both (PEFT's "svd" takes a full SVD of each dense ΔW)."""
    from loramux.merging import materialize
    from loramux.merging.lowrank import compress_exact

    spec = mix_spec("linear", names, args.density)
    adapters = [adapters[n] for n in spec.names]

    def ours():
        deltas = materialize.exact_deltas(adapters, spec)
        return {n: compress_exact(f, args.slot_rank) for n, f in deltas.items()}

    s, _ = _timed(ours)
    samples.add("compress/ours", s)
    if peft_model is None:
        return
    w = [1.0 / len(names)] * len(names)
    s, _ = _timed(lambda: peft_model.add_weighted_adapter(
        names, w, "merged", combination_type="svd", svd_rank=args.slot_rank))
    peft_model.delete_adapter("merged")
    samples.add("compress/peft-svd", s)


def time_engine(samples: Samples, engine, names, args) -> None:
    from loramux.engine.types import GenerationRequest

    spec = mix_spec("linear", names, args.density)
    wall, swap = _timed(lambda: engine.pin(GenerationRequest(mix=spec)))
    samples.add("pin/wall", wall)
    samples.add("pin/swap", swap)
    wall, swap = _timed(engine.unpin)
    samples.add("unpin/wall", wall)
    samples.add("unpin/swap", swap)
    # A fresh seed is a fresh cache key, so the first resolve merges and the second hits.
    cached = replace(mix_spec("linear", names, args.density), seed=len(samples.seconds.get("cached", ())) + 1)
    engine.merges.resolve(cached)
    s, (_, report) = _timed(lambda: engine.merges.resolve(cached))
    if not report.cache_hit:
        raise RuntimeError("the second resolve of a mix missed the merge cache")
    samples.add("cached", s)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1.0 else f"{s:.2f} s"


def report(samples: Samples, args, argv: list[str]) -> str:
    m = samples.median
    lines = [
        f"merge benchmark, default model float32 CPU, {args.adapters} random rank-{args.rank} adapters "
        f"on 7 projections × 30 layers, median of {args.rounds} rounds (threads={torch.get_num_threads()})",
        f"command: {COMMAND} {shlex.join(argv)}".rstrip(),
        f"served = serving_adapter at rank ≤ {args.slot_rank}, error budget {args.budget}; "
        f"ties/dare density {args.density}; PEFT linear/ties/dare_ties work on A and B "
        "separately (factor space), cat/svd on the exact ΔW",
        "load average (1 min) at start / end: " + " / ".join(f"{x:.2f}" for x in samples.load),
        "",
        f"{'method':10s} {'ours exact ΔW':>14s} {'ours served':>12s} {'rank':>5s} {'rel.err':>8s}   "
        f"{'PEFT add_weighted_adapter':28s} goal",
    ]
    for method in OURS_METHODS:
        if m(f"{method}/exact") is None:
            continue
        rank, err = samples.served.get(method, (0, float("nan")))
        peft = ", ".join(
            f"{t} {_fmt_s(m(f'{method}/peft-{t}'))}" for t in PEFT_TYPES.get(method, ())
        ) or "— (none)"
        goal = GOALS.get(method, "")
        if method == "ties" and m("ties/peft-ties"):
            goal += f" (ours/PEFT {m('ties/exact') / m('ties/peft-ties'):.2f}×)"
        lines.append(
            f"{method:10s} {_fmt_s(m(f'{method}/exact')):>14s} {_fmt_s(m(f'{method}/served')):>12s} "
            f"{rank:5d} {err:8.4f}   {peft:28s} {goal}"
        )
    lines.append("")
    ours, peft = m("compress/ours"), m("compress/peft-svd")
    if ours is not None:
        vs = f"PEFT svd {_fmt_s(peft)}, {peft / ours:.1f}× faster" if peft is not None else "PEFT skipped"
        lines.append(
            f"exact compression linear mix r{args.adapters * args.rank}→{args.slot_rank}: "
            f"ours {_fmt_s(ours)}, {vs}   goal {GOALS['compress']}"
        )
    if m("pin/wall") is not None:
        lines.append(
            f"pin linear mix (exact ΔW + fold): {_fmt_s(m('pin/wall'))} (fold alone {_fmt_s(m('pin/swap'))})"
            f"   goal {GOALS['pin']}"
        )
        lines.append(f"unpin: {_fmt_s(m('unpin/wall'))} (swap {_fmt_s(m('unpin/swap'))})")
        lines.append(f"cached-mix lookup: {m('cached') * 1e3:.3f} ms   goal {GOALS['cached']}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.5, help="ties / dare_ties density")
    ap.add_argument("--slot-rank", type=int, default=16, help="rank of the served adapter")
    ap.add_argument("--budget", type=float, default=0.01, help="error budget of the served adapter")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated subset (default: {','.join(OURS_METHODS)}; "
                    f"with --synthetic {','.join(DENSE_METHODS)})")
    ap.add_argument("--synthetic", action="store_true",
                    help="dense methods on in-memory adapters of the default model's shapes (no model)")
    ap.add_argument("--counts", default="2,4,8", help="--synthetic: numbers of adapters merged")
    ap.add_argument("--skip-peft", action="store_true", help="time ours only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--model-cache", type=Path, default=ModelConfig().cache_dir)
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = ",".join(DENSE_METHODS if args.synthetic else OURS_METHODS)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.synthetic:
        main_synthetic(args, argv)
        return

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramux.app import build_engine
    from loramux.config import AdapterConfig, EngineConfig, MergeConfig, SlotConfig
    from loramux.model.loader import ensure_default_model

    base_dir = ensure_default_model(args.model_cache)
    root = Path(tempfile.mkdtemp(prefix="loramux-bench-merge-"))
    names = make_adapters(base_dir, root, args.adapters, args.rank)
    engine = build_engine(EngineConfig(
        model=ModelConfig(cache_dir=args.model_cache, device="cpu", dtype="float32", quantization="none"),
        adapters=AdapterConfig(roots=[root], max_rank=max(args.rank, args.slot_rank)),
        slots=SlotConfig(num_slots=args.adapters),
        merges=MergeConfig(max_rank=args.slot_rank, error_budget=args.budget),
        max_batch_rows=4,
    ))
    adapters = {n: engine.store.get(n) for n in names}
    peft_model = None
    if not args.skip_peft:
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(hf, root / names[0], adapter_name=names[0]).eval()
        for name in names[1:]:
            peft_model.load_adapter(root / name, adapter_name=name)

    methods = [x for x in args.methods.split(",") if x]
    samples = Samples(load=[os.getloadavg()[0]])
    with torch.no_grad():
        for r in range(args.rounds):
            for method in methods:
                time_ours(samples, adapters, names, method, args)
                if peft_model is not None:
                    time_peft(samples, peft_model, names, method, args)
            time_compression(samples, adapters, peft_model, names, args)
            time_engine(samples, engine, names, args)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    samples.load.append(os.getloadavg()[0])
    shutil.rmtree(root, ignore_errors=True)
    print(report(samples, args, argv))


if __name__ == "__main__":
    main()
