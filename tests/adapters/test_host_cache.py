"""HostAdapterCache: byte bound, LRU order, pins, callbacks, single-flight."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramux.adapters.host_cache import HostAdapterCache
from loramux.adapters.types import LoraAdapter, LoraModule
from loramux.errors import FailedPrecondition, NotFound, ResourceExhausted


def adapter(name: str, nbytes: int = 400) -> LoraAdapter:
    """A real LoraAdapter of exactly `nbytes` host bytes (a multiple of 4, ≥ 8)."""
    k = nbytes // 4 - 1
    module = LoraModule(A=torch.zeros(1, k), B=torch.zeros(1, 1), scale=1.0)  # [1, k], [1, 1]
    a = LoraAdapter(name=name, modules={"m": module}, content_hash=name)
    assert a.nbytes == nbytes
    return a


def load(cache: HostAdapterCache, name: str, nbytes: int = 400, **kw) -> LoraAdapter:
    return cache.get_or_load(name, lambda: adapter(name, nbytes), **kw)


def check_invariants(cache: HostAdapterCache, sizes: dict[str, int]) -> None:
    names = cache.names()
    assert cache.bytes_used == sum(sizes[n] for n in names)
    assert cache.bytes_used <= cache.capacity_bytes
    assert cache.count == len(names) == len(set(names))


def test_hit_miss_and_stats():
    cache = HostAdapterCache(10_000)
    a = load(cache, "a")
    assert load(cache, "a") is a
    assert cache.get("a") is a and cache.get("zzz") is None
    s = cache.stats
    assert (s.hits, s.misses, s.loads, s.evictions) == (2, 2, 1, 0)
    assert s.load_seconds_total >= 0
    assert cache.bytes_used == 400 and cache.count == 1 and cache.capacity_bytes == 10_000


def test_stats_is_a_snapshot():
    cache = HostAdapterCache(10_000)
    before = cache.stats
    load(cache, "a")
    assert before.misses == 0 and cache.stats.misses == 1


def test_lru_eviction_order_and_callbacks():
    evicted: list[str] = []
    cache = HostAdapterCache(1200, on_evict=[evicted.append])
    for n in "abc":
        load(cache, n)
    load(cache, "a")  # a is now most recent; b is the LRU
    load(cache, "d")
    assert evicted == ["b"] and cache.names() == ["c", "a", "d"]
    load(cache, "e", nbytes=800)  # needs two victims: c then a
    assert evicted == ["b", "c", "a"] and cache.names() == ["d", "e"]
    assert cache.stats.evictions == 3
    check_invariants(cache, {"d": 400, "e": 800})


def test_pinned_entries_survive_eviction():
    cache = HostAdapterCache(1200)
    load(cache, "p", pin=True)
    load(cache, "q")
    cache.pin("q")
    for i in range(20):
        load(cache, f"x{i}")
    assert "p" in cache and "q" in cache and cache.is_pinned("p")
    cache.unpin("q")
    load(cache, "y")
    load(cache, "z")
    assert "q" not in cache and "p" in cache


def test_pins_are_counted():
    cache = HostAdapterCache(800)
    load(cache, "a")
    cache.pin("a")
    cache.pin("a")
    cache.unpin("a")
    assert cache.is_pinned("a")
    cache.unpin("a")
    assert not cache.is_pinned("a")
    with pytest.raises(FailedPrecondition, match="not pinned"):
        cache.unpin("a")


def test_pin_unknown_is_not_found():
    cache = HostAdapterCache(800)
    with pytest.raises(NotFound, match="'nope'"):
        cache.pin("nope")
    with pytest.raises(NotFound):
        cache.unpin("nope")


def test_remove_fires_callbacks_and_refuses_pinned():
    removed: list[str] = []
    cache = HostAdapterCache(2000)
    cache.subscribe(removed.append)
    load(cache, "a")
    load(cache, "b", pin=True)
    assert cache.remove("a") is True and removed == ["a"] and cache.bytes_used == 400
    assert cache.remove("a") is False and removed == ["a"]
    with pytest.raises(FailedPrecondition, match="pinned"):
        cache.remove("b")
    assert "b" in cache
    assert cache.stats.evictions == 0  # explicit removes are not LRU evictions


def test_oversize_adapter_is_resource_exhausted_with_numbers():
    cache = HostAdapterCache(1000)
    load(cache, "a")
    with pytest.raises(ResourceExhausted, match=r"needs 1200 bytes .* at most 1000 bytes"):
        load(cache, "big", nbytes=1200)
    assert cache.names() == ["a"]  # nothing evicted for a load that could never fit
    assert cache.stats.load_failures == 1


def test_everything_pinned_is_resource_exhausted_and_evicts_nothing():
    evicted: list[str] = []
    cache = HostAdapterCache(1000, on_evict=[evicted.append])
    load(cache, "p", nbytes=600, pin=True)
    load(cache, "u", nbytes=200)
    msg = r"needs 600 bytes but only 400 .* 600 bytes are pinned"
    with pytest.raises(ResourceExhausted, match=msg):
        load(cache, "x", nbytes=600)
    assert evicted == [] and cache.names() == ["p", "u"]


def test_failing_callback_does_not_break_the_cache(caplog):
    seen: list[str] = []

    def broken(name):
        raise RuntimeError("subscriber bug")

    cache = HostAdapterCache(400, on_evict=[broken, seen.append])
    load(cache, "a")
    load(cache, "b")
    assert seen == ["a"] and cache.names() == ["b"]
    assert "subscriber bug" in caplog.text


def test_callback_may_reenter_the_cache():
    cache = HostAdapterCache(400)
    seen: list[tuple[str, list[str]]] = []
    cache.subscribe(lambda name: seen.append((name, cache.names())))  # would deadlock under lock
    load(cache, "a")
    load(cache, "b")
    assert seen == [("a", ["b"])]


# ---------------------------------------------------------------- churn


OPS = st.lists(
    st.tuples(
        st.sampled_from(["get", "get", "get", "pin", "unpin", "remove"]),
        st.integers(0, 11),
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_byte_bound_holds_under_churn(ops):
    sizes = {f"a{i}": 100 * (1 + i % 5) for i in range(12)}  # 100..500 bytes
    evicted: list[str] = []
    cache = HostAdapterCache(1000, on_evict=[evicted.append])
    pins: dict[str, int] = {}
    for op, i in ops:
        name = f"a{i}"
        seen = len(evicted)
        pinned_before = {n for n, c in pins.items() if c > 0}
        try:
            if op == "get":
                load(cache, name, sizes[name])
            elif op == "pin":
                cache.pin(name)
                pins[name] = pins.get(name, 0) + 1
            elif op == "unpin":
                cache.unpin(name)
                pins[name] -= 1
            else:
                cache.remove(name)
        except (ResourceExhausted, NotFound, FailedPrecondition):
            pass
        check_invariants(cache, sizes)
        pinned = {n for n, c in pins.items() if c > 0}
        assert pinned <= set(cache.names())  # pinned entries are never evicted
        assert not set(evicted[seen:]) & pinned_before  # no pinned entry left
        assert {n for n in cache.names() if cache.is_pinned(n)} == pinned


def test_seeded_churn_with_threads():
    sizes = {f"a{i}": 100 * (1 + i % 7) for i in range(30)}
    cache = HostAdapterCache(2000)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                name = rng.choice(list(sizes))
                got = load(cache, name, sizes[name])
                assert got.name == name
                assert cache.bytes_used <= 2000
        except BaseException as e:  # report in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_invariants(cache, sizes)
    s = cache.stats
    assert s.hits + s.misses == 8 * 300


# ---------------------------------------------------------------- single-flight


def _run_concurrently(n: int, fn) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_misses_load_once():
    cache = HostAdapterCache(10_000)
    calls = []

    def loader():
        calls.append(1)
        time.sleep(0.1)  # long enough for every thread to arrive while loading
        return adapter("a")

    results = _run_concurrently(8, lambda: cache.get_or_load("a", loader))
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and isinstance(results[0], LoraAdapter)
    s = cache.stats
    assert s.loads == 1 and s.misses + s.hits == 8 and s.load_seconds_total >= 0.1


def test_concurrent_pins_are_all_counted():
    cache = HostAdapterCache(10_000)

    def loader():
        time.sleep(0.05)
        return adapter("a")

    _run_concurrently(6, lambda: cache.get_or_load("a", loader, pin=True))
    for _ in range(6):
        cache.unpin("a")
    with pytest.raises(FailedPrecondition):
        cache.unpin("a")


def test_loader_error_reaches_every_waiter_and_is_not_cached():
    cache = HostAdapterCache(10_000)
    calls = []

    def failing():
        calls.append(1)
        time.sleep(0.1)
        raise ValueError("disk on fire")

    results = _run_concurrently(5, lambda: cache.get_or_load("a", failing))
    assert len(calls) == 1
    assert all(isinstance(r, ValueError) and "disk on fire" in str(r) for r in results)
    assert "a" not in cache and cache.stats.load_failures == 1
    assert load(cache, "a").name == "a"  # the next miss tries again


def test_different_names_load_in_parallel():
    cache = HostAdapterCache(10_000)
    started = threading.Barrier(2, timeout=5)

    def loader(name):
        started.wait()  # deadlocks (times out) if loads were serialised
        return adapter(name)

    names = iter(["a", "b"])
    lock = threading.Lock()

    def one():
        with lock:
            name = next(names)
        return cache.get_or_load(name, lambda: loader(name))

    results = _run_concurrently(2, one)
    assert sorted(r.name for r in results) == ["a", "b"]


# ---------------------------------------------------------------- refresh


def _version(name: str, content: str, nbytes: int = 400) -> LoraAdapter:
    a = adapter(name, nbytes)
    return LoraAdapter(name=name, modules=a.modules, content_hash=content)


def test_refresh_replaces_the_entry_keeping_pins_and_bytes_exact():
    removed: list[str] = []
    cache = HostAdapterCache(2000, on_evict=[removed.append])
    old = cache.get_or_load("a", lambda: _version("a", "v1"), pin=True)
    new = cache.refresh("a", old, lambda: _version("a", "v2", 800))
    assert cache.get("a") is new and cache.is_pinned("a") and cache.bytes_used == 800
    assert removed == ["a"] and cache.stats.reloads == 1 and cache.stats.loads == 2
    # A caller still holding the old object gets the current entry, no second load.
    assert cache.refresh("a", old, lambda: pytest.fail("loaded twice")) is new


def test_refresh_to_identical_content_fires_no_callback():
    removed: list[str] = []
    cache = HostAdapterCache(2000, on_evict=[removed.append])
    old = cache.get_or_load("a", lambda: _version("a", "same"))
    assert cache.refresh("a", old, lambda: _version("a", "same")) is not old
    assert removed == []


def test_failed_refresh_drops_the_stale_entry_even_pinned():
    removed: list[str] = []
    cache = HostAdapterCache(2000, on_evict=[removed.append])
    old = cache.get_or_load("a", lambda: _version("a", "v1"), pin=True)

    def broken() -> LoraAdapter:
        raise NotFound("gone")

    with pytest.raises(NotFound, match="gone"):
        cache.refresh("a", old, broken)
    assert "a" not in cache and cache.bytes_used == 0 and removed == ["a"]
    assert cache.stats.load_failures == 1


def test_refresh_of_a_removed_entry_is_a_plain_load():
    cache = HostAdapterCache(2000)
    old = cache.get_or_load("a", lambda: _version("a", "v1"))
    cache.remove("a")
    new = cache.refresh("a", old, lambda: _version("a", "v2"))
    assert cache.get("a") is new and cache.stats.reloads == 0
