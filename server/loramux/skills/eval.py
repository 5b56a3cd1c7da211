"""`loramux eval`: does a merged model keep every skill?

    loramux eval --adapter-root adapters --tasks sql,python,json --pairs-all --limit 50
    loramux eval --adapter-root adapters --merges ties:sql=1,json=1:density=0.5 \\
        --sweep ties.density=0.3,0.5,0.7 --out eval-report
    loramux eval --server localhost:50051 --merges linear:sql=0.5,json=0.5
    python -m loramux.skills.eval ...          (the same command)

Scores the base model, each adapter alone and each merge on every task's test split
(greedy decoding), through the engine the server runs: loaded here (all requests of a
configuration go in as one batch, so rows share forward passes), or a running server
(--server; concurrent calls). Then a general-capability check: token-level
perplexity on general prose shipped in `skills/data/` (in-process only: the gRPC API
has no log-probabilities), and the share of fixed general prompts each configuration
answers exactly as the base model does.

The report (report.md, report.json, report.png in --out) has the task scores, each
merge's retention of each specialist's score, Pareto status against the specialists
and the linear average, the best merge per adapter set, the general-capability table
and a plain line for every shortfall; `loramux.skills.analysis` defines each term.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from loramux.cliargs import add_base_model_args, module_main
from loramux.config import AdapterConfig, EngineConfig, MergeConfig, ModelConfig, SlotConfig
from loramux.errors import InvalidArgument
from loramux.merging.spec import MixSpec
from loramux.skills import mergespec
from loramux.skills.analysis import ADAPTER, BASE, MERGE, RETENTION_GOAL, Row, analyze
from loramux.skills.runners import Answer, Configuration, EngineRunner, Prompt, Runner, ServerRunner
from loramux.skills.tasks import TASK_NAMES, Example, Task, make_task

DATA_DIR = Path(__file__).parent / "data"
GENERAL_TEXT = DATA_DIR / "general_text.txt"
GENERAL_PROMPTS = DATA_DIR / "general_prompts.txt"
COMMAND = "loramux eval"
PPL_WINDOW = 512  # longest piece of general text scored in one row, in tokens

Log = Callable[[str], None]


# =============================================================================
# Configuration
# =============================================================================


@dataclass
class EvalConfig:
    """One evaluation run.

    tasks: task names scored (see tasks.make_task).
    adapters: adapters scored alone and available to merges; an adapter named like a
      task is that task's specialist.
    merges: merges scored (validated; see mergespec).
    add_references: add the linear average of every merged adapter set that has none
      (the Pareto reference).
    limit: test items per task; None is the task's whole test split.
    data_seed: the tasks' generation seed (the split assignment never depends on it).
    max_tokens: generated tokens per task answer; general_max_tokens: per general prompt.
    out: report directory. save_items: also write every answer to items.jsonl.
    server: HOST:PORT of a running server to evaluate instead of loading the model;
      token: its bearer token; concurrency: calls in flight.
    engine: the in-process engine (None with server). threads: torch CPU threads.
    pin_merges: score each merge pinned into the base weights (its exact ΔW, folded
      in) instead of as a per-request mix (which serves dense merges compressed to
      the slot rank); in-process only.
    retention_goal: shortfall threshold for a merge's retention of a specialist.
    command: the command line, recorded in the report.
    """

    tasks: tuple[str, ...] = TASK_NAMES
    adapters: tuple[str, ...] = ()
    merges: tuple[MixSpec, ...] = ()
    add_references: bool = True
    limit: int | None = None
    data_seed: int = 0
    max_tokens: int = 192
    general_max_tokens: int = 48
    out: Path = Path("eval-report")
    save_items: bool = False
    server: str | None = None
    token: str | None = None
    concurrency: int = 16
    engine: EngineConfig | None = field(default_factory=EngineConfig)
    threads: int | None = None
    pin_merges: bool = False
    retention_goal: float = RETENTION_GOAL
    command: str | None = None

    def validate(self) -> "EvalConfig":
        if not self.tasks:
            raise InvalidArgument("give at least one task")
        for t in self.tasks:
            if t not in TASK_NAMES:
                raise InvalidArgument(f"unknown task {t!r}; known: {', '.join(TASK_NAMES)}")
        if len(set(self.tasks)) != len(self.tasks) or len(set(self.adapters)) != len(self.adapters):
            raise InvalidArgument("a task or adapter is named twice")
        if self.limit is not None and self.limit < 1:
            raise InvalidArgument("--limit must be at least 1")
        if min(self.max_tokens, self.general_max_tokens, self.concurrency) < 1:
            raise InvalidArgument("--max-tokens, --general-max-tokens and --concurrency must be at least 1")
        if not 0 < self.retention_goal <= 1:
            raise InvalidArgument("--retention-goal must be in (0, 1]")
        if (self.server is None) == (self.engine is None):
            raise InvalidArgument("evaluate in-process (an engine config) or against --server, not both")
        if self.pin_merges and self.server is not None:
            raise InvalidArgument("--pin-merges runs in-process only (pinning a shared server "
                                  "changes what its other clients get)")
        mergespec.check_adapters(self.merges, self.adapters)
        return self

    @property
    def specialist_task(self) -> dict[str, str]:
        return {a: a for a in self.adapters if a in self.tasks}


def configurations(cfg: EvalConfig) -> list[Configuration]:
    """Base first (the general prompts compare with it), then adapters, then merges."""
    merges = list(cfg.merges)
    if cfg.add_references:
        merges += reference_merges(merges, cfg.adapters)
    configs = ([Configuration("base", BASE)]
               + [Configuration(a, ADAPTER, adapter=a) for a in cfg.adapters]
               + [Configuration(mergespec.label(m), MERGE, mix=m) for m in mergespec.unique(merges)])
    labels = [c.label for c in configs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:  # the report keys rows by label
        raise InvalidArgument(f"two configurations would both be called {twice[0]!r}")
    return configs


def reference_merges(merges: Sequence[MixSpec], order: Sequence[str]) -> list[MixSpec]:
    """The linear average of every merged adapter set (≥ 2 adapters) that lacks one."""
    have = {frozenset(m.names) for m in merges if mergespec.is_linear_average(m)}
    out: list[MixSpec] = []
    for m in merges:
        names = frozenset(m.names)
        if len(names) >= 2 and names not in have:
            have.add(names)
            out.append(mergespec.linear_average([a for a in order if a in names]))
    return out


# =============================================================================
# Data: task items, general text and prompts
# =============================================================================


def read_lines(path: Path) -> list[str]:
    """Non-empty lines that are not # comments."""
    return [s for s in (line.strip() for line in path.read_text().splitlines())
            if s and not s.startswith("#")]


