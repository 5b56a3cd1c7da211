"""Every backend and every plan mode against the reference op."""

import pytest
import torch
import torch.nn.functional as F

from loramux_kernels import (
    NO_SLOT,
    NativeCpuBackend,
    TorchBackend,
    add_lora_reference,
    native,
    plan_step,
    select_backend,
)

S, R, D_IN, D_OUT = 6, 8, 24, 40


def _buffers(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S, R, D_IN, generator=g, dtype=dtype)  # [S, R, d_in]
    BT = torch.randn(S, R, D_OUT, generator=g, dtype=dtype)  # [S, R, d_out]
    return A, BT


CASES = {
    "none": [NO_SLOT] * 5,
    "single_all": [2] * 5,
    "single_some": [NO_SLOT, 3, 3, NO_SLOT, 3],
    "mixed": [NO_SLOT, 0, 5, 0, 2, NO_SLOT, 5],
    "mixed_high_slots": [4, 5, 4, 5],
    "mixed_prefix": [1, 0, NO_SLOT, 0, 1, 1],
    # decode with one row per adapter: block in token order (plain add)
    "one_per_slot_in_order": [0, 1, 2, 3],
    # one row per adapter, out of order (gather by the inverse permutation)
    "one_per_slot_shuffled": [3, 0, 2, 1],
    # base rows and no padding in the block: the scatter-add fallback
    "base_rows_no_padding": [0, NO_SLOT, 1, NO_SLOT],
}


def _native():
    lib = native.load("lora_cpu")
    if lib is None:
        pytest.skip("the native kernels do not build here (no C compiler)")
    return NativeCpuBackend(lib)


BACKENDS = {"torch": TorchBackend, "native": _native}


def test_cpu_gets_the_native_kernels_where_a_compiler_exists():
    if native._compiler() is None:
        pytest.skip("no C compiler")
    assert select_backend(torch.device("cpu")).name == "cpu-native"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("plan_kw", [{}, {"small_max_tokens": 0, "max_padding": 0.0}],
                         ids=["default", "force_segment"])
def test_backend_matches_reference(backend, case, plan_kw):
    slots = torch.tensor(CASES[case])
    A, BT = _buffers()
    x = torch.randn(len(slots), D_IN)
    base = torch.randn(len(slots), D_OUT)
    want = base.clone()
    add_lora_reference(want, x, A, BT, slots)
    got = base.clone()
    plan = plan_step(slots, R, torch.float32, **plan_kw)
    BACKENDS[backend]().add_lora_(got, x, A, BT, plan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case != "none":
        assert not torch.equal(got, base)  # the delta really was added


def test_grouped_plans_pick_the_cheapest_way_back():
    plan = lambda slots: plan_step(torch.tensor(slots), R, torch.float32)  # noqa: E731
    assert plan(CASES["one_per_slot_in_order"]).in_token_order
    shuffled = plan(CASES["one_per_slot_shuffled"])
    assert not shuffled.in_token_order and shuffled.block_of_token.tolist() == [3, 0, 2, 1]
    padded = plan(CASES["mixed"])  # slot 2 has one token, so its second block row is padding
    assert padded.block_of_token is not None and padded.block_mask is not None
    assert plan(CASES["base_rows_no_padding"]).block_of_token is None


def test_plan_modes():
    assert plan_step(torch.tensor(CASES["none"]), R, torch.float32).mode == "none"
    assert plan_step(torch.tensor(CASES["single_all"]), R, torch.float32).token_mask is None
    assert plan_step(torch.tensor(CASES["single_some"]), R, torch.float32).mode == "single"
    grouped = plan_step(torch.tensor(CASES["mixed"]), R, torch.float32)
    assert grouped.mode == "grouped" and grouped.block_shape == (3, 2)
    assert grouped.used_slots.tolist() == [0, 2, 5] and not grouped.slot_prefix
    assert grouped.block_mask is not None  # slot 2 has one token, the others two
    prefix = plan_step(torch.tensor([1, 0, 0, 1]), R, torch.float32)
    assert prefix.slot_prefix and prefix.block_mask is None
    # Past small_max_tokens: grouped while the padded block stays small, else segment.
    assert plan_step(torch.tensor(CASES["mixed"]), R, torch.float32, small_max_tokens=3).mode == "grouped"
    uneven = torch.tensor([0] * 10 + [1, 2])  # k·m = 3·10 = 30 > 1.5 · 12
    assert plan_step(uneven, R, torch.float32, small_max_tokens=3).mode == "segment"
    seg = plan_step(torch.tensor(CASES["mixed"]), R, torch.float32, small_max_tokens=3, max_padding=0.0)
    assert seg.mode == "segment" and [s for s, _, _ in seg.groups] == [0, 2, 5]
    # slot order: slot 0 holds tokens 1 and 3, slot 2 token 4, slot 5 tokens 2 and 6
    assert seg.token_of_block.tolist() == [1, 3, 4, 2, 6] and seg.groups[1] == (2, 2, 3)
    assert seg.block_of_token.tolist() == [5, 0, 3, 1, 2, 5, 4]  # base tokens read the zero row 5


def test_random_mixes_large():
    """Many tokens, random slots, both large-N paths."""
    g = torch.Generator().manual_seed(1)
    A, BT = _buffers(1)
    for n in (1, 33, 200):
        slots = torch.randint(-1, S, (n,), generator=g)
        x = torch.randn(n, D_IN, generator=g)
        want = torch.zeros(n, D_OUT)
        add_lora_reference(want, x, A, BT, slots)
        got = torch.zeros(n, D_OUT)
        select_backend(torch.device("cpu")).add_lora_(got, x, A, BT, plan_step(slots, R, torch.float32))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 7, 16])
