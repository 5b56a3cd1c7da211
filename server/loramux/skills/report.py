"""The `loramux eval` report: one JSON-able dict, written as report.json, rendered as
report.md and report.png. Rendering reads only the dict, so a report can be rendered
again from its JSON:

    python -m loramux.skills.report eval-report/report.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from loramux.skills.analysis import MERGE, Analysis

DEFINITIONS = {
    "score": "share of a task's test items answered right (1/0 per item, by the task's "
             "scorer: SQL result sets, hidden Python tests, parsed JSON equality); a failed "
             "request counts as wrong",
    "specialist": "the adapter named after a task (trained for it)",
    "retention": "a merge's score on a specialist's task divided by that specialist's "
                 "score there; undefined when the specialist scores 0",
    "dominates": "row r dominates merge M on tasks T when r scores >= M on every task in T "
                 "and > on at least one; T is the set of tasks whose specialists M merges",
    "pareto_optimal": "no reference dominates the merge on its tasks; the references are the "
                      "specialists it merges and the linear average (equal weights summing to 1) "
                      "of the same adapters",
    "on_evaluated_front": "no evaluated configuration at all (base, any adapter, any merge) "
                          "dominates the merge on its tasks",
    "best_merge": "per adapter set, the merge with the highest worst retention; ties broken by "
                  "the mean score on its tasks",
    "perplexity": "exp of the mean negative log-likelihood per predicted token of the shipped "
                  "general prose (each piece's first token is not predicted)",
    "same_as_base": "share of the fixed general prompts answered (greedily) with exactly the "
                    "base model's text",
}


def build(meta: dict, entries: Sequence[dict], analysis: Analysis,
          items: list[dict] | None = None) -> dict:
    """The report: run metadata, one entry per configuration (merges carry their
    retention and Pareto status), the best merge per adapter set, shortfalls, goals."""
    configurations = []
    for e in entries:
        e = dict(e)
        m = analysis.merges.get(e["label"]) if e["kind"] == MERGE else None
        if m is not None:
            e["retention"] = {a: {"task": r.task, "score": r.merge_score,
                                  "specialist_score": r.specialist_score, "retention": r.ratio}
                              for a, r in m.retention.items()}
            e["worst_retention"] = m.worst_retention
            e["pareto"] = {
                "tasks": list(m.vs_references.tasks),
                "references": list(m.vs_references.references),
                "optimal": m.vs_references.optimal,
                "dominated_by": list(m.vs_references.dominated_by),
                "on_evaluated_front": m.vs_evaluated.optimal,
                "dominated_by_evaluated": list(m.vs_evaluated.dominated_by),
            }
        configurations.append(e)
    report = {
        "meta": meta,
        "definitions": DEFINITIONS,
        "configurations": configurations,
        "best_per_adapter_set": [asdict(b) | {"adapters": list(b.adapters)} for b in analysis.best],
        "methods": [asdict(s) for s in analysis.methods],
        "shortfalls": list(analysis.shortfalls),
        "goals": [asdict(g) for g in analysis.goals],
    }
    if items is not None:
        report["items"] = items
    return report


def write(report: dict, out: Path) -> list[Path]:
    """report.json, report.md, report.png (and items.jsonl when the report holds
    items) in `out`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    items = report.pop("items", None)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text(render_markdown(report, png_name=paths[2].name))
    render_png(report, paths[2])
    if items is not None:
        paths.append(out / "items.jsonl")
        paths[-1].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    return paths


# ============================================================================= markdown


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _tasks(report: dict) -> list[str]:
    return list(report["meta"]["tasks"])


def _merges(report: dict) -> list[dict]:
    return [c for c in report["configurations"] if c["kind"] == MERGE]


def scores_section(report: dict) -> str:
    tasks, own = _tasks(report), report["meta"]["specialists"]
    rows = []
    for c in report["configurations"]:
        cells = []
        for t in tasks:
            cell = f"{_pct(c['scores'][t])} ({c['correct'][t]}/{c['items'][t]})"
            if c["kind"] == "adapter" and own.get(c["adapters"][0]) == t:
                cell = f"**{cell}**"
            if c["errors"][t]:
                cell += f" ⚠ {c['errors'][t]} failed"
            cells.append(cell)
        served = c.get("served")
        serving = ("" if not served else "pinned (exact ΔW)" if served.get("pinned") else
                   f"rank {served['rank']}, error {served['rel_error']:.3f}")
        rows.append([c["label"], c["kind"], *cells, serving])
    text = _table(["configuration", "kind", *tasks, "served as"], rows)
    notes = [f"- {c['label']}: first failure: {c['first_error']}" for c in report["configurations"]
             if c.get("first_error")]
    return ("## Task scores\n\nShare of test items answered right; a specialist's own task in bold. "
            "*Served as*: the rank a merge was served at and its relative Frobenius error against "
            "the exact merged ΔW (worst module), or pinned: folded into the base weights exactly "
            "(`--pin-merges`).\n\n" + text + ("\n\n" + "\n".join(notes) if notes else ""))


