"""The block allocator and prefix hashes, on their own."""

from __future__ import annotations

import pytest
import torch

from loramux.engine.kv_cache import BlockAllocator, KvCache, KvGeometry, block_hashes
from loramux.errors import InvalidArgument


def test_allocate_and_free_return_every_block():
    a = BlockAllocator(8, 4)
    got = a.allocate(5)
    assert len(set(got)) == 5 and a.num_free == 3 and a.num_used == 5
    with pytest.raises(RuntimeError):
        a.allocate(4)
    a.free(got)
    assert a.num_free == 8 and a.num_used == 0 and a.num_cached == 0


def test_a_freed_block_is_reused_first():
    a = BlockAllocator(8, 4)
    first = a.allocate(2)
    a.free(first)
    assert set(a.allocate(2)) == set(first)  # warm pages, bounded RSS


def test_hashed_blocks_stay_cached_until_space_is_needed():
    a = BlockAllocator(4, 2)
    blocks = a.allocate(2)
    hashes = block_hashes([1, 2, 3, 4], 2, "base|pin0")
    for b, h in zip(blocks, hashes):
        a.register(b, h)
    a.free(blocks)
    assert a.num_cached == 2 and a.num_free == 4 and a.num_used == 0
    assert a.match_prefix(hashes) == blocks  # taken back, owned again
    assert a.num_cached == 0 and a.num_used == 2
    a.free(blocks)
    a.allocate(4)  # no truly free block left for two of them: the cached ones are evicted
    assert a.stats.evictions == 2 and a.match_prefix(hashes) == []


def test_shared_blocks_are_counted_per_owner():
    a = BlockAllocator(4, 2)
    blocks = a.allocate(1)
    h = block_hashes([7, 8], 2, "x")
    a.register(blocks[0], h[0])
    assert a.match_prefix(h) == blocks  # a second owner
    a.free(blocks)
    assert a.num_used == 1 and a.num_cached == 0  # still owned by the first
    a.free(blocks)
    assert a.num_used == 0 and a.num_cached == 1


def test_match_stops_at_the_first_missing_block():
    a = BlockAllocator(8, 2)
    hashes = block_hashes([1, 2, 3, 4, 5, 6], 2, "x")
    b = a.allocate(3)
    a.register(b[0], hashes[0])
    a.register(b[2], hashes[2])  # block 1 of the chain is missing
    assert a.match_prefix(hashes) == [b[0]]


def test_hashes_depend_on_tokens_position_and_weights():
    base = block_hashes([1, 2, 3, 4], 2, "base|pin0")
    assert base == block_hashes([1, 2, 3, 4, 5], 2, "base|pin0")  # only full blocks
    assert base[0] != block_hashes([1, 2, 3, 4], 2, "base|pin1")[0]  # re-pinned weights
    assert base[0] != block_hashes([1, 2, 3, 4], 2, "x@abc|pin0")[0]  # an adapter
    assert base[1] != block_hashes([9, 9, 3, 4], 2, "base|pin0")[1]  # chained: the prefix counts
    assert block_hashes([1, 2, 3, 4], 2, "base|pin0", start=1, prev=base[0]) == base[1:]


def test_prefix_caching_off_registers_nothing():
    a = BlockAllocator(4, 2, prefix_caching=False)
    b = a.allocate(1)
    h = block_hashes([1, 2], 2, "x")
    a.register(b[0], h[0])
    a.free(b)
    assert a.num_cached == 0 and a.match_prefix(h) == []


def test_pool_is_sized_from_the_byte_budget():
    g = KvGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    assert g.bytes_per_token == 2 * 2 * 2 * 16 * 4
    kv = KvCache.from_budget(g, budget_bytes=10 * 16 * g.bytes_per_token + 1, block_size=16, device="cpu")
    assert kv.num_blocks == 10 and kv.capacity_tokens == 160
    assert kv.keys[0].shape == (10, 16, 2, 16) and len(kv.values) == 2
    with pytest.raises(InvalidArgument, match="holds no block"):
        KvCache.from_budget(g, budget_bytes=100, block_size=16, device="cpu")
