"""AdapterStore: name → validated LoraAdapter, through the host cache.

The one place that ties naming (where an adapter lives), peft_format (is it
acceptable, what are its factors) and the host cache (keep it, share loads) together.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from loramux.adapters.host_cache import CacheStats, EvictCallback, HostAdapterCache
from loramux.adapters.naming import resolve_adapter_dir, validate_adapter_name
from loramux.adapters.peft_format import default_warn, read_adapter
from loramux.adapters.types import LoraAdapter
from loramux.config import AdapterConfig
from loramux.errors import FailedPrecondition, NotFound
from loramux.model.spec import BaseModelSpec


@dataclass(frozen=True)
class AdapterInfo:
    """What an operator sees about one adapter in the host cache."""

    name: str
    rank: int  # largest rank over its modules
    nbytes: int  # host bytes of its float32 factors
    num_modules: int
    pinned: bool  # pinned by anyone (operator or slot pool)
    explicit: bool  # brought in by load()/pin() rather than on demand by a request
    base_model_name: str | None
    content_hash: str


class AdapterStore:
    """Validated adapters by name, cached on the host.

    get() is the request path; load()/unload()/pin()/unpin() are the operator's.
    Operator pins are idempotent (pinning twice needs one unpin); other users of
    the cache (the slot pool) pin through `cache` with their own counted pins.
    """

    def __init__(
        self,
        cfg: AdapterConfig,
        spec: BaseModelSpec,
        *,
        cache: HostAdapterCache | None = None,
        warn: Callable[[str], None] = default_warn,
    ) -> None:
        self._cfg = cfg
        self._spec = spec
        self._warn = warn
        self.cache = cache if cache is not None else HostAdapterCache(cfg.host_cache_bytes)
        self._lock = threading.Lock()
        self._pinned: set[str] = set()  # operator pins
        self._explicit: set[str] = set()
        self.cache.subscribe(self._forget)

    def get(self, name: str) -> LoraAdapter:
        """The adapter called `name`, read from the first root that has it on a miss.

        InvalidArgument for a bad name or refused adapter, NotFound when no root has
        it, ResourceExhausted when it does not fit in the host cache.
        """
        validate_adapter_name(name)  # before the cache: bad names are not misses
        return self.cache.get_or_load(name, lambda: self._read(name))

    def load(self, name: str) -> LoraAdapter:
        """get(), and remember that an operator asked for it (shown in list())."""
        adapter = self.get(name)
        with self._lock:
            if name in self.cache:
                self._explicit.add(name)
        return adapter

    def unload(self, name: str) -> None:
        """Drop `name` from the host cache (eviction callbacks fire).

        NotFound when it is not loaded; FailedPrecondition when it is pinned.
        """
        validate_adapter_name(name)
        if not self.cache.remove(name):
            raise NotFound(f"adapter {name!r} is not loaded")

    def pin(self, name: str) -> LoraAdapter:
        """Load `name` if needed and keep it in the host cache until unpin()."""
        validate_adapter_name(name)
        with self._lock:
            # An operator pin keeps the entry cached, so this is a hit.
            adapter = self.cache.get(name) if name in self._pinned else None
        if adapter is not None:
            return adapter
        adapter = self.cache.get_or_load(name, lambda: self._read(name), pin=True)
        with self._lock:
            if name in self._pinned:
                self.cache.unpin(name)  # a concurrent pin() won; keep one operator pin
            self._pinned.add(name)
            self._explicit.add(name)
        return adapter

    def unpin(self, name: str) -> None:
        """Release the operator pin; FailedPrecondition when the operator has none."""
        validate_adapter_name(name)
        with self._lock:
            if name not in self._pinned:
                raise FailedPrecondition(f"adapter {name!r} is not pinned")
            self._pinned.discard(name)
            self.cache.unpin(name)

    def list(self) -> list[AdapterInfo]:
        """Every adapter in the host cache, least recently used first."""
        with self._lock:
            explicit = set(self._explicit)
        return [_info(a, pinned, a.name in explicit) for a, pinned in self.cache.snapshot()]

    def subscribe_evictions(self, callback: EvictCallback) -> None:
        """Call `callback(name)` whenever an adapter leaves the host cache."""
        self.cache.subscribe(callback)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def _read(self, name: str) -> LoraAdapter:
        directory = resolve_adapter_dir(name, list(self._cfg.roots))
        return read_adapter(directory, name, self._spec, self._cfg, self._warn)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._explicit.discard(name)
            self._pinned.discard(name)


def _info(adapter: LoraAdapter, pinned: bool, explicit: bool) -> AdapterInfo:
    return AdapterInfo(
        name=adapter.name,
        rank=adapter.rank,
        nbytes=adapter.nbytes,
        num_modules=len(adapter.modules),
        pinned=pinned,
        explicit=explicit,
        base_model_name=adapter.base_model_name,
        content_hash=adapter.content_hash,
    )