def read_paragraphs(path: Path) -> list[str]:
    """Blank-line separated paragraphs, comment lines dropped, each on one line."""
    paragraphs, current = [], []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("#"):
            continue
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return paragraphs


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_to_fit(paragraphs: Sequence[str], count: Callable[[str], int], limit: int) -> list[str]:
    """Paragraphs, each cut at sentence ends into pieces of at most `limit` tokens
    (by `count`); a single sentence longer than that is dropped."""
    out = []
    for p in paragraphs:
        if count(p) <= limit:
            out.append(p)
            continue
        piece = ""
        for sentence in _SENTENCE_END.split(p):
            joined = f"{piece} {sentence}".strip()
            if count(joined) <= limit:
                piece = joined
                continue
            if piece:
                out.append(piece)
            piece = sentence if count(sentence) <= limit else ""
        if piece:
            out.append(piece)
    return out


@dataclass(frozen=True)
class Workload:
    """What every configuration answers.

    tasks: name → task (its scorer). items: (task name, example) of every test item.
    general: the fixed general prompts. texts: general prose pieces for perplexity
      (empty when the runner cannot score text).
    """

    tasks: dict[str, Task]
    items: list[tuple[str, Example]]
    general: list[str]
    texts: list[str]

    @property
    def per_configuration(self) -> int:
        return len(self.items) + len(self.general)


