"""The `loramux` command.

    loramux serve --adapter-root ./adapters             # start the gRPC server
    loramux generate --prompt "Hello" --adapter sql     # ask it (streams to stdout)
    loramux adapters | merges | pin | unpin | export | info   # operate it
    loramux run --prompt "Hello"                        # no server: generate in this process
    loramux bench ...                                   # serving benchmark
    loramux eval --adapter-root adapters --pairs-all    # do merges keep every skill?

Every client subcommand takes --server (env LORAMUX_SERVER, default localhost:50051),
--token/--admin-token (env LORAMUX_API_TOKEN / LORAMUX_ADMIN_TOKEN, as the server
reads them), TLS flags, --timeout and --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

from loramux import logs
from loramux.cliargs import add_model_args, add_serve_args, engine_config, serve_configs
from loramux.config import ConfigError
from loramux.errors import LoramuxError
from loramux_client import (
    DEFAULT_TARGET,
    AdapterInfo,
    Client,
    Generation,
    LoramuxClientError,
    MergeInfo,
    Mix,
    ServerInfo,
    TLSConfig,
    Unavailable,
)

RAW = argparse.RawDescriptionHelpFormatter


class UsageError(Exception):
    """A command line that parses but does not make sense; reported like argparse errors."""


def add_command(sub, name: str, *, help: str, description: str, epilog: str | None = None):
    """A subcommand parser: description wrapped to the terminal, examples kept as written."""
    return sub.add_parser(name, help=help, description=textwrap.fill(description, 79),
                          epilog=epilog, formatter_class=RAW)


# =============================================================================
# `run`: in-process generation
# =============================================================================


# flag, type, default (also the server's default), meaning
SAMPLING_FLAGS = (
    ("--max-tokens", int, 128, "generated tokens at most"),
    ("--temperature", float, 0.0, "0 = greedy"),
    ("--top-k", int, 0, "0 = off"),
    ("--top-p", float, 1.0, "1 = off"),
    ("--repetition-penalty", float, 1.0, "1 = off"),
)
SAMPLING_DESTS = [flag[2:].replace("-", "_") for flag, *_ in SAMPLING_FLAGS] + ["seed"]


def add_sampling_args(p: argparse.ArgumentParser, *, leave_unset: bool = False) -> None:
    """Sampling flags. leave_unset=True (client commands): flags not given stay None,
    so the request leaves them unset and the server applies its defaults."""
    g = p.add_argument_group("sampling")
    for flag, kind, default, meaning in SAMPLING_FLAGS:
        if leave_unset:
            g.add_argument(flag, type=kind, help=f"{meaning} (server default: {default})")
        else:
            g.add_argument(flag, type=kind, default=default, help=f"{meaning} (default: %(default)s)")
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string; repeatable")


def cmd_run(args: argparse.Namespace) -> int:
    config = engine_config(args)  # a bad flag is reported before torch loads
    from loramux.app import build_engine
    from loramux.engine.sampling import SamplingParams
    from loramux.engine.types import GenerationRequest

    engine = build_engine(config)
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


def add_run_parser(sub) -> None:
    run = add_command(sub, "run", help="load the model in this process and generate once",
                      description="Load the base model (and adapters) here, without a server, and "
                      "stream one generation.", epilog=RUN_EXAMPLES)
    add_model_args(run)
    add_sampling_args(run)
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw prompt text")
    prompt.add_argument("--chat", help="a user message, rendered with the chat template")
    run.add_argument("--adapter", help="adapter name under an --adapter-root")
    run.set_defaults(func=cmd_run)


# =============================================================================
# Client flags and argument parsing helpers
# =============================================================================


@dataclasses.dataclass(frozen=True)
class ClientDefaults:
    """Defaults of the client flags, read from the environment once in main()."""

    server: str = DEFAULT_TARGET
    token: str | None = None
    admin_token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ClientDefaults":
        return cls(env.get("LORAMUX_SERVER") or DEFAULT_TARGET,
                   env.get("LORAMUX_API_TOKEN") or None, env.get("LORAMUX_ADMIN_TOKEN") or None)


def add_client_args(p: argparse.ArgumentParser, defaults: ClientDefaults, *, nested: bool = False) -> None:
    """Connection and output flags of every client command. nested=True (action
    parsers under `adapters`/`merges`) leaves them unset unless given, so flags given
    before the action (`loramux adapters --server X load a`) are kept."""
    d = (lambda _: argparse.SUPPRESS) if nested else (lambda v: v)  # noqa: E731
    g = p.add_argument_group("server connection")
    g.add_argument("--server", metavar="HOST:PORT", default=d(defaults.server),
                   help=f"loramux server address (env LORAMUX_SERVER; now {defaults.server})")
    tokens = g.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=d(defaults.token),
                        help="bearer token for generation calls (env LORAMUX_API_TOKEN)")
    tokens.add_argument("--token-file", type=Path, default=d(None), help="read --token from this file")
    admin = g.add_mutually_exclusive_group()
    admin.add_argument("--admin-token", default=d(defaults.admin_token),
                       help="bearer token for admin calls (env LORAMUX_ADMIN_TOKEN; else --token)")
    admin.add_argument("--admin-token-file", type=Path, default=d(None),
                       help="read --admin-token from this file")
    g.add_argument("--tls", action="store_true", default=d(False),
                   help="use TLS with the system CA roots (implied by the --tls-* flags)")
    g.add_argument("--tls-ca", type=Path, default=d(None),
                   help="CA certificate (PEM) that signed the server's")
    g.add_argument("--tls-cert", type=Path, default=d(None), help="client certificate (PEM) for mutual TLS")
    g.add_argument("--tls-key", type=Path, default=d(None), help="client private key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", default=d(None), help="name expected in the server certificate")
    g.add_argument("--timeout", type=float, default=d(None), help="seconds before a call gives up")
    g.add_argument("--json", action="store_true", default=d(False), help="print JSON instead of text")


def read_secret(value: str | None, path: Path | None) -> str | None:
    if path is None:
        return value
    try:
        return path.read_text().strip() or None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def tls_config(args: argparse.Namespace) -> TLSConfig | None:
    files = (args.tls_ca, args.tls_cert, args.tls_key)
    if not args.tls and not args.tls_server_name and all(f is None for f in files):
        return None
    try:
        return TLSConfig.from_files(*files, server_name=args.tls_server_name)
    except (OSError, ValueError) as e:
        raise UsageError(f"TLS: {e}") from None


def client_from_args(args: argparse.Namespace) -> Client:
    return Client(args.server, token=read_secret(args.token, args.token_file),
                  admin_token=read_secret(args.admin_token, args.admin_token_file),
                  tls=tls_config(args), timeout=args.timeout)


def with_client(command: Callable[[Client, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An args → exit code function that opens a Client for `command`."""

    def run(args: argparse.Namespace) -> int:
        with client_from_args(args) as client:
            return command(client, args)

    return run


