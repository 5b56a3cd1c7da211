"""AdapterStore: name → validated LoraAdapter, through the host cache.

The one place that ties naming (where an adapter lives), peft_format (is it
acceptable, what are its factors) and the host cache (keep it, share loads) together.
The files on disk are the truth: a cached adapter whose files changed is reloaded at
its next request (two stats per request tell), and listing shows every adapter under
the roots, cached or not.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from loramux.adapters.host_cache import CacheStats, EvictCallback, HostAdapterCache
from loramux.adapters.naming import locate_adapter, scan_adapter_dirs, validate_adapter_name
from loramux.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, default_warn, read_adapter
from loramux.adapters.types import LoraAdapter
from loramux.config import AdapterConfig
from loramux.errors import FailedPrecondition, NotFound
from loramux.model.spec import BaseModelSpec


_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInfo:
    """What an operator sees about one adapter: cached, or only on disk.

    An adapter that is not cached (cached=False) has not been read: only its name
    (its directory under the root) is known; rank, nbytes and num_modules are 0,
    base_model_name None and content_hash "".
    """

    name: str
    rank: int  # largest rank over its modules
    nbytes: int  # host bytes of its float32 factors
    num_modules: int
    pinned: bool  # pinned by anyone (operator or slot pool)
    explicit: bool  # brought in by load()/pin() rather than on demand by a request
    base_model_name: str | None
    content_hash: str
    cached: bool = True  # in the host cache


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
        """The adapter called `name`, read from the first root that has it on a miss,
        or again when the files it was read from changed (then the old version
        leaves the cache; rows already running keep it).

        InvalidArgument for a bad name or refused adapter, NotFound when no root has
        it, ResourceExhausted when it does not fit in the host cache. A changed
        adapter that now fails any of these is dropped from the cache, and raises.
        """
        validate_adapter_name(name)  # before the cache: bad names are not misses
        return self._fresh(name, self.cache.get_or_load(name, lambda: self._read(name)))

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
        """Load `name` if needed and keep it in the host cache until unpin() (a
        reload after its files change keeps the pin)."""
        validate_adapter_name(name)
        with self._lock:
            # An operator pin keeps the entry cached, so this is a hit.
            adapter = self.cache.get(name) if name in self._pinned else None
        if adapter is None:
            adapter = self.cache.get_or_load(name, lambda: self._read(name), pin=True)
            with self._lock:
                if name in self._pinned:
                    self.cache.unpin(name)  # a concurrent pin() won; keep one operator pin
                self._pinned.add(name)
                self._explicit.add(name)
        return self._fresh(name, adapter)

    def unpin(self, name: str) -> None:
        """Release the operator pin; FailedPrecondition when the operator has none."""
        validate_adapter_name(name)
        with self._lock:
            if name not in self._pinned:
                raise FailedPrecondition(f"adapter {name!r} is not pinned")
            self._pinned.discard(name)
            self.cache.unpin(name)

    def list(self) -> list[AdapterInfo]:
        """Every adapter a request could name, sorted by name: each directory under
        the roots (first root wins, one level deep) that holds adapter_config.json
        and adapter_model.safetensors, and every cached adapter (also when its
        files are gone). Uncached ones are not read, so only their names are known.
        """
        with self._lock:
            explicit = set(self._explicit)
        infos = {
            a.name: _info(a, pinned, a.name in explicit) for a, pinned in self.cache.snapshot()
        }
        for name, directory in scan_adapter_dirs(list(self._cfg.roots)).items():
            if name not in infos and _has_adapter_files(directory):
                infos[name] = _uncached_info(name)
        return [infos[n] for n in sorted(infos)]

    def subscribe_evictions(self, callback: EvictCallback) -> None:
        """Call `callback(name)` whenever an adapter leaves the host cache."""
        self.cache.subscribe(callback)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def _read(self, name: str) -> LoraAdapter:
        where = locate_adapter(name, list(self._cfg.roots))
        return read_adapter(where.real, name, self._spec, self._cfg, self._warn, entry=where.entry)

    def _fresh(self, name: str, adapter: LoraAdapter) -> LoraAdapter:
        """`adapter`, or its new version when its files changed (one stat per file)."""
        return self._reload(name, adapter) if adapter.files_changed() else adapter

    def _reload(self, name: str, stale: LoraAdapter) -> LoraAdapter:
        try:
            fresh = self.cache.refresh(name, stale, lambda: self._read(name))
        except Exception as e:
            _log.warning("adapter %r changed on disk and was dropped: %s", name, e)
            raise
        if fresh is not stale and fresh.content_hash != stale.content_hash:
            _log.info("adapter %r changed on disk; reloaded (content %s -> %s)",
                      name, stale.content_hash[:12], fresh.content_hash[:12])
        return fresh

    def _forget(self, name: str) -> None:
        """The cache let go of `name`'s weights. The operator's marks go with them,
        unless `name` is still cached: a refresh put new weights under the name,
        and kept its pins."""
        with self._lock:
            if name in self.cache:
                return
            self._explicit.discard(name)
            self._pinned.discard(name)


def _has_adapter_files(directory) -> bool:
    """Cheap: both files are there (the reader judges them when the adapter is used)."""
    return all(os.path.isfile(os.path.join(directory, f)) for f in (CONFIG_FILE, WEIGHTS_FILE))


def _uncached_info(name: str) -> AdapterInfo:
    return AdapterInfo(
        name=name, rank=0, nbytes=0, num_modules=0, pinned=False, explicit=False,
        base_model_name=None, content_hash="", cached=False,
    )


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
        cached=True,
    )
