"""Backends behind one interface; `select_backend` picks one for a device."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from loramux_kernels import native
from loramux_kernels.plan import StepPlan

log = logging.getLogger(__name__)


class LoraBackend(Protocol):
    name: str

    def add_lora_(
        self, out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, BT: torch.Tensor, plan: StepPlan
    ) -> None:
        """Semantics: `add_lora_reference(out, x, A, BT, token_slots)` for the
        token_slots the plan was made from. out: [N, d_out] (written in place),
        x: [N, d_in], A: [S, R, d_in], BT: [S, R, d_out], all in one dtype.
        out and x may also come unflattened, [..., d_out] and [..., d_in] holding
        the N rows row-major (a layer's [B, T, d]): no reshape on the hot path."""

    def linear(self, x, weight, bias, A, BT, plan: StepPlan | None) -> torch.Tensor | None:
        """Semantics: out = F.linear(x, weight, bias), then, unless plan is None or
        "none", add_lora_(out, x, A, BT, plan); return out. None when the backend
        has no fused path for these arguments: the caller runs the two ops."""


class TorchBackend:
    """Plain torch ops; runs on any device, and serves prefills on CPU (behind
    `NativeCpuBackend`). The op count per layer is small and fixed whatever the
    adapter mix, and each used adapter's weights are read once."""

    name = "torch"

    def linear(self, x, weight, bias, A, BT, plan) -> None:
        return None  # F.linear and add_lora_ are this backend's ops already

    def add_lora_(self, out, x, A, BT, plan: StepPlan) -> None:
        if plan.mode == "none":
            return
        x, out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
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
    torch ops' dispatch costs more than the arithmetic; one call does not.

    A decode step makes one call per target layer (210 on the default model), so
    the Python side of a call is kept to a few attribute reads: what is fixed per
    slot buffer (pointers, shapes; checked once) and per step (the routing; checked
    once) sits in int64 arrays the C entry reads, and a call passes only its rows.
    `linear` goes further: base GEMM (a small-batch AVX-512 kernel, about twice
    the BLAS's speed at 1-32 rows) and deltas in one C call (see csrc/lora_cpu.c),
    since each return to Python right after a GEMM runs with cold caches.
    """

    name = "cpu-native"
    # Rows on distinct adapters up to this many tokens (decode); beyond it, or when
    # more than `max_single_tokens` tokens share one adapter, GEMMs beat per-token loops.
    max_tokens = 32
    max_single_tokens = 4
    # Every step takes the one-call linear: its small-batch GEMM (csrc/lora_cpu.c)
    # streams the weights at ~38 GB/s on two cores for one row, where F.linear's
    # gemv reached ~15 GB/s here, and takes prefills 32 rows at a time, faster
    # than the BLAS too (deltas of a prefill then come from the torch ops).
    min_fused_tokens = 1
    # Below this many multiply-adds a second thread costs more than it saves. Decode
    # reads the adapter weights cold, so a second core's memory bandwidth pays early
    # (one rank-16 adapter on a 576-wide layer is ~18k).
    parallel_work = 1 << 13

    def __init__(self, lib):
        self._fn = lib.lmx_lora_add_f32_step
        self._torch = TorchBackend()
        # id(A) -> (A, BT, module args): the views are held, so an id is never
        # reused while its entry lives, and a re-strided buffer (new views) misses.
        self._modules: dict[int, tuple] = {}
        self._plan: StepPlan | None = None
        self._step = np.zeros(4, dtype=np.int64)  # one engine thread runs forwards
        self._step_ptr = self._step.ctypes.data
        self._native_plan = False
        self._linear_fn = _fused_linear(lib)
        self._linear = np.zeros(11, dtype=np.int64)
        self._linear_ptr = self._linear.ctypes.data
        self._weights: dict[int, tuple] = {}  # id(weight) -> (weight, data_ptr, d_out, d_in), checked

    def linear(self, x, weight, bias, A, BT, plan: StepPlan | None) -> torch.Tensor | None:
        fn = self._linear_fn
        lora = plan is not None and plan.mode != "none"
        if not lora and plan is not None and plan.num_tokens < self.min_fused_tokens:
            return None  # decided before any tensor is touched: see the check on n below
        if fn is None or torch.is_grad_enabled():
            return None  # autograd needs torch's own ops
        w = self._weights.get(id(weight))
        if w is None or w[0] is not weight or w[1] != weight.data_ptr():  # pinning swaps weight.data
            w = self._weight(weight)
            if w is None:
                return None
        _, w_ptr, d_out, d_in = w
        if x.dtype is not torch.float32 or not x.is_cpu or x.shape[-1] != d_in:
            return None
        x_stride = _row_stride(x)
        if x_stride is None:
            return None
        b_ptr = 0
        if bias is not None:
            if bias.dtype is not torch.float32 or not bias.is_cpu or bias.shape != (d_out,) or bias.stride(0) != 1:
                return None
            b_ptr = bias.data_ptr()
        n = x.numel() // d_in
        mod_ptr, torch_deltas = 0, False
        if not lora:
            if n < self.min_fused_tokens:
                return None
        else:
            if plan is not self._plan:
                self._start_plan(plan)
            entry = self._module(A, BT, plan) if self._native_plan else None
            if entry is None:
                # A prefill (or slots the C loop does not take): our GEMM, then
                # the torch ops' batched deltas.
                torch_deltas = True
            else:
                _, _, mod_ptr, s, a_in, a_out, _ = entry
                if n != plan.num_tokens or a_in != d_in or a_out != d_out or plan.max_slot >= s:
                    raise self._disagree(None, x, A, BT, plan)
        out = x.new_empty((*x.shape[:-1], d_out))
        self._linear[:] = (
            x.data_ptr(), x_stride, n, d_in, d_out, w_ptr, b_ptr, out.data_ptr(), d_out, mod_ptr,
            torch.get_num_threads(),
        )
        fn(self._step_ptr, self._linear_ptr)
        if torch_deltas:
            self._torch.add_lora_(out, x, A, BT, plan)
        return out

    def _weight(self, weight):
        if not (weight.dtype is torch.float32 and weight.is_cpu and weight.dim() == 2 and weight.is_contiguous()):
            return None
        if len(self._weights) > 4096:
            self._weights.clear()
        entry = (weight, weight.data_ptr(), *weight.shape)
        self._weights[id(weight)] = entry
        return entry

    def add_lora_(self, out, x, A, BT, plan: StepPlan) -> None:
        if plan is not self._plan:
            self._start_plan(plan)
        entry = self._module(A, BT, plan) if self._native_plan else None
        if entry is None:
            self._torch.add_lora_(out, x, A, BT, plan)
            return
        _, _, mod_ptr, s, d_in, d_out, _ = entry
        n = plan.num_tokens
        # The C loop trusts its arguments: everything it indexes with, per call.
        if (
            x.numel() != n * d_in or out.numel() != n * d_out or x.shape[-1] != d_in
            or out.shape[-1] != d_out or plan.max_slot >= s
        ):
            raise self._disagree(out, x, A, BT, plan)
        x_stride, out_stride = _row_stride(x), _row_stride(out)
        if (
            x_stride is None or out_stride is None or x.dtype is not torch.float32
            or out.dtype is not torch.float32 or not x.is_cpu or not out.is_cpu
        ):
            self._torch.add_lora_(out, x, A, BT, plan)  # an unusual layout or dtype: correct, slower
            return
        self._fn(mod_ptr, self._step_ptr, out.data_ptr(), out_stride, x.data_ptr(), x_stride)

    def _start_plan(self, plan: StepPlan) -> None:
        self._plan = plan
        n = plan.num_tokens
        self._native_plan = (
            plan.mode in ("single", "grouped")
            and plan.token_slots is not None
            and plan.token_slots.is_cpu
            and n <= self.max_tokens
            and not (plan.mode == "single" and n > self.max_single_tokens)
        )
        if self._native_plan:
            self._step[:] = (plan.token_slots.data_ptr(), n, torch.get_num_threads(), self.parallel_work)

    def _module(self, A, BT, plan: StepPlan):
        """The cached C arguments of one slot buffer pair, or None when the native
        loop does not take them (another dtype or device: the torch ops do)."""
        entry = self._modules.get(id(A))
        if entry is not None and entry[0] is A and entry[1] is BT:
            return entry
        if not (A.dtype is BT.dtype is torch.float32 and A.is_cpu and BT.is_cpu):
            return None
        if not (A.dim() == BT.dim() == 3 and BT.shape[:2] == A.shape[:2]):
            raise self._disagree(None, None, A, BT, plan)
        s, r, d_in = A.shape
        if not (A.is_contiguous() and BT.is_contiguous()):
            return None
        if len(self._modules) > 4096:  # stale views after re-strides; refilled on demand
            self._modules.clear()
        d_out = BT.shape[2]
        args = np.array([A.data_ptr(), BT.data_ptr(), s, r, d_in, d_out], dtype=np.int64)
        entry = (A, BT, args.ctypes.data, s, d_in, d_out, args)  # args: kept alive with its pointer
        self._modules[id(A)] = entry
        return entry

    @staticmethod
    def _disagree(out, x, A, BT, plan: StepPlan) -> ValueError:
        shape = lambda t: "?" if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))  # noqa: E731
        return ValueError(
            f"add_lora_ arguments do not agree: out {shape(out)}, x {shape(x)}, A {shape(A)}, "
            f"BT {shape(BT)}, plan for {plan.num_tokens} tokens at rank {plan.rank} up to slot {plan.max_slot}"
        )


def _row_stride(t: torch.Tensor) -> int | None:
    """Distance between consecutive rows when t's rows are evenly spaced with unit
    column stride (contiguous, or a 2-D row view); None otherwise."""
    if t.is_contiguous():
        return t.shape[-1]
    if t.dim() == 2 and t.stride(1) == 1:
        return t.stride(0)
    return None


def _fused_linear(lib):
    """lib's whole-linear entry bound to the sgemm inside torch's own CPU library
    (what F.linear calls), or None where that symbol is not exported or does not
    reproduce F.linear on a check (another BLAS, another integer width)."""
    try:
        torch_cpu = next((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
        sgemm = ctypes.cast(ctypes.CDLL(str(torch_cpu)).sgemm_, ctypes.c_void_p).value
    except (StopIteration, OSError, AttributeError):
        return None
    lib.lmx_set_sgemm(sgemm)
    fn = lib.lmx_linear_lora_f32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, generator=g)[:, :37]  # a row stride, odd sizes
    w, b = torch.randn(29, 37, generator=g), torch.randn(29, generator=g)
    out = torch.empty(3, 29)
    step = np.zeros(4, dtype=np.int64)
    args = np.array([x.data_ptr(), 41, 3, 37, 29, w.data_ptr(), b.data_ptr(), out.data_ptr(), 29, 0, 1], dtype=np.int64)
    fn(step.ctypes.data, args.ctypes.data)
    if not torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5):
        log.warning("torch's sgemm does not reproduce F.linear here; LoRA layers call F.linear")
        return None
    return fn


def select_backend(device: torch.device) -> LoraBackend:
    """The fastest backend available for `device`: the fused C kernels on CPU when
    they build here (see `native`), else the torch ops. A CUDA (SGMV/BGMV-style)
    kernel slots in here without touching callers."""
    if torch.device(device).type == "cpu":
        lib = native.load("lora_cpu")
        if lib is not None:
            return NativeCpuBackend(lib)
    return TorchBackend()