def parse_scalar(text: str) -> bool | int | float | str:
    """true/false → bool, then int, then float, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_pair(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return key.strip(), value.strip()


def parse_param(text: str) -> tuple[str, bool | int | float | str]:
    """--param KEY=VALUE → (key, typed value)."""
    key, value = _split_pair(text, "KEY=VALUE")
    return key, parse_scalar(value)


def parse_mix(text: str) -> list[tuple[str, float]]:
    """--mix a=0.6,b=0.4 → [("a", 0.6), ("b", 0.4)]."""
    pairs = []
    for item in text.split(","):
        name, weight = _split_pair(item, "NAME=WEIGHT[,NAME=WEIGHT...]")
        try:
            pairs.append((name, float(weight)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is not a number: {weight!r}") from None
    return pairs


def add_mix_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mix options (with --mix)")
    g.add_argument("--method", help="merge method: linear (default), ties, dare_linear, dare_ties, "
                   "magnitude_prune, slerp, karcher, della, breadcrumbs")
    g.add_argument("--density", type=float,
                   help="fraction kept by ties/dare/magnitude_prune (= --param density=X)")
    g.add_argument("--param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter; repeatable; VALUE reads as true/false, int, float or text")
    g.add_argument("--mix-seed", type=int, help="seed of DARE-style random drops (default 0)")


def add_selection_args(p: argparse.ArgumentParser, *, required: bool, pinned_model: bool = False) -> None:
    """--adapter | --merge | --mix (| --pinned-model) plus the mix options."""
    g = p.add_argument_group("weights (one of)")
    one = g.add_mutually_exclusive_group(required=required)
    one.add_argument("--adapter", metavar="NAME", help="an adapter under the server's adapter roots")
    one.add_argument("--merge", metavar="NAME", help="a named merge (`loramux merges create`)")
    one.add_argument("--mix", type=parse_mix, metavar="A=W,B=W",
                     help="an inline mix of adapters with weights")
    if pinned_model:
        one.add_argument("--pinned-model", action="store_true",
                         help="the base model with the pinned merge folded in (dense)")
    add_mix_options(p)


def mix_from_args(args: argparse.Namespace) -> Mix | None:
    tuning = args.method or args.density is not None or args.param or args.mix_seed is not None
    if args.mix is None:
        if tuning:
            raise UsageError("--method, --density, --param and --mix-seed only apply with --mix")
        return None
    params = dict(args.param)
    if args.density is not None:
        if "density" in params:
            raise UsageError("density given twice (--density and --param density=...)")
        params["density"] = args.density
    return Mix(args.mix, method=args.method or "linear", params=params, seed=args.mix_seed or 0)


def selection_from_args(args: argparse.Namespace) -> dict:
    """adapter= / merge= / mix= (/ pinned_model=) keywords for the client."""
    chosen = dict(adapter=args.adapter, merge=args.merge, mix=mix_from_args(args))
    if getattr(args, "pinned_model", False):
        chosen["pinned_model"] = True
    return {k: v for k, v in chosen.items() if v is not None}


# =============================================================================
# Output
# =============================================================================


def jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def print_json(value) -> None:
    print(json.dumps(jsonable(value), indent=2))


def print_table(headers: list[str], rows: list[list]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def emit(args: argparse.Namespace, value, show: Callable) -> int:
    """Print `value` as JSON with --json, else through `show`; exit code 0."""
    if args.json:
        print_json(value)
    else:
        show(value)
    return 0


# =============================================================================
# generate
# =============================================================================


def generate_options(args: argparse.Namespace) -> dict:
    if args.system and args.chat is None:
        raise UsageError("--system goes with --chat")
    text = {"prompt": args.prompt} if args.prompt is not None else {"messages": chat_messages(args)}
    sampling = {k: getattr(args, k) for k in SAMPLING_DESTS if getattr(args, k) is not None}
    return dict(**text, **selection_from_args(args), **sampling, stop=tuple(args.stop),
                ignore_eos=args.ignore_eos, request_id=args.request_id)


def chat_messages(args: argparse.Namespace) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.chat}]


def describe_resolution(g: Generation) -> str:
    r = g.resolution
    if r.kind == "base":
        return "base model"
    if r.kind not in ("merge", "mix"):
        return f"{r.kind} {r.name}" + (" (cache hit)" if r.cache_hit else "")
    merged = "cached" if r.cache_hit else f"merged in {r.merge_seconds:.3f}s"
    return f"{r.kind} {r.name}: {r.method or 'linear'} rank {r.rank}, rel. error {r.relative_error:.2e}, {merged}"


def summary_line(g: Generation) -> str:
    return (f"[{g.finish_reason}; {g.prompt_tokens} prompt + {g.completion_tokens} generated tokens; "
            f"ttft {g.ttft_seconds:.3f}s, total {g.total_seconds:.3f}s; {describe_resolution(g)}]")


def stream_to_stdout(chunks) -> Generation | None:
    """Write each chunk's text as it comes; the final result (None if it never came)."""
    result = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        result = chunk.result or result
    sys.stdout.write("\n")
    return result


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    options = generate_options(args)
    if args.json:
        print_json(client.generate(**options))
        return 0
    if args.no_stream:
        result = client.generate(**options)
        print(result.text)
    else:
        result = stream_to_stdout(client.stream(**options))
    if result is None:
        print("loramux: the stream ended without a final result", file=sys.stderr)
        return 2
    print(summary_line(result), file=sys.stderr)
    return 0