def test_native_kernel_on_strided_rows_and_real_module_sizes(rank):
    """Rows a stride apart (a view into a wider tensor), sizes that are not a
    multiple of the vector width or the expand block, both thread settings."""
    backend = _native()
    g = torch.Generator().manual_seed(rank)
    for d_in, d_out, n in [(576, 1536, 8), (1536, 576, 3), (37, 301, 5)]:
        A = torch.randn(S, rank, d_in, generator=g)
        BT = torch.randn(S, rank, d_out, generator=g)
        slots = torch.tensor([(i * 5) % (S + 1) - 1 for i in range(n)])  # NO_SLOT and all slots
        x = torch.randn(n, d_in + 3, generator=g)[:, 1 : 1 + d_in]  # row stride d_in + 3
        out = torch.randn(n, d_out + 2, generator=g)[:, :d_out]
        want = out.clone()
        add_lora_reference(want, x, A, BT, slots)
        for work in (0, 1 << 40):  # always / never multi-threaded
            got = out.clone()
            backend.parallel_work = work
            backend.add_lora_(got, x, A, BT, plan_step(slots, rank, torch.float32))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_take_rows_unflattened(backend):
    """A layer's [B, T, d] input and output, contiguous or not, hold the N rows
    row-major: the same result as the flattened call."""
    A, BT = _buffers(3)
    slots = torch.tensor([0, NO_SLOT, 4, 4, 1, 0])  # B=2 rows of T=3 tokens
    x = torch.randn(2, 3, D_IN)
    base = torch.randn(2, 3, D_OUT)
    want = base.clone().view(6, D_OUT)
    add_lora_reference(want, x.reshape(6, D_IN), A, BT, slots)
    impl = BACKENDS[backend]()
    got = base.clone()
    impl.add_lora_(got, x, A, BT, plan_step(slots, R, torch.float32))
    torch.testing.assert_close(got.view(6, D_OUT), want, rtol=1e-5, atol=1e-5)
    wide = torch.randn(2, 3, D_IN + 5)
    wide[..., :D_IN] = x  # rows not evenly spaced once flattened: the torch ops take it
    got = base.clone()
    impl.add_lora_(got, wide[..., :D_IN], A, BT, plan_step(slots, R, torch.float32))
    torch.testing.assert_close(got.view(6, D_OUT), want, rtol=1e-5, atol=1e-5)


def test_native_kernel_follows_buffers_re_viewed_at_another_rank():
    """The backend caches each slot buffer's C arguments; a re-strided buffer
    (new views of the same storage, as ModuleSlots.set_stride makes) must not be
    read through the old ones."""
    backend = _native()
    store_a, store_bt = torch.zeros(S * 16 * D_IN), torch.zeros(S * 16 * D_OUT)
    slots = torch.tensor([2, 5, NO_SLOT])
    x = torch.randn(3, D_IN)
    for rank in (4, 16, 8):
        A = store_a[: S * rank * D_IN].view(S, rank, D_IN)
        BT = store_bt[: S * rank * D_OUT].view(S, rank, D_OUT)
        A.copy_(torch.randn(S, rank, D_IN))
        BT.copy_(torch.randn(S, rank, D_OUT))
        want = torch.zeros(3, D_OUT)
        add_lora_reference(want, x, A, BT, slots)
        got = torch.zeros(3, D_OUT)
        backend.add_lora_(got, x, A, BT, plan_step(slots, rank, torch.float32))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _fused():
    backend = _native()
    if backend._linear_fn is None:
        pytest.skip("torch's CPU library exports no usable sgemm here")
    return backend


