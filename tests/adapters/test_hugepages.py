"""Huge-page buffers: advice to the OS, never a change in what the buffer holds."""

import sys

import pytest
import torch

from loramux import hugepages


def _huge_kib() -> int:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_small_buffers_are_ordinary_tensors():
    t = hugepages.empty(1000, torch.float32)
    assert t.shape == (1000,) and t.dtype == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_large_buffer_starts_on_a_huge_page_and_holds_what_is_written():
    before = _huge_kib()
    t = hugepages.empty(3 * hugepages.HUGE_PAGE // 4 + 5, torch.float32).zero_()
    assert t.numel() == 3 * hugepages.HUGE_PAGE // 4 + 5 and t.dtype == torch.float32
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.copy_(torch.arange(t.numel(), dtype=torch.float32))
    assert t[-1].item() == t.numel() - 1
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in mode:  # the kernel may still decline (fragmented memory): report, don't fail
        print(f"AnonHugePages grew by {_huge_kib() - before} KiB for a {t.numel() * 4 >> 10} KiB buffer")


def test_the_slot_pool_lives_in_one_buffer():
    """Every module's slots are views of one arena, laid out in target order."""
    from types import SimpleNamespace

    from loramux.adapters.slots import SlotPool

    targets = {f"layers.{i}.{m}": SimpleNamespace(d_in=64, d_out=32 if m == "k" else 64) for i in range(2) for m in "qk"}
    pool = SlotPool(SimpleNamespace(targets=targets), num_slots=4, max_rank=8, device="cpu", dtype=torch.float32)
    stores = [(m._a_store, m._bt_store) for m in pool.modules.values()]
    base = stores[0][0].untyped_storage().data_ptr()
    assert all(s.untyped_storage().data_ptr() == base for pair in stores for s in pair)
    assert all(a.abs().sum() == 0 and bt.abs().sum() == 0 for a, bt in stores)
    ends = [(a.data_ptr(), bt.data_ptr() + bt.numel() * 4) for a, bt in stores]
    assert all(end == nxt for (_, end), (nxt, _) in zip(ends, ends[1:]))  # back to back, in order