def add_generate_parser(sub, defaults: ClientDefaults) -> None:
    p = add_command(sub, "generate", help="generate text on a running server",
                    description="Send one generation request to a loramux server and stream the "
                    "answer to stdout; a summary (finish reason, tokens, latency, which weights "
                    "answered) goes to stderr. Without --adapter/--merge/--mix the base model "
                    "answers (or the pinned merge, if one is pinned).", epilog=GENERATE_EXAMPLES)
    prompt = p.add_argument_group("input (one of)").add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw prompt text")
    prompt.add_argument("--chat", metavar="MESSAGE", help="a user message, rendered with the chat template")
    p.add_argument("--system", help="with --chat: a system message before it")
    add_selection_args(p, required=False)
    add_sampling_args(p, leave_unset=True)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--request-id", help="echoed back by the server (default: generated)")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer (unary call)")
    add_client_args(p, defaults)
    p.set_defaults(func=with_client(cmd_generate))


# =============================================================================
# adapters, merges
# =============================================================================


def show_adapters(adapters: list[AdapterInfo]) -> None:
    """One row per adapter; one not cached shows only its name (the rest is unread)."""
    print_table(["NAME", "RANK", "SIZE", "MODULES", "CACHED", "KEPT", "BASE MODEL", "HASH"],
                [[a.name, a.rank, human_bytes(a.bytes), a.modules, "yes", "yes" if a.pinned else "",
                  a.base_model, a.content_hash[:12]] if a.cached else
                 [a.name, "-", "-", "-", "no", "", "", ""] for a in adapters])


