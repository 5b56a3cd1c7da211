"""What the rest of loramux needs to know about the resident base model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetModule:
    """One linear layer that LoRA may target.

    name: full module path in the base model, e.g. "model.layers.0.self_attn.q_proj".
    d_in, d_out: the linear's shapes; its weight is [d_out, d_in].
    weight_norm: Frobenius norm of the base weight (float32, as loaded), which the
      adapter reader bounds each ΔW against; None when it was not computed.
    """

    name: str
    d_in: int
    d_out: int
    weight_norm: float | None = None

    @property
    def short_name(self) -> str:
        """Last path component ("q_proj"), as PEFT's target_modules lists it."""
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class BaseModelSpec:
    """Identity and LoRA-targetable layers of the loaded base model.

    name: what adapters call it in `base_model_name_or_path` (a hub id or a path).
    architecture: the HF architecture class name, e.g. "LlamaForCausalLM".
    targets: every linear inside the decoder layers, keyed by full module name.
    fingerprint: hash of architecture, dimensions and target shapes; equal
      fingerprints mean an adapter trained for one fits the other.
    """

    name: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    targets: dict[str, TargetModule] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        shapes = sorted((t.name, t.d_in, t.d_out) for t in self.targets.values())
        blob = json.dumps(
            [self.architecture, self.hidden_size, self.num_layers, self.vocab_size, shapes]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def matches_name(self, other: str | None) -> bool:
        """True when an adapter's base_model_name_or_path names this model.

        Compares the last path component case-insensitively, so "HuggingFaceTB/
        SmolLM2-135M-Instruct" and "/models/smollm2-135m-instruct" both match.
        """
        if not other:
            return False
        def norm(s: str) -> str:
            return s.rstrip("/").rsplit("/", 1)[-1].lower()
        return norm(other) in {norm(n) for n in (self.name, *self.aliases)}
