"""Adapter domain types: raw LoRA weights as loaded from disk, on the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class LoraModule:
    """The LoRA pair for one target linear.

    A: [r, d_in] float32, B: [d_out, r] float32, scale: s in ΔW = s·B·A
    (lora_alpha / r, or lora_alpha / √r with use_rslora; per-module when the
    adapter has rank_pattern / alpha_pattern).
    """

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def delta(self) -> torch.Tensor:
        """Dense ΔW = s·B·A, [d_out, d_in] float32."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter held on the host.

    name: the name it was loaded under (unique in the store).
    modules: full base-module name → LoraModule. Only modules the adapter trains.
    content_hash: sha256 over the safetensors bytes and the config fields that
      change the math (ranks, alphas, rslora); the merge cache keys on it.
    """

    name: str
    modules: dict[str, LoraModule]
    content_hash: str
    base_model_name: str | None = None
    source: Path | None = None
    config: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """Largest rank over all modules (the slot width it needs)."""
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())