def show_merges(merges: list[MergeInfo]) -> None:
    print_table(["NAME", "MIX", "RANK", "REL.ERROR", "MERGED IN"],
                [[m.name, m.description or m.mix.describe(), m.rank, f"{m.relative_error:.2e}",
                  f"{m.merge_seconds:.3f}s"] for m in merges])


def cmd_adapters_list(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.list_adapters(), show_adapters)


def cmd_adapters_load(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.load_adapter(args.name, keep=args.keep), lambda a: show_adapters([a]))


def cmd_adapters_unload(client: Client, args: argparse.Namespace) -> int:
    client.unload_adapter(args.name)
    return emit(args, {"unloaded": args.name}, lambda _: print(f"unloaded {args.name}"))


def cmd_merges_list(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.list_merges(), show_merges)


def cmd_merges_create(client: Client, args: argparse.Namespace) -> int:
    info = client.create_merge(args.name, mix_from_args(args), replace=args.replace)
    return emit(args, info, lambda m: show_merges([m]))


def cmd_merges_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_merge(args.name)
    return emit(args, {"deleted": args.name}, lambda _: print(f"deleted merge {args.name}"))


def add_group_parser(sub, name: str, defaults: ClientDefaults, *, help: str, description: str,
                     epilog: str, list_func: Callable) -> argparse._SubParsersAction:
    """A command whose bare form lists, with actions under it (list is one of them)."""
    p = add_command(sub, name, help=help, description=description, epilog=epilog)
    add_client_args(p, defaults)
    p.set_defaults(func=with_client(list_func))
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    add_action(actions, "list", defaults, f"list {name} (the default action)", list_func)
    return actions


def add_action(actions, name: str, defaults: ClientDefaults, help: str,
               func: Callable) -> argparse.ArgumentParser:
    a = add_command(actions, name, help=help, description=help[0].upper() + help[1:] + ".")
    add_client_args(a, defaults, nested=True)
    a.set_defaults(func=with_client(func))
    return a


