"""Command-line pieces shared by `loramux` and the modules that also run on their
own (`python -m loramux.skills.eval`, `python -m loramux.benchmarks.serving`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from loramux.config import ModelConfig
from loramux.errors import LoramuxError


def add_base_model_args(g, *, device: str = "auto", dtype: str = "auto", quantization: bool = True) -> None:
    """--model, --model-cache, --device, --dtype (and --quantization) on group `g`."""
    g.add_argument("--model", type=Path, help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--model-cache", type=Path, default=ModelConfig.cache_dir,
                   help="where the embedded GGUF is converted to safetensors once (default: %(default)s)")
    auto = "auto | " if device == "auto" else ""
    g.add_argument("--device", default=device, help=f"{auto}cpu | cuda | cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default=dtype,
                   help=f"{auto}float32 | bfloat16 | float16 (default: %(default)s)")
    if quantization:
        g.add_argument("--quantization", default="auto", help="auto | none | nf4 | int8 (default: %(default)s)")


def module_main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str | None,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    command: str,
) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run; a LoramuxError is printed
    as `command: Kind: message` and exits 2. The namespace's command_line is
    `command` with the arguments, for reports that record how they were made."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(command_line=shlex.join([*command.split(), *argv]))
    try:
        return run(p.parse_args(argv))
    except LoramuxError as e:
        print(f"{command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
