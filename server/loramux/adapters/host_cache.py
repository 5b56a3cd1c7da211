"""Host LRU of raw adapters, bounded by bytes, with pins and single-flight loads.

Thread-safe: the server calls it from the gRPC threads and the scheduler thread.
Eviction callbacks (the device slot pool frees its slot) run after the lock is
released, in the thread that caused the eviction, so a callback may call back into
the cache or take its own locks without deadlocking against us.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from loramux.adapters.types import LoraAdapter
from loramux.errors import FailedPrecondition, NotFound, ResourceExhausted

_log = logging.getLogger(__name__)

EvictCallback = Callable[[str], None]

# How often a caller waiting on another's load calls its check (the admission check
# of the request it serves: the caller left, shutdown, the merge timeout).
WAIT_CHECK_SECONDS = 0.05


@dataclass
class CacheStats:
    """Counters since the cache was built (a snapshot when read from `stats`).

    misses counts every lookup that found no entry, waiters of a shared load
    included; loads counts loader calls, so misses - loads is the single-flight
    saving. evictions counts LRU evictions only, not explicit removes. reloads
    counts the loads of refresh() (an entry replaced; they count in loads too).
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_failures: int = 0
    load_seconds_total: float = 0.0
    reloads: int = 0


@dataclass
class _Entry:
    adapter: LoraAdapter
    nbytes: int
    pins: int = 0


