"""Command-line pieces shared by `loramux` and the modules that also run on their
own (`python -m loramux.skills.eval`, `python -m loramux.benchmarks.serving`), and
the flags of `loramux serve` / `loramux run` with the configs they make.

Standard library and loramux.config only: flags and config files are checked
before torch, transformers or grpc load.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from loramux.config import (
    AdapterConfig,
    ConfigError,
    EngineConfig,
    KvCacheConfig,
    MergeConfig,
    ModelConfig,
    ServerConfig,
    SlotConfig,
    load_toml,
)
from loramux.errors import LoramuxError
from loramux.logs import add_log_args


def add_base_model_args(g, *, device: str = "auto", dtype: str = "auto", quantization: bool = True,
                        leave_unset: bool = False) -> None:
    """--model, --model-cache, --device, --dtype (and --quantization) on group `g`.
    leave_unset=True: a flag not given stays off the namespace (see apply_engine_flags),
    so a config file or ModelConfig's default applies."""
    d = (lambda _: argparse.SUPPRESS) if leave_unset else (lambda v: v)  # noqa: E731
    g.add_argument("--model", type=Path, default=d(None),
                   help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--model-cache", type=Path, default=d(ModelConfig.cache_dir),
                   help=f"where the embedded GGUF is converted to safetensors once (default: {ModelConfig.cache_dir})")
    auto = "auto | " if device == "auto" else ""
    g.add_argument("--device", default=d(device), help=f"{auto}cpu | cuda | cuda:N (default: {device})")
    g.add_argument("--dtype", default=d(dtype), help=f"{auto}float32 | bfloat16 | float16 (default: {dtype})")
    if quantization:
        g.add_argument("--quantization", default=d("auto"), help="auto | none | nf4 | int8 (default: auto)")


# =============================================================================
# Engine flags (`loramux run`, `loramux serve`)
# =============================================================================

