"""Batched multi-LoRA ops: every row of a batch adds the delta of its own adapter.

One interface (`LoraBackend`), a torch reference beside it (the test oracle and the
fallback), and `select_backend(device)` so callers never branch on the platform.
"""

from loramux_kernels.backend import LoraBackend, NativeCpuBackend, TorchBackend, select_backend
from loramux_kernels.plan import NO_SLOT, StepPlan, plan_step
from loramux_kernels.reference import add_lora_reference

__all__ = [
    "NO_SLOT",
    "LoraBackend",
    "NativeCpuBackend",
    "StepPlan",
    "TorchBackend",
    "add_lora_reference",
    "plan_step",
    "select_backend",
]
