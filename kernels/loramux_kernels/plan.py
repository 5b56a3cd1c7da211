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

    Runs once per step on the host: the routing is worked out on a Python list
    (a decode step has a few tokens, where each small torch op would cost more
    than the whole loop) and turned into tensors once at the end.
    """
    n = token_slots.numel()
    slots = token_slots.tolist()
    members: dict[int, list[int]] = {}  # slot -> its tokens, in token order
    for i, s in enumerate(slots):
        if s != NO_SLOT:
            members.setdefault(s, []).append(i)
    if not members:
        return StepPlan("none", n, rank)
    used = sorted(members)
    device = token_slots.device
    routing = {"token_slots": token_slots.contiguous(), "max_slot": used[-1]}
    if len(used) == 1:
        slot = used[0]
        mask = None
        if len(members[slot]) < n:
            mask = torch.tensor([float(s == slot) for s in slots], dtype=dtype, device=device).unsqueeze(1)
        return StepPlan("single", n, rank, slot=slot, token_mask=mask, **routing)
    if n > small_max_tokens:
        # A prefill: one bmm over a padded [k, m] block beats k small GEMMs unless the
        # padding is large (one adapter with many more tokens than the others).
        if len(used) * max(len(t) for t in members.values()) > max_padding * n:
            return _segment_plan(members, used, n, rank, device)
    return _grouped_plan(members, used, n, rank, dtype, device, routing)


def _segment_plan(members: dict[int, list[int]], used: list[int], n: int, rank: int, device) -> StepPlan:
    token_of_block = [i for s in used for i in members[s]]  # tokens with an adapter, in slot order
    n_a = len(token_of_block)
    groups, start = [], 0
    for s in used:
        groups.append((s, start, start + len(members[s])))
        start += len(members[s])
    block_of_token = [n_a] * n  # n_a: the zero row past the block
    for p, i in enumerate(token_of_block):
        block_of_token[i] = p
    return StepPlan(
        "segment", n, rank, groups=groups,
        token_of_block=torch.tensor(token_of_block, dtype=torch.long, device=device),
        block_of_token=torch.tensor(block_of_token, dtype=torch.long, device=device),
        in_token_order=token_of_block == list(range(n)),
    )


def _grouped_plan(members, used: list[int], n: int, rank: int, dtype, device, routing: dict) -> StepPlan:
    k, m = len(used), max(len(t) for t in members.values())
    token_of_block = [0] * (k * m)
    real = [0.0] * (k * m)
    block_of_token = [-1] * n
    for i, s in enumerate(used):
        for j, tok in enumerate(members[s]):
            token_of_block[i * m + j] = tok
            block_of_token[tok] = i * m + j
            real[i * m + j] = 1.0
    padded = [p for p, r in enumerate(real) if not r]
    if any(b < 0 for b in block_of_token):  # tokens whose row uses no adapter
        # They read a padding row (a zero delta); with no padding, deltas are scatter-added.
        block_of_token = [padded[0] if b < 0 else b for b in block_of_token] if padded else None
    long = dict(dtype=torch.long, device=device)
    return StepPlan(
        "grouped",
        n,
        rank,
        used_slots=torch.tensor(used, **long),
        slot_prefix=used == list(range(k)),
        block_shape=(k, m),
        token_of_block=torch.tensor(token_of_block, **long),
        block_mask=None if not padded else torch.tensor(real, dtype=dtype, device=device).view(k, m, 1),
        block_of_token=None if block_of_token is None else torch.tensor(block_of_token, **long),
        in_token_order=token_of_block == list(range(n)),
        **routing,
    )