def add_adapters_parser(sub, defaults: ClientDefaults) -> None:
    actions = add_group_parser(
        sub, "adapters", defaults, help="list, load or unload adapters on the server",
        description="Adapters are PEFT directories under the server's adapter roots. Without an "
        "action, list them all, with which are in the host cache (only those show rank, size "
        "and hash).", epilog=ADAPTERS_EXAMPLES, list_func=cmd_adapters_list)
    load = add_action(actions, "load", defaults, "read, validate and cache an adapter now", cmd_adapters_load)
    load.add_argument("name", help="adapter name")
    load.add_argument("--keep", action="store_true", help="keep it in the host cache (never evicted)")
    unload = add_action(actions, "unload", defaults, "drop an adapter from the caches", cmd_adapters_unload)
    unload.add_argument("name", help="adapter name")


def add_merges_parser(sub, defaults: ClientDefaults) -> None:
    actions = add_group_parser(
        sub, "merges", defaults, help="list, create or delete named merges",
        description="A named merge is a mix of adapters built once on the server; requests then "
        "name it with --merge. Without an action, list them.", epilog=MERGES_EXAMPLES,
        list_func=cmd_merges_list)
    create = add_action(actions, "create", defaults, "build a named merge from a mix", cmd_merges_create)
    create.add_argument("name", help="name of the new merge")
    create.add_argument("--mix", type=parse_mix, required=True, metavar="A=W,B=W",
                        help="adapters and weights, e.g. sql=0.6,chat=0.4")
    add_mix_options(create)
    create.add_argument("--replace", action="store_true", help="overwrite a merge of that name")
    delete = add_action(actions, "delete", defaults, "delete a named merge", cmd_merges_delete)
    delete.add_argument("name", help="merge name")


# =============================================================================
# pin, unpin, export, info
# =============================================================================


def show_pin(result) -> None:
    state = f"pinned {result.pinned}" if result.pinned else "nothing pinned (original base weights)"
    print(f"{state}; swap took {result.swap_seconds:.3f}s")


def show_export(result) -> None:
    extra = f", rank {result.rank}, rel. error {result.relative_error:.2e}" if result.rank else ""
    print(f"wrote {result.path} ({human_bytes(result.bytes)}{extra})")


def show_info(info: ServerInfo) -> None:
    def cache(c):
        return f"{human_bytes(c.used_bytes)} / {human_bytes(c.capacity_bytes)}, {c.entries} entries"

    rows = [
        ("version", info.version), ("base model", info.base_model),
        ("fingerprint", info.model_fingerprint), ("device", f"{info.device} ({info.dtype}, "
                                                            f"quantization {info.quantization})"),
        ("pinned", info.pinned or "-"), ("adapter cache", cache(info.adapter_cache)),
        ("merge cache", cache(info.merge_cache)),
        ("device slots", f"{info.device_slots_used} / {info.device_slots} used, max rank {info.max_rank}"),
        ("requests", f"{info.running_requests} running, {info.waiting_requests} waiting, "
                     f"{info.max_batch_rows} rows max"),
        ("merge methods", ", ".join(info.merge_methods)),
    ]
    for key, value in rows:
        print(f"{key + ':':<15}{value}")


def cmd_pin(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.pin(**selection_from_args(args)), show_pin)


def cmd_unpin(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.unpin(), show_pin)


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.export(args.destination, **selection_from_args(args)), show_export)


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    return emit(args, client.server_info(), show_info)


