"""Batched multi-LoRA ops: every row of a batch adds the delta of its own adapter.

One interface (`LoraBackend`), a torch reference beside it (the test oracle and the
fallback), and `select_backend(device)` so callers never branch on the platform.
Paged attention over a block-table KV cache alike: `AttentionPlan` per step,
`select_attention(device)` for the per-layer entry, `paged_attention_reference`.
"""

from loramux_kernels.attention import (
    AttentionPlan,
    PagedAttention,
    paged_attention,
    paged_attention_reference,
    select_attention,
    write_kv,
)
from loramux_kernels.backend import LoraBackend, NativeCpuBackend, TorchBackend, select_backend
from loramux_kernels.plan import NO_SLOT, StepPlan, plan_step
from loramux_kernels.reference import add_lora_reference

__all__ = [
    "NO_SLOT",
    "AttentionPlan",
    "LoraBackend",
    "NativeCpuBackend",
    "PagedAttention",
    "StepPlan",
    "TorchBackend",
    "add_lora_reference",
    "paged_attention",
    "paged_attention_reference",
    "plan_step",
    "select_attention",
    "select_backend",
    "write_kv",
]
