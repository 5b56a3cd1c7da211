"""The small-M GEMM of csrc/lora_cpu.c (decode batches of up to 32 rows): the
one-call linear must equal F.linear (+ the reference deltas) to float32 rounding,
whatever the rows, the shapes (odd ones reach the kernel's column and d_in tails),
the row strides, the bias and the threads."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loramux_kernels import NO_SLOT, NativeCpuBackend, add_lora_reference, native, plan_step

ROWS = [1, 2, 3, 7, 8, 9, 16, 31, 32, 40, 64]  # past 32: a prefill, 32 rows at a time
# (d_out, d_in): odd sizes (a d_in tail of 5, column tails of 1..3), d_in under one
# vector, and real layer shapes of the default model (q/o, k/v, gate/up, down)
SHAPES = [(29, 37), (45, 13), (200, 576), (576, 576), (192, 576), (1536, 576), (576, 1536)]
S, R = 5, 8
U = torch.finfo(torch.float32).eps / 2  # unit roundoff


def _backend():
    lib = native.load("lora_cpu")
    if lib is None:
        pytest.skip("the native kernels do not build here (no C compiler)")
    try:
        torch_cpu = next((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
        ctypes.CDLL(str(torch_cpu)).sgemm_
    except (StopIteration, OSError, AttributeError):
        pytest.skip("torch's CPU library exports no sgemm here")
    backend = NativeCpuBackend(lib)
    # The backend checks the one-call linear against F.linear once and turns it off
    # when they disagree: here that is a failure (a wrong kernel), not a skip.
    assert backend._linear_fn is not None, "the one-call linear disagrees with F.linear on its start-up check"
    return backend


def _check(got, x, w, b, lora=None):
    """got == F.linear(x, w, b) (+ the deltas of lora = (A, BT, slots)) to float32
    rounding: against a float64 reference within the worst-case bound of float32
    rounding in any summation order ((d_in + 1) u (|x| @ |w|.T + |b|) for the GEMM,
    (d_in + R + 2) u (|x| @ |A_s|.T) @ |BT_s| for a delta); and against F.linear
    (+ the float32 reference op) within twice that. A wrong or missing product
    (~|x_k w_k|) is far above it."""
    d_in = x.shape[-1]
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = (d_in + 1) * U * F.linear(x.abs().double(), w.abs().double(), None if b is None else b.abs().double())
    want = F.linear(x, w, b)
    if lora is not None:
        A, BT, slots = lora
        add_lora_reference(ref, x.double(), A.double(), BT.double(), slots)
        mag = torch.zeros_like(ref)
        add_lora_reference(mag, x.abs().double(), A.abs().double(), BT.abs().double(), slots)
        bound = bound + (d_in + A.shape[1] + 2) * U * mag
        add_lora_reference(want, x, A, BT, slots)
    bound = bound + 2 * U * ref.abs()
    excess = (got.double() - ref).abs() - bound
    assert excess.max() <= 0, f"off the float64 result by {excess.max().item():.3g} past the rounding bound"
    excess = (got.double() - want.double()).abs() - 2 * bound
    assert excess.max() <= 0, f"off F.linear by {excess.max().item():.3g} past the rounding bound"


def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _slots(n):
    if n == 1:
        return torch.tensor([3])
    if n <= 4:  # a "single" plan: one adapter, some rows without
        return torch.tensor([2 if i % 3 else NO_SLOT for i in range(n)])
    return torch.tensor([(i * 5) % (S + 1) - 1 for i in range(n)])  # grouped: NO_SLOT and every slot


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("d_out, d_in", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_linear_equals_f_linear_plus_deltas(d_out, d_in, with_bias, threads):
    backend = _backend()
    g = torch.Generator().manual_seed(d_out * 1000 + d_in)
    w = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if with_bias else None
    A = torch.randn(S, R, d_in, generator=g) * 0.05
    BT = torch.randn(S, R, d_out, generator=g) * 0.05
    before = _threads(threads)
    try:
        with torch.inference_mode():
            for n in ROWS:
                xs = torch.randn(n, d_in + 7, generator=g)
                for x in (xs[:, 3 : 3 + d_in], xs[:, :d_in].contiguous()):  # strided rows, then contiguous
                    for plan in (None, plan_step(torch.full((n,), NO_SLOT), R, torch.float32)):
                        got = backend.linear(x, w, b, A, BT, plan)
                        if n < backend.min_fused_tokens:
                            assert got is None  # one row without adapters: F.linear's
                            continue
                        assert got is not None and got.shape == (n, d_out)
                        _check(got, x, w, b)
                    slots = _slots(n)
                    plan = plan_step(slots, R, torch.float32)
                    assert plan.mode in ("single", "grouped")
                    got = backend.linear(x, w, b, A, BT, plan)
                    assert got is not None, (n, plan.mode)
                    _check(got, x, w, b, (A, BT, slots))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_c_entry_on_every_row_count(threads):
    """The C entry itself, which the Python side does not call with one row and no
    adapters: 1..33 rows and prefills of 64, 100 and 257 (blocks of 32 rows),
    strided x and out, 1..5 threads (more than 4: the BLAS's own threading)."""
    backend = _backend()
    fn = backend._linear_fn
    g = torch.Generator().manual_seed(threads)
    step = np.zeros(4, dtype=np.int64)
    for d_out, d_in in [(29, 37), (200, 576), (576, 1536)]:
        w = torch.randn(d_out, d_in, generator=g)
        for n in [*range(1, 34), 64, 100, 257]:
            x = torch.randn(n, d_in + 5, generator=g)[:, 1 : 1 + d_in]
            b = torch.randn(d_out, generator=g) if n % 2 else None
            out = torch.full((n, d_out + 3), float("nan"))
            args = np.array([x.data_ptr(), d_in + 5, n, d_in, d_out, w.data_ptr(), 0 if b is None else b.data_ptr(),
                             out.data_ptr(), d_out + 3, 0, threads], dtype=np.int64)
            fn(step.ctypes.data, args.ctypes.data)
            assert torch.isnan(out[:, d_out:]).all()  # nothing written past the row
            _check(out[:, :d_out], x, w, b)
