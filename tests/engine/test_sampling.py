"""Sampling: processed scores against HF's own logits processors, seeds, validation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loramux.engine.sampling import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    NONFINITE_LOGITS,
    RowFailure,
    RowSampler,
    SamplingParams,
    process_logits,
    sample_next,
)
from loramux.errors import InvalidArgument

V = 1000
CPU = torch.device("cpu")


def random_logits(n: int, seed: int, vocab: int = V, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale  # [N, V]


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """What HF `generate` builds for these parameters, in its order."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:  # do_sample=True
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    return procs


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice([0, 0, 1, 5, 50, 2 * V]),
        top_p=rng.choice([1.0, 1.0, 0.05, 0.5, 0.9, 0.99]),
        repetition_penalty=rng.choice([1.0, 1.0, 0.8, 1.2, 2.0]),
        seed=rng.randrange(2**32),
    )


def make_row(p: SamplingParams, rng: random.Random, n_generated: int = 5):
    """A row with a random prompt and some observed tokens; returns (row, all ids)."""
    prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 30))]
    row = RowSampler(p, prompt, V, CPU)
    generated = [rng.randrange(V) for _ in range(n_generated)]
    for t in generated:
        row.observe(t)
    return row, prompt + generated


def assert_same_scores(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens filtered"
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_process_logits_matches_hf_processors_on_a_mixed_batch():
    rng = random.Random(0)
    params = [random_params(rng) for _ in range(60)]
    made = [make_row(p, rng) for p in params]
    rows = [r for r, _ in made]
    logits = random_logits(len(rows), seed=1)
    ours = process_logits(logits, rows)  # [N, V]
    for i, (p, (_, ids)) in enumerate(zip(params, made)):
        ref = hf_processors(p)(torch.tensor([ids]), logits[i : i + 1].clone())[0]
        assert_same_scores(ours[i], ref)


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, top_p=1e-6),  # keeps only the top token
        SamplingParams(temperature=0.5, top_k=V + 7),  # k beyond the vocab
        SamplingParams(temperature=0.0, repetition_penalty=1.5),  # greedy: penalty only
        SamplingParams(temperature=2.0, top_p=0.3, repetition_penalty=0.5),
    ],
)
def test_each_setting_matches_hf(p):
    rng = random.Random(3)
    row, ids = make_row(p, rng, n_generated=20)
    logits = random_logits(1, seed=4)
    ref = hf_processors(p)(torch.tensor([ids]), logits.clone())
    assert_same_scores(process_logits(logits, [row]), ref)


def test_process_logits_leaves_input_alone_and_accepts_bfloat16():
    rng = random.Random(5)
    rows = [make_row(random_params(rng), rng)[0] for _ in range(8)]
    logits = random_logits(8, seed=6)
    before = logits.clone()
    ours = process_logits(logits, rows)
    assert torch.equal(logits, before)
    half = logits.bfloat16()
    assert torch.equal(process_logits(half, rows), process_logits(half.float(), rows))
    assert ours.dtype == torch.float32


def test_greedy_is_argmax():
    logits = random_logits(16, seed=7)
    rows = [RowSampler(SamplingParams(), [1, 2, 3], V, CPU) for _ in range(16)]
    assert sample_next(logits, rows) == logits.argmax(-1).tolist()
    assert sample_next(logits.bfloat16(), rows) == logits.bfloat16().argmax(-1).tolist()


def test_greedy_with_repetition_penalty_is_argmax_of_penalized_scores():
    rng = random.Random(8)
    p = SamplingParams(repetition_penalty=3.0)
    made = [make_row(p, rng, n_generated=50) for _ in range(6)]
    logits = random_logits(6, seed=9)
    # Make each row's raw argmax a seen token so the penalty has to move it.
    for i, (_, ids) in enumerate(made):
        logits[i, ids[0]] = logits[i].max() + 0.1
    got = sample_next(logits, [r for r, _ in made])
    for i, (_, ids) in enumerate(made):
        ref = RepetitionPenaltyLogitsProcessor(3.0)(torch.tensor([ids]), logits[i : i + 1].clone())
        assert got[i] == ref.argmax(-1).item()
    assert got != logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy():
    logits = random_logits(12, seed=10, scale=0.1)  # flat: sampling would wander
    rows = [
        RowSampler(SamplingParams(temperature=1.3, top_k=1, seed=s), [], V, CPU) for s in range(12)
    ]
    for _ in range(5):
        assert sample_next(logits, rows) == logits.argmax(-1).tolist()


