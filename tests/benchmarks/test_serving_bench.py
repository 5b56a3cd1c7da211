"""`loramux bench` end to end on the tiny model: a real in-process server loaded
over gRPC, and the PEFT baseline, in one short run."""

from __future__ import annotations

import argparse
import json

import pytest

from loramux.benchmarks.serving import add_bench_args, cmd_bench, plan_requests
from loramux.errors import InvalidArgument


def run_bench_json(capsys, *flags: str) -> dict:
    p = argparse.ArgumentParser()
    add_bench_args(p)
    assert cmd_bench(p.parse_args([*flags, "--json"])) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_reports_both_systems(capsys, tiny_llama_dir, adapter_root):
    clients, requests, max_tokens = 2, 2, 4
    report = run_bench_json(
        capsys, "--model", str(tiny_llama_dir), "--adapter-root", str(adapter_root),
        "--adapter-names", "x,y,z", "--clients", str(clients), "--requests", str(requests),
        "--max-tokens", str(max_tokens), "--rounds", "1",
    )
    for system in ("loramux", "baseline"):
        figures = report[system]
        assert figures["tokens_per_s"] > 0
        assert figures["tokens"] == clients * requests * max_tokens
        assert figures["ttft_p50_ms"] > 0 and figures["itl_p99_ms"] >= figures["itl_p50_ms"] > 0
    assert report["ratio"] > 0
    assert report["adapters"] == ["x", "y", "z"]


def test_plan_round_robin_and_mix_share():
    plan = plan_requests(["a", "b", "c"], clients=2, requests=3, mix_fraction=0.5)
    flat = [plan[c][j] for j in range(3) for c in range(2)]  # global request order
    assert sum(s.mix is not None for s in flat) == 3
    assert [s.adapter for s in flat if s.mix is None] == ["a", "c", "b"]
    assert [s.mix for s in flat if s.mix is not None] == [("b", "c"), ("a", "b"), ("c", "a")]
    assert all(s.mix is None for row in plan_requests(["a"], 2, 2, 0.0) for s in row)
    with pytest.raises(InvalidArgument):
        plan_requests(["a"], 1, 1, 0.5)
