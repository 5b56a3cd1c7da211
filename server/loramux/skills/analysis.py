"""What an evaluation's score table says about merges: retention, Pareto optimality,
the best merge per adapter set, shortfalls and the issue's goals. Pure functions on
plain score tables, so they are tested on hand-made tables.

Definitions (also written into every report):
- The *specialist* of task t is the adapter trained for t (an adapter is named after
  its task). A merge *covers* the tasks of the specialists it merges.
- *Retention* of specialist a in merge M: score(M, task(a)) / score(a, task(a)).
  Undefined (None) when the specialist scores 0 on its own task.
- Row r *dominates* M on tasks T: score(r, t) ≥ score(M, t) for every t in T and
  > for at least one.
- M is *Pareto-optimal against its references* when no reference dominates it on
  the tasks M covers; the references are the specialists M merges and the linear
  average (equal weights summing to 1) of the same adapters, when it was evaluated and
  is not M itself.
- M is *on the evaluated front* when no evaluated row at all (base, any adapter, any
  other merge) dominates it on those tasks.
- The *best merge* of an adapter set is the one with the highest worst retention
  (ties: higher mean score on the covered tasks, then the label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

BASE, ADAPTER, MERGE = "base", "adapter", "merge"
SPECIALIST_GOAL = 0.80  # each specialist on its own task
RETENTION_GOAL = 0.90  # the best merge keeps this share of every specialist's score
BASE_CEILING = 0.10  # "the base model is near 0" on every task
_EPS = 1e-12


@dataclass(frozen=True)
class Row:
    """One evaluated configuration.

    kind: base | adapter | merge. adapters: () for the base, (name,) for an adapter,
    the merged names for a merge. scores: task → accuracy in [0, 1].
    linear_average: a merge that is the equal-weight linear average of its adapters.
    method: a merge's method.
    """

    label: str
    kind: str
    adapters: tuple[str, ...]
    scores: Mapping[str, float]
    linear_average: bool = False
    method: str | None = None


@dataclass(frozen=True)
class Retention:
    adapter: str
    task: str
    merge_score: float
    specialist_score: float
    ratio: float | None  # None: the specialist scores 0 on its own task


@dataclass(frozen=True)
class Pareto:
    """tasks: what the merge covers. references: the rows it was compared with.
    dominated_by: those of them that dominate it."""

    tasks: tuple[str, ...]
    references: tuple[str, ...]
    dominated_by: tuple[str, ...]

    @property
    def optimal(self) -> bool:
        return not self.dominated_by


@dataclass(frozen=True)
class MergeAnalysis:
    label: str
    retention: Mapping[str, Retention]  # adapter → its retention
    vs_references: Pareto
    vs_evaluated: Pareto

    @property
    def worst_retention(self) -> float | None:
        ratios = [r.ratio for r in self.retention.values() if r.ratio is not None]
        return min(ratios) if ratios else None


@dataclass(frozen=True)
class Best:
    """The best merge of one adapter set (see the module docstring)."""

    adapters: tuple[str, ...]
    label: str
    worst_retention: float | None
    mean_score: float
    candidates: int


@dataclass(frozen=True)
class MethodSummary:
    """How one method's merges did: how many keep retention_goal of every specialist
    (a merge with an undefined retention does not), how many are Pareto-optimal."""

    method: str
    merges: int
    meet_goal: int
    pareto_optimal: int
    mean_worst_retention: float | None


@dataclass(frozen=True)
class Goal:
    text: str
    met: bool
    detail: str


@dataclass
class Analysis:
    merges: dict[str, MergeAnalysis] = field(default_factory=dict)
    best: list[Best] = field(default_factory=list)
    methods: list[MethodSummary] = field(default_factory=list)
    shortfalls: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)


def dominates(a: Mapping[str, float], b: Mapping[str, float], tasks: Sequence[str]) -> bool:
    """a ≥ b on every task of `tasks` and > on at least one."""
    if not tasks:
        return False
    return (all(a[t] >= b[t] - _EPS for t in tasks)
            and any(a[t] > b[t] + _EPS for t in tasks))


def specialists(rows: Sequence[Row], specialist_task: Mapping[str, str]) -> dict[str, Row]:
    """adapter name → its single-adapter row, for adapters that have a task."""
    return {r.adapters[0]: r for r in rows
            if r.kind == ADAPTER and r.adapters[0] in specialist_task}


def covered_tasks(merge: Row, specialist_task: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(specialist_task[a] for a in merge.adapters if a in specialist_task))


def retention(merge: Row, specs: Mapping[str, Row],
              specialist_task: Mapping[str, str]) -> dict[str, Retention]:
    """adapter → Retention, for every merged adapter whose specialist was evaluated."""
    out = {}
    for a in merge.adapters:
        if a not in specs:
            continue
        task = specialist_task[a]
        mine, theirs = merge.scores[task], specs[a].scores[task]
        ratio = mine / theirs if theirs > _EPS else None
        out[a] = Retention(a, task, mine, theirs, ratio)
    return out


def pareto(merge: Row, references: Sequence[Row], tasks: Sequence[str]) -> Pareto:
    others = [r for r in references if r.label != merge.label]
    return Pareto(tuple(tasks), tuple(r.label for r in others),
                  tuple(r.label for r in others if dominates(r.scores, merge.scores, tasks)))


def references_of(merge: Row, rows: Sequence[Row], specs: Mapping[str, Row]) -> list[Row]:
    """The merge's specialists and the linear average of the same adapter set."""
    own = [specs[a] for a in merge.adapters if a in specs]
    averages = [r for r in rows if r.kind == MERGE and r.linear_average
                and set(r.adapters) == set(merge.adapters)]
    return own + averages