def load_workload(cfg: EvalConfig, runner: Runner) -> Workload:
    sizes = None if cfg.limit is None else {"test": cfg.limit}
    tasks = {name: make_task(name, seed=cfg.data_seed, sizes=sizes) for name in cfg.tasks}
    items = [(name, ex) for name, task in tasks.items() for ex in task.examples("test")]
    texts: list[str] = []
    if isinstance(runner, EngineRunner):
        limit = min(PPL_WINDOW, runner.max_prompt_tokens)
        texts = split_to_fit(read_paragraphs(GENERAL_TEXT), lambda s: len(runner.token_ids(s)), limit)
    return Workload(tasks, items, read_lines(GENERAL_PROMPTS), texts)


# =============================================================================
# Progress
# =============================================================================


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Prints "done/total items, elapsed, eta" at most every `every` seconds (and at
    the end); the ETA assumes the remaining items go at the average rate so far."""

    def __init__(self, total: int, log: Log, every: float = 5.0, clock=time.monotonic):
        self.total, self.log, self.every, self.clock = total, log, every, clock
        self.done = 0
        self.start = self._last = clock()

    def advance(self, note: str = "") -> None:
        self.done += 1
        now = self.clock()
        if now - self._last >= self.every or self.done == self.total:
            self._last = now
            self.log(self.line(now, note))

    def line(self, now: float, note: str = "") -> str:
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        pct = 100 * self.done / max(1, self.total)
        tail = f"  [{note}]" if note else ""
        return (f"eval: {self.done}/{self.total} items ({pct:.0f}%)  elapsed {_duration(elapsed)}"
                f"  eta {_duration(eta) if math.isfinite(eta) else '?'}{tail}")


# =============================================================================
# The run
# =============================================================================


def evaluate_configuration(config: Configuration, runner: Runner, work: Workload, cfg: EvalConfig,
                           base_answers: Sequence[str] | None, progress: Progress,
                           records: list[dict] | None) -> tuple[dict, list[str]]:
    """Score one configuration; returns its report entry and its general answers.
    records: where each answer is appended (None: not kept)."""
    started = time.perf_counter()
    tasks, items, general = work.tasks, work.items, work.general
    prompts = [Prompt(tuple(ex.prompt_messages), cfg.max_tokens) for _, ex in items]
    prompts += [Prompt(({"role": "user", "content": q},), cfg.general_max_tokens) for q in general]
    correct = {t: 0 for t in tasks}
    count = {t: 0 for t in tasks}
    errors = {t: 0 for t in tasks}
    answers: list[str] = [""] * len(general)
    served: list[Answer] = []
    first_error: list[str] = []

    def on_answer(i: int, a: Answer) -> None:
        if a.rank is not None:
            served.append(a)
        if a.error and not first_error:
            first_error.append(a.error)
        if i < len(items):
            task, ex = items[i]
            score = 0.0 if a.error else tasks[task].score(a.text, ex)
            correct[task] += int(score == 1.0)
            count[task] += 1
            errors[task] += int(a.error is not None)
            if records is not None:
                records.append({"configuration": config.label, "task": task, "template": ex.template_id,
                                "prompt": ex.prompt, "answer": a.text, "reference": ex.reference,
                                "score": score, "error": a.error})
        else:
            answers[i - len(items)] = a.text if a.error is None else f"<error: {a.error}>"
            if records is not None:
                records.append({"configuration": config.label, "task": "general",
                                "prompt": general[i - len(items)], "answer": a.text, "error": a.error})
        progress.advance(config.label)

    with runner.using(config) as (sent, how_served):
        runner.answer(sent, prompts, on_answer)
        nll = runner.nll(sent, work.texts) if work.texts else None
    same = len(general) if base_answers is None else sum(a == b for a, b in zip(answers, base_answers))
    entry = {
        "label": config.label,
        "kind": config.kind,
        "adapters": list(config.adapters),
        "method": config.mix.method if config.mix else None,
        "weights": config.mix.weights if config.mix else None,
        "params": dict(config.mix.params) if config.mix else None,
        "seed": config.mix.seed if config.mix else None,
        "scores": {t: correct[t] / count[t] if count[t] else 0.0 for t in tasks},
        "correct": correct,
        "items": count,
        "errors": errors,
        "first_error": first_error[0] if first_error else None,
        "general": {
            "perplexity": _finite(math.exp(nll[0] / nll[1])) if nll and nll[1] else None,
            "tokens": nll[1] if nll else None,
            "same_as_base": same / len(general) if general else None,
            "same_as_base_count": same,
            "prompts": len(general),
        },
        "served": how_served or ({"pinned": False, "rank": max(a.rank for a in served),
                                  "rel_error": max(a.rel_error for a in served)} if served else None),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return entry, answers


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_eval(cfg: EvalConfig, runner: Runner, log: Log = print) -> dict:
    """Score every configuration and return the report (a JSON-able dict)."""
    from loramux.skills import report

    began, wall = time.perf_counter(), datetime.now(timezone.utc)
    configs = configurations(cfg)
    work = load_workload(cfg, runner)
    total = len(configs) * work.per_configuration
    log(f"eval: {len(configs)} configurations x ({len(work.items)} task items + {len(work.general)} "
        f"general prompts) = {total} generations ({runner.mode})")
    progress = Progress(total, log)
    records: list[dict] | None = [] if cfg.save_items else None
    entries, base_answers = [], None
    for config in configs:
        entry, answers = evaluate_configuration(config, runner, work, cfg, base_answers, progress, records)
        base_answers = answers if config.kind == BASE else base_answers
        entries.append(entry)
    rows = [Row(e["label"], e["kind"], tuple(e["adapters"]), e["scores"],
                e["kind"] == MERGE and mergespec.is_linear_average(c.mix), e["method"])
            for e, c in zip(entries, configs)]
    analysis = analyze(rows, cfg.specialist_task, retention_goal=cfg.retention_goal)
    meta = run_meta(cfg, runner, work, began, wall)
    meta["general_prompts"] = [{"prompt": q, "base_answer": a}
                               for q, a in zip(work.general, base_answers or [])]
    return report.build(meta, entries, analysis, records)


def run_meta(cfg: EvalConfig, runner: Runner, work: Workload, began: float, wall: datetime) -> dict:
    import torch
    import transformers

    model = None
    if cfg.engine is not None:
        model = str(cfg.engine.model.path) if cfg.engine.model.path else "SmolLM2-135M-Instruct (embedded)"
    return {
        "command": cfg.command,
        "mode": runner.mode,
        "server": cfg.server,
        "model": model,
        "device": str(runner.engine.device) if isinstance(runner, EngineRunner) else None,
        "adapter_roots": [str(r) for r in cfg.engine.adapters.roots] if cfg.engine else None,
        "tasks": list(cfg.tasks),
        "adapters": list(cfg.adapters),
        "specialists": cfg.specialist_task,
        "items_per_task": {t: sum(1 for name, _ in work.items if name == t) for t in work.tasks},
        "limit": cfg.limit,
        "data_seed": cfg.data_seed,
        "split": "test",
        "decoding": "greedy",
        "max_tokens": cfg.max_tokens,
        "general_max_tokens": cfg.general_max_tokens,
        "general_text": {"file": f"skills/data/{GENERAL_TEXT.name}", "pieces": len(work.texts)},
        "retention_goal": cfg.retention_goal,
        "started": wall.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - began, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


# =============================================================================
# Command line
# =============================================================================


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to score")
    g.add_argument("--tasks", default=",".join(TASK_NAMES),
                   help="comma-separated tasks (default: %(default)s)")
    g.add_argument("--adapters", help="comma-separated adapter names (default: every task that has "
                   "an adapter of its name under --adapter-root, or on the --server)")
    g.add_argument("--merges", nargs="+", action="extend", default=[], metavar="SPEC",
                   help=f"merges, each {mergespec.SPEC_SYNTAX}, or a .toml/.json file of them")
    g.add_argument("--sweep", action="append", default=[], metavar="METHOD.KEY=V,V",
                   help="a merge of every pair of adapters per value: ties.density=0.3,0.5,0.7, "
                   "slerp.t=0.3,0.7, linear.weight=0.3,0.7 (first adapter w, second 1-w), "
                   "linear.scale=0.5,1 (both s); repeatable")
    g.add_argument("--pairs-all", action="store_true",
                   help=f"{', '.join(mergespec.PAIR_METHODS)} of every pair of adapters (default "
                   "parameters), plus the karcher mean of all adapters when there are 3 or more")
    g.add_argument("--no-linear-reference", action="store_true",
                   help="do not add the linear average of merged adapter sets that lack one")
    g.add_argument("--limit", type=int, help="test items per task (default: the whole test split)")
    g.add_argument("--data-seed", type=int, default=0, help="task generation seed (default: 0)")
    g.add_argument("--max-tokens", type=int, default=EvalConfig.max_tokens,
                   help="generated tokens per task answer (default: %(default)s)")
    g.add_argument("--general-max-tokens", type=int, default=EvalConfig.general_max_tokens,
                   help="generated tokens per general prompt (default: %(default)s)")
    g.add_argument("--retention-goal", type=float, default=RETENTION_GOAL,
                   help="report every merge keeping less of a specialist's score (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=EvalConfig.out,
                   help="report directory: report.md, report.json, report.png (default: %(default)s)")
    g.add_argument("--save-items", action="store_true", help="also write every answer to items.jsonl")
    g = p.add_argument_group("in-process model (when no --server)")
    add_base_model_args(g)
    g.add_argument("--adapter-root", type=Path, help="directory holding the adapters")
    g.add_argument("--max-rank", type=int, default=AdapterConfig.max_rank,
                   help="largest adapter rank, and the rank merges are served at (default: %(default)s)")
    g.add_argument("--error-budget", type=float, default=MergeConfig.error_budget,
                   help="relative error allowed when a dense merge is compressed to --max-rank "
                   "(default: %(default)s; the achieved error is reported)")
    g.add_argument("--pin-merges", action="store_true",
                   help="score each merge pinned into the base weights (exact ΔW) instead of as a "
                   "per-request mix (dense merges compressed to --max-rank)")
    g.add_argument("--batch-rows", type=int, default=EngineConfig.max_batch_rows,
                   help="rows decoded together (default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("running server")
    g.add_argument("--server", metavar="HOST:PORT", help="evaluate this server instead of loading the model")
    g.add_argument("--token-file", type=Path, help="bearer token for the server's Inference API")
    g.add_argument("--concurrency", type=int, default=EvalConfig.concurrency,
                   help="calls in flight against --server (default: %(default)s)")
    p.set_defaults(command_line=None)


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def config_from_args(args: argparse.Namespace, available: Sequence[str] | None = None) -> EvalConfig:
    """The run's configuration. available: adapter names that exist (from the adapter
    root or the server), for the default --adapters; None reads --adapter-root."""
    tasks = tuple(_names(args.tasks))
    if available is None:
        root = args.adapter_root
        if root is not None and not root.is_dir():
            raise InvalidArgument(f"--adapter-root {root} is not a directory")
        available = [d.name for d in sorted(root.iterdir())
                     if (d / "adapter_config.json").is_file()] if root else []
    adapters = tuple(_names(args.adapters)) if args.adapters else tuple(t for t in tasks if t in available)
    merges = mergespec.parse_merges(args.merges)
    for text in args.sweep:
        merges += mergespec.expand_sweep(mergespec.parse_sweep(text), adapters)
    if args.pairs_all:
        merges += mergespec.pairs_all(adapters)
    if (args.sweep or args.pairs_all) and len(adapters) < 2:
        raise InvalidArgument(f"--sweep and --pairs-all merge pairs of adapters; evaluating "
                              f"{len(adapters)} ({', '.join(adapters) or 'none found'})")
    engine = None
    if args.server is None:
        if args.threads is not None and args.threads < 1:
            raise InvalidArgument("--threads must be at least 1")
        engine = EngineConfig(
            model=ModelConfig(path=args.model, cache_dir=args.model_cache, device=args.device,
                              dtype=args.dtype, quantization=args.quantization),
            adapters=AdapterConfig(roots=[args.adapter_root] if args.adapter_root else [],
                                   max_rank=args.max_rank),
            # One adapter or merge at a time: two slots leave room for a larger --max-rank.
            slots=SlotConfig(num_slots=2),
            merges=MergeConfig(error_budget=args.error_budget),
            max_batch_rows=args.batch_rows,
        )
    token = args.token_file.read_text().strip() if args.token_file else None
    return EvalConfig(
        tasks=tasks, adapters=adapters, merges=tuple(mergespec.unique(merges)),
        add_references=not args.no_linear_reference, limit=args.limit, data_seed=args.data_seed,
        max_tokens=args.max_tokens, general_max_tokens=args.general_max_tokens, out=args.out,
        save_items=args.save_items, server=args.server, token=token, concurrency=args.concurrency,
        engine=engine, threads=args.threads, pin_merges=args.pin_merges, retention_goal=args.retention_goal,
        command=args.command_line or _invocation(),
    ).validate()


def _invocation() -> str | None:
    """The command line, when this process is `loramux eval ...`."""
    return shlex.join(["loramux", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_eval(args: argparse.Namespace, log: Log = _stderr) -> int:
    from loramux.skills import report

    if args.server is not None:
        return _eval_server(args, log)
    cfg = config_from_args(args)
    import torch

    from loramux.app import build_engine

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        engine = build_engine(cfg.engine)
        for name in cfg.adapters:  # NotFound / InvalidArgument now, not item by item
            engine.store.get(name)
        result = run_eval(cfg, EngineRunner(engine, cfg.pin_merges), log)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as found
    _finish(report.write(result, cfg.out), result, log)
    return 0


def _eval_server(args: argparse.Namespace, log: Log) -> int:
    from loramux.skills import report
    from loramux_client import Client

    token = args.token_file.read_text().strip() if args.token_file else None
    with Client(args.server, token=token) as client:
        client.wait_ready(timeout=30)
        info = client.server_info()
        if info.pinned:
            raise InvalidArgument(f"{info.pinned} is pinned on {args.server}: requests without an adapter "
                                  "get it, so the base model cannot be scored; `loramux unpin` first")
        wanted = _names(args.adapters) or _names(args.tasks)
        available = [name for name in wanted if _server_has(client, name)]
        if args.adapters and available != wanted:
            missing = [a for a in wanted if a not in available]
            raise InvalidArgument(f"the server at {args.server} has no adapter(s) {missing} under its "
                                  "adapter roots")
        cfg = config_from_args(args, available)
        result = run_eval(cfg, ServerRunner(client, cfg.concurrency), log)
        result["meta"]["model"] = info.base_model
    _finish(report.write(result, cfg.out), result, log)
    return 0


def _server_has(client, name: str) -> bool:
    """Whether the server resolves adapter `name` (its list shows only cached ones,
    so ask for one token with it)."""
    from loramux_client import NotFound

    try:
        client.generate("ok", adapter=name, max_tokens=1)
    except NotFound:
        return False
    return True


def _finish(paths: Sequence[Path], result: dict, log: Log) -> None:
    for line in result["shortfalls"]:
        log(f"shortfall: {line}")
    log(f"eval: wrote {', '.join(str(p) for p in paths)} in {result['meta']['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m loramux.skills.eval", description=__doc__,
                       add_args=add_eval_args, run=cmd_eval, command=COMMAND)


if __name__ == "__main__":
    sys.exit(main())
