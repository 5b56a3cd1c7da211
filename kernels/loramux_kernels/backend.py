"""Backends behind one interface; `select_backend` picks one for a device."""

from __future__ import annotations

from typing import Protocol

import torch

from loramux_kernels.plan import StepPlan


class LoraBackend(Protocol):
    name: str

    def add_lora_(
        self, out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, BT: torch.Tensor, plan: StepPlan
    ) -> None:
        """Semantics: `add_lora_reference(out, x, A, BT, token_slots)` for the
        token_slots the plan was made from. out: [N, d_out] (written in place),
        x: [N, d_in], A: [S, R, d_in], BT: [S, R, d_out], all in one dtype."""


class TorchBackend:
    """Plain torch ops; runs on any device. On CPU it is the fast path: the op count
    per layer is small and fixed whatever the adapter mix (decode is bound by op
    dispatch and by reading adapter weights, so each used adapter is read once)."""

    name = "torch"

    def add_lora_(self, out, x, A, BT, plan: StepPlan) -> None:
        if plan.mode == "none":
            return
        if plan.mode == "single":
            shrunk = x @ A[plan.slot].t()  # [N, R]
            if plan.token_mask is not None:
                shrunk.mul_(plan.token_mask)
            out.addmm_(shrunk, BT[plan.slot])
        elif plan.mode == "grouped":
            k, m = plan.block_shape
            if plan.slot_prefix:
                a, bt = A[:k], BT[:k]  # views: no copy of adapter weights
            else:
                a, bt = A.index_select(0, plan.used_slots), BT.index_select(0, plan.used_slots)
            xs = x.index_select(0, plan.token_of_block).view(k, m, -1)  # [k, m, d_in]
            shrunk = torch.bmm(xs, a.transpose(1, 2))  # [k, m, R]
            if plan.block_mask is not None:
                shrunk.mul_(plan.block_mask)  # padding rows add exactly zero
            delta = torch.bmm(shrunk, bt).view(k * m, -1)  # [k*m, d_out]
            if plan.in_token_order:
                out.add_(delta)
            elif plan.block_of_token is not None:
                out.add_(delta.index_select(0, plan.block_of_token))
            else:
                out.index_add_(0, plan.token_of_block, delta)
        else:  # segment
            for slot, idx in plan.groups:
                xs = x.index_select(0, idx)  # [n_s, d_in]
                out.index_add_(0, idx, (xs @ A[slot].t()) @ BT[slot])


def select_backend(device: torch.device) -> LoraBackend:
    """The fastest backend available for `device`. Only the torch backend exists
    today; a CUDA (SGMV/BGMV-style) kernel slots in here without touching callers."""
    return TorchBackend()
