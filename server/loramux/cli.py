"""The `loramux` command.

    loramux run --prompt "Hello"                 # load the default model, generate locally
    loramux run --adapter-root ./adapters --adapter sql --chat "List users older than 30"
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loramux.config import AdapterConfig, EngineConfig, ModelConfig, SlotConfig
from loramux.errors import LoramuxError


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", type=Path, help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--model-cache", type=Path, default=ModelConfig.cache_dir,
                   help="where the embedded GGUF is converted to safetensors once (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--quantization", default="auto", help="auto | none | nf4 | int8")
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter-root", type=Path, action="append", default=[],
                   help="directory of PEFT adapters; repeatable")
    g.add_argument("--max-rank", type=int, default=AdapterConfig.max_rank)
    g.add_argument("--host-cache-bytes", type=int, default=AdapterConfig.host_cache_bytes)
    g.add_argument("--slots", type=int, default=SlotConfig.num_slots,
                   help="distinct adapters one forward step can serve")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(path=args.model, cache_dir=args.model_cache, device=args.device,
                          dtype=args.dtype, quantization=args.quantization),
        adapters=AdapterConfig(roots=args.adapter_root, max_rank=args.max_rank,
                               host_cache_bytes=args.host_cache_bytes),
        slots=SlotConfig(num_slots=args.slots),
    ).validate()


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string; repeatable")


def cmd_run(args: argparse.Namespace) -> int:
    from loramux.app import build_engine
    from loramux.engine.sampling import SamplingParams
    from loramux.engine.types import GenerationRequest

    engine = build_engine(engine_config(args))
    request = GenerationRequest(
        prompt=args.prompt,
        messages=[{"role": "user", "content": args.chat}] if args.chat else None,
        adapter=args.adapter,
        sampling=SamplingParams(
            max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=tuple(args.stop),
        ),
    )
    engine.submit(request)
    while engine.has_work():
        for ev in engine.step():
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            if ev.result is not None:
                r = ev.result
                print(f"\n[{r.finish_reason}; {r.prompt_tokens} prompt + "
                      f"{r.completion_tokens} generated tokens]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux",
        description="Serve one base LLM with many LoRA adapters, mixes and pinned merges.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load the model in this process and generate once",
                         description="Load the base model (and adapters) here and stream one generation.")
    add_model_args(run)
    add_sampling_args(run)
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw prompt text")
    prompt.add_argument("--chat", help="a user message, rendered with the chat template")
    run.add_argument("--adapter", help="adapter name under an --adapter-root")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LoramuxError as e:
        print(f"loramux: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
