"""Per-step routing metadata: which slot each token uses, planned once per step and
shared by every LoRA layer of the forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

NO_SLOT = -1  # a token whose row uses no adapter

Mode = Literal["none", "single", "grouped", "segment"]


@dataclass
class StepPlan:
    """How one forward step adds LoRA deltas.

    Tokens are the rows of x flattened row-major from [B, T, d] to [N, d].

    mode:
      "none"    no token uses an adapter; layers skip LoRA entirely.
      "single"  one slot for every token that has one (`token_mask` zeroes the rest).
      "grouped" few tokens (decode), or a prefill whose slots have similar token
                counts, several slots: tokens gathered into a
                [k, m, d] block (k slots used, m = most tokens on one slot, padding
                rows zeroed), one bmm shrink and one bmm expand against the used
                slots, one scatter-add back. 4-5 ops per layer whatever the mix,
                and each used adapter's weights are read once.
      "segment" many tokens on unevenly used slots: tokens gathered once into slot
                order, one shrink/expand GEMM per slot on its contiguous run
                (`groups`), one gather back to token order (no scatter-add).
    rank: the slot buffers' rank stride R when the plan was made.
    """

    mode: Mode
    num_tokens: int
    rank: int
    slot: int = NO_SLOT
    token_mask: torch.Tensor | None = None  # [N, 1], 1.0 where the token uses `slot`
    # grouped mode: block position p = i*m + j holds the j-th token of used slot i.
    # segment mode: block position p holds the p-th token in slot order (no padding).
    used_slots: torch.Tensor | None = None  # [k] slot ids, ascending
    slot_prefix: bool = False  # used_slots == arange(k): slice the buffers, no gather
    block_shape: tuple[int, int] = (0, 0)  # (k, m)
    token_of_block: torch.Tensor | None = None  # [k*m] token index (0 for padding)
    block_mask: torch.Tensor | None = None  # [k, m, 1] 1.0 on real tokens; None if no padding
    # The inverse: block position of each token ([N]); a token without an adapter
    # points at a padding position (its delta row is zero; in segment mode the row
    # past the block). grouped: None when such a token exists but the block has no
    # padding (then deltas are scatter-added). Gathering is ~10x faster than
    # index_add_ on CPU.
    block_of_token: torch.Tensor | None = None
    in_token_order: bool = False  # block position p holds token p: add the block as is
    groups: list[tuple[int, int, int]] = field(default_factory=list)  # segment: (slot, start, end) in the block
    # single and grouped modes: the [N] int64 slot of each token, contiguous, for
    # kernels that route per token themselves; max_slot bounds it (buffer checks).
    token_slots: torch.Tensor | None = None
    max_slot: int = NO_SLOT


def plan_step(
    token_slots: torch.Tensor,
    rank: int,
    dtype: torch.dtype,
    small_max_tokens: int = 64,
    max_padding: float = 1.5,
) -> StepPlan:
    """Plan one step from token_slots: [N] int64 (slot per token, NO_SLOT for none).

    Masks are built on token_slots' device in `dtype` (the slot buffers' dtype).
    Up to `small_max_tokens` tokens on several slots are always grouped; more are
    grouped while the padded block has at most `max_padding` × N positions, and
    segmented beyond.
    """
    n = token_slots.numel()
    used = torch.unique(token_slots[token_slots != NO_SLOT]).tolist()
    if not used:
        return StepPlan("none", n, rank)
    routing = {"token_slots": token_slots.contiguous(), "max_slot": used[-1]}
    if len(used) == 1:
        slot = used[0]
        has = token_slots == slot
        mask = None if bool(has.all()) else has.to(dtype).unsqueeze(1)  # [N, 1]
        return StepPlan("single", n, rank, slot=slot, token_mask=mask, **routing)
    if n > small_max_tokens:
        # A prefill: one bmm over a padded [k, m] block beats k small GEMMs unless the
        # padding is large (one adapter with many more tokens than the others).
        counts = torch.bincount(token_slots[token_slots != NO_SLOT])[used]
        if len(used) * int(counts.max()) > max_padding * n:
            return _segment_plan(token_slots, used, n, rank)
    return _grouped_plan(token_slots, used, n, rank, dtype, routing)


def _segment_plan(token_slots, used: list[int], n: int, rank: int) -> StepPlan:
    members = [(token_slots == s).nonzero().squeeze(1) for s in used]  # token indices per slot
    token_of_block = torch.cat(members)  # [n_a]: tokens with an adapter, in slot order
    n_a = token_of_block.numel()
    groups, start = [], 0
    for s, idx in zip(used, members):
        groups.append((s, start, start + idx.numel()))
        start += idx.numel()
    block_of_token = torch.full((n,), n_a, dtype=torch.long, device=token_slots.device)  # n_a: the zero row
    block_of_token[token_of_block] = torch.arange(n_a, device=token_slots.device)
    in_order = n_a == n and bool((token_of_block == torch.arange(n, device=token_slots.device)).all())
    return StepPlan(
        "segment", n, rank, groups=groups, token_of_block=token_of_block,
        block_of_token=block_of_token, in_token_order=in_order,
    )


def _grouped_plan(token_slots, used: list[int], n: int, rank: int, dtype, routing: dict) -> StepPlan:
    members = [(token_slots == s).nonzero().squeeze(1).tolist() for s in used]
    k, m = len(used), max(len(t) for t in members)
    token_of_block = torch.zeros(k * m, dtype=torch.long)
    real = torch.zeros(k * m, dtype=dtype)
    block_of_token = torch.full((n,), -1, dtype=torch.long)
    for i, toks in enumerate(members):
        token_of_block[i * m : i * m + len(toks)] = torch.tensor(toks)
        block_of_token[toks] = torch.arange(i * m, i * m + len(toks))
        real[i * m : i * m + len(toks)] = 1
    padding = (real == 0).nonzero().squeeze(1)
    without = block_of_token < 0  # tokens whose row uses no adapter
    if bool(without.any()):
        block_of_token = block_of_token.masked_fill(without, int(padding[0])) if padding.numel() else None
    in_order = k * m == n and bool((token_of_block == torch.arange(n)).all())
    device = token_slots.device
    return StepPlan(
        "grouped",
        n,
        rank,
        used_slots=torch.tensor(used, device=device),
        slot_prefix=used == list(range(k)),
        block_shape=(k, m),
        token_of_block=token_of_block.to(device),
        block_mask=None if bool(real.all()) else real.view(k, m, 1).to(device),
        block_of_token=None if block_of_token is None else block_of_token.to(device),
        in_token_order=in_order,
        **routing,
    )
