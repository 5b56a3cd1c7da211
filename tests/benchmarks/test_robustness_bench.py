"""The robustness benchmark end to end on the tiny model (the figures in the README
come from the default model: `python -m loramux.benchmarks.robustness`)."""

from __future__ import annotations

import argparse

from loramux.benchmarks.robustness import run


def test_robustness_report_on_the_tiny_model(tiny_llama_dir):
    report = run(argparse.Namespace(model=str(tiny_llama_dir), streams=2, long_tokens=160,
                                    shutdown_streams=3, shutdown_max_tokens=200,
                                    grace_seconds=2.0))
    hol = report["head_of_line"]
    assert hol["max_gap_ms"] >= hol["median_gap_ms"] > 0
    assert report["oversized_prompt_refused_seconds"] < 5
    for kind, outcome in report["poison"].items():
        assert outcome["victims_ok"] == "4/4", kind
        assert "INTERNAL" not in outcome["poison"] and "UNKNOWN" not in outcome["poison"], kind
    assert report["poisonous_adapter"]["status"] == "INVALID_ARGUMENT"
    assert set(report["mix_merge"]) == {"ties x2", "ties x4", "ties x8"}
    assert report["idle_after"] is True
    shutdown = report["shutdown"]
    # Whether the tiny model's streams end before the grace depends on the machine;
    # either way each ends OK or with a final message, and the exit is in time.
    assert shutdown["exit_code"] == 0 and sum(shutdown["streams"].values()) == 3
    assert set(shutdown["streams"]) <= {"OK", "UNAVAILABLE after a final message"}, shutdown
    assert shutdown["exit_seconds"] <= 2.0 + 1.5
