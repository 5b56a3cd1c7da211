"""Backends behind one interface; `select_backend` picks one for a device."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from loramux_kernels import native
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
    """Plain torch ops; runs on any device, and serves prefills on CPU (behind
    `NativeCpuBackend`). The op count per layer is small and fixed whatever the
    adapter mix, and each used adapter's weights are read once."""

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
            n_a = plan.token_of_block.numel()
            xs = x if plan.in_token_order else x.index_select(0, plan.token_of_block)  # [n_a, d_in]
            delta = torch.empty(n_a + 1, out.shape[1], dtype=out.dtype, device=out.device)  # [n_a + 1, d_out]
            delta[n_a].zero_()  # the row tokens without an adapter read
            for slot, start, end in plan.groups:
                torch.mm(xs[start:end] @ A[slot].t(), BT[slot], out=delta[start:end])
            if plan.in_token_order:
                out.add_(delta[:n_a])
            else:
                out.add_(delta.index_select(0, plan.block_of_token))


class NativeCpuBackend:
    """Decode-sized steps (few tokens, float32) go to one fused C call per layer
    (csrc/lora_cpu.c: per-token shrink and expand, OpenMP over the work); prefill,
    other dtypes and anything unusual go to the torch ops. At decode sizes the
    torch ops' dispatch costs more than the arithmetic; one call does not."""

    name = "cpu-native"
    # Rows on distinct adapters up to this many tokens (decode); beyond it, or when
    # more than `max_single_tokens` tokens share one adapter, GEMMs beat per-token loops.
    max_tokens = 32
    max_single_tokens = 4
    # Below this many multiply-adds a second thread costs more than it saves.
    parallel_work = 1 << 16

    def __init__(self, lib):
        self._fn = lib.lmx_lora_add_f32_packed
        # The call's arguments, packed: one pointer through ctypes instead of 13
        # arguments saves microseconds per layer. Forward passes run on one thread
        # (the engine's), so one buffer per backend is enough.
        self._args = np.zeros(13, dtype=np.int64)
        self._args_ptr = self._args.ctypes.data
        self._torch = TorchBackend()

    def add_lora_(self, out, x, A, BT, plan: StepPlan) -> None:
        if plan.mode == "none":
            return
        n = plan.num_tokens
        if (
            plan.token_slots is None
            or n > self.max_tokens
            or (plan.mode == "single" and n > self.max_single_tokens)
            or A.dtype != torch.float32
            or out.dtype != torch.float32
            or x.dtype != torch.float32
        ):
            self._torch.add_lora_(out, x, A, BT, plan)
            return
        s, r, d_in = A.shape
        d_out = BT.shape[2]
        # The C loop trusts its arguments: check everything it indexes with.
        if not (
            plan.max_slot < s == BT.shape[0] and r == BT.shape[1] and A.is_contiguous() and BT.is_contiguous()
            and x.shape == (n, d_in) and out.shape == (n, d_out) and x.stride(1) == 1 and out.stride(1) == 1
            and x.device.type == out.device.type == A.device.type == "cpu"
        ):
            raise ValueError(
                f"add_lora_ shapes do not agree: out {tuple(out.shape)}, x {tuple(x.shape)}, "
                f"A {tuple(A.shape)}, BT {tuple(BT.shape)}, plan for {n} tokens up to slot {plan.max_slot}"
            )
        threads = torch.get_num_threads() if n * r * (d_in + d_out) >= self.parallel_work else 1
        self._args[:] = (
            out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0), A.data_ptr(), BT.data_ptr(),
            plan.token_slots.data_ptr(), n, d_in, d_out, r, r, threads,
        )
        self._fn(self._args_ptr)


def select_backend(device: torch.device) -> LoraBackend:
    """The fastest backend available for `device`: the fused C kernels on CPU when
    they build here (see `native`), else the torch ops. A CUDA (SGMV/BGMV-style)
    kernel slots in here without touching callers."""
    if torch.device(device).type == "cpu":
        lib = native.load("lora_cpu")
        if lib is not None:
            return NativeCpuBackend(lib)
    return TorchBackend()