def sample_sequence(p: SamplingParams, steps: int = 30, batch_mates: int = 0) -> list[int]:
    """Tokens one seeded row draws over `steps` steps, optionally beside other rows."""
    rng = random.Random(99)
    row = RowSampler(p, [1, 2, 3], V, CPU)
    others = [RowSampler(random_params(rng), [4, 5], V, CPU) for _ in range(batch_mates)]
    out = []
    for step in range(steps):
        logits = random_logits(1 + batch_mates, seed=1000 + step, scale=0.5)
        logits[batch_mates] = random_logits(1, seed=step, scale=0.5)[0]  # our row's logits
        tok = sample_next(logits, others + [row])[batch_mates]
        row.observe(tok)
        out.append(tok)
    return out


def test_same_seed_same_tokens_different_seed_different_tokens():
    p = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1234)
    first = sample_sequence(p)
    assert sample_sequence(p) == first
    other = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=4321)
    assert sample_sequence(other) != first


def test_seeded_row_does_not_depend_on_its_batch_mates():
    p = SamplingParams(temperature=0.9, top_k=100, seed=77)
    assert sample_sequence(p, batch_mates=5) == sample_sequence(p)


def test_unseeded_rows_draw_and_record_a_random_seed():
    a = RowSampler(SamplingParams(temperature=1.0), [], V, CPU)
    b = RowSampler(SamplingParams(temperature=1.0), [], V, CPU)
    assert a.seed != b.seed
    again = RowSampler(SamplingParams(temperature=1.0, seed=a.seed), [], V, CPU)
    logits = random_logits(1, seed=11, scale=0.1)
    assert [sample_next(logits, [a])[0] for _ in range(10)] == [
        sample_next(logits, [again])[0] for _ in range(10)
    ]


def test_sample_frequencies_follow_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]])  # [1, 5]
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    row = RowSampler(p, [], 5, CPU)
    probs = torch.softmax(process_logits(logits, [row])[0], -1)
    n = 4000
    draws = torch.tensor([sample_next(logits, [row])[0] for _ in range(n)])  # [n]
    counts = torch.bincount(draws, minlength=5)
    assert counts[probs == 0].sum() == 0
    # Binomial standard error is at most 0.008 here; 5 sigma.
    assert torch.allclose(counts / n, probs, atol=0.04)


def test_seen_mask_covers_prompt_and_generated_and_ignores_out_of_vocab_ids():
    row = RowSampler(SamplingParams(repetition_penalty=1.2), [3, 3, 7, V + 5, -1], V, CPU)
    row.observe(9)
    row.observe(V + 1)
    assert row.seen.nonzero().flatten().tolist() == [3, 7, 9]
    assert RowSampler(SamplingParams(), [3], V, CPU).seen is None  # no penalty, no mask


