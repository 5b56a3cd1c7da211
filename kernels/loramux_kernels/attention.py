"""Paged attention: one KV cache of fixed-size blocks shared by the sequences of a step.

Per layer a key pool and a value pool, each [num_blocks, block_size, Hkv, D]
contiguous; their rows are the pools viewed as [num_blocks * block_size, Hkv, D].
Key position p of sequence s lives at row
    block_tables[s, p // block_size] * block_size + p % block_size.
A step packs N tokens of S sequences (no padding), each sequence's tokens
consecutive and in position order.

`AttentionPlan` is the step's metadata (built once, shared by every layer);
`PagedAttention` the per-layer entry a transformers attention function calls;
`write_kv` and `paged_attention` the torch ops (any device and dtype);
`paged_attention_reference` the oracle.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from loramux_kernels import native


@dataclass
class AttentionPlan:
    """Where one step's tokens write their keys and values and which keys each reads.
    Make it with `AttentionPlan.build`, which checks what the kernels index with."""

    block_size: int
    slot_mapping: torch.Tensor  # [N] int64: the pool row token t's new K/V is written to
    query_start: torch.Tensor  # [S+1] int64: sequence s owns tokens query_start[s] .. query_start[s+1]-1
    context_lens: torch.Tensor  # [S] int64: keys of sequence s after this step (last position + 1)
    block_tables: torch.Tensor  # [S, max_blocks] int64 block ids, padded with 0 (never read)
    # Host copies, so no layer calls .tolist():
    query_start_host: list[int]
    q_lens_host: list[int]
    context_lens_host: list[int]
    max_block: int  # the largest block id a sequence reads (-1: none)
    # Built on first use by the torch path, then shared by all layers:
    _key_rows: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _masks: dict[int, torch.Tensor | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.query_start_host[-1]

    @classmethod
    def build(
        cls, seqs: Sequence[tuple[Sequence[int], int, int]], block_size: int, device: torch.device | str = "cpu"
    ) -> AttentionPlan:
        """From (block_table, context_len, q_len) per sequence: q_len new tokens at
        positions context_len - q_len .. context_len - 1, whose keys the block table
        covers. Worked out on Python lists, turned into tensors once at the end."""
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        slots, starts, max_block = [], [0], -1
        width = max((len(table) for table, _, _ in seqs), default=0)
        tables = []
        for s, (table, ctx, q_len) in enumerate(seqs):
            used = table[: -(-ctx // block_size)]
            if not 1 <= q_len <= ctx <= len(table) * block_size or min(used) < 0:
                raise ValueError(
                    f"sequence {s}: {q_len} new tokens, {ctx} keys, {len(table)} blocks of {block_size}"
                    f" (ids from {min(used, default=0)})"
                )
            max_block = max(max_block, *used)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx))
            starts.append(starts[-1] + q_len)
            tables.append([*table, *[0] * (width - len(table))])
        if len(set(slots)) != len(slots):
            raise ValueError("two new tokens are written to one pool row (shared blocks?)")
        long = dict(dtype=torch.long, device=device)
        ctx_lens = [ctx for _, ctx, _ in seqs]
        return cls(
            block_size=block_size,
            slot_mapping=torch.tensor(slots, **long),
            query_start=torch.tensor(starts, **long),
            context_lens=torch.tensor(ctx_lens, **long),
            block_tables=torch.tensor(tables, **long).view(len(seqs), width),
            query_start_host=starts,
            q_lens_host=[q_len for _, _, q_len in seqs],
            context_lens_host=ctx_lens,
            max_block=max_block,
        )

    def key_rows(self, s: int) -> torch.Tensor:
        """[L] int64: the pool rows of sequence s's key positions 0 .. L-1."""
        rows = self._key_rows.get(s)
        if rows is None:
            pos = torch.arange(self.context_lens_host[s], device=self.block_tables.device)
            rows = self.block_tables[s, pos // self.block_size] * self.block_size + pos % self.block_size
            self._key_rows[s] = rows
        return rows

    def causal_mask(self, s: int) -> torch.Tensor | None:
        """[q_len, L] bool, True where a query of sequence s sees a key: causal,
        aligned bottom-right (its tokens are the last q_len positions). None for
        one query (it sees every key)."""
        if s not in self._masks:
            q_len, L = self.q_lens_host[s], self.context_lens_host[s]
            self._masks[s] = None if q_len == 1 else (
                torch.ones(q_len, L, dtype=torch.bool, device=self.block_tables.device).tril(L - q_len)
            )
        return self._masks[s]


def _pool_geometry(k_pool: torch.Tensor, v_pool: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, Hkv, D); ValueError unless the pools are a matching
    contiguous pair."""
    if not (
        k_pool.dim() == 4 and k_pool.shape == v_pool.shape and k_pool.dtype == v_pool.dtype
        and k_pool.device == v_pool.device and k_pool.is_contiguous() and v_pool.is_contiguous()
    ):
        raise ValueError(
            f"k_pool {tuple(k_pool.shape)} {k_pool.dtype} and v_pool {tuple(v_pool.shape)} {v_pool.dtype} "
            "must be contiguous [num_blocks, block_size, Hkv, D] of one dtype and device"
        )
    return tuple(k_pool.shape)


def _check(plan: AttentionPlan, geometry, dtype: torch.dtype, q=None, key=None, value=None) -> None:
    """ValueError unless the arguments agree with the pools' geometry and the plan:
    the kernels index with them unchecked."""
    num_blocks, block_size, hkv, d = geometry
    n = plan.num_tokens
    ok = block_size == plan.block_size and plan.max_block < num_blocks
    if q is not None:
        qs = q.shape
        ok = ok and len(qs) == 4 and qs[1] > 0 and qs[1] % hkv == 0 and qs == (1, qs[1], n, d) and q.dtype == dtype
    if key is not None:
        ok = ok and key.shape == value.shape == (1, hkv, n, d) and key.dtype == value.dtype == dtype
    if not ok:
        shape = lambda t: "-" if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))  # noqa: E731
        raise ValueError(
            f"paged attention arguments do not agree: pools {tuple(geometry)} {dtype}, q {shape(q)}, "
            f"key {shape(key)}, value {shape(value)}, plan for {n} tokens in blocks of {plan.block_size} "
            f"up to block {plan.max_block}"
        )


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             plan: AttentionPlan) -> None:
    """Semantics: for every token t and kv head g,
        k_rows[slot_mapping[t], g, :] = key[0, g, t, :];  v_rows[...] = value[0, g, t, :]
    where k_rows, v_rows are the pools as [num_blocks * block_size, Hkv, D].
    key, value: [1, Hkv, N, D], any strides (transformers' transposed views)."""
    _check(plan, _pool_geometry(k_pool, v_pool), k_pool.dtype, key=key, value=value)
    hkv, d = k_pool.shape[2:]
    k_pool.view(-1, hkv, d).index_copy_(0, plan.slot_mapping, key[0].transpose(0, 1))
    v_pool.view(-1, hkv, d).index_copy_(0, plan.slot_mapping, value[0].transpose(0, 1))


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan,
                    scale: float, softcap: float | None = None) -> torch.Tensor:
    """Semantics: `paged_attention_reference(q, k_pool, v_pool, plan, scale, softcap)`,
    in torch ops: per sequence its keys and values gathered from their blocks and one
    scaled_dot_product_attention. q: [1, Hq, N, D], any strides; returns [1, N, Hq, D]."""
    _check(plan, _pool_geometry(k_pool, v_pool), k_pool.dtype, q=q)
    out = q.new_empty(1, plan.num_tokens, q.shape[1], q.shape[3])
    _attend_torch(out, q, k_pool, v_pool, plan, range(len(plan.q_lens_host)), scale, softcap)
    return out


def _attend_torch(out, q, k_pool, v_pool, plan: AttentionPlan, seqs, scale, softcap, key=None, value=None) -> None:
    """out[0, tokens of s] = attention of those tokens, for s in seqs. out: [1, N, Hq, D].
    key, value ([1, Hkv, N, D], the step's own): a sequence whose keys are all new
    this step (a fresh prefill) reads them there instead of gathering its blocks."""
    hq, (hkv, d) = q.shape[1], k_pool.shape[2:]
    k_rows, v_rows = k_pool.view(-1, hkv, d), v_pool.view(-1, hkv, d)  # [rows, Hkv, D]
    for s in seqs:
        t0, q_len, L = plan.query_start_host[s], plan.q_lens_host[s], plan.context_lens_host[s]
        if key is not None and q_len == L:
            k, v = key[:, :, t0 : t0 + q_len], value[:, :, t0 : t0 + q_len]  # [1, Hkv, L, D]
        else:
            rows = plan.key_rows(s)
            k = k_rows.index_select(0, rows).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            v = v_rows.index_select(0, rows).transpose(0, 1).unsqueeze(0)
        qs = q[:, :, t0 : t0 + q_len]  # [1, Hq, q_len, D]
        mask = plan.causal_mask(s)  # [q_len, L] or None
        if softcap is None:
            whole = q_len == L and q_len > 1  # SDPA's own causal mask is the aligned one only then
            o = F.scaled_dot_product_attention(
                qs, k, v, attn_mask=None if whole else mask, is_causal=whole, scale=scale, enable_gqa=True
            )
        else:  # SDPA has no softcap: the same steps by hand, softmax in float32
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)  # [1, Hq, L, D]
            scores = (qs.float() @ k.float().transpose(2, 3)) * scale  # [1, Hq, q_len, L]
            scores = softcap * torch.tanh(scores / softcap)
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            o = (scores.softmax(-1) @ v.float()).to(q.dtype)
        out[0, t0 : t0 + q_len] = o[0].transpose(0, 1)