def retention_section(report: dict) -> str:
    merges, goal = _merges(report), report["meta"]["retention_goal"]
    adapters = [a for a in report["meta"]["adapters"] if a in report["meta"]["specialists"]]
    rows = []
    for m in merges:
        ret = m.get("retention", {})
        cells = []
        for a in adapters:
            r = ret.get(a)
            cells.append("—" if r is None else
                         f"{_pct(r['retention'])} ({r['score']:.2f} / {r['specialist_score']:.2f})")
        worst = m.get("worst_retention")
        ok = "n/a" if worst is None else ("yes" if worst >= goal - 1e-12 else "**no**")
        rows.append([m["label"], *cells, _pct(worst), ok])
    head = ["merge", *(f"{a} ({report['meta']['specialists'][a]})" for a in adapters), "worst",
            f"≥ {_pct(goal)}"]
    return ("## Retention of each specialist's score\n\nMerge score on the specialist's task / "
            "the specialist's score there (merge / specialist in parentheses); — where the merge "
            "does not include that adapter.\n\n" + (_table(head, rows) if rows else "No merges."))


def pareto_section(report: dict) -> str:
    rows = []
    for m in _merges(report):
        p = m.get("pareto")
        if p is None:
            continue
        rows.append([m["label"], ", ".join(p["tasks"]) or "—",
                     "yes" if p["optimal"] else "**no**",
                     ", ".join(p["dominated_by"]) or "—",
                     "yes" if p["on_evaluated_front"] else "no"])
    d = report["definitions"]
    return ("## Pareto optimality\n\n"
            f"*Pareto-optimal*: {d['pareto_optimal']}. Here {d['dominates']}. "
            f"*On the evaluated front*: {d['on_evaluated_front']}.\n\n"
            + (_table(["merge", "tasks", "Pareto-optimal", "dominated by", "on the evaluated front"], rows)
               if rows else "No merges."))


def best_section(report: dict) -> str:
    goal = report["meta"]["retention_goal"]
    rows = [[" + ".join(b["adapters"]), b["label"], _pct(b["worst_retention"]), _pct(b["mean_score"]),
             b["candidates"],
             "yes" if b["worst_retention"] is not None and b["worst_retention"] >= goal - 1e-12 else "**no**"]
            for b in report["best_per_adapter_set"]]
    return ("## Best merge per adapter set\n\nThe merge with the highest worst retention among those "
            "evaluated on the same adapters (ties: mean score on their tasks).\n\n"
            + (_table(["adapters", "best merge", "worst retention", "mean score", "merges compared",
                       f"keeps ≥ {_pct(goal)}"], rows) if rows else "No merge of two or more adapters."))


def methods_section(report: dict) -> str:
    goal = report["meta"]["retention_goal"]
    rows = [[s["method"], s["merges"], s["meet_goal"], s["pareto_optimal"], _pct(s["mean_worst_retention"])]
            for s in report["methods"]]
    head = ["method", "merges", f"keep ≥ {_pct(goal)} of every specialist", "Pareto-optimal",
            "mean worst retention"]
    return "## By method\n\n" + (_table(head, rows) if rows else "No merges.")


def shortfall_section(report: dict) -> str:
    lines = report["shortfalls"]
    body = ("\n".join(f"- {line}" for line in lines) if lines else
            f"None: every merge keeps at least {_pct(report['meta']['retention_goal'])} of every "
            "specialist's score and is Pareto-optimal.")
    return "## Where methods fall short\n\n" + body