def add_admin_parsers(sub, defaults: ClientDefaults) -> None:
    pin = add_command(sub, "pin", help="fold an adapter or merge into the base weights",
                      description="Pin one adapter, merge or mix: fold it into the base weights at a "
                      "step boundary, so requests without an adapter get it at base-model speed. "
                      "One pin at a time; `loramux unpin` restores the base bit for bit.",
                      epilog=PIN_EXAMPLES)
    add_selection_args(pin, required=True)
    add_client_args(pin, defaults)
    pin.set_defaults(func=with_client(cmd_pin))

    unpin = add_command(sub, "unpin", help="restore the original base weights",
                        description="Take the pinned merge out of the base weights (bit-for-bit "
                        "restore).", epilog="example:\n  loramux unpin")
    add_client_args(unpin, defaults)
    unpin.set_defaults(func=with_client(cmd_unpin))

    export = add_command(sub, "export", help="write an adapter, merge or the pinned model to disk",
                         description="Write an adapter, merge or mix as a PEFT directory, or the "
                         "pinned model as a dense model directory, to DEST under the server's export "
                         "root (`loramux serve --export-root`). The path is on the server's machine.",
                         epilog=EXPORT_EXAMPLES)
    export.add_argument("destination", metavar="DEST", help="new directory name under the export root")
    add_selection_args(export, required=True, pinned_model=True)
    add_client_args(export, defaults)
    export.set_defaults(func=with_client(cmd_export))

    info = add_command(sub, "info", help="show the server's model, caches and load",
                       description="Show what the server runs and how full its caches and queues are.",
                       epilog="examples:\n  loramux info\n  loramux info --json")
    add_client_args(info, defaults)
    info.set_defaults(func=with_client(cmd_info))