class PagedAttention:
    """The per-layer entry: write the step's keys and values into the pools, attend.

    With the C kernels (csrc/attention_cpu.c) and float32 CPU tensors, one C call
    per layer writes every new row and attends for every sequence, OpenMP over
    tasks: those of at most `max_native_q_len` tokens (decode, chunked-prefill
    tails) one task per (sequence, kv head), longer chunks (prefill) in the tiled
    kernel, a task per kv head and block of query rows, reading the keys from
    their blocks. Where the tiled kernel is not built (no AVX-512; `tiled` False)
    the longer chunks go to torch's SDPA instead. Anything else (other dtypes or
    devices, autograd, a row stride inside D) takes the torch ops.

    A decode step calls this once per layer, so the Python side of the C path is
    kept to a few attribute reads: what is fixed per step (the plan's pointers)
    and per pool pair sits in int64 arrays built once, and a call passes q, key,
    value and out.
    """

    # Chunks of at most this many tokens take the per-row loop, longer ones the tiled
    # kernel. One sequence, SmolLM2 shapes, one thread, per-row / tiled: 1 token over
    # 200 / 2,000 keys 0.5x / 0.7x the time, 2 tokens even, 4 tokens 1.5x / 1.6x.
    # The tiled kernel over SDPA (gathered keys): 2,000 fresh tokens 0.79x the time,
    # 32 tokens over 2,000 cached keys 0.49x, 8 over 200 0.4x.
    max_native_q_len = 1
    # Below this many multiply-adds (q·k) a second thread costs more than it saves.
    parallel_work = 1 << 17

    def __init__(self, lib=None):
        self._fn = None if lib is None else lib.lmx_paged_attention_f32
        self.name = "torch" if lib is None else "cpu-native"
        self._plan: AttentionPlan | None = None
        self._native_plan = False
        self._long: list[int] = []  # sequences of the plan that SDPA serves
        self._short = np.zeros(0, dtype=np.int64)  # and those the C call does: their pointers are in _step
        self._long_native = np.zeros(0, dtype=np.int64)
        self.tiled = lib is not None and bool(lib.lmx_attention_tiled())
        self._step = np.zeros(14, dtype=np.int64)
        self._step_ptr = self._step.ctypes.data
        self._call = np.zeros(11, dtype=np.int64)
        self._call_ptr = self._call.ctypes.data
        # id(k_pool) -> (k_pool, v_pool as weak references: a replaced cache is freed,
        # geometry, pointer to its args, args)
        self._pools: dict[int, tuple] = {}

    def __call__(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_pool: torch.Tensor,
                 v_pool: torch.Tensor, plan: AttentionPlan, scale: float, softcap: float | None = None
                 ) -> torch.Tensor:
        """Semantics: write_kv(k_pool, v_pool, key, value, plan), then
        return paged_attention(q, k_pool, v_pool, plan, scale, softcap).
        q: [1, Hq, N, D], key, value: [1, Hkv, N, D], any strides; returns [1, N, Hq, D]."""
        if plan is not self._plan:
            self._start_plan(plan)
        pools = self._pools.get(id(k_pool))
        if pools is None or pools[0]() is not k_pool or pools[1]() is not v_pool:
            pools = self._pool_args(k_pool, v_pool)
        native = pools is not None and self._native_plan and not (
            torch.is_grad_enabled() and (q.requires_grad or key.requires_grad or value.requires_grad)
        )
        if native:
            _check(plan, pools[2], torch.float32, q, key, value)
            qst, kst, vst = q.stride(), key.stride(), value.stride()
            native = q.is_cpu and key.is_cpu and value.is_cpu and qst[3] == 1 and kst[3] == 1 and vst[3] == 1
        if not native:  # another dtype or device, autograd, a stride inside D: correct, slower
            _check(plan, _pool_geometry(k_pool, v_pool), k_pool.dtype, q, key, value)  # before anything is written
            write_kv(k_pool, v_pool, key, value, plan)
            return paged_attention(q, k_pool, v_pool, plan, scale, softcap)
        _, hq, n, d = q.shape
        out = q.new_empty(1, n, hq, d)
        self._call[:] = (
            q.data_ptr(), qst[2], qst[1], hq, key.data_ptr(), kst[2], kst[1], value.data_ptr(), vst[2], vst[1],
            out.data_ptr(),
        )
        self._fn(self._step_ptr, pools[3], self._call_ptr, scale, softcap or 0.0)
        if self._long:
            _attend_torch(out, q, k_pool, v_pool, plan, self._long, scale, softcap, key, value)
        return out

    def _start_plan(self, plan: AttentionPlan) -> None:
        self._plan = plan
        self._native_plan = self._fn is not None and plan.slot_mapping.is_cpu
        if not self._native_plan:
            return
        q_lens, ctx_lens = plan.q_lens_host, plan.context_lens_host
        short = [s for s, q_len in enumerate(q_lens) if q_len <= self.max_native_q_len]
        long = [s for s, q_len in enumerate(q_lens) if q_len > self.max_native_q_len]
        native_long = long if self.tiled else []
        self._long = [] if self.tiled else long
        self._short = np.array(short, dtype=np.int64)
        self._long_native = np.array(native_long, dtype=np.int64)
        self._step[:] = (
            plan.slot_mapping.data_ptr(), plan.query_start.data_ptr(), plan.context_lens.data_ptr(),
            plan.block_tables.data_ptr(), plan.block_tables.shape[1], plan.block_size, plan.num_tokens,
            len(short), self._short.ctypes.data, torch.get_num_threads(),
            sum(q_lens[s] * ctx_lens[s] for s in short + native_long), self.parallel_work,
            len(native_long), self._long_native.ctypes.data,
        )

    def _pool_args(self, k_pool: torch.Tensor, v_pool: torch.Tensor):
        """The cached C arguments of a pool pair, or None when the kernel does not
        take it (another dtype or device, D past its buffers)."""
        if self._fn is None or k_pool.dtype is not torch.float32 or not k_pool.is_cpu:
            return None
        geometry = _pool_geometry(k_pool, v_pool)
        if geometry[3] > 256:
            return None
        if len(self._pools) > 4096:  # entries of freed pools; refilled on demand
            self._pools.clear()
        args = np.array([k_pool.data_ptr(), v_pool.data_ptr(), *geometry[2:]], dtype=np.int64)  # alive in the entry
        entry = (weakref.ref(k_pool), weakref.ref(v_pool), geometry, args.ctypes.data, args)
        self._pools[id(k_pool)] = entry
        return entry