def test_valid_params_pass():
    SamplingParams().validate(128)
    SamplingParams(
        max_new_tokens=1, temperature=0.5, top_k=1, top_p=1.0, repetition_penalty=0.5,
        seed=2**64 - 1, stop=("x" * MAX_STOP_CHARS,) * MAX_STOP_STRINGS,
    ).validate(1)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens must be between 1 and 128"),
        (SamplingParams(max_new_tokens=129), "max_new_tokens must be between 1 and 128, got 129"),
        (SamplingParams(temperature=-0.1), "temperature must be a finite number >= 0"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(temperature=math.inf), "temperature"),
        (SamplingParams(top_k=-1), "top_k must be >= 0"),
        (SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
        (SamplingParams(top_p=1.5), "top_p must be in (0, 1]"),
        (SamplingParams(top_p=math.nan), "top_p"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be between 0.01 and 100"),
        (SamplingParams(repetition_penalty=-1.0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
        (SamplingParams(repetition_penalty=math.nan), "repetition_penalty"),
        (SamplingParams(repetition_penalty=1e-38), "got 1e-38"),
        (SamplingParams(repetition_penalty=1e3), "repetition_penalty"),
        (SamplingParams(seed=-1), "seed must be between 0 and 2**64 - 1"),
        (SamplingParams(seed=2**64), "seed"),
        (SamplingParams(stop=("a",) * (MAX_STOP_STRINGS + 1)), f"at most {MAX_STOP_STRINGS} stop"),
        (SamplingParams(stop=("ok", "")), "stop string 1 is empty"),
        (SamplingParams(stop=("x" * (MAX_STOP_CHARS + 1),)), f"the limit is {MAX_STOP_CHARS}"),
    ],
)
def test_validate_rejects_bad_params(params, message):
    with pytest.raises(InvalidArgument) as exc:
        params.validate(128)  # the default max_new_tokens is within it
    assert message in str(exc.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_is_reproducible():
    dev = torch.device("cuda")
    rng = random.Random(12)
    params = [random_params(rng) for _ in range(16)]
    prompts = [[rng.randrange(V) for _ in range(10)] for _ in params]
    logits = random_logits(len(params), seed=13)
    cpu_rows = [RowSampler(p, ids, V, CPU) for p, ids in zip(params, prompts)]
    gpu_rows = [RowSampler(p, ids, V, dev) for p, ids in zip(params, prompts)]
    ours = process_logits(logits.to(dev), gpu_rows).cpu()
    ref = process_logits(logits, cpu_rows)
    # CUDA divides by a scalar as a multiply by its reciprocal: equal up to rounding.
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours, ref)
    again = [RowSampler(p, ids, V, dev) for p, ids in zip(params, prompts)]
    assert sample_next(logits.to(dev), gpu_rows) == sample_next(logits.to(dev), again)


# ---- a row is isolated: extreme values and non-finite logits ----------------------


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-6])
def test_tiny_temperatures_are_greedy(temperature):
    """Below 1e-5 a temperature is the argmax, its limit; float32 division by a
    subnormal would otherwise overflow and feed NaN to the multinomial."""
    logits = random_logits(4, seed=11)
    rows = [RowSampler(SamplingParams(temperature=temperature, top_p=0.9, seed=i), [], V, CPU) for i in range(4)]
    assert sample_next(logits, rows) == logits.argmax(-1).tolist()


def test_warped_scores_that_overflow_take_their_limit():
    """Finite but huge logits over a small temperature overflow to +inf in float32;
    that row takes its argmax instead of raising inside torch.multinomial."""
    logits = random_logits(3, seed=12)
    logits[1, 7] = 3e38
    rows = [RowSampler(SamplingParams(temperature=0.5, seed=i), [], V, CPU) for i in range(3)]
    again = [RowSampler(SamplingParams(temperature=0.5, seed=i), [], V, CPU) for i in range(3)]
    got = sample_next(logits, rows)
    assert got[1] == 7
    clean = logits.clone()
    clean[1] = 0.0
    expected = sample_next(clean, again)  # the other rows draw exactly as without it
    assert [got[0], got[2]] == [expected[0], expected[2]]


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("sampled", [False, True])
def test_nonfinite_logits_fail_only_their_row(poison, sampled):
    logits = random_logits(4, seed=13)
    params = SamplingParams(temperature=0.8 if sampled else 0.0, seed=5)
    poisoned = logits.clone()
    poisoned[2, :: 3] = poison  # a row of an adapter whose weights overflow
    rows = [RowSampler(params, [], V, CPU) for _ in range(4)]
    again = [RowSampler(params, [], V, CPU) for _ in range(4)]
    got = sample_next(poisoned, rows)
    assert isinstance(got[2], RowFailure) and got[2].message == NONFINITE_LOGITS
    expected = sample_next(logits, again)
    assert [got[i] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]


def test_all_nan_rows_fail_with_repetition_penalty_and_top_k():
    logits = torch.full((2, V), math.nan)
    rows = [RowSampler(SamplingParams(temperature=1.0, top_k=5, top_p=0.5, repetition_penalty=1.3, seed=1),
                       [1, 2, 3], V, CPU) for _ in range(2)]
    assert all(isinstance(t, RowFailure) for t in sample_next(logits, rows))
