"""Paged attention: the C kernel and the torch path against the reference op."""

import pytest
import torch
import torch.nn.functional as F

from loramux_kernels import (
    AttentionPlan,
    PagedAttention,
    native,
    paged_attention,
    paged_attention_reference,
    select_attention,
    write_kv,
)
from loramux_kernels import attention

# (context_len, q_len) per sequence: decodes around block edges and one long, a
# chunked-prefill tail (7 new tokens after 20), a fresh prefill.
MIXED = [(1, 1), (2, 1), (15, 1), (16, 1), (17, 1), (300, 1), (27, 7), (40, 40)]
SHAPES = {"gqa2": (4, 2, 16), "smollm2": (9, 3, 64)}  # (Hq, Hkv, D)


def _native():
    lib = native.load("attention_cpu")
    if lib is None:
        pytest.skip("the native kernels do not build here (no C compiler)")
    return PagedAttention(lib)


PATHS = {"native": _native, "torch": PagedAttention}


def _step(spec, block_size, hq, hkv, d, dtype=torch.float32, seed=0):
    """Pools with shuffled block ids (some never used, one table longer than its
    context) and one step's new states in transformers' layout: views [1, H, N, D]
    of [1, N, H, D] buffers. Returns (tables, plan, k_pool, v_pool, q, key, value)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-ctx // block_size) + (2 if i == 0 else 0) for i, (ctx, _) in enumerate(spec)]
    num_blocks = sum(need) + 3
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables = [ids[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(spec))]
    plan = AttentionPlan.build([(t, ctx, q_len) for t, (ctx, q_len) in zip(tables, spec)], block_size)
    n = plan.num_tokens
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    k_pool, v_pool = rand(num_blocks, block_size, hkv, d), rand(num_blocks, block_size, hkv, d)
    q = rand(1, n, hq, d).transpose(1, 2)
    key, value = rand(1, n, hkv, d).transpose(1, 2), rand(1, n, hkv, d).transpose(1, 2)
    return tables, plan, k_pool, v_pool, q, key, value


def _written(pool, states, tables, spec, block_size):
    """pool with the step's states written one row at a time, from the block tables."""
    pool = pool.clone()
    t = 0
    for table, (ctx, q_len) in zip(tables, spec):
        for p in range(ctx - q_len, ctx):
            pool[table[p // block_size], p % block_size] = states[0, :, t]
            t += 1
    return pool


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_mixed_step_matches_reference(path, shape, block_size):
    tables, plan, k_pool, v_pool, q, key, value = _step(MIXED, block_size, *SHAPES[shape])
    k_want = _written(k_pool, key, tables, MIXED, block_size)
    v_want = _written(v_pool, value, tables, MIXED, block_size)
    scale = 0.3
    want = paged_attention_reference(q, k_want, v_want, plan, scale)
    att = PATHS[path]()
    # always / never multi-threaded; the chunks past max_native_q_len to the tiled
    # kernel, all to the per-row loop, the long ones to SDPA
    tiled = att.tiled
    for work, max_q_len, att.tiled in [(0, 1, tiled), (1 << 62, 1, tiled), (0, 10**9, tiled), (0, 1, False)]:
        att.parallel_work, att.max_native_q_len, att._plan = work, max_q_len, None
        k_got, v_got = k_pool.clone(), v_pool.clone()
        got = att(q, key, value, k_got, v_got, plan, scale)
        assert got.shape == (1, plan.num_tokens, q.shape[1], q.shape[3]) and got.is_contiguous()
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("hq", "hkv", "d", "block_size"), [(4, 1, 100, 7), (6, 2, 256, 16), (2, 2, 8, 3)])
def test_native_kernel_on_long_chunks_odd_sizes_and_long_contexts(hq, hkv, d, block_size):
    """Everything through C: chunks past its query-row buffer, D not a multiple of
    the vector width, block sizes that split the key tiles, thousands of keys."""
    att = _native()
    att.max_native_q_len = 10**9
    spec = [(2500, 1), (70, 5), (33, 33), (130, 2)]
    tables, plan, k_pool, v_pool, q, key, value = _step(spec, block_size, hq, hkv, d, seed=1)
    want = paged_attention_reference(
        q, _written(k_pool, key, tables, spec, block_size), _written(v_pool, value, tables, spec, block_size),
        plan, d**-0.5,
    )
    got = att(q, key, value, k_pool, v_pool, plan, d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size"),
    [(9, 3, 64, 16), (4, 4, 16, 1), (8, 2, 128, 7), (10, 2, 80, 16), (7, 1, 256, 5), (48, 1, 32, 16),
     (49, 1, 16, 4), (6, 2, 100, 16)],
    ids=["smollm2", "mha-d16", "d128", "g5-d80", "g7-d256", "g48", "g49-per-row", "d100-per-row"],
)
def test_tiled_kernel_on_prefill_chunks(hq, hkv, d, block_size):
    """Chunks past one task's query rows, over cached contexts of thousands of keys,
    fresh prefills, tails of a row block, on one thread and on several; group sizes
    past the kernel's rows and D off the vector width take the per-row loop."""
    att = _native()
    if not att.tiled:
        pytest.skip("the tiled kernel needs AVX-512")
    spec = [(2100, 37), (2, 2), (97, 97), (300, 1), (64, 63), (17, 16)]
    tables, plan, k_pool, v_pool, q, key, value = _step(spec, block_size, hq, hkv, d, seed=4)
    want = paged_attention_reference(
        q, _written(k_pool, key, tables, spec, block_size), _written(v_pool, value, tables, spec, block_size),
        plan, d**-0.5,
    )
    for work in (0, 1 << 62):
        att.parallel_work, att._plan = work, None
        got = att(q, key, value, k_pool.clone(), v_pool.clone(), plan, d**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tiled_kernel_takes_every_chunk_past_one_token(monkeypatch):
    att = _native()
    if not att.tiled:
        pytest.skip("the tiled kernel needs AVX-512")
    spec = [(40, 40), (2000, 32), (9, 1)]
    tables, plan, k_pool, v_pool, q, key, value = _step(spec, 16, *SHAPES["smollm2"], seed=5)
    monkeypatch.setattr(attention, "_attend_torch", lambda *args: pytest.fail("SDPA ran"))
    got = att(q, key, value, k_pool, v_pool, plan, 0.125)
    monkeypatch.undo()
    torch.testing.assert_close(got, paged_attention_reference(q, k_pool, v_pool, plan, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_softcap(path):
    tables, plan, k_pool, v_pool, q, key, value = _step(MIXED, 16, *SHAPES["gqa2"], seed=2)
    write_kv(k_pool, v_pool, key, value, plan)
    want = paged_attention_reference(q, k_pool, v_pool, plan, 1.0, softcap=2.0)
    got = PATHS[path]()(q, key, value, k_pool, v_pool, plan, 1.0, softcap=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, paged_attention_reference(q, k_pool, v_pool, plan, 1.0), atol=1e-2)


def test_bfloat16_takes_the_torch_path():
    tables, plan, k_pool, v_pool, q, key, value = _step(MIXED, 16, *SHAPES["smollm2"], dtype=torch.bfloat16)
    att = select_attention(torch.device("cpu"))
    att._fn = lambda *args: pytest.fail("bfloat16 reached the float32 kernel")
    got = att(q, key, value, k_pool, v_pool, plan, 0.125)
    assert got.dtype is torch.bfloat16
    want = paged_attention_reference(q, k_pool, v_pool, plan, 0.125)  # pools hold the written rows now
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_write_kv_writes_exactly_the_step_rows():
    spec = [(6, 3), (1, 1)]
    tables, plan, k_pool, v_pool, q, key, value = _step(spec, 4, *SHAPES["gqa2"])
    # positions 3, 4, 5 of sequence 0 and position 0 of sequence 1
    rows = [tables[0][0] * 4 + 3, tables[0][1] * 4, tables[0][1] * 4 + 1, tables[1][0] * 4]
    assert plan.slot_mapping.tolist() == rows
    assert plan.query_start.tolist() == [0, 3, 4] and plan.context_lens.tolist() == [6, 1]
    k_want, v_want = k_pool.view(-1, 2, 16).clone(), v_pool.view(-1, 2, 16).clone()
    k_want[rows], v_want[rows] = key[0].transpose(0, 1), value[0].transpose(0, 1)
    write_kv(k_pool, v_pool, key, value, plan)
    assert torch.equal(k_pool.view(-1, 2, 16), k_want) and torch.equal(v_pool.view(-1, 2, 16), v_want)


@pytest.mark.parametrize(("max_native_q_len", "tiled"), [(1, True), (1, False), (10**9, True)],
                         ids=["tiled", "sdpa", "per-row"])
def test_whole_prefill_equals_causal_sdpa(max_native_q_len, tiled):
    hq, hkv, d = SHAPES["smollm2"]
    _, plan, k_pool, v_pool, q, key, value = _step([(37, 37)], 16, hq, hkv, d, seed=3)
    att = select_attention(torch.device("cpu"))
    att.max_native_q_len, att.tiled = max_native_q_len, tiled and att.tiled
    got = att(q, key, value, k_pool, v_pool, plan, d**-0.5)
    k, v = key.repeat_interleave(hq // hkv, 1), value.repeat_interleave(hq // hkv, 1)  # [1, Hq, N, D]
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_float32_decode_runs_in_the_native_kernel(monkeypatch):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    att = select_attention(torch.device("cpu"))
    assert att.name == "cpu-native"
    spec = [(5, 1), (40, 1), (17, 2)]
    tables, plan, k_pool, v_pool, q, key, value = _step(spec, 16, *SHAPES["smollm2"])
    for name in ("write_kv", "paged_attention", "_attend_torch"):
        monkeypatch.setattr(attention, name, lambda *args, _name=name: pytest.fail(f"{_name} ran"))
    got = att(q, key, value, k_pool, v_pool, plan, 0.125)
    monkeypatch.undo()
    torch.testing.assert_close(got, paged_attention_reference(q, k_pool, v_pool, plan, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_arguments_that_disagree_raise_before_any_kernel(path):
    tables, plan, k_pool, v_pool, q, key, value = _step([(20, 2), (3, 1)], 16, *SHAPES["gqa2"])
    att = PATHS[path]()
    if path == "native":
        att._fn = lambda *args: pytest.fail("reached C")
    out_of_range = [(tables[0][:1] + [k_pool.shape[0]], 20, 2), (tables[1], 3, 1)]
    cases = {
        "block out of range": dict(plan=AttentionPlan.build(out_of_range, 16)),
        "q tokens": dict(q=q[:, :, :-1]),
        "q heads not a multiple": dict(q=torch.randn(1, 3, 3, 16)),
        "q dims": dict(q=q[0]),
        "key heads": dict(key=key[:, :1], value=value[:, :1]),
        "value shape": dict(value=value[..., :8]),
        "key dtype": dict(key=key.double()),
        "pool block size": dict(k_pool=k_pool.view(-1, 8, 2, 16), v_pool=v_pool.view(-1, 8, 2, 16)),
        "pools differ": dict(v_pool=v_pool[:-1]),
        "pool not contiguous": dict(k_pool=k_pool.transpose(0, 1), v_pool=v_pool.transpose(0, 1)),
    }
    for case, change in cases.items():
        args = dict(q=q, key=key, value=value, k_pool=k_pool, v_pool=v_pool, plan=plan) | change
        with pytest.raises(ValueError):
            att(scale=0.25, **args)
            pytest.fail(case)
    assert torch.equal(k_pool, _step([(20, 2), (3, 1)], 16, *SHAPES["gqa2"])[2])  # nothing was written
    with pytest.raises(ValueError):
        paged_attention(q[:, :, :-1], k_pool, v_pool, plan, 0.25)


@pytest.mark.parametrize(
    "seqs",
    [
        [([0], 17, 1)],  # more keys than the table holds
        [([0, 1], 20, 21)],  # more new tokens than keys
        [([0, 1], 20, 0)],  # no new token
        [([0, -1], 20, 1)],  # a negative block id where keys are read
        [([0, 1], 20, 1), ([1], 4, 1)],  # two sequences write one row
    ],
)
def test_plans_that_cannot_be_built(seqs):
    with pytest.raises(ValueError):
        AttentionPlan.build(seqs, 16)


def test_plan_host_copies_and_padding():
    plan = AttentionPlan.build([([3, 1, 4], 40, 40), ([2], 5, 1)], 16)
    assert plan.num_tokens == 41 and plan.q_lens_host == [40, 1] and plan.query_start_host == [0, 40, 41]
    assert plan.context_lens_host == [40, 5] and plan.max_block == 4
    assert plan.block_tables.tolist() == [[3, 1, 4], [2, 0, 0]]
    assert plan.key_rows(1).tolist() == [32, 33, 34, 35, 36]
    assert plan.causal_mask(1) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_the_torch_path():
    cuda = torch.device("cuda")
    tables, _, k_pool, v_pool, q, key, value = _step(MIXED, 16, *SHAPES["smollm2"])
    plan = AttentionPlan.build([(t, ctx, q_len) for t, (ctx, q_len) in zip(tables, MIXED)], 16, cuda)
    k_pool, v_pool, q, key, value = (t.to(cuda) for t in (k_pool, v_pool, q, key, value))
    att = select_attention(cuda)
    assert att.name == "torch"
    got = att(q, key, value, k_pool, v_pool, plan, 0.125)
    torch.testing.assert_close(got, paged_attention_reference(q, k_pool, v_pool, plan, 0.125), rtol=1e-4, atol=1e-4)
