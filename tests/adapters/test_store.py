"""AdapterStore: names → validated adapters through roots, reader and host cache."""

from __future__ import annotations

import os

import pytest
import torch

from loramux.adapters.store import AdapterStore
from loramux.config import AdapterConfig
from loramux.errors import (
    AdapterRefused,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tests.adapters.conftest import SPEC_NAME, gets_at_once, lora_config, lora_tensors, write_adapter

Q0 = "model.layers.0.self_attn.q_proj"
ONE_MODULE_BYTES = 2 * 4 * 64 * 4  # r=4 q_proj: A [4, 64] + B [64, 4], float32


def test_get_reads_peft_adapter_once(root, tiny_spec, peft_adapter, adapter_cfg):
    peft_model = peft_adapter(root / "sql", r=8, lora_alpha=16)
    store = AdapterStore(adapter_cfg, tiny_spec)
    a = store.get("sql")
    assert store.get("sql") is a
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    ref = layer.get_delta_weight("default")  # [d_out, d_in]
    torch.testing.assert_close(a.modules["model.layers.1.mlp.down_proj"].delta(), ref)
    s = store.stats
    assert (s.loads, s.hits, s.misses) == (1, 1, 1)


def test_list_describes_cached_adapters(root, tiny_spec, good_adapter, adapter_cfg):
    good_adapter(root / "a")
    good_adapter(root / "b", r=2, modules=(Q0, "model.layers.1.mlp.up_proj"))
    store = AdapterStore(adapter_cfg, tiny_spec)
    store.get("a")
    store.load("b")
    store.pin("a")
    info = {i.name: i for i in store.list()}
    assert set(info) == {"a", "b"}
    assert (info["a"].rank, info["a"].nbytes, info["a"].num_modules) == (4, ONE_MODULE_BYTES, 1)
    assert info["a"].pinned and not info["b"].pinned
    assert info["b"].explicit and info["a"].explicit  # pin() is an operator action too
    assert info["b"].num_modules == 2 and info["b"].rank == 2
    assert info["a"].base_model_name == SPEC_NAME and len(info["a"].content_hash) == 64


def test_get_alone_is_not_explicit(root, tiny_spec, good_adapter, adapter_cfg):
    good_adapter(root / "a")
    store = AdapterStore(adapter_cfg, tiny_spec)
    store.get("a")
    assert not store.list()[0].explicit


def test_unload_fires_eviction_and_reloads_later(root, tiny_spec, good_adapter, adapter_cfg):
    good_adapter(root / "a")
    store = AdapterStore(adapter_cfg, tiny_spec)
    evicted: list[str] = []
    store.subscribe_evictions(evicted.append)
    first = store.load("a")
    store.unload("a")
    assert evicted == ["a"] and [i.cached for i in store.list()] == [False]
    with pytest.raises(NotFound, match="'a' is not loaded"):
        store.unload("a")
    assert store.get("a") is not first and store.stats.loads == 2


def test_pin_is_idempotent_and_blocks_unload(root, tiny_spec, good_adapter, adapter_cfg):
    good_adapter(root / "a")
    store = AdapterStore(adapter_cfg, tiny_spec)
    store.pin("a")
    store.pin("a")
    with pytest.raises(FailedPrecondition, match="pinned"):
        store.unload("a")
    store.unpin("a")  # one unpin undoes any number of operator pins
    with pytest.raises(FailedPrecondition, match="'a' is not pinned"):
        store.unpin("a")
    store.unload("a")


def test_operator_and_cache_pins_are_independent(root, tiny_spec, good_adapter, adapter_cfg):
    good_adapter(root / "a")
    store = AdapterStore(adapter_cfg, tiny_spec)
    store.get("a")
    store.cache.pin("a")  # e.g. the slot pool while a request uses it
    store.pin("a")
    store.unpin("a")
    assert store.list()[0].pinned
    store.cache.unpin("a")
    assert not store.list()[0].pinned


def test_pinned_adapter_survives_cache_pressure(root, tiny_spec, good_adapter):
    for n in "abcd":
        good_adapter(root / n)
    cfg = AdapterConfig(roots=[root], host_cache_bytes=2 * ONE_MODULE_BYTES)
    store = AdapterStore(cfg, tiny_spec)
    evicted: list[str] = []
    store.subscribe_evictions(evicted.append)
    store.pin("a")
    for n in "bcd":
        store.get(n)
    assert store.cache.names() == ["a", "d"]
    assert evicted == ["b", "c"]
    store.unpin("a")
    store.get("b")
    assert evicted == ["b", "c", "a"]  # unpinned, a is the LRU entry again
    store.pin("b")
    store.pin("d")
    with pytest.raises(ResourceExhausted, match="pinned"):
        store.get("c")  # b and d fill the cache and are pinned
    assert store.cache.names() == ["b", "d"]  # pin() counts as a use


def test_adapter_larger_than_cache_is_resource_exhausted(root, tiny_spec, good_adapter):
    good_adapter(root / "a")
    store = AdapterStore(AdapterConfig(roots=[root], host_cache_bytes=1000), tiny_spec)
    with pytest.raises(ResourceExhausted, match=f"needs {ONE_MODULE_BYTES} bytes"):
        store.get("a")


@pytest.mark.parametrize("name", ["../a", "/etc", "a/b", "", ".."])
def test_bad_names_are_invalid_and_not_misses(name, root, tiny_spec, adapter_cfg):
    store = AdapterStore(adapter_cfg, tiny_spec)
    for call in (store.get, store.load, store.pin, store.unpin, store.unload):
        with pytest.raises(InvalidArgument, match="names must match"):
            call(name)
    assert store.stats.misses == 0


def test_not_found_and_no_roots(root, tiny_spec, adapter_cfg):
    with pytest.raises(NotFound, match="'ghost' not found in the 1 adapter root$"):
        AdapterStore(adapter_cfg, tiny_spec).get("ghost")
    with pytest.raises(FailedPrecondition, match="no adapter roots"):
        AdapterStore(AdapterConfig(roots=[]), tiny_spec).get("ghost")


def test_first_root_wins(tmp_path, tiny_spec, good_adapter):
    good_adapter(tmp_path / "r1" / "a", r=2)
    good_adapter(tmp_path / "r2" / "a", r=4)
    cfg = AdapterConfig(roots=[tmp_path / "r1", tmp_path / "r2"])
    assert AdapterStore(cfg, tiny_spec).get("a").rank == 2


def test_symlink_escapes_through_the_store(tmp_path, root, tiny_spec, good_adapter, adapter_cfg):
    outside = good_adapter(tmp_path / "outside")
    os.symlink(outside, root / "dir_escape")
    d = good_adapter(root / "file_escape")
    (d / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", d / "adapter_model.safetensors")
    store = AdapterStore(adapter_cfg, tiny_spec)
    with pytest.raises(InvalidArgument, match="resolves outside the adapter root"):
        store.get("dir_escape")
    with pytest.raises(AdapterRefused, match="outside the adapter directory"):
        store.get("file_escape")


def test_refused_adapter_is_not_cached(root, tiny_spec, adapter_cfg):
    write_adapter(root / "dora", lora_config(use_dora=True), lora_tensors(tiny_spec))
    store = AdapterStore(adapter_cfg, tiny_spec)
    for _ in range(2):
        with pytest.raises(AdapterRefused, match="DoRA"):
            store.get("dora")
    assert [i.name for i in store.list() if i.cached] == []
    assert store.stats.loads == 2 and store.stats.load_failures == 2


def test_name_mismatch_warning_goes_to_injected_warn(root, tiny_spec):
    write_adapter(
        root / "a", lora_config(base_model_name_or_path="meta-llama/Llama-3-8B"),
        lora_tensors(tiny_spec),
    )
    warnings: list[str] = []
    store = AdapterStore(AdapterConfig(roots=[root]), tiny_spec, warn=warnings.append)
    store.get("a")
    store.get("a")
    assert len(warnings) == 1 and "Llama-3-8B" in warnings[0]


def test_concurrent_gets_read_the_disk_once(root, tiny_spec, peft_adapter, adapter_cfg):
    peft_adapter(root / "a", r=8, lora_alpha=16)
    store = AdapterStore(adapter_cfg, tiny_spec)
    results = gets_at_once(store, "a", 8)
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert store.stats.loads == 1
