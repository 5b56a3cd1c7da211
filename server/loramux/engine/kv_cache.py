"""The paged KV cache: one pool of fixed-size blocks, allocated once from a byte
budget, and the allocator that hands blocks to sequences.

Layout: per decoder layer a key pool and a value pool, each
`[num_blocks, block_size, Hkv, D]`. A sequence owns a block table (block ids in
position order); key position p lives in block `table[p // block_size]` at offset
`p % block_size`. Tokens are written in place by the attention op; nothing here
ever copies or grows a tensor after start-up.

Prefix caching (vLLM's automatic prefix caching, in our own words): a block whose
`block_size` tokens are all computed gets a hash chained from the previous block's
hash, its tokens and the identity of the weights that computed it (adapter content
hash, mix hash, pin epoch), so the same tokens under other weights never match.
When its last owner lets go, a hashed block is not wiped: it joins an LRU of cached
blocks that a later sequence with the same prefix can take back, and that
allocation evicts (oldest first) only when no truly free block is left.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loramux.errors import InvalidArgument


@dataclass(frozen=True)
class KvGeometry:
    """Shapes of the cache for one model: layers, KV heads, head size, dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @classmethod
    def of(cls, model_config, dtype: torch.dtype) -> "KvGeometry":
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        return cls(model_config.num_hidden_layers, kv_heads, head_dim, dtype)


def default_kv_bytes(geometry: KvGeometry, max_tokens: int) -> int:
    """Room for `max_tokens` tokens, but at most a quarter of the memory available
    now (the pool is allocated lazily, so unused blocks cost address space only)."""
    want = geometry.bytes_per_token * max_tokens
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return want
    return max(min(want, avail // 4), geometry.bytes_per_token * 256)


@dataclass
class BlockStats:
    """Counters since start (read by metrics)."""

    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens whose KV was found
    evictions: int = 0  # cached blocks reclaimed for new tokens
    preemptions: int = 0  # rows whose blocks were taken back (counted by the scheduler)


class BlockAllocator:
    """Owns every block's state: free, owned (ref count > 0) or cached (hashed,
    unowned, reclaimable). Engine thread only; counts are plain ints that other
    threads may read for metrics.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        # LIFO: a freed block is reused first, so its pages stay warm and RSS tracks use.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unowned hashed blocks, oldest first
        self.stats = BlockStats()

    # ---- counts ----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: truly free plus reclaimable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- allocation ------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """n blocks owned by the caller (ref count 1). Raises if fewer are free:
        callers check `num_free` first."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash_of[block]]
                self._hash_of[block] = None
                self.stats.evictions += 1
            self._refs[block] = 1
            out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Unowned hashed blocks stay cached
        (freed last-first, so a sequence's tail is evicted before its shared head)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if self._hash_of[block] is not None:
                self._cached[block] = None
            else:
                self._free.append(block)

    # ---- prefix cache ----------------------------------------------------------

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes`, each now owned by
        the caller (one more reference)."""
        found = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        return found

    def register(self, block: int, block_hash: bytes) -> None:
        """Mark `block` (full, computed) as holding the tokens `block_hash` names.
        A block already registered under another hash, or a hash already served
        by another block, is left as it is (the first copy stays canonical)."""
        if not self.prefix_caching or self._hash_of[block] is not None or block_hash in self._by_hash:
            return
        self._hash_of[block] = block_hash
        self._by_hash[block_hash] = block

    def note_lookup(self, queried: int, hit: int) -> None:
        self.stats.prefix_queries += queried
        self.stats.prefix_hits += hit


def block_hashes(tokens: list[int], block_size: int, identity: str, start: int = 0,
                 prev: bytes | None = None) -> list[bytes]:
    """Chained hashes of the full blocks of `tokens` from block index `start`
    (`prev`: the hash of block start-1). `identity` names the weights."""
    out = []
    h = prev if prev is not None else hashlib.blake2b(identity.encode(), digest_size=16).digest()
    for b in range(start, len(tokens) // block_size):
        chunk = tokens[b * block_size : (b + 1) * block_size]
        h = hashlib.blake2b(h + repr(chunk).encode(), digest_size=16).digest()
        out.append(h)
    return out


class KvCache:
    """The key and value pools of every layer plus their allocator."""

    def __init__(self, geometry: KvGeometry, num_blocks: int, block_size: int, device,
                 prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise InvalidArgument("the KV cache needs at least one block of at least one token")
        self.geometry, self.block_size = geometry, block_size
        g = geometry
        shape = (num_blocks, block_size, g.num_kv_heads, g.head_dim)
        # torch.empty: pages are touched as blocks are first written, so memory in
        # use follows the blocks in use, up to the budget.
        self.keys = [torch.empty(shape, dtype=g.dtype, device=device) for _ in range(g.num_layers)]
        self.values = [torch.empty(shape, dtype=g.dtype, device=device) for _ in range(g.num_layers)]
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_caching)

    @classmethod
    def from_budget(cls, geometry: KvGeometry, budget_bytes: int, block_size: int, device,
                    prefix_caching: bool = True) -> "KvCache":
        num_blocks = budget_bytes // (geometry.bytes_per_token * block_size)
        if num_blocks < 1:
            raise InvalidArgument(
                f"kv_cache_bytes={budget_bytes} holds no block of {block_size} tokens "
                f"({geometry.bytes_per_token * block_size} bytes each)"
            )
        return cls(geometry, num_blocks, block_size, device, prefix_caching)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.capacity_tokens * self.geometry.bytes_per_token