# flag dest → (flag as typed, EngineConfig section or None for its own fields, field)
ENGINE_FLAGS = {
    "model": ("--model", "model", "path"), "model_cache": ("--model-cache", "model", "cache_dir"),
    "device": ("--device", "model", "device"), "dtype": ("--dtype", "model", "dtype"),
    "quantization": ("--quantization", "model", "quantization"),
    "adapter_root": ("--adapter-root", "adapters", "roots"), "max_rank": ("--max-rank", "adapters", "max_rank"),
    "host_cache_bytes": ("--host-cache-bytes", "adapters", "host_cache_bytes"),
    "slots": ("--slots", "slots", "num_slots"),
    "kv_cache_bytes": ("--kv-cache-bytes", "kv_cache", "bytes"),
    "kv_block_size": ("--kv-block-size", "kv_cache", "block_size"),
    "prefix_caching": ("--no-prefix-caching", "kv_cache", "prefix_caching"),
    "max_batch_rows": ("--max-batch-rows", None, "max_batch_rows"),
    "max_batch_tokens": ("--max-batch-tokens", None, "max_batch_tokens"),
    "prefill_chunk_tokens": ("--prefill-chunk-tokens", None, "prefill_chunk_tokens"),
    "max_concurrent_merges": ("--max-concurrent-merges", "merges", "max_concurrent"),
    "merge_timeout_seconds": ("--merge-timeout-seconds", "merges", "timeout_seconds"),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Base model, adapter and engine flags. None has a default on the namespace:
    a flag is there only when given (apply_engine_flags), so given flags always
    win over a config file, even when they repeat the default."""
    add_base_model_args(p.add_argument_group("base model"), leave_unset=True)
    unset = argparse.SUPPRESS
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter-root", type=Path, action="append", default=unset,
                   help="directory of PEFT adapters; repeatable (replaces [adapters] roots)")
    g.add_argument("--max-rank", type=int, default=unset,
                   help=f"largest LoRA rank accepted (default: {AdapterConfig.max_rank})")
    g.add_argument("--host-cache-bytes", type=int, default=unset,
                   help=f"bytes of raw adapters kept on the host (default: {AdapterConfig.host_cache_bytes})")
    g.add_argument("--slots", type=int, default=unset,
                   help=f"distinct adapters one forward step can serve (default: {SlotConfig.num_slots})")
    g = p.add_argument_group("engine")
    g.add_argument("--kv-cache-bytes", type=int, default=unset,
                   help="size of the paged KV cache (default: room for --max-batch-rows full-length rows, "
                        "at most a quarter of the memory available)")
    g.add_argument("--kv-block-size", type=int, default=unset,
                   help=f"tokens per KV-cache block (default: {KvCacheConfig.block_size})")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=unset,
                   help="do not reuse the KV of prompts that share a prefix")
    g.add_argument("--max-batch-tokens", type=int, default=unset,
                   help=f"tokens one forward step packs (default: {EngineConfig.max_batch_tokens})")
    g.add_argument("--prefill-chunk-tokens", type=int, default=unset,
                   help=f"tokens a step computes while rows decode, theirs included "
                        f"(default: {EngineConfig.prefill_chunk_tokens})")
    g = p.add_argument_group("merges")
    g.add_argument("--max-concurrent-merges", type=int, default=unset,
                   help=f"requests' mixes merged at once (default: {MergeConfig.max_concurrent})")
    g.add_argument("--merge-timeout-seconds", type=float, default=unset,
                   help="seconds a request may wait for its mix's merge before it is refused "
                        f"(default: {MergeConfig.timeout_seconds:g})")


def _assign(target, name: str, value, flag: str) -> None:
    """target.name = value, checked on assignment; a bad value is reported as the flag's."""
    try:
        setattr(target, name, value)
    except ConfigError as e:
        raise e.located(lambda _: flag) from None


def apply_engine_flags(config: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """Set every engine flag given on the command line into `config` (in place;
    returned). Each value is checked on its own; validate() is the caller's."""
    given = vars(args)
    for dest, (flag, section, name) in ENGINE_FLAGS.items():
        if dest in given:
            _assign(config if section is None else getattr(config, section), name, given[dest], flag)
    return config


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The validated engine config of `loramux run`: defaults, then the flags given."""
    return apply_engine_flags(EngineConfig(), args).validate()


# =============================================================================
# `loramux serve`
# =============================================================================

# flag dests that set the ServerConfig field of the same name
SERVER_FLAGS = ("host", "port", "metrics_host", "metrics_port", "max_waiting", "grace_seconds", "export_root",
                "tls_cert", "tls_key", "tls_client_ca", "api_token_file", "admin_token_file", "port_file")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `loramux serve`. As in add_model_args, a flag is on the
    namespace only when given; the defaults in --help are ServerConfig's."""
    p.add_argument("--config", type=Path, help="TOML file ([server], [model], [adapters], [slots], [merges], "
                   "[kv_cache], [engine]); flags given on the command line win")
    add_model_args(p)
    d, unset = ServerConfig, argparse.SUPPRESS
    g = p.add_argument_group("server")
    g.add_argument("--host", default=unset, help=f"address gRPC listens on (default: {d.host})")
    g.add_argument("--port", type=int, default=unset, help=f"gRPC port; 0 picks one (default: {d.port})")
    g.add_argument("--metrics-host", default=unset,
                   help="address HTTP /metrics listens on (default: the --host address)")
    g.add_argument("--metrics-port", type=int, default=unset,
                   help=f"HTTP /metrics port; 0 picks one, -1 turns it off (default: {d.metrics_port})")
    g.add_argument("--max-waiting", type=int, default=unset,
                   help=f"queued requests beyond the running rows (default: {d.max_waiting})")
    g.add_argument("--max-batch-rows", type=int, default=unset,
                   help=f"rows decoding together (default: {EngineConfig.max_batch_rows})")
    g.add_argument("--grace-seconds", type=float, default=unset,
                   help=f"on SIGTERM, time in-flight requests get to finish (default: {d.grace_seconds:g})")
    g.add_argument("--export-root", type=Path, default=unset,
                   help="directory Admin.Export writes into (off if unset)")
    g.add_argument("--tls-cert", type=Path, default=unset, help="server certificate (PEM); enables TLS")
    g.add_argument("--tls-key", type=Path, default=unset, help="server private key (PEM)")
    g.add_argument("--tls-client-ca", type=Path, default=unset,
                   help="CA bundle; requires client certificates (mTLS)")
    g.add_argument("--api-token-file", type=Path, default=unset,
                   help="bearer token for Inference (else env LORAMUX_API_TOKEN; none: no auth)")
    g.add_argument("--admin-token-file", type=Path, default=unset,
                   help="bearer token for Admin (else env LORAMUX_ADMIN_TOKEN, else the API token)")
    g.add_argument("--port-file", type=Path, default=unset,
                   help="write '<grpc port> <metrics port>' here when serving")
    add_log_args(p.add_argument_group("logging"), shown_default="info", leave_unset=True)


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Validated engine and server configs of `loramux serve`: the config classes'
    defaults, then the TOML file (--config), then every flag given on the command
    line (given, even if equal to the default, beats the file). Raises ConfigError."""
    config = getattr(args, "config", None)
    engine, server = load_toml(config) if config else (EngineConfig(), ServerConfig())
    apply_engine_flags(engine, args)
    given = vars(args)
    for name in SERVER_FLAGS:
        if name in given:
            _assign(server, name, given[name], f"--{name.replace('_', '-')}")
    if "max_batch_rows" in given and "max_batch_tokens" not in given:
        # every running row decodes a token per step: more rows need room for them
        engine.max_batch_tokens = max(engine.max_batch_tokens, engine.max_batch_rows)
    return engine.validate(), server.validate()


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
