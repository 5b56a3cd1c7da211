"""`loramux eval`: an end-to-end run on the tiny model with two freshly trained tiny
adapters, the analysis (retention, Pareto, best merge) on hand-made score tables, and
the merge-spec and sweep parsers."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from loramux.errors import InvalidArgument
from loramux.skills import mergespec
from loramux.skills.analysis import ADAPTER, BASE, MERGE, Row, analyze, dominates
from loramux.skills.eval import (
    GENERAL_PROMPTS,
    GENERAL_TEXT,
    EvalConfig,
    Progress,
    add_eval_args,
    cmd_eval,
    configurations,
    read_lines,
    read_paragraphs,
    reference_merges,
    split_to_fit,
)
from loramux.skills.runners import Configuration
from loramux.skills.train import TrainConfig, train

LINEAR = "linear(sql=0.5,json=0.5)"
# The ties merge served at rank 8 loses at most √(1 − 8/64) ≈ 0.94 of a 64-wide module,
# more than the default 1 % error budget, which would refuse it: the runs here allow 0.99.
DENSE_AT_RANK_8 = 0.99
TIES = "ties(sql=1,json=1,density=0.5)"
TASKS = ("sql", "python", "json")


# ============================================================================ end to end


@pytest.fixture(scope="module")
def adapter_root(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-adapters")
    for task in ("sql", "json"):
        # A few steps on one thread: the point is a real PEFT adapter from train.py,
        # not a skill (the tiny random model has none to learn in this time).
        train(TrainConfig(task=task, out=root / task, model=tiny_llama_dir, steps=3, batch_size=2,
                          train_examples=8, validation_examples=2, log_every=3, rank=4, alpha=8,
                          threads=1), log=lambda _: None)
    return root


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_eval_args(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="module")
def run(tiny_llama_dir, adapter_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-report")
    lines: list[str] = []
    args = _args("--model", str(tiny_llama_dir), "--adapter-root", str(adapter_root),
                 "--tasks", ",".join(TASKS), "--merges", "linear:sql=0.5,json=0.5",
                 "ties:sql=1,json=1:density=0.5", "--limit", "2", "--max-tokens", "8",
                 "--general-max-tokens", "8", "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--quantization", "none", "--max-rank", "8",
                 "--threads", "1", "--save-items", "--error-budget", str(DENSE_AT_RANK_8))
    assert cmd_eval(args, log=lines.append) == 0
    return out, json.loads((out / "report.json").read_text()), lines


def test_eval_writes_markdown_json_png_and_items(run):
    out, _, _ = run
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for heading in ("## Task scores", "## Retention", "## Pareto optimality", "## Best merge",
                    "## Where methods fall short", "## General capability", "## Goals"):
        assert heading in md
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    # 5 configurations x (3 tasks x 2 items + 12 general prompts)
    assert len(items) == 5 * (3 * 2 + len(read_lines(GENERAL_PROMPTS)))


def test_eval_scores_every_configuration_on_every_task(run):
    _, report, _ = run
    configs = {c["label"]: c for c in report["configurations"]}
    # The linear merge is the average of sql and json, so no reference is added.
    assert list(configs) == ["base", "sql", "json", LINEAR, TIES]
    assert [c["kind"] for c in configs.values()] == [BASE, ADAPTER, ADAPTER, MERGE, MERGE]
    for c in configs.values():
        assert set(c["scores"]) == set(TASKS)
        assert all(0.0 <= s <= 1.0 for s in c["scores"].values())
        assert c["items"] == {t: 2 for t in TASKS} and c["errors"] == {t: 0 for t in TASKS}
    assert report["meta"]["specialists"] == {"sql": "sql", "json": "json"}
    assert configs[TIES]["served"]["rank"] <= 8  # served through the engine's merge path
    assert configs["base"]["served"] is None


def test_eval_reports_retention_pareto_and_best(run):
    _, report, _ = run
    for label in (LINEAR, TIES):
        m = next(c for c in report["configurations"] if c["label"] == label)
        assert set(m["retention"]) == {"sql", "json"}
        assert {"task", "score", "specialist_score", "retention"} <= set(m["retention"]["sql"])
        assert set(m["pareto"]) >= {"tasks", "references", "optimal", "dominated_by", "on_evaluated_front"}
        assert m["pareto"]["tasks"] == ["sql", "json"]
        assert set(m["pareto"]["references"]) == {"sql", "json"} | ({LINEAR} - {label})
    (best,) = report["best_per_adapter_set"]
    assert best["adapters"] == ["json", "sql"] and best["label"] in (LINEAR, TIES)
    assert best["candidates"] == 2


def test_eval_general_capability_is_measured(run):
    _, report, _ = run
    for c in report["configurations"]:
        g = c["general"]
        assert g["perplexity"] is not None and math.isfinite(g["perplexity"]) and g["perplexity"] > 1
        assert g["tokens"] > 100 and g["prompts"] == len(read_lines(GENERAL_PROMPTS))
        assert 0.0 <= g["same_as_base"] <= 1.0
    base = report["configurations"][0]
    assert base["general"]["same_as_base"] == 1.0
    assert len(report["meta"]["general_prompts"]) == base["general"]["prompts"]


def test_eval_prints_progress(run):
    _, _, lines = run
    progress = [x for x in lines if x.startswith("eval: ") and " items (" in x]
    assert progress and "elapsed" in progress[-1] and "eta" in progress[-1]
    assert progress[-1].startswith("eval: 90/90 items (100%)")


def test_pinned_merges_are_scored_exactly_and_unpinned(tiny_llama_dir, adapter_root, run, tmp_path):
    args = _args("--model", str(tiny_llama_dir), "--adapter-root", str(adapter_root),
                 "--tasks", "json", "--adapters", "sql,json", "--merges", "ties:sql=1,json=1:density=0.5",
                 "--no-linear-reference", "--limit", "1", "--max-tokens", "4", "--general-max-tokens", "8",
                 "--out", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--quantization", "none",
                 "--max-rank", "8", "--threads", "1", "--pin-merges")
    assert cmd_eval(args, log=lambda _: None) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    base, _, _, ties = report["configurations"]
    assert ties["label"] == TIES and ties["served"]["pinned"] and ties["served"]["rel_error"] == 0.0
    assert math.isfinite(ties["general"]["perplexity"])
    # Every configuration after the pin ran on restored weights: the base scores as before.
    _, first, _ = run
    assert base["general"]["perplexity"] == pytest.approx(first["configurations"][0]["general"]["perplexity"])
    assert "pinned (exact ΔW)" in (tmp_path / "report.md").read_text()


def test_eval_against_a_running_server_matches_in_process(tiny_llama_dir, adapter_root, run, tmp_path):
    from loramux.app import build_engine
    from loramux.config import AdapterConfig, EngineConfig, MergeConfig, ModelConfig, ServerConfig
    from loramux.service.main import ServerThread

    engine_cfg = EngineConfig(model=ModelConfig(path=tiny_llama_dir, device="cpu", dtype="float32"),
                              adapters=AdapterConfig(roots=[adapter_root], max_rank=8),
                              merges=MergeConfig(error_budget=DENSE_AT_RANK_8))
    server_cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5).validate()
    with ServerThread(server_cfg, lambda: build_engine(engine_cfg)) as server:
        args = _args("--server", server.address, "--tasks", ",".join(TASKS), "--merges",
                     "linear:sql=0.5,json=0.5", "ties:sql=1,json=1:density=0.5", "--limit", "2",
                     "--max-tokens", "8", "--general-max-tokens", "8", "--out", str(tmp_path))
        assert cmd_eval(args, log=lambda _: None) == 0
    remote = json.loads((tmp_path / "report.json").read_text())
    _, local, _ = run
    assert remote["meta"]["mode"] == "server" and remote["meta"]["adapters"] == ["sql", "json"]
    # Same greedy answers through gRPC as in-process (merges served at the same rank).
    assert remote["meta"]["general_prompts"] == local["meta"]["general_prompts"]
    for r, l in zip(remote["configurations"], local["configurations"], strict=True):
        assert (r["label"], r["scores"]) == (l["label"], l["scores"])
        assert r["general"]["same_as_base_count"] == l["general"]["same_as_base_count"]
        assert r["general"]["perplexity"] is None  # the API has no log-probabilities
        assert (r["served"] is None) == (l["served"] is None)
    assert "not measured: the gRPC API has no log-probabilities" in (tmp_path / "report.md").read_text()


def test_loramux_eval_subcommand_is_wired():
    from loramux import cli

    args = cli.build_parser(command="eval").parse_args(["eval", "--limit", "3", "--pairs-all"])
    assert args.func is cmd_eval and args.limit == 3 and args.pairs_all


def test_eval_refuses_unknown_adapters_in_merges(adapter_root, tmp_path):
    with pytest.raises(InvalidArgument, match="not evaluated"):
        cmd_eval(_args("--adapter-root", str(adapter_root), "--merges", "linear:sql=1,python=1",
                       "--out", str(tmp_path)))


# ============================================================================ analysis


def _table(**extra: dict) -> list[Row]:
    rows = [
        Row("base", BASE, (), {"sql": 0.0, "json": 0.05}),
        Row("sql", ADAPTER, ("sql",), {"sql": 0.80, "json": 0.0}),
        Row("json", ADAPTER, ("json",), {"sql": 0.0, "json": 0.90}),
        Row("avg", MERGE, ("sql", "json"), {"sql": 0.60, "json": 0.70}, True, "linear"),
        Row("ties", MERGE, ("sql", "json"), {"sql": 0.76, "json": 0.88}, method="ties"),
        # below the average on both tasks; below the sql specialist on its task
        Row("weak", MERGE, ("sql", "json"), {"sql": 0.50, "json": 0.60}, method="dare_ties"),
        Row("sqlish", MERGE, ("sql", "json"), {"sql": 0.70, "json": 0.0}, method="dare_ties"),
    ]
    return rows + [Row(k, MERGE, ("sql", "json"), v, method="ties") for k, v in extra.items()]


SPECIALISTS = {"sql": "sql", "json": "json"}


def test_dominates_needs_one_strict_gain():
    assert dominates({"a": 1, "b": 1}, {"a": 1, "b": 0.5}, ["a", "b"])
    assert not dominates({"a": 1, "b": 1}, {"a": 1, "b": 1}, ["a", "b"])  # equal: no
    assert not dominates({"a": 1, "b": 0}, {"a": 0, "b": 1}, ["a", "b"])  # a trade-off
    assert dominates({"a": 1, "b": 0}, {"a": 0, "b": 1}, ["a"])  # only the tasks given count
    assert not dominates({"a": 1}, {"a": 0}, [])


def test_retention_is_merge_over_specialist():
    a = analyze(_table(), SPECIALISTS)
    ties = a.merges["ties"].retention
    assert ties["sql"].ratio == pytest.approx(0.76 / 0.80)
    assert ties["json"].ratio == pytest.approx(0.88 / 0.90)
    assert ties["sql"].task == "sql" and ties["sql"].specialist_score == 0.80
    assert a.merges["ties"].worst_retention == pytest.approx(0.95)
    assert a.merges["avg"].worst_retention == pytest.approx(0.60 / 0.80)


def test_pareto_against_specialists_and_linear_average():
    a = analyze(_table(), SPECIALISTS)
    ties, weak, sqlish, avg = (a.merges[k] for k in ("ties", "weak", "sqlish", "avg"))
    assert ties.vs_references.optimal and ties.vs_references.references == ("sql", "json", "avg")
    assert ties.vs_evaluated.optimal
    assert not weak.vs_references.optimal and weak.vs_references.dominated_by == ("avg",)
    assert not sqlish.vs_references.optimal and sqlish.vs_references.dominated_by == ("sql",)
    # The average is compared with the specialists only (not with itself), and ties
    # beats it on both tasks, so it is off the evaluated front.
    assert avg.vs_references.references == ("sql", "json") and avg.vs_references.optimal
    assert not avg.vs_evaluated.optimal and "ties" in avg.vs_evaluated.dominated_by


def test_best_merge_per_set_maximises_worst_retention():
    a = analyze(_table(), SPECIALISTS)
    (best,) = a.best
    assert best.adapters == ("json", "sql") and best.label == "ties" and best.candidates == 4
    assert best.worst_retention == pytest.approx(0.95)
    assert best.mean_score == pytest.approx((0.76 + 0.88) / 2)
    # Equal worst retention: the higher mean score wins.
    b = analyze(_table(t2={"sql": 0.76, "json": 0.90}), SPECIALISTS)
    assert b.best[0].label == "t2"


def test_shortfalls_and_goals_say_what_falls_short():
    a = analyze(_table(), SPECIALISTS)
    text = "\n".join(a.shortfalls)
    assert "weak keeps 62% of sql's score on sql" in text
    assert "weak is not Pareto-optimal: dominated by avg" in text
    assert "sqlish keeps 0% of json's score on json" in text
    assert not any(line.startswith("ties") for line in a.shortfalls)  # 95% and 98%: fine
    assert not any(line.startswith("No merge") for line in a.shortfalls)
    assert "dare_ties: 0 of 2 merge(s) keep 90% of every specialist's score" in text
    assert "linear: 0 of 1 merge(s)" in text
    goals = {g.text: g.met for g in a.goals}
    assert goals["specialist sql ≥ 80% on sql"] and goals["specialist json ≥ 80% on json"]
    assert goals["base model ≤ 10% on every task"]
    assert goals["best merge of json + sql keeps ≥ 90% of each specialist"]


def test_summary_by_method():
    methods = {m.method: m for m in analyze(_table(), SPECIALISTS).methods}
    assert list(methods) == ["linear", "ties", "dare_ties"]
    assert (methods["ties"].merges, methods["ties"].meet_goal, methods["ties"].pareto_optimal) == (1, 1, 1)
    dare = methods["dare_ties"]
    assert (dare.merges, dare.meet_goal, dare.pareto_optimal) == (2, 0, 0)
    assert dare.mean_worst_retention == pytest.approx((0.5 / 0.8 + 0.0) / 2)


def test_undefined_retention_and_no_good_merge():
    rows = [Row("base", BASE, (), {"sql": 0.0, "json": 0.0}),
            Row("sql", ADAPTER, ("sql",), {"sql": 0.0, "json": 0.0}),  # learned nothing
            Row("json", ADAPTER, ("json",), {"sql": 0.0, "json": 0.5}),
            Row("m", MERGE, ("sql", "json"), {"sql": 0.0, "json": 0.25})]
    a = analyze(rows, SPECIALISTS)
    assert a.merges["m"].retention["sql"].ratio is None
    assert a.merges["m"].worst_retention == pytest.approx(0.5)
    assert any("retention of sql is undefined" in s for s in a.shortfalls)
    assert any(s.startswith("No merge of json + sql keeps 90%") for s in a.shortfalls)
    assert not {g.text: g.met for g in a.goals}["specialist sql ≥ 80% on sql"]


def test_report_renders_from_hand_made_analysis(tmp_path):
    from loramux.skills import report

    rows = _table()
    entries = [{"label": r.label, "kind": r.kind, "adapters": list(r.adapters), "method": r.method,
                "scores": dict(r.scores),
                "correct": {t: int(100 * s) for t, s in r.scores.items()}, "items": {"sql": 100, "json": 100},
                "errors": {"sql": 0, "json": 0}, "first_error": None, "served": None,
                "general": {"perplexity": 10.0 + i, "tokens": 900, "same_as_base": 1.0,
                            "same_as_base_count": 12, "prompts": 12}}
               for i, r in enumerate(rows)]
    meta = {"tasks": ["sql", "json"], "adapters": ["sql", "json"], "specialists": SPECIALISTS,
            "retention_goal": 0.9, "mode": "in-process", "device": "cpu", "model": "m", "split": "test",
            "items_per_task": {"sql": 100, "json": 100}, "data_seed": 0, "decoding": "greedy",
            "max_tokens": 8, "general_max_tokens": 8, "started": "now", "seconds": 1.0,
            "general_text": {"file": "f", "pieces": 3}, "general_prompts": [], "command": None}
    rep = report.build(meta, entries, analyze(rows, SPECIALISTS))
    paths = report.write(rep, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    md = paths[1].read_text()
    assert "| weak | sql, json | **no** | avg | no |" in md
    assert "| json + sql | ties | 95% |" in md
    assert "- weak is not Pareto-optimal: dominated by avg on sql, json." in md
    assert "| dare_ties | 2 | 0 | 0 | 31% |" in md
    # The JSON renders again on its own.
    assert report.main([str(paths[0])]) == 0


# ============================================================================ specs


def test_parse_merge_reads_method_weights_params_and_seed():
    spec = mergespec.parse_merge("ties:sql=1,json=1:density=0.5")
    assert spec.method == "ties" and spec.adapters == (("sql", 1.0), ("json", 1.0))
    assert dict(spec.params) == {"density": 0.5} and spec.seed == 0
    assert mergespec.label(spec) == TIES
    d = mergespec.parse_merge(" dare_ties:a=1,b=-0.5:density=0.3,majority_sign_method=frequency,seed=7 ")
    assert d.seed == 7 and dict(d.params) == {"density": 0.3, "majority_sign_method": "frequency"}
    assert mergespec.label(d).endswith(",seed=7)")
    assert dict(mergespec.parse_merge("linear:a=1,b=1:normalize=true").params) == {"normalize": True}
    assert mergespec.parse_merge("linear:a=0.5,b=0.5").params == ()


@pytest.mark.parametrize("text, message", [
    ("", "separated by ':'"),
    ("ties", "separated by ':'"),
    ("a:b:c:d", "separated by ':'"),
    ("bogus:a=1", "unknown method 'bogus'"),
    ("linear:a", "adapter 'a' is not KEY=VALUE"),
    ("linear:a=1,", "adapter '' is not KEY=VALUE"),
    ("linear:a=x", "weight of 'a' is not a number"),
    ("linear:a=1,a=2", "names an adapter twice"),
    ("linear:a/b=1", "adapter name 'a/b'"),
    ("linear:a=nan", "not finite"),
    ("ties:a=1,b=1", "needs parameter 'density'"),
    ("ties:a=1,b=1:density=0", "density"),
    ("ties:a=1,b=1:density=1.5", "density"),
    ("ties:a=1,b=1:density", "parameter 'density' is not KEY=VALUE"),
    ("ties:a=1:foo=1,density=0.5", "no parameter 'foo'"),
    ("slerp:a=1,b=1,c=1:t=0.5", "exactly 2"),
    ("dare_ties:a=1,b=1:density=0.5,seed=x", "seed must be an integer"),
])
def test_parse_merge_errors_are_clear(text, message):
    with pytest.raises(InvalidArgument, match="merge spec") as e:
        mergespec.parse_merge(text)
    assert message in str(e.value)


def test_sweeps_cover_every_pair_per_value():
    names = ["sql", "python", "json"]
    ties = mergespec.expand_sweep(mergespec.parse_sweep("ties.density=0.3,0.5,0.7"), names)
    assert len(ties) == 3 * 3 and {s.method for s in ties} == {"ties"}
    assert sorted({dict(s.params)["density"] for s in ties}) == [0.3, 0.5, 0.7]
    assert {tuple(s.names) for s in ties} == {("sql", "python"), ("sql", "json"), ("python", "json")}
    assert all(s.weights == [1.0, 1.0] for s in ties)
    lin = mergespec.expand_sweep(mergespec.parse_sweep("linear.weight=0.3"), ["a", "b"])
    assert [s.weights for s in lin] == [[0.3, 0.7]] and lin[0].params == ()
    scaled = mergespec.expand_sweep(mergespec.parse_sweep("linear.scale=1"), ["a", "b"])
    assert scaled[0].weights == [1.0, 1.0]
    (slerp,) = mergespec.expand_sweep(mergespec.parse_sweep("slerp.t=0.25"), ["a", "b"])
    assert dict(slerp.params) == {"t": 0.25} and slerp.weights == [1.0, 1.0]
    (dare,) = mergespec.expand_sweep(mergespec.parse_sweep("dare_ties.weight=0.6"), ["a", "b"])
    assert dict(dare.params) == {"density": 0.5} and dare.weights == [0.6, pytest.approx(0.4)]


@pytest.mark.parametrize("text, message", [
    ("ties.density", "expected METHOD.KEY=V1,V2"),
    ("ties=0.3", "expected METHOD.KEY=V1,V2"),
    ("nope.t=1", "unknown method 'nope'"),
    ("ties.t=0.5", "ties has no parameter 't'; sweepable: density, majority_sign_method, weight, scale"),
    ("linear.weight=a", "weight values must be numbers"),
    ("ties.density=", "at least one value"),
])
def test_sweep_errors_are_clear(text, message):
    with pytest.raises(InvalidArgument, match="sweep") as e:
        mergespec.parse_sweep(text)
    assert message in str(e.value)


def test_sweep_value_out_of_range_fails_on_expansion():
    with pytest.raises(InvalidArgument, match="ties of a\\+b.*density"):
        mergespec.expand_sweep(mergespec.parse_sweep("ties.density=0"), ["a", "b"])


def test_pairs_all_and_the_linear_average():
    specs = mergespec.pairs_all(["sql", "python", "json"])
    assert len(specs) == 3 * 4 + 1
    assert [s.method for s in specs[:4]] == ["linear", "ties", "dare_ties", "slerp"]
    karcher = specs[-1]
    assert karcher.method == "karcher" and karcher.names == ["sql", "python", "json"]
    assert karcher.weights == [pytest.approx(1 / 3)] * 3
    assert mergespec.is_linear_average(specs[0])
    assert [s.method for s in mergespec.pairs_all(["a", "b"])] == ["linear", "ties", "dare_ties", "slerp"]
    assert not mergespec.is_linear_average(mergespec.parse_merge("linear:a=1,b=1"))
    assert mergespec.is_linear_average(mergespec.parse_merge("linear:a=2,b=2:normalize=true"))
    assert not mergespec.is_linear_average(mergespec.parse_merge("ties:a=0.5,b=0.5:density=0.5"))


def test_merge_files_toml_and_json(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('merges = ["linear:a=0.5,b=0.5"]\n\n[[merges]]\nmethod = "ties"\n'
                    'adapters = {a = 1, b = 1}\nparams = {density = 0.4}\nseed = 2\n')
    with pytest.raises(InvalidArgument, match="does not parse"):  # mixed array and table
        mergespec.load_merge_file(toml)
    toml.write_text('[[merges]]\nmethod = "ties"\nadapters = {a = 1, b = 1}\nparams = {density = 0.4}\n'
                    'seed = 2\n\n[[merges]]\nadapters = {a = 0.5, b = 0.5}\n')
    ties, lin = mergespec.load_merge_file(toml)
    assert ties.method == "ties" and dict(ties.params) == {"density": 0.4} and ties.seed == 2
    assert lin.method == "linear" and mergespec.is_linear_average(lin)
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"merges": ["slerp:a=1,b=1:t=0.3", {"method": "karcher",
                                                                   "adapters": {"a": 0.5, "b": 0.5}}]}))
    assert [s.method for s in mergespec.parse_merges([str(js), "linear:a=1,b=0"])] == [
        "slerp", "karcher", "linear"]


@pytest.mark.parametrize("content, message", [
    ("{}", "non-empty list `merges`"),
    ('{"merges": [{"method": "ties", "adapters": {"a": 1}, "density": 0.5}]}', "unknown key(s) ['density']"),
    ('{"merges": [{"adapters": {"a": "x"}}]}', "every adapter weight must be a number"),
    ('{"merges": [{"adapters": []}]}', "`adapters` must be a table"),
    ('{"merges": [{"adapters": {"a": 1}, "method": "ties"}]}', "entry 1: ties needs parameter 'density'"),
    ('{"merges": ["linear:a=1", "ties:a"]}', "entry 2: merge spec 'ties:a'"),
    ("not json", "does not parse"),
])
def test_merge_file_errors_are_clear(tmp_path, content, message):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match="merge file") as e:
        mergespec.load_merge_file(path)
    assert message in str(e.value)
    with pytest.raises(InvalidArgument, match="cannot read"):
        mergespec.load_merge_file(tmp_path / "missing.toml")


def test_configurations_add_the_linear_reference_once():
    ties = mergespec.parse_merge("ties:json=1,sql=1:density=0.5")
    refs = reference_merges([ties, mergespec.parse_merge("slerp:sql=1,json=1:t=0.5")], ["sql", "json"])
    assert [mergespec.label(r) for r in refs] == [LINEAR]
    cfg = EvalConfig(adapters=("sql", "json"), merges=(ties,), engine=None, server="x:1")
    labels = [c.label for c in configurations(cfg)]
    assert labels == ["base", "sql", "json", "ties(json=1,sql=1,density=0.5)", LINEAR]
    cfg.add_references = False
    assert len(configurations(cfg)) == 4
    with pytest.raises(InvalidArgument, match=r"names adapter\(s\) \['python'\]"):
        EvalConfig(adapters=("sql",), merges=(mergespec.parse_merge("linear:sql=1,python=1"),)).validate()
    assert Configuration("m", MERGE, mix=ties).adapters == ("json", "sql")
    with pytest.raises(InvalidArgument, match="both be called 'base'"):
        configurations(EvalConfig(adapters=("base",)))


def test_pairs_need_two_adapters(adapter_root, tmp_path):
    with pytest.raises(InvalidArgument, match="pairs of adapters; evaluating 1 \\(sql\\)"):
        cmd_eval(_args("--adapter-root", str(adapter_root), "--tasks", "sql,python", "--pairs-all"))
    with pytest.raises(InvalidArgument, match="--adapter-root .* is not a directory"):
        cmd_eval(_args("--adapter-root", str(tmp_path / "nope")))


# ============================================================================ data, progress


def test_general_data_ships_enough_text_and_prompts():
    paragraphs = read_paragraphs(GENERAL_TEXT)
    assert len(paragraphs) >= 8 and 3000 <= sum(map(len, paragraphs)) <= 6000
    assert not any(p.startswith("#") for p in paragraphs)
    assert 8 <= len(read_lines(GENERAL_PROMPTS)) <= 15


def test_split_to_fit_cuts_at_sentences():
    words = len  # one "token" per character
    text = "One two. Three four five. Six."
    assert split_to_fit([text], words, 100) == [text]
    assert split_to_fit([text], words, 20) == ["One two.", "Three four five.", "Six."]
    assert split_to_fit(["A very long sentence here. Ok."], words, 5) == ["Ok."]


def test_progress_prints_count_elapsed_and_eta():
    now = [0.0]
    lines: list[str] = []
    p = Progress(4, lines.append, every=5.0, clock=lambda: now[0])
    now[0] = 10.0
    p.advance("base")
    now[0] = 12.0
    p.advance()  # within 5 s of the last line: quiet
    now[0] = 40.0
    p.advance()
    p.advance()  # the last item always prints
    assert lines == ["eval: 1/4 items (25%)  elapsed 0m10s  eta 0m30s  [base]",
                     "eval: 3/4 items (75%)  elapsed 0m40s  eta 0m13s",
                     "eval: 4/4 items (100%)  elapsed 0m40s  eta 0m00s"]