# =============================================================================
# serve
# =============================================================================


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the flags and config file, then import the server (torch,
    transformers, grpc: seconds) and run it until SIGTERM."""
    engine_cfg, server_cfg = serve_configs(args)
    try:
        from loramux.service.main import run_server
    except ImportError as e:
        return unavailable("serve", f"loramux.service.main is not available: {e}")
    code = run_server(engine_cfg, server_cfg)
    # The server is drained and closed. A normal interpreter exit would now
    # garbage-collect the model's object graph and join threads (4-16 s measured),
    # past the grace period a Kubernetes pod gets; exit at once instead.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_serve_parser(sub) -> None:
    serve = add_command(sub, "serve", help="start the gRPC server",
                        description="Load the base model and serve the Inference and Admin gRPC services "
                        "(plus health, reflection and /metrics). Settings come from the flags and an "
                        "optional --config TOML file; a flag given on the command line always wins.",
                        epilog=SERVE_EXAMPLES)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)


# =============================================================================
# bench, peers, eval: owned by other modules, registered when they are importable
# =============================================================================


def add_external_parser(sub, name: str, module: str, *, load: bool, help: str, description: str,
                        epilog: str) -> None:
    """`loramux NAME` from MODULE's add_NAME_args / cmd_NAME; when the module cannot
    be imported, the command exists but explains why it is unavailable. load=False
    registers only the name and help (the module imports torch: seconds)."""
    if not load:
        p = add_command(sub, name, help=help, description=description, epilog=epilog)
        p.set_defaults(func=lambda _args: unavailable(name, "its parser was not loaded"))
        return
    try:
        mod = importlib.import_module(module)
        add_args, command = getattr(mod, f"add_{name}_args"), getattr(mod, f"cmd_{name}")
    except (ImportError, AttributeError) as e:
        reason = f"{module} is not available: {e}"
        p = add_command(sub, name, help=f"{help} (unavailable)", description=f"{description} {reason}")
        p.set_defaults(func=lambda _args: unavailable(name, reason))
        return
    p = add_command(sub, name, help=help, description=description, epilog=epilog)
    add_args(p)
    p.set_defaults(func=command)


def unavailable(name: str, reason: str) -> int:
    print(f"loramux {name}: {reason}", file=sys.stderr)
    return 2


# =============================================================================
# main
# =============================================================================


def build_parser(defaults: ClientDefaults = ClientDefaults(), command: str | None = None
                 ) -> argparse.ArgumentParser:
    """The whole command line. command: the subcommand about to run, when known;
    bench, peers and eval then import their modules only when it is theirs, so
    other commands start without loading torch (serve imports its server only
    once its flags and config file have been checked)."""
    external = lambda name: command in (None, name)  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="loramux", formatter_class=RAW, epilog=TOP_EXAMPLES,
        description="Serve one base LLM with many LoRA adapters, mixes and pinned merges.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at info level (= --log-level info)")
    logs.add_log_args(parser, shown_default="warning; info for serve")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(sub)
    add_generate_parser(sub, defaults)
    add_adapters_parser(sub, defaults)
    add_merges_parser(sub, defaults)
    add_admin_parsers(sub, defaults)
    add_run_parser(sub)
    add_external_parser(sub, "bench", "loramux.benchmarks.serving", load=external("bench"),
                        help="benchmark serving throughput and latency against a PEFT baseline",
                        description="Run concurrent gRPC streams against a loramux server (started "
                        "here, or --target) and against a PEFT baseline in the same process; report "
                        "tokens/s, time to first token and inter-token latency.", epilog=BENCH_EXAMPLES)
    add_external_parser(sub, "peers", "loramux.benchmarks.peers", load=external("peers"),
                        help="benchmark loramux against vLLM's CPU build on the same load",
                        description="Install (or find) vLLM's CPU build in its own virtual environment, "
                        "serve the same model and adapters with both systems, run the same load shapes "
                        "against each over its own protocol, rounds alternated, and report tokens/s, "
                        "TTFT and ITL with the ratios.", epilog="  loramux peers --rounds 3\n"
                        "  loramux peers --workloads 8x4-adapters,poisson --json peers.json")
    add_external_parser(sub, "eval", "loramux.skills.eval", load=external("eval"),
                        help="score the base model, adapters and merges on the skill tasks",
                        description="Score the base model, each adapter and each merge on every "
                        "task's test split (in-process, or against --server), check general "
                        "capability, and write report.md, report.json and report.png: scores, each "
                        "merge's retention of each specialist, Pareto status, the best merge per "
                        "adapter set and every shortfall.", epilog=EVAL_EXAMPLES)
    return parser


def is_connection_failure(error: LoramuxClientError) -> bool:
    details = error.details.lower()
    return isinstance(error, Unavailable) and any(w in details for w in ("connect", "resolv", "dns"))


def report_client_error(error: LoramuxClientError, server: str | None) -> None:
    if is_connection_failure(error):
        print(f"loramux: Unavailable: cannot connect to a loramux server at {server} ({error.details}).\n"
              f"Start one with `loramux serve`, or point --server / LORAMUX_SERVER at a running one.",
              file=sys.stderr)
    else:
        print(f"loramux: {error.code_name}: {error.details}", file=sys.stderr)


# global options followed by a value, which is not the subcommand
GLOBAL_VALUE_OPTIONS = ("--log-level", "--log-format")


def subcommand(argv: list[str]) -> str | None:
    """The subcommand `argv` names, before it is parsed: its first word that is
    neither an option nor the value of a global option."""
    words = iter(argv)
    for word in words:
        if word in GLOBAL_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def configure_logging(args: argparse.Namespace) -> None:
    """The one place logging is set up: --log-level (else info with -v or for
    `serve`, which logs where it listens and how long loading took; else warning)
    and --log-format."""
    level = args.log_level or ("info" if args.verbose or args.command == "serve" else "warning")
    logs.configure(level, args.log_format or "text")


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    defaults = ClientDefaults.from_env(os.environ if env is None else env)
    command = subcommand(argv)
    args = build_parser(defaults, command).parse_args(argv)
    configure_logging(args)
    try:
        return args.func(args)
    except LoramuxClientError as e:
        report_client_error(e, getattr(args, "server", None))
    except (UsageError, ConfigError) as e:
        print(f"loramux {args.command}: error: {e}", file=sys.stderr)
    except LoramuxError as e:
        print(f"loramux: {type(e).__name__}: {e}", file=sys.stderr)
    except KeyboardInterrupt:  # a stream interrupted by ^C; the call is cancelled on exit
        return 130
    return 2


# =============================================================================
# --help examples
# =============================================================================

TOP_EXAMPLES = """\
examples:
  loramux serve --adapter-root ./adapters          # start a server on localhost:50051
  loramux generate --chat "List users older than 30" --adapter sql
  loramux generate --prompt "Hi" --mix sql=0.6,chat=0.4 --method ties --density 0.5
  loramux adapters                                 # what the server has
  loramux info --server gpu-box:50051 --token-file ~/.loramux-token

