"""Mixes on demand: resolve a MixSpec to a cached virtual adapter, and keep the
operator's named merges."""

from __future__ import annotations

import threading
from dataclasses import replace

from loramux.adapters.host_cache import HostAdapterCache
from loramux.adapters.naming import validate_adapter_name
from loramux.adapters.store import AdapterStore
from loramux.adapters.types import LoraAdapter
from loramux.config import MergeConfig
from loramux.errors import FailedPrecondition, NotFound
from loramux.merging import materialize
from loramux.merging.materialize import MergeReport
from loramux.merging.spec import MixSpec


class MergeService:
    """Resolves mixes through a byte-bounded cache keyed by content hash; identical
    concurrent misses merge once (the cache's single flight)."""

    def __init__(self, store: AdapterStore, cfg: MergeConfig):
        self.store, self.cfg = store, cfg
        self.cache = HostAdapterCache(cfg.cache_bytes)
        self._reports: dict[str, MergeReport] = {}
        self._named: dict[str, MixSpec] = {}
        self._named_reports: dict[str, MergeReport] = {}  # as merged at create()
        self._lock = threading.Lock()
        self.cache.subscribe(self._forget_report)

    def resolve(self, spec: MixSpec) -> tuple[LoraAdapter, MergeReport]:
        """The served virtual adapter of `spec` and how it was made."""
        adapters = [self.store.get(n) for n in spec.names]
        key = spec.key({a.name: a.content_hash for a in adapters}, self._serving())
        name = f"mix:{key}"
        hit = name in self.cache

        def merge() -> LoraAdapter:
            merged, report = materialize.serving_adapter(
                adapters, spec, key, self.cfg.max_rank, self.cfg.error_budget
            )
            merged = replace(merged, name=name)
            with self._lock:
                self._reports[name] = report
            return merged

        merged = self.cache.get_or_load(name, merge)
        with self._lock:
            report = self._reports.get(name) or MergeReport(spec.method, merged.rank, 0.0, 0.0)
        return merged, replace(report, cache_hit=hit)

    def exact_deltas(self, spec: MixSpec):
        """Uncompressed merged ΔW per module (pinning and export use these)."""
        return materialize.exact_deltas([self.store.get(n) for n in spec.names], spec)

    def _serving(self) -> tuple:
        return (self.cfg.max_rank, self.cfg.error_budget)

    def _forget_report(self, name: str) -> None:
        with self._lock:
            self._reports.pop(name, None)

    # ---- named merges ------------------------------------------------------

    def create(self, name: str, spec: MixSpec, replace_existing: bool = False) -> MergeReport:
        """Register `spec` under `name` after merging it once (so errors surface now)."""
        validate_adapter_name(name)
        with self._lock:
            if name in self._named and not replace_existing:
                raise FailedPrecondition(f"a merge named {name!r} already exists; delete it first")
        _, report = self.resolve(spec)
        with self._lock:
            self._named[name] = spec
            self._named_reports[name] = report
        return report

    def report_of(self, name: str) -> MergeReport | None:
        """How the named merge was served when it was created."""
        with self._lock:
            return self._named_reports.get(name)

    def get(self, name: str) -> MixSpec:
        with self._lock:
            spec = self._named.get(name)
        if spec is None:
            raise NotFound(f"no merge named {name!r}; create it first (known: {sorted(self._named)})")
        return spec

    def delete(self, name: str) -> None:
        with self._lock:
            self._named_reports.pop(name, None)
            if self._named.pop(name, None) is None:
                raise NotFound(f"no merge named {name!r}")

    def list(self) -> dict[str, MixSpec]:
        with self._lock:
            return dict(self._named)