FUSED_CASES = {"none": CASES["none"], "single": [NO_SLOT, 3, 3, NO_SLOT], "mixed": CASES["mixed"],
               "shuffled": CASES["one_per_slot_shuffled"]}


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_is_f_linear_plus_the_deltas(case, with_bias):
    """One call for a whole layer: the base output as F.linear (the same sgemm,
    maybe by column chunks), plus the reference deltas; rows as [B, T, d] or a
    strided view."""
    backend = _fused()
    slots = torch.tensor(FUSED_CASES[case])
    n = len(slots)
    A, BT = _buffers(4)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(D_OUT, D_IN, generator=g)
    b = torch.randn(D_OUT, generator=g) if with_bias else None
    x = torch.randn(n, D_IN + 3, generator=g)[:, 2 : 2 + D_IN]
    plan = plan_step(slots, R, torch.float32)
    with torch.inference_mode():
        got = backend.linear(x, w, b, A, BT, plan)
        base = backend.linear(x.contiguous().unsqueeze(0), w, b, A, BT, None)
        assert got is not None and base is not None and base.shape == (1, n, D_OUT)
        torch.testing.assert_close(base[0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        want = F.linear(x, w, b)
        add_lora_reference(want, x, A, BT, slots)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("d_in, d_out, with_bias", [(576, 1536, False), (1536, 576, True), (576, 200, True)])
def test_fused_linear_on_decode_batches_splits_the_gemm_and_overlaps_the_shrink(threads, d_in, d_out, with_bias):
    """2..32 tokens on several threads: column-chunked GEMM, the shrink on its own
    core, expands split by columns. Real layer sizes, so the split really runs."""
    backend = _fused()
    g = torch.Generator().manual_seed(d_out + threads)
    A, BT = torch.randn(8, 16, d_in, generator=g) * 0.05, torch.randn(8, 16, d_out, generator=g) * 0.05
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    b = torch.randn(d_out, generator=g) if with_bias else None
    slots = torch.tensor([3, NO_SLOT, 0, 7, 7, 1, 5, 2])
    x = torch.randn(len(slots), d_in + 8, generator=g)[:, :d_in]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = backend.linear(x, w, b, A, BT, plan_step(slots, 16, torch.float32))
            base = backend.linear(x, w, b, A, BT, plan_step(torch.full((8,), NO_SLOT), 16, torch.float32))
    finally:
        torch.set_num_threads(before)
    want = F.linear(x, w, b)
    torch.testing.assert_close(base, want, rtol=1e-5, atol=1e-5)  # the same sgemm by column chunks: BLAS blocking may differ in the last bits
    add_lora_reference(want, x, A, BT, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base)  # the deltas are there


def test_fused_linear_follows_swapped_weights_and_leaves_autograd_to_torch():
    backend = _fused()
    A, BT = _buffers()
    w = torch.nn.Parameter(torch.randn(D_OUT, D_IN))
    x = torch.randn(2, D_IN)
    with torch.inference_mode():
        # Our small-batch GEMM sums in another order than the BLAS: float32 rounding.
        torch.testing.assert_close(backend.linear(x, w, None, A, BT, None), F.linear(x, w), rtol=1e-5, atol=1e-5)
        w.data = torch.randn(D_OUT, D_IN)  # what pinning does: same Parameter, new storage
        torch.testing.assert_close(backend.linear(x, w, None, A, BT, None), F.linear(x, w), rtol=1e-5, atol=1e-5)
        assert backend.linear(x.double(), w.double(), None, A, BT, None) is None  # not float32: torch's ops
        plan = plan_step(torch.tensor([0, 1, 2]), R, torch.float32)  # 3 tokens, 2 rows
        with pytest.raises(ValueError, match="do not agree"):
            backend.linear(x, w, None, A, BT, plan)
        # Many tokens on one adapter (a prefill): our GEMM, then the torch ops' deltas.
        prefill = plan_step(torch.tensor([1] * 40), R, torch.float32)
        xp = torch.randn(40, D_IN)
        want = F.linear(xp, w)
        add_lora_reference(want, xp, A, BT, torch.tensor([1] * 40))
        torch.testing.assert_close(backend.linear(xp, w, None, A, BT, prefill), want, rtol=1e-5, atol=1e-5)
    assert backend.linear(x, w, None, A, BT, None) is None  # grad mode: autograd needs torch's ops


def test_native_kernel_refuses_arguments_that_disagree():
    backend = _native()
    A, BT = _buffers()
    slots = torch.tensor([0, 1, 2])
    plan = plan_step(slots, R, torch.float32)
    with pytest.raises(ValueError, match="do not agree"):
        backend.add_lora_(torch.zeros(3, D_OUT), torch.zeros(3, D_IN + 1), A, BT, plan)
    with pytest.raises(ValueError, match="do not agree"):  # a slot past the buffers
        backend.add_lora_(torch.zeros(3, D_OUT), torch.zeros(3, D_IN), A[:2], BT[:2], plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backend_matches_reference():
    dev = torch.device("cuda")
    A, BT = _buffers(2)
    slots = torch.tensor(CASES["mixed"])
    x = torch.randn(len(slots), D_IN)
    want = torch.zeros(len(slots), D_OUT)
    add_lora_reference(want, x, A, BT, slots)
    got = torch.zeros(len(slots), D_OUT, device=dev)
    plan = plan_step(slots.to(dev), R, torch.float32)
    select_backend(dev).add_lora_(got, x.to(dev), A.to(dev), BT.to(dev), plan)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
