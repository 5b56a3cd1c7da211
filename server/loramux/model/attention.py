"""Paged attention inside transformers' own decoder layers.

The engine runs the HF model unchanged except for its attention implementation:
`install` registers ours under transformers' attention interface, which every
supported family (Llama, Mistral, Qwen2, Gemma, ...) calls with the layer's
post-RoPE query, key and value. The step's metadata travels as a forward keyword
argument (`loramux_step`) that transformers hands to the attention function, so
nothing is global: a forward without it (a plain call outside the engine) runs
ordinary causal SDPA over the given tokens. Since this implementation has no
mask function, transformers builds no attention mask at all for our steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loramux.engine.kv_cache import KvCache
from loramux_kernels import AttentionPlan, PagedAttention

ATTN_IMPLEMENTATION = "loramux_paged"


@dataclass(frozen=True)
class PagedStep:
    """What one forward step's attention needs: the pools, the step's plan and the
    attention op (which keeps per-step state between layers)."""

    kv: KvCache
    plan: AttentionPlan
    attend: PagedAttention


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            softcap=None, loramux_step: PagedStep | None = None, **kwargs):
    """transformers' attention-function contract: query [1, Hq, N, D], key/value
    [1, Hkv, N, D] → ([1, N, Hq, D], None). Writes the step's keys/values into the
    layer's pools, then attends per sequence over its blocks."""
    if loramux_step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, softcap=softcap, **kwargs)
    layer = module.layer_idx
    kv = loramux_step.kv
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = loramux_step.attend(query, key, value, kv.keys[layer], kv.values[layer], loramux_step.plan, scale, softcap)
    return out, None


def install(model: torch.nn.Module) -> None:
    """Route `model`'s attention through the paged implementation."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