Run `loramux COMMAND --help` for each command's options."""

SERVE_EXAMPLES = """\
examples:
  loramux serve                                    # default model, no adapters, port 50051
  loramux serve --adapter-root ./adapters --export-root ./exports
  loramux serve --model ./my-hf-model --port 6000 --api-token-file token.txt
  loramux serve --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem
  loramux serve --config loramux.toml --port 6000 --log-format json   # flags win over the file
  loramux serve --host 127.0.0.1 --metrics-host 0.0.0.0               # metrics follow --host unless given"""

GENERATE_EXAMPLES = """\
examples:
  loramux generate --prompt "Once upon a time" --max-tokens 64
  loramux generate --chat "List users older than 30" --adapter sql
  loramux generate --chat "Hi" --system "Answer in French" --merge support-v2
  loramux generate --prompt "Hi" --mix sql=0.6,chat=0.4                      # linear mix
  loramux generate --prompt "Hi" --mix sql=0.6,chat=0.4 --method ties --density 0.5 \\
      --param majority_sign_method=frequency --mix-seed 7
  loramux generate --prompt "Hi" --temperature 0.8 --top-p 0.9 --seed 1 --stop END
  loramux generate --prompt "Hi" --json                                      # one JSON object

The text streams to stdout; the summary line goes to stderr, so
`loramux generate ... > out.txt` keeps only the text."""

ADAPTERS_EXAMPLES = """\
examples:
  loramux adapters                      # list (same as `loramux adapters list`)
  loramux adapters load sql --keep      # load now and never evict
  loramux adapters unload sql
  loramux adapters --json"""

MERGES_EXAMPLES = """\
examples:
  loramux merges                        # list
  loramux merges create support-v2 --mix sql=0.6,chat=0.4 --method ties --density 0.5
  loramux merges create blend --mix a=1,b=1 --method slerp --param t=0.3 --replace
  loramux merges delete support-v2
then: loramux generate --chat "Hi" --merge support-v2"""

PIN_EXAMPLES = """\
examples:
  loramux pin --merge support-v2
  loramux pin --adapter sql
  loramux pin --mix sql=0.5,chat=0.5 --method dare_ties --density 0.3 --mix-seed 1
  loramux unpin"""

EXPORT_EXAMPLES = """\
examples:
  loramux export sql-copy --adapter sql             # a PEFT directory
  loramux export support-v2 --merge support-v2
  loramux export blend --mix a=0.5,b=0.5 --method ties --density 0.5
  loramux export pinned-full --pinned-model         # dense model with the pin folded in"""

BENCH_EXAMPLES = """\
examples:
  loramux bench                                    # default model, 8 clients, 8 random adapters
  loramux bench --clients 16 --max-tokens 64 --mix-fraction 0.25
  loramux bench --target localhost:50051 --adapter-names sql,chat --no-baseline --json"""

EVAL_EXAMPLES = """\
examples:
  loramux eval --adapter-root adapters --pairs-all --limit 50 --out eval-report
  loramux eval --adapter-root adapters --merges linear:sql=0.5,json=0.5 ties:sql=1,json=1:density=0.5
  loramux eval --adapter-root adapters --tasks sql,json --sweep ties.density=0.3,0.5,0.7 \\
      --sweep slerp.t=0.3,0.5,0.7 --sweep linear.weight=0.3,0.5,0.7
  loramux eval --adapter-root adapters --merges merges.toml --save-items
  loramux eval --server localhost:50051 --merges dare_ties:sql=1,python=1:density=0.5,seed=1
merge spec: METHOD:ADAPTER=WEIGHT[,ADAPTER=WEIGHT...][:KEY=VALUE[,KEY=VALUE...]]"""

RUN_EXAMPLES = """\
examples:
  loramux run --prompt "Hello"
  loramux run --adapter-root ./adapters --adapter sql --chat "List users older than 30\""""


if __name__ == "__main__":
    sys.exit(main())
