"""The resolver: what weights a request's selection names (adapter, named merge,
inline mix, none), and what a row must add to compute them on the current base
weights (the adapter itself, or adapter − P while a merge P is pinned)."""

from __future__ import annotations

from collections.abc import Callable

from loramux.adapters.store import AdapterStore
from loramux.adapters.types import LoraAdapter
from loramux.engine.pins import PinState
from loramux.engine.types import (
    RESOLVED_ADAPTER,
    RESOLVED_BASE,
    RESOLVED_MERGE,
    RESOLVED_MIX,
    RESOLVED_PINNED,
    GenerationRequest,
    Resolution,
)
from loramux.errors import FailedPrecondition, InvalidArgument
from loramux.merging.compensation import compensated_adapter
from loramux.merging.lowrank import Factored
from loramux.merging.service import MergeService


class Resolver:
    """Thread-safe (the store and merge caches are): requests resolve on RPC threads."""

    def __init__(self, store: AdapterStore, merges: MergeService, max_rank: int):
        self.store, self.merges, self.max_rank = store, merges, max_rank

    def resolve(
        self, request: GenerationRequest, pin: PinState, check: Callable[[], None] | None = None
    ) -> tuple[LoraAdapter | None, Resolution]:
        """(adapter or virtual merged adapter, how it was found) for the request.
        check: passed to a merge, which calls it between modules (it raises to stop)."""
        chosen = [x for x in (request.adapter, request.merge, request.mix) if x is not None]
        if len(chosen) > 1:
            raise InvalidArgument("give at most one of adapter, merge or mix")
        if request.adapter is not None:
            hit = request.adapter in self.store.cache
            adapter = self.store.get(request.adapter)
            return adapter, Resolution(RESOLVED_ADAPTER, request.adapter, hit)
        if request.merge is not None:
            adapter, report = self.merges.resolve(self.merges.get(request.merge), check=check)
            return adapter, Resolution(RESOLVED_MERGE, request.merge, report.cache_hit, report)
        if request.mix is not None:
            adapter, report = self.merges.resolve(request.mix, check=check)
            return adapter, Resolution(RESOLVED_MIX, request.mix.describe(), report.cache_hit, report)
        return None, self.unselected(pin)

    @staticmethod
    def unselected(pin: PinState) -> Resolution:
        """A request naming no adapter gets whatever the weights are: the pinned
        merge, or the base model."""
        if pin.label is not None:
            return Resolution(RESOLVED_PINNED, pin.label)
        return Resolution(RESOLVED_BASE)

    def needs_merge(self, request: GenerationRequest) -> bool:
        """The request's mix or named merge is not in the merge cache yet."""
        spec = request.mix
        if spec is None and request.merge is not None:
            spec = self.merges.list().get(request.merge)
        return spec is not None and not self.merges.is_cached(spec)

    def on_weights(self, requested: LoraAdapter | None, pin: PinState) -> LoraAdapter | None:
        """What a row must add so it computes W + ΔW_requested on the weights of `pin`:
        `requested` itself, or requested − P while a merge P is pinned."""
        if requested is None or pin.label is None:
            return requested
        if pin.factors is None:
            raise FailedPrecondition(
                f"{pin.label} is pinned and {pin.refusal}; requests naming an "
                "adapter, merge or mix are refused until it is unpinned"
            )
        pin_id = f"pin{pin.epoch}"
        return self.merges.cache.get_or_load(
            # Keyed by content too: a reloaded adapter must not get the old compensation.
            f"{requested.name}@{requested.content_hash}~{pin_id}",
            lambda: compensated_adapter(requested, pin.factors, pin_id, self.max_rank),
        )

    def exact_deltas(self, selection: GenerationRequest):
        """Uncompressed ΔW per module of the adapter, named merge or mix that
        `selection` names (what pinning folds in and export writes)."""
        if selection.adapter is not None:
            adapter = self.store.get(selection.adapter)
            return {n: Factored(m.B.float() * m.scale, m.A.float()) for n, m in adapter.modules.items()}
        spec = self.merges.get(selection.merge) if selection.merge else selection.mix
        if spec is None:
            raise InvalidArgument("pin needs an adapter, a merge name or a mix")
        return self.merges.exact_deltas(spec)