def general_section(report: dict) -> str:
    configs = report["configurations"]
    base = next((c for c in configs if c["kind"] == "base"), None)
    base_ppl = base["general"]["perplexity"] if base else None
    rows = []
    for c in configs:
        g = c["general"]
        ppl = g["perplexity"]
        delta = (f"{100 * (ppl / base_ppl - 1):+.1f}%" if ppl is not None and base_ppl else "—")
        same = ("—" if g["same_as_base"] is None else
                f"{_pct(g['same_as_base'])} ({g['same_as_base_count']}/{g['prompts']})")
        rows.append([c["label"], "n/a" if ppl is None else f"{ppl:.2f}", delta, same])
    meta = report["meta"]
    tokens = base["general"]["tokens"] if base else None
    source = (f"{meta['general_text']['pieces']} pieces, {tokens} predicted tokens" if tokens else
              "not measured: the gRPC API has no log-probabilities; run in-process for it")
    return ("## General capability\n\n"
            f"Perplexity on the general prose in `{meta['general_text']['file']}` ({source}; lower "
            f"is better), and the share of the {len(meta.get('general_prompts', []))} fixed general "
            "prompts answered exactly as the base model answers them (greedy, at most "
            f"{meta['general_max_tokens']} tokens).\n\n"
            + _table(["configuration", "perplexity", "vs base", "same answers as base"], rows))


def goals_section(report: dict) -> str:
    rows = [[g["text"], "yes" if g["met"] else "**no**", g["detail"]] for g in report["goals"]]
    return "## Goals\n\n" + (_table(["goal", "met", "measured"], rows) if rows else "No goals apply.")


def header_section(report: dict) -> str:
    m = report["meta"]
    items = ", ".join(f"{t} {n}" for t, n in m["items_per_task"].items())
    where = (f"in-process on {m['device']}, model {m['model']}" if m["mode"] == "in-process"
             else f"against the server at {m['server']} (model {m['model']})")
    lines = [
        "# Merge evaluation",
        "",
        f"Scored {where}; adapters {', '.join(m['adapters']) or 'none'}; {m['split']} split items per "
        f"task: {items} (data seed {m['data_seed']}); {m['decoding']} decoding, at most "
        f"{m['max_tokens']} new tokens. Started {m['started']}, took {m['seconds']:.0f} s.",
    ]
    if m.get("command"):
        lines += ["", f"Command: `{m['command']}`"]
    return "\n".join(lines)


def render_markdown(report: dict, png_name: str | None = "report.png") -> str:
    sections = [header_section(report)]
    if png_name:
        sections.append(f"![task scores per configuration]({png_name})")
    sections += [scores_section(report), retention_section(report), pareto_section(report),
                 best_section(report), methods_section(report), shortfall_section(report),
                 general_section(report), goals_section(report)]
    defs = "\n".join(f"- **{k}**: {v}." for k, v in report["definitions"].items())
    sections.append("## Definitions\n\n" + defs)
    return "\n\n".join(sections) + "\n"


# ============================================================================= chart


def render_png(report: dict, path: Path) -> None:
    """Grouped horizontal bars of task scores per configuration and, when measured,
    perplexity per configuration beside them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    configs = report["configurations"]
    tasks = _tasks(report)
    labels = [c["label"] for c in configs]
    ppl = [c["general"]["perplexity"] for c in configs]
    has_ppl = any(p is not None for p in ppl)
    height = 1.5 + len(configs) * (0.15 + 0.12 * len(tasks))
    fig = Figure(figsize=(13 if has_ppl else 10, height), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[3, 1]) if has_ppl else fig.add_gridspec(1, 1)
    ax = fig.add_subplot(grid[0, 0])
    bar = 0.8 / max(1, len(tasks))
    ys = range(len(configs))
    for k, t in enumerate(tasks):
        offsets = [y - 0.4 + bar * (k + 0.5) for y in ys]
        ax.barh(offsets, [100 * c["scores"][t] for c in configs], height=bar, label=t)
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("test items right (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(tasks), fontsize=8, frameon=False)
    ax.set_title("Task scores per configuration", pad=20)
    if has_ppl:
        ax2 = fig.add_subplot(grid[0, 1], sharey=ax)
        ax2.barh(list(ys), [p or 0.0 for p in ppl], color="tab:grey")
        ax2.tick_params(labelleft=False)
        ax2.set_xlabel("perplexity on general text")
        ax2.grid(axis="x", alpha=0.3)
        ax2.set_title("General text (lower is better)", pad=20)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Render report.md and report.png again beside a report.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m loramux.skills.report REPORT.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    report = json.loads(path.read_text())
    (path.parent / "report.md").write_text(render_markdown(report))
    render_png(report, path.parent / "report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