class _Flight:
    """One in-progress load that concurrent misses of the same name wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.adapter: LoraAdapter | None = None
        self.error: BaseException | None = None


def _wait(flight: _Flight, check: Callable[[], None] | None) -> None:
    """Until `flight` is done, calling `check` (which raises to stop waiting) now and then."""
    if check is None:
        flight.done.wait()
        return
    while not flight.done.wait(WAIT_CHECK_SECONDS):
        check()


class HostAdapterCache:
    """LRU of LoraAdapter keyed by name, holding at most `capacity_bytes` bytes.

    Pinned entries (pin count > 0) are never evicted. Pins are counted so the
    operator and the slot pool can pin independently.
    """

    def __init__(self, capacity_bytes: int, on_evict: Iterable[EvictCallback] = ()) -> None:
        if capacity_bytes < 1:
            raise ValueError("capacity_bytes must be positive")
        self._capacity = capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._flights: dict[str, _Flight] = {}
        self._bytes = 0
        self._stats = CacheStats()
        self._on_evict: list[EvictCallback] = list(on_evict)

    # ------------------------------------------------------------ lookups

    def get(self, name: str) -> LoraAdapter | None:
        """The cached adapter (marking it recently used), or None. Counts hit/miss."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self._stats.misses += 1
                return None
            self._touch(name)
            return entry.adapter

    def get_or_load(
        self, name: str, loader: Callable[[], LoraAdapter], *, pin: bool = False,
        check: Callable[[], None] | None = None,
    ) -> LoraAdapter:
        """The cached adapter, else `loader()`'s result, cached.

        Concurrent misses of one name call `loader` once; the others wait and get
        the same object, or the same exception (then nothing is cached). With
        pin=True the entry is pinned atomically with the lookup. Raises
        ResourceExhausted when the adapter cannot fit next to the pinned entries.
        A waiter calls `check` every WAIT_CHECK_SECONDS and gives up waiting with
        its exception (the load goes on for the others; the leader's own abort is
        its loader's business).
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._touch(name)
                entry.pins += int(pin)
                return entry.adapter
            self._stats.misses += 1
            flight = self._flights.get(name)
            leader = flight is None
            if leader:
                flight = self._flights[name] = _Flight()
        if leader:
            self._lead(name, loader, flight, pins=int(pin))
        else:
            _wait(flight, check)
        if flight.error is not None:
            raise flight.error
        if pin and not leader:
            self._pin_loaded(name, flight.adapter)
        return flight.adapter

    def _lead(
        self, name: str, loader: Callable[[], LoraAdapter], flight: _Flight, pins: int,
        replacing: LoraAdapter | None = None,
    ) -> None:
        """Run the load for everyone waiting on `flight`, then release them.

        replacing: the stale entry a refresh replaces; it is dropped whatever the
        load gives, and the new entry takes its pins."""
        evicted: list[str] = []
        adapter = None
        start = time.perf_counter()
        try:
            adapter = loader()
        except BaseException as e:  # waiters must wake up whatever happened
            flight.error = e
        finally:
            elapsed = time.perf_counter() - start
        dropped = False
        with self._lock:
            self._stats.loads += 1
            self._stats.load_seconds_total += elapsed
            if replacing is not None:
                self._stats.reloads += 1
                # While the flight is open nothing else inserts `name`: the entry is
                # the stale one or was removed/evicted meanwhile (then no pins carry).
                entry = self._entries.get(name)
                pins, dropped = (entry.pins, True) if entry is not None else (0, False)
                if dropped:
                    self._drop(name)
            if flight.error is None:
                try:
                    evicted = self._insert(name, adapter, pins)
                    flight.adapter = adapter
                except ResourceExhausted as e:
                    flight.error = e
            if flight.error is not None:
                self._stats.load_failures += 1
            del self._flights[name]
        flight.done.set()
        same = flight.error is None and replacing is not None and adapter.content_hash == replacing.content_hash
        self._notify(([name] if dropped and not same else []) + evicted)

    def refresh(
        self, name: str, stale: LoraAdapter, loader: Callable[[], LoraAdapter]
    ) -> LoraAdapter:
        """Replace `stale`, the entry of `name`, with `loader()`'s result (its files
        changed on disk); returns what is cached for `name` after.

        Concurrent refreshes and misses of `name` share one `loader` call. The new
        entry keeps the old one's pins. The eviction callbacks fire for `name` once
        the old weights are out, unless the new ones have the same content_hash.
        When `loader` fails, the stale entry is dropped all the same, pins or not (the
        files it came from are gone or no longer valid), and the error is raised.
        When `stale` is no longer the entry (already refreshed, or removed), this is
        get_or_load.
        """
        with self._lock:
            entry = self._entries.get(name)
            flight = self._flights.get(name)
            leader = flight is None and entry is not None and entry.adapter is stale
            if flight is None and entry is not None and not leader:
                return entry.adapter
            if leader:
                flight = self._flights[name] = _Flight()
        if flight is None:
            return self.get_or_load(name, loader)
        if leader:
            self._lead(name, loader, flight, pins=0, replacing=stale)
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.adapter

    def _pin_loaded(self, name: str, adapter: LoraAdapter) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.adapter is not adapter:
                # Evicted between the load and now; a caller asking for a pin must
                # not get an adapter that is silently unpinned.
                raise ResourceExhausted(
                    f"adapter {name!r} was evicted before it could be pinned; host cache "
                    f"holds {self._bytes}/{self._capacity} bytes"
                )
            entry.pins += 1

    # ------------------------------------------------------------ pins and removal

    def pin(self, name: str) -> None:
        """Add a pin to a cached entry; NotFound when it is not cached."""
        with self._lock:
            self._require(name).pins += 1

    def unpin(self, name: str) -> None:
        """Drop one pin; FailedPrecondition when the entry has none."""
        with self._lock:
            entry = self._require(name)
            if entry.pins == 0:
                raise FailedPrecondition(f"adapter {name!r} is not pinned")
            entry.pins -= 1

    def is_pinned(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.pins > 0

    def remove(self, name: str) -> bool:
        """Drop an entry and fire the eviction callbacks; False when not cached.

        FailedPrecondition when it is pinned: unpin it first.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return False
            if entry.pins:
                raise FailedPrecondition(
                    f"adapter {name!r} is pinned ({entry.pins} pin(s)); unpin it first"
                )
            self._drop(name)
        self._notify([name])
        return True

    def subscribe(self, callback: EvictCallback) -> None:
        """Call `callback(name)` whenever an entry leaves (LRU eviction or remove)."""
        with self._lock:
            self._on_evict.append(callback)

    # ------------------------------------------------------------ introspection

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def names(self) -> list[str]:
        """Cached names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def snapshot(self) -> list[tuple[LoraAdapter, bool]]:
        """(adapter, pinned) for every entry, least recently used first."""
        with self._lock:
            return [(e.adapter, e.pins > 0) for e in self._entries.values()]

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    # ------------------------------------------------------------ internals (lock held)

    def _touch(self, name: str) -> None:
        self._entries.move_to_end(name)
        self._stats.hits += 1

    def _require(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"adapter {name!r} is not in the host cache")
        return entry

    def _insert(self, name: str, adapter: LoraAdapter, pins: int) -> list[str]:
        """Insert, evicting LRU unpinned entries; returns the evicted names."""
        need = adapter.nbytes
        if need > self._capacity:
            raise ResourceExhausted(
                f"adapter {name!r} needs {need} bytes but the host cache holds at most "
                f"{self._capacity} bytes (host_cache_bytes)"
            )
        pinned = sum(e.nbytes for e in self._entries.values() if e.pins)
        if pinned + need > self._capacity:
            # Decide before evicting anything: a refused insert must not cost entries.
            raise ResourceExhausted(
                f"adapter {name!r} needs {need} bytes but only {self._capacity - pinned} of "
                f"the host cache's {self._capacity} bytes can be freed; {pinned} bytes are "
                "pinned"
            )
        evicted = []
        for victim in [n for n, e in self._entries.items() if not e.pins]:
            if self._bytes + need <= self._capacity:
                break
            self._drop(victim)
            self._stats.evictions += 1
            evicted.append(victim)
        self._entries[name] = _Entry(adapter, need, pins)
        self._bytes += need
        return evicted

    def _drop(self, name: str) -> None:
        self._bytes -= self._entries.pop(name).nbytes

    # ------------------------------------------------------------ callbacks (lock free)

    def _notify(self, names: list[str]) -> None:
        if not names:
            return
        with self._lock:
            callbacks = list(self._on_evict)
        for name in names:
            for callback in callbacks:
                try:
                    callback(name)
                except Exception:
                    # One broken subscriber must not fail an unrelated request's load.
                    _log.exception("eviction callback %r failed for adapter %r", callback, name)
