"""The reference multi-LoRA op: slow, obviously right, the oracle for every backend."""

from __future__ import annotations

import torch

from loramux_kernels.plan import NO_SLOT


def add_lora_reference(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    BT: torch.Tensor,
    token_slots: torch.Tensor,
) -> None:
    """Semantics:
        for each token i with s = token_slots[i] != NO_SLOT:
            out[i] += (x[i] @ A[s].T) @ BT[s]
    where out: [N, d_out], x: [N, d_in], A: [S, R, d_in], BT: [S, R, d_out]
    (BT is the adapter's B transposed with its scale folded in: BT[s] = (s·B).T).
    Accumulates in float32, writes in out's dtype.
    """
    for i, s in enumerate(token_slots.tolist()):
        if s == NO_SLOT:
            continue
        shrunk = A[s].float() @ x[i].float()  # [R]
        out[i] += (shrunk @ BT[s].float()).to(out.dtype)  # [d_out]
