"""Decode-speed benchmark: loramux vs PEFT, side by side in one process.

    python -m loramux.benchmarks.decode [--tokens 48] [--rounds 5] [--rank 16]

Default model, float32, random rank-16 adapters on all seven projections. Prints
median decode tokens/s (and ms per step) for: base; one adapter unmerged; 8 rows
with 8 different adapters vs the base with 8 rows, through loramux and through
PEFT (single active adapter; `adapter_names` mixed batch). Workloads are
interleaved round by round so machine noise hits them alike.
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


def loramux_step_ms(engine, adapters: list[str | None], tokens: int) -> float:
    """Median wall time of one decode step for a batch of rows with `adapters`."""
    from loramux.engine.sampling import SamplingParams
    from loramux.engine.types import GenerationRequest

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    for a in adapters:
        engine.submit(GenerationRequest(prompt=PROMPT, adapter=a, sampling=params))
    engine.step()  # prefill + first decode
    times = []
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[:-1]) * 1e3  # last step also tears the batch down


def hf_step_ms(model, tokenizer, rows: int, tokens: int, adapter_names=None) -> float:
    """Median decode-step time of a plain greedy loop over an HF/PEFT model."""
    from transformers import DynamicCache

    ids = tokenizer([PROMPT] * rows, return_tensors="pt")["input_ids"]
    kw = {"adapter_names": adapter_names} if adapter_names else {}
    times = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        for _ in range(tokens - 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "loramux")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramux.app import build_engine
    from loramux.config import AdapterConfig, EngineConfig, ModelConfig, SlotConfig
    from loramux.model.loader import ensure_default_model

    base_dir = ensure_default_model(args.model_cache)
    root = Path(tempfile.mkdtemp(prefix="loramux-bench-"))
    names = make_adapters(base_dir, root, args.rows, args.rank)
    engine = build_engine(EngineConfig(
        model=ModelConfig(cache_dir=args.model_cache, device="cpu", dtype="float32", quantization="none"),
        adapters=AdapterConfig(roots=[root], max_rank=args.rank),
        slots=SlotConfig(num_slots=args.rows),
        max_batch_rows=args.rows,
    ))
    tok = engine.tokenizer
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), root / names[0],
        adapter_name=names[0],
    ).eval()
    for n in names[1:]:
        peft.load_adapter(root / n, adapter_name=n)
    peft.set_adapter(names[0])

    n, t = args.rows, args.tokens
    workloads = {
        "loramux base, 1 row": lambda: loramux_step_ms(engine, [None], t),
        "loramux 1 adapter, 1 row": lambda: loramux_step_ms(engine, [names[0]], t),
        f"loramux base, {n} rows": lambda: loramux_step_ms(engine, [None] * n, t),
        f"loramux {n} adapters, {n} rows": lambda: loramux_step_ms(engine, names, t),
        "HF base, 1 row": lambda: hf_step_ms(plain, tok, 1, t),
        "PEFT 1 adapter, 1 row": lambda: hf_step_ms(peft, tok, 1, t),
        f"HF base, {n} rows": lambda: hf_step_ms(plain, tok, n, t),
        f"PEFT {n} adapters, {n} rows": lambda: hf_step_ms(peft, tok, n, t, adapter_names=names),
    }
    for w in workloads.values():  # warm-up: caches, slots, allocator
        w()
    samples: dict[str, list[float]] = {k: [] for k in workloads}
    for _ in range(args.rounds):
        for k, w in workloads.items():
            samples[k].append(w())
    ms = {k: statistics.median(v) for k, v in samples.items()}

    print(f"\ndecode, default model float32 CPU, rank-{args.rank} adapters on 7 projections, "
          f"{t} tokens, median of {args.rounds} rounds (threads={torch.get_num_threads()})")
    print(f"{'workload':34s} {'ms/step':>8s} {'tok/s':>8s}")
    for k, v in ms.items():
        rows = n if f"{n} rows" in k else 1
        print(f"{k:34s} {v:8.2f} {rows * 1e3 / v:8.1f}")
    print("\nratios (time vs the same system's base; lower is better):")
    print(f"  one adapter:   loramux {ms['loramux 1 adapter, 1 row'] / ms['loramux base, 1 row']:.3f}x"
          f"   PEFT {ms['PEFT 1 adapter, 1 row'] / ms['HF base, 1 row']:.3f}x   (goal <= 1.08x)")
    print(f"  {n} mixed rows: loramux {ms[f'loramux {n} adapters, {n} rows'] / ms[f'loramux base, {n} rows']:.3f}x"
          f"   PEFT {ms[f'PEFT {n} adapters, {n} rows'] / ms[f'HF base, {n} rows']:.3f}x   (goal <= 1.15x)")
    print(f"  loramux base vs HF base (1 row): {ms['loramux base, 1 row'] / ms['HF base, 1 row']:.3f}x")


if __name__ == "__main__":
    main()