def select_attention(device: torch.device | str) -> PagedAttention:
    """The entry with the C kernels on CPU when they build here (see `native`),
    else torch ops only."""
    lib = native.load("attention_cpu") if torch.device(device).type == "cpu" else None
    return PagedAttention(lib)


def paged_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttentionPlan,
                              scale: float, softcap: float | None = None) -> torch.Tensor:
    """Semantics, in float64, one token and one head at a time: for every sequence s,
    its token t at position p and query head h (kv head g = h // (Hq / Hkv)),
        rows     = [block_tables[s][i // block_size] * block_size + i % block_size for i in 0..p]
        score    = scale * k_rows[rows, g] @ q[0, h, t]          (softcap: softcap * tanh(score / softcap))
        out[0, t, h] = softmax(score) @ v_rows[rows, g]
    q: [1, Hq, N, D]; returns [1, N, Hq, D] in q's dtype."""
    _, hq, n, d = q.shape
    hkv, bs = k_pool.shape[2], plan.block_size
    k_rows, v_rows = k_pool.reshape(-1, hkv, d).double(), v_pool.reshape(-1, hkv, d).double()
    out = torch.zeros(1, n, hq, d, dtype=torch.float64, device=q.device)
    tables = plan.block_tables.tolist()
    for s, (t0, q_len, ctx) in enumerate(zip(plan.query_start_host, plan.q_lens_host, plan.context_lens_host)):
        for j in range(q_len):
            p = ctx - q_len + j
            rows = [tables[s][i // bs] * bs + i % bs for i in range(p + 1)]
            for h in range(hq):
                g = h // (hq // hkv)
                score = scale * (k_rows[rows, g] @ q[0, h, t0 + j].double())  # [p + 1]
                if softcap is not None:
                    score = softcap * torch.tanh(score / softcap)
                out[0, t0 + j, h] = score.softmax(0) @ v_rows[rows, g]
    return out.to(q.dtype)
