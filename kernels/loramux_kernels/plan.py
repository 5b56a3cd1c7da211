"""Per-step routing metadata: which slot each token uses, planned once per step and
shared by every LoRA layer of the forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

NO_SLOT = -1  # a token whose row uses no adapter

Mode = Literal["none", "single", "dense", "segment"]


@dataclass
class StepPlan:
    """How one forward step adds LoRA deltas.

    Tokens are the rows of x flattened row-major from [B, T, d] to [N, d].

    mode:
      "none"    no token uses an adapter; layers skip LoRA entirely.
      "single"  one slot for every token that has one (`token_mask` zeroes the rest).
      "dense"   few tokens, several slots: one shrink over the active slot prefix,
                masked per token (`rank_mask`), one expand. 3 ops per layer whatever
                the mix; the masked-out columns cost FLOPs but no extra weight reads.
      "segment" many tokens (prefill), several slots: one shrink/expand per slot over
                that slot's token indices (`groups`).
    k: slots [0, k) cover every slot used (dense mode computes over them).
    rank: the slot buffers' rank stride R when the plan was made.
    """

    mode: Mode
    num_tokens: int
    rank: int
    k: int = 0
    slot: int = NO_SLOT
    token_mask: torch.Tensor | None = None  # [N, 1], 1.0 where the token uses `slot`
    rank_mask: torch.Tensor | None = None  # [N, k*R], 1.0 on the token's slot columns
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, idx [n_s])


def plan_step(
    token_slots: torch.Tensor,
    rank: int,
    dtype: torch.dtype,
    dense_max_tokens: int = 64,
) -> StepPlan:
    """Plan one step from token_slots: [N] int64 (slot per token, NO_SLOT for none).

    Masks are built on token_slots' device in `dtype` (the slot buffers' dtype).
    """
    n = token_slots.numel()
    used = torch.unique(token_slots[token_slots != NO_SLOT]).tolist()
    if not used:
        return StepPlan("none", n, rank)
    if len(used) == 1:
        slot = used[0]
        has = token_slots == slot
        mask = None if bool(has.all()) else has.to(dtype).unsqueeze(1)  # [N, 1]
        return StepPlan("single", n, rank, k=slot + 1, slot=slot, token_mask=mask)
    k = max(used) + 1
    if n <= dense_max_tokens:
        # rank_mask[i, s*R:(s+1)*R] = 1 where token i uses slot s.
        cols = torch.arange(k * rank, device=token_slots.device) // rank  # [k*R]
        rank_mask = (cols.unsqueeze(0) == token_slots.unsqueeze(1)).to(dtype)  # [N, k*R]
        return StepPlan("dense", n, rank, k=k, rank_mask=rank_mask)
    groups = [(s, (token_slots == s).nonzero().squeeze(1)) for s in used]
    return StepPlan("segment", n, rank, k=k, groups=groups)
