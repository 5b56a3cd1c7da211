"""Large host buffers on transparent huge pages.

A decode step reads every target layer's weights and adapter slots once: about
170k distinct 4 KiB pages per step on the default model, each a TLB miss whose
page-table walk itself often misses the caches. On 2 MiB pages the same bytes
span ~350 pages. Linux gives anonymous memory huge pages where the process asks
(`madvise(MADV_HUGEPAGE)`, honoured in the default "madvise" THP mode) if the
advice comes before the pages are first touched. Elsewhere, or when the kernel
says no, the buffer is an ordinary one: this is advice, never a requirement.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized flat buffer, on huge pages where the OS allows (CPU, Linux).

    Over-allocates by one huge page so the buffer can start on a 2 MiB boundary,
    and advises the kernel before anything touches it (the caller's first write
    then faults in huge pages)."""
    device = torch.device(device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or _MADVISE is None or nbytes < HUGE_PAGE:
        return torch.empty(numel, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    region = raw[start : start + nbytes]
    if _MADVISE(region.data_ptr(), nbytes, _MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) refused (errno %d); ordinary pages", ctypes.get_errno())
    return region.view(dtype)
