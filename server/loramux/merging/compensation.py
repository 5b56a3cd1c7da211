"""Serving other adapters exactly while a merge is pinned into the base weights.

With P folded in, a linear computes (W + P)·x. A row that asked for adapter D must
get W·x + D·x, so its LoRA becomes D − P: concatenated factors of rank r_D + r_P,
exact (no truncation) and computed once per (adapter, pin). This needs P low rank
(a pinned adapter or a linear/slerp/karcher merge) and an unquantized base, where
(W + P) − P = W up to float rounding; a dense pin (ties, dare...) or a 4-bit base
would make the answer approximate, so such requests are refused instead.
"""

from __future__ import annotations

import hashlib

from loramux.adapters.types import LoraAdapter, LoraModule
from loramux.errors import FailedPrecondition
from loramux.merging.lowrank import Factored, concat


def compensated_adapter(
    adapter: LoraAdapter | None, pinned: dict[str, Factored], pin_id: str, max_rank: int
) -> LoraAdapter:
    """The virtual adapter D − P (or −P alone for the base model, adapter None)."""
    own = adapter.modules if adapter is not None else {}
    modules: dict[str, LoraModule] = {}
    for name in sorted(own.keys() | pinned.keys()):
        terms = []
        if name in own:
            m = own[name]
            terms.append((1.0, Factored(m.B.float() * m.scale, m.A.float())))
        if name in pinned:
            terms.append((-1.0, pinned[name]))
        f = concat(terms)
        if f.rank > max_rank:
            raise FailedPrecondition(
                f"serving this adapter on top of the pinned merge needs rank {f.rank} in "
                f"{name}, above the slot rank {max_rank}; unpin first or raise --max-rank"
            )
        modules[name] = LoraModule(A=f.A.contiguous(), B=f.B.contiguous(), scale=1.0)
    base_name = adapter.name if adapter is not None else "base"
    base_hash = adapter.content_hash if adapter is not None else ""
    return LoraAdapter(
        name=f"{base_name}~{pin_id}",
        modules=modules,
        content_hash=hashlib.sha256(f"{base_hash}|{pin_id}".encode()).hexdigest(),
        config={"compensates": pin_id},
    )
