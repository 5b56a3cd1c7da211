"""Wrap every target linear so one forward pass adds each row's own LoRA delta."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loramux.adapters.slots import ModuleSlots, SlotPool
from loramux_kernels import LoraBackend, StepPlan


@dataclass
class LoraContext:
    """The one object through which the engine hands per-step metadata to layers.

    plan: set before each forward step, cleared after; None means no LoRA.
    """

    backend: LoraBackend
    plan: StepPlan | None = None


class LoraLinear(nn.Module):
    """A target linear plus the multi-LoRA delta of the current step.

    Works over any base linear: nn.Linear (called through F.linear to save a module
    call per layer on the hot path), bitsandbytes Linear4bit / Linear8bitLt.
    """

    def __init__(self, base: nn.Module, name: str, slots: ModuleSlots, ctx: LoraContext):
        super().__init__()
        self.base = base
        self.name = name
        self.slots = slots
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self._plain = type(base) is nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d_in]
        plan = self.ctx.plan
        lora = plan is not None and plan.mode != "none"
        if self._plain:
            base = self.base
            if plan is not None:
                # The backend's one-call linear (base GEMM, then this step's deltas)
                # where it has one and it pays: no return to Python between the two,
                # and a faster GEMM for decode batches, with adapters or without.
                out = self.ctx.backend.linear(x, base.weight, base.bias, self.slots.A, self.slots.BT, plan)
                if out is not None:
                    return out
            out = F.linear(x, base.weight, base.bias)
        else:
            out = self.base(x)
        if not lora:
            return out
        slots = self.slots
        A = slots.A
        if x.dtype is A.dtype and out.dtype is A.dtype:
            # [B, T, d] as they are: the backend takes rows unflattened (no reshape
            # per layer on the decode hot path).
            self.ctx.backend.add_lora_(out, x, A, slots.BT, plan)
        else:
            delta = torch.zeros(out.shape, dtype=A.dtype, device=out.device)
            self.ctx.backend.add_lora_(delta, x.to(A.dtype), A, slots.BT, plan)
            out += delta.to(out.dtype)
        return out


class StepLinear(nn.Linear):
    """A plain linear outside the LoRA targets (the LM head) that takes the
    backend's faster GEMM during engine steps: decode batches of the LM head are
    the largest GEMM of a step (49k×576 on the default model). Installed by
    swapping the module's class, so its parameters, their names and weight tying
    stay as loaded."""

    ctx: LoraContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d_in]
        if self.ctx.plan is not None:
            rows = x.numel() // x.shape[-1]
            out = self.ctx.backend.linear(x, self.weight, self.bias, None, None, StepPlan("none", rows, 0))
            if out is not None:
                return out
        return F.linear(x, self.weight, self.bias)


def speed_up_head(model: nn.Module, ctx: LoraContext) -> None:
    """Route a plain nn.Linear LM head through `StepLinear` (others stay as they are)."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        head.__class__ = StepLinear
        head.ctx = ctx


def wrap_targets(model: nn.Module, pool: SlotPool, ctx: LoraContext) -> dict[str, LoraLinear]:
    """Replace every module named in pool.modules by a LoraLinear; return them by name."""
    wrapped = {}
    for name, slots in pool.modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraLinear(getattr(parent, child), name, slots, ctx)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
