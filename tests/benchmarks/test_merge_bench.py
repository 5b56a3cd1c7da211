"""The merge benchmark's table (the timing runs need the default model; see
`python -m loramux.benchmarks.merge`)."""

from __future__ import annotations

from loramux.benchmarks.merge import Samples, mix_spec, parse_args, report


def test_mix_specs_match_the_methods():
    names = ["a", "b", "c", "d"]
    assert mix_spec("slerp", names, 0.5).names == ["a", "b"]
    ties = mix_spec("ties", names, 0.3)
    assert ties.weights == [0.25] * 4 and dict(ties.params) == {"density": 0.3}
    assert dict(mix_spec("linear", names, 0.3).params) == {}


def test_report_puts_goals_next_to_medians():
    args = parse_args(["--rounds", "3"])
    s = Samples(load=[1.0, 2.0])
    for v in (3.0, 1.0, 2.0):
        s.add("ties/exact", v)
        s.add("ties/served", v + 1)
        s.add("ties/peft-ties", 1.0)
    s.served["ties"] = (16, 0.8675)
    for key, v in {"compress/ours": 0.5, "compress/peft-svd": 15.0, "pin/wall": 0.2, "pin/swap": 0.15,
                   "unpin/wall": 0.002, "unpin/swap": 0.001, "cached": 0.0003}.items():
        s.add(key, v)
    text = report(s, args, ["--rounds", "3"])
    assert "python -m loramux.benchmarks.merge --rounds 3" in text
    ties_line = next(line for line in text.splitlines() if line.startswith("ties "))
    assert "2.00 s" in ties_line and "3.00 s" in ties_line and "0.8675" in ties_line
    assert "ours/PEFT 2.00×" in ties_line
    assert "30.0× faster" in text and "≥ 10×" in text
    assert "≤ 300 ms" in text and "0.300 ms" in text and "≤ 1 ms" in text
    assert "1.00 / 2.00" in text