def best_per_set(merges: Sequence[Row], analyses: Mapping[str, MergeAnalysis],
                 specialist_task: Mapping[str, str]) -> list[Best]:
    """For each set of ≥ 2 adapters that some merge covers, its best merge."""
    groups: dict[tuple[str, ...], list[Row]] = {}
    for m in merges:
        if len(set(m.adapters)) >= 2:
            groups.setdefault(tuple(sorted(set(m.adapters))), []).append(m)
    def mean_score(m: Row) -> float:
        tasks = covered_tasks(m, specialist_task)
        return sum(m.scores[t] for t in tasks) / len(tasks) if tasks else 0.0

    def rank(m: Row) -> tuple:  # an undefined retention ranks below every defined one
        worst = analyses[m.label].worst_retention
        return (worst is None, -(worst or 0.0), -mean_score(m), m.label)

    out = []
    for adapters, group in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0])):
        top = min(group, key=rank)
        out.append(Best(adapters, top.label, analyses[top.label].worst_retention,
                        mean_score(top), len(group)))
    return out


def analyze(rows: Sequence[Row], specialist_task: Mapping[str, str], *,
            retention_goal: float = RETENTION_GOAL, specialist_goal: float = SPECIALIST_GOAL,
            base_ceiling: float = BASE_CEILING) -> Analysis:
    """Retention and Pareto status of every merge, the best merge per adapter set,
    one plain line per shortfall, and the issue's goals checked."""
    specs = specialists(rows, specialist_task)
    merges = [r for r in rows if r.kind == MERGE]
    result = Analysis()
    for m in merges:
        tasks = covered_tasks(m, specialist_task)
        result.merges[m.label] = MergeAnalysis(
            m.label,
            retention(m, specs, specialist_task),
            pareto(m, references_of(m, rows, specs), tasks),
            pareto(m, rows, tasks),
        )
    result.best = best_per_set(merges, result.merges, specialist_task)
    result.methods = by_method(merges, result.merges, retention_goal)
    result.shortfalls = shortfalls(result, retention_goal)
    result.goals = goals(rows, specs, specialist_task, result.best, retention_goal=retention_goal,
                         specialist_goal=specialist_goal, base_ceiling=base_ceiling)
    return result


def meets(worst_retention: float | None, goal: float) -> bool:
    return worst_retention is not None and worst_retention >= goal - _EPS


def by_method(merges: Sequence[Row], analyses: Mapping[str, MergeAnalysis],
              retention_goal: float) -> list[MethodSummary]:
    groups: dict[str, list[MergeAnalysis]] = {}
    for m in merges:
        groups.setdefault(m.method or "?", []).append(analyses[m.label])
    out = []
    for method, group in groups.items():
        worst = [a.worst_retention for a in group if a.worst_retention is not None]
        out.append(MethodSummary(
            method, len(group), sum(meets(a.worst_retention, retention_goal) for a in group),
            sum(a.vs_references.optimal for a in group), sum(worst) / len(worst) if worst else None))
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def shortfalls(analysis: Analysis, retention_goal: float) -> list[str]:
    """A plain sentence for every merge that keeps less than retention_goal of a
    specialist's score, cannot be measured, or is dominated by a reference."""
    lines = []
    for m in analysis.merges.values():
        for r in m.retention.values():
            if r.ratio is None:
                lines.append(f"{m.label}: retention of {r.adapter} is undefined (the {r.adapter} "
                             f"specialist scores 0 on {r.task}).")
            elif r.ratio < retention_goal - _EPS:
                lines.append(f"{m.label} keeps {_pct(r.ratio)} of {r.adapter}'s score on {r.task} "
                             f"({r.merge_score:.2f} vs {r.specialist_score:.2f}), under the "
                             f"{_pct(retention_goal)} goal.")
        if m.vs_references.dominated_by:
            lines.append(f"{m.label} is not Pareto-optimal: dominated by "
                         f"{', '.join(m.vs_references.dominated_by)} on {', '.join(m.vs_references.tasks)}.")
    for s in analysis.methods:
        if s.meet_goal < s.merges:
            lines.append(f"{s.method}: {s.meet_goal} of {s.merges} merge(s) keep {_pct(retention_goal)} "
                         f"of every specialist's score (mean worst retention "
                         f"{_pct(s.mean_worst_retention)}).")
    for b in analysis.best:
        if not meets(b.worst_retention, retention_goal):
            lines.append(f"No merge of {' + '.join(b.adapters)} keeps {_pct(retention_goal)} of every "
                         f"specialist's score (best: {b.label}, worst retention "
                         f"{_pct(b.worst_retention)}).")
    return lines


def goals(rows: Sequence[Row], specs: Mapping[str, Row], specialist_task: Mapping[str, str],
          best: Sequence[Best], *, retention_goal: float, specialist_goal: float,
          base_ceiling: float) -> list[Goal]:
    out = []
    for a, row in specs.items():
        t = specialist_task[a]
        out.append(Goal(f"specialist {a} ≥ {_pct(specialist_goal)} on {t}",
                        row.scores[t] >= specialist_goal - _EPS, f"{_pct(row.scores[t])}"))
    base = next((r for r in rows if r.kind == BASE), None)
    if base is not None and base.scores:
        worst = max(base.scores.items(), key=lambda kv: kv[1])
        out.append(Goal(f"base model ≤ {_pct(base_ceiling)} on every task",
                        worst[1] <= base_ceiling + _EPS, f"highest: {worst[0]} {_pct(worst[1])}"))
    for b in best:
        if len(b.adapters) == 2:
            out.append(Goal(f"best merge of {' + '.join(b.adapters)} keeps ≥ {_pct(retention_goal)} "
                            f"of each specialist",
                            meets(b.worst_retention, retention_goal),
                            f"{b.label}: worst retention {_pct(b.worst_retention)}"))
    return out
