"""Decode-speed benchmark: loramux vs PEFT, side by side in one process.

    python -m loramux.benchmarks.decode [--tokens 48] [--rounds 5] [--rank 16]

Default model, float32, random rank-16 adapters on all seven projections. Prints
median decode tokens/s (and ms per step) for: base; one adapter unmerged; 8 rows
with 8 different adapters vs the base with 8 rows, through loramux and through
PEFT (single active adapter; `adapter_names` mixed batch).

Workloads are interleaved step by step so machine noise hits them alike; figures
are medians over rounds of per-step medians, and each ratio is also taken paired:
an adapter workload's step over its base workload's step just before it, median
over all passes (the steadier figure on a noisy machine). The loramux workloads run on twin
engines over one model (one copy of the weights, one slot pool, as in a server:
base and adapter rows read the same memory); HF base and PEFT each have their
model. `--copies` gives every loramux workload its own model copy instead: each
step then starts with the caches full of another copy's weights, a colder and
harsher setting than serving.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def make_adapters(base_dir: Path, root: Path, n: int, rank: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS),
    )
    names = []
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(root / f"bench{i}")
        names.append(f"bench{i}")
    return names


class EngineWorkload:
    """Rows with `adapters` decoding on their own engine; step() times one decode
    step and restarts the generation when it ends."""

    def __init__(self, engine, adapters: list[str | None], tokens: int):
        self.engine, self.adapters, self.tokens = engine, adapters, tokens

    def _start(self) -> None:
        from loramux.engine.sampling import SamplingParams
        from loramux.engine.types import GenerationRequest

        params = SamplingParams(max_new_tokens=self.tokens, ignore_eos=True)
        for a in self.adapters:
            self.engine.submit(GenerationRequest(prompt=PROMPT, adapter=a, sampling=params))
        self.engine.step()  # prefill

    def step(self) -> float:
        if self.engine.num_running < len(self.adapters) or self.engine.num_waiting:
            while self.engine.has_work():
                self.engine.step()
            self._start()
        t = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - t


class HFWorkload:
    """The loop a user writes over HF/PEFT: forward with a KV cache, argmax."""

    def __init__(self, model, tokenizer, rows: int, tokens: int, adapter_names=None):
        self.model, self.tokens = model, tokens
        self.ids = tokenizer([PROMPT] * rows, return_tensors="pt")["input_ids"]
        self.kw = {"adapter_names": adapter_names} if adapter_names else {}
        self.done = tokens

    @torch.inference_mode()
    def step(self) -> float:
        from transformers import DynamicCache

        if self.done >= self.tokens - 1:
            self.cache = DynamicCache(config=self.model.config)
            self.out = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True,
                                  logits_to_keep=1, **self.kw)
            self.done = 0
        nxt = self.out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        self.out = self.model(input_ids=nxt, past_key_values=self.cache, use_cache=True,
                              logits_to_keep=1, **self.kw)
        self.done += 1
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--copies", action="store_true",
                    help="one model copy per loramux workload instead of twin engines over one")
    ap.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "loramux")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramux.app import build_engine, build_kv_cache
    from loramux.config import AdapterConfig, EngineConfig, ModelConfig, SlotConfig
    from loramux.engine.engine import Engine
    from loramux.engine.pins import PinController
    from loramux.model.loader import ensure_default_model

    base_dir = ensure_default_model(args.model_cache)
    root = Path(tempfile.mkdtemp(prefix="loramux-bench-"))
    names = make_adapters(base_dir, root, args.rows, args.rank)
    first = build_engine(EngineConfig(
        model=ModelConfig(cache_dir=args.model_cache, device="cpu", dtype="float32", quantization="none"),
        adapters=AdapterConfig(roots=[root], max_rank=args.rank),
        slots=SlotConfig(num_slots=args.rows),
        max_batch_rows=args.rows,
    ))

    def engine():
        if args.copies:
            return build_engine(first.config)
        # Same model, store, slot pool and LoRA context; its own rows and KV cache.
        # Steps run one at a time on this thread, and the 8 slots hold all 8
        # adapters, so the twins never contend for a slot.
        return Engine(first.loaded, first.store, first.pool, first.runner.ctx, first.config, first.merges,
                      PinController(first.pinner), build_kv_cache(first.config, first.loaded))

    def hf():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    peft = PeftModel.from_pretrained(hf(), root / names[0], adapter_name=names[0]).eval()
    for name in names[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    peft.set_adapter(names[0])
    plain = hf()
    n, t = args.rows, args.tokens
    tok = first.tokenizer
    # Each workload keeps its own engine (own rows and cache) so steps interleave.
    workloads = {
        "loramux base, 1 row": EngineWorkload(first, [None], t),
        "loramux 1 adapter, 1 row": EngineWorkload(engine(), [names[0]], t),
        f"loramux base, {n} rows": EngineWorkload(engine(), [None] * n, t),
        f"loramux {n} adapters, {n} rows": EngineWorkload(engine(), names, t),
        "HF base, 1 row": HFWorkload(plain, tok, 1, t),
        "PEFT 1 adapter, 1 row": HFWorkload(peft, tok, 1, t),
        f"HF base, {n} rows": HFWorkload(plain, tok, n, t),
        f"PEFT {n} adapters, {n} rows": HFWorkload(peft, tok, n, t, adapter_names=names),
    }
    for w in workloads.values():  # warm-up: caches, slots, allocator
        for _ in range(3):
            w.step()
    # Round-robin one step at a time; a round's figure is the median of its steps.
    samples: dict[str, list[float]] = {k: [] for k in workloads}
    cycles: list[dict[str, float]] = []  # every workload's step of one round-robin pass
    for _ in range(args.rounds):
        steps: dict[str, list[float]] = {k: [] for k in workloads}
        for _ in range(t):
            cycle = {k: w.step() for k, w in workloads.items()}
            cycles.append(cycle)
            for k, v in cycle.items():
                steps[k].append(v)
        for k, v in steps.items():
            samples[k].append(statistics.median(v) * 1e3)
    ms = {k: statistics.median(v) for k, v in samples.items()}

    def ratio(num: str, den: str) -> str:
        """Paired: each pass's adapter step over the base step run just before it
        (slow spells of the machine hit both), median over all passes; then the
        ratio of the medians above, for comparison."""
        paired = statistics.median(c[num] / c[den] for c in cycles)
        return f"{paired:.3f}x (medians {ms[num] / ms[den]:.3f}x)"

    print(f"\ndecode, default model float32 CPU, rank-{args.rank} adapters on 7 projections, "
          f"{t} tokens, median of {args.rounds} rounds, "
          f"{'a model copy per workload' if args.copies else 'loramux workloads on one model'} "
          f"(threads={torch.get_num_threads()})")
    print(f"{'workload':34s} {'ms/step':>8s} {'tok/s':>8s}")
    for k, v in ms.items():
        rows = n if f"{n} rows" in k else 1
        print(f"{k:34s} {v:8.2f} {rows * 1e3 / v:8.1f}")
    print("\nratios, time vs the same system's base (lower is better), paired step by step:")
    print(f"  one adapter:   loramux {ratio('loramux 1 adapter, 1 row', 'loramux base, 1 row')}"
          f"   PEFT {ratio('PEFT 1 adapter, 1 row', 'HF base, 1 row')}   (goal <= 1.08x)")
    print(f"  {n} mixed rows: loramux {ratio(f'loramux {n} adapters, {n} rows', f'loramux base, {n} rows')}"
          f"   PEFT {ratio(f'PEFT {n} adapters, {n} rows', f'HF base, {n} rows')}   (goal <= 1.15x)")
    print(f"  loramux base vs HF base (1 row): {ms['loramux base, 1 row'] / ms['HF base, 1 row']:.3f}x")


if __name__ == "__main__":
    main()
