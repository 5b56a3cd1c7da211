"""Per-request sampling parameters and the batched next-token sampler.

Semantics (per row, matching HF `generate` with the same parameters):
    scores = logits                                  # [V]
    if repetition_penalty != 1:                      # CTRL, arXiv:1909.05858
        for t in set(prompt_ids + generated_ids):
            scores[t] = scores[t] * p if scores[t] < 0 else scores[t] / p
    if temperature < 1e-5: return argmax(scores)     # greedy; warpers do not apply
    scores = scores / temperature
    if top_k: drop tokens below the k-th largest score
    if top_p < 1: drop the low tail whose total probability is <= 1 - top_p (keep >= 1)
    return multinomial(softmax(scores), generator=row's own generator)

The torch code here is the reference and the only backend: per step it is a handful
of [N, V] ops plus one multinomial per sampled row, small next to the forward pass.

A row is isolated: logits that are not finite (an adapter or mix whose weights
overflow float32) end that row with a `RowFailure`, never the step; scores that
overflow only in the warpers (a huge logit over a small temperature) take their
limit, the argmax, instead of feeding NaN to the multinomial.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from loramux.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
_MAX_SEED = 2**64  # torch.Generator.manual_seed takes a 64-bit unsigned seed
# Below this a temperature is greedy (vLLM's rule too): dividing float32 logits by
# less would overflow, and the limit of sampling as T -> 0 is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
# Penalties outside this range change nothing more (a token is already never or
# always picked) and only risk float32 overflow.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    max_new_tokens: generated tokens at most (the prompt does not count).
    temperature: 0 (or below 1e-5) means greedy (argmax); otherwise logits are
      divided by it.
    top_k: keep only the k most likely tokens; 0 turns it off.
    top_p: nucleus sampling, keep the smallest set with probability >= top_p; 1 is off.
    repetition_penalty: HF/CTRL semantics over prompt + generated tokens; 1 is off.
    seed: per-request seed; the same seed and inputs give the same tokens, whatever
      else is in the batch. None draws a fresh random seed.
    stop: strings that end generation when they appear in the decoded text; the
      stop string itself is not returned.
    ignore_eos: keep generating past the end-of-sequence token.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self, max_new_tokens_limit: int) -> None:
        """Raise InvalidArgument naming the first bad field and its allowed range."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(
                f"max_new_tokens must be between 1 and {max_new_tokens_limit}, "
                f"got {self.max_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise InvalidArgument(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:  # also rejects NaN
            raise InvalidArgument(
                f"repetition_penalty must be between {lo:g} and {hi:g} (1 turns it off), "
                f"got {self.repetition_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed < _MAX_SEED:
            raise InvalidArgument(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        self._validate_stop()

    def _validate_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
            )
        for i, s in enumerate(self.stop):
            if not s:
                raise InvalidArgument(f"stop string {i} is empty; remove it")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"stop string {i} has {len(s)} characters; the limit is {MAX_STOP_CHARS}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class RowSampler:
    """Sampling state of one request: its params, its own generator, the tokens seen.

    seed: the seed actually used (drawn at random when params.seed is None), so a
      sampled answer can be reproduced.
    seen: [V] bool, True for every token in prompt + generated; None when
      repetition_penalty is 1 (nothing to track).
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        self.seen: torch.Tensor | None = None  # [V] bool
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            # Ids outside the logits' vocab cannot be generated; HF drops them too.
            ids = [t for t in prompt_ids if 0 <= t < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, dtype=torch.long, device=device)] = True

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits is this row's answer."""
        return self.params.greedy and self.seen is None

    def observe(self, token_id: int) -> None:
        """Record a generated token (only the repetition penalty needs it)."""
        if self.seen is not None and 0 <= token_id < self.vocab_size:
            self.seen[token_id] = True


def process_logits(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """The scores each row samples from, float32 [N, V].

    Greedy rows get only the repetition penalty (HF applies no warpers without
    sampling); sampled rows get penalty, temperature, top-k, top-p in HF's order,
    with filtered tokens at -inf. `logits` ([N, V], any float dtype) is not modified.
    """
    scores = logits.float()  # [N, V]; a fresh tensor unless logits were float32
    if scores is logits:
        scores = scores.clone()
    _apply_repetition_penalty(scores, rows)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        sub = _warp(scores[sampled], [rows[i].params for i in sampled])  # [S, V]
        scores[sampled] = sub
    return scores


class RowFailure:
    """A row that cannot sample: why, for its caller. Stands in the token list."""

    def __init__(self, message: str):
        self.message = message

    def __repr__(self) -> str:
        return f"RowFailure({self.message!r})"


NONFINITE_LOGITS = (
    "the model produced non-finite logits (NaN or Inf) for this request: the weights it "
    "selected (adapter, merge or mix weights) overflow float32; other requests are unaffected"
)


def sample_next(logits: torch.Tensor, rows: list[RowSampler]) -> list[int | RowFailure]:
    """Next token id for each row, or a RowFailure for a row whose logits are not
    finite; logits: [N, V] at each row's last position.

    Does not call `observe`; the caller records the token it keeps.
    """
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # [N]
    if all(r.plain_greedy for r in rows):
        ids = logits.argmax(dim=-1).tolist()
    else:
        ids = _sample(logits, rows)
    return [t if ok else RowFailure(NONFINITE_LOGITS) for t, ok in zip(ids, finite)]


def _sample(logits: torch.Tensor, rows: list[RowSampler]) -> list[int]:
    scores = process_logits(logits, rows)  # [N, V] float32
    next_ids = scores.nan_to_num(nan=-math.inf).argmax(dim=-1)  # [N]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    # A row whose warped scores overflowed (a +inf, or nothing left to draw) takes
    # the argmax, the limit of what it asked for; NaN never reaches multinomial.
    ok = torch.isfinite(scores).logical_or(scores == -math.inf).all(dim=-1)
    ok &= (scores > -math.inf).any(dim=-1)
    sampled = [i for i, good in zip(sampled, ok[sampled].tolist()) if good]
    if sampled:
        probs = torch.softmax(scores[sampled], dim=-1)  # [S, V]
        # One multinomial per row so each row draws only from its own generator.
        draws = [
            torch.multinomial(probs[j], 1, generator=rows[i].generator)  # [1]
            for j, i in enumerate(sampled)
        ]
        next_ids[sampled] = torch.cat(draws)
    return next_ids.tolist()


def _apply_repetition_penalty(scores: torch.Tensor, rows: list[RowSampler]) -> None:
    """In place on scores [N, V] for the rows that track seen tokens."""
    idx = [i for i, r in enumerate(rows) if r.seen is not None]
    if not idx:
        return
    seen = torch.stack([rows[i].seen for i in idx])  # [P, V] bool
    penalty = torch.tensor(
        [rows[i].params.repetition_penalty for i in idx], dtype=scores.dtype, device=scores.device
    )[:, None]  # [P, 1]
    sub = scores[idx]  # [P, V]
    penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
    scores[idx] = torch.where(seen, penalized, sub)


def _warp(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p on scores [S, V] of sampled rows."""
    device = scores.device
    temperature = torch.tensor([p.temperature for p in params], dtype=scores.dtype, device=device)
    scores = scores / temperature[:, None]  # [S, V]
    if all(p.top_k == 0 and p.top_p >= 1.0 for p in params):
        return scores
    return _top_k_top_p(scores, params)


def _top_k_top_p(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask to -inf what HF's TopKLogitsWarper then TopPLogitsWarper would drop.

    One ascending sort serves both: masking the values below the k-th largest keeps
    the order, so the masked sorted row is exactly what HF's top-p sorts again.
    """
    n_vocab = scores.shape[-1]
    device = scores.device
    sorted_scores, sorted_idx = torch.sort(scores, dim=-1)  # [S, V] ascending
    k = [min(p.top_k, n_vocab) if p.top_k > 0 else n_vocab for p in params]
    kth_pos = torch.tensor([n_vocab - kk for kk in k], device=device)[:, None]  # [S, 1]
    kth = sorted_scores.gather(1, kth_pos)  # [S, 1] k-th largest score
    remove = sorted_scores < kth  # [S, V]; ties with the k-th are kept, as in HF
    if any(p.top_p < 1.0 for p in params):
        sorted_scores = sorted_scores.masked_fill(remove, -math.inf)
        cum_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
        # 1 - top_p in double, then float32: the same threshold HF compares against.
        cut = torch.tensor([1.0 - p.top_p for p in params], dtype=scores.dtype, device=device)
        applies = torch.tensor([p.top_p < 1.0 for p in params], device=device)  # [S]
        remove_p = (cum_probs <= cut[:, None]) & applies[:, None]  # [S, V]
        remove_p[:, -1] = False  # min_tokens_to_keep=1: the most likely token stays
        remove |= remove_p
    remove = remove.scatter(1, sorted_idx, remove)  # back to vocab order
    return scores.masked_fill(remove, -math.inf)
