"""Device slots: a fixed pool of stacked LoRA buffers, one row of slots per target
module, so one forward step can serve up to `num_slots` distinct adapters."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loramux import hugepages
from loramux.adapters.types import LoraModule
from loramux.errors import InvalidArgument, ResourceExhausted
from loramux.model.spec import BaseModelSpec


@dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    repacks: int = 0


class ModuleSlots:
    """The stacked buffers of one target module.

    Storage is allocated once for num_slots × max_rank; `A` and `BT` are views at
    the current rank stride R (the largest rank resident), so the slot prefix
    [:k] is contiguous and a step needs no copy:
        A:  [S, R, d_in]   lora_A of each slot, zero-padded past its rank
        BT: [S, R, d_out]  (scale · lora_B).T of each slot, zero-padded
    """

    def __init__(self, d_in: int, d_out: int, num_slots: int, max_rank: int, store: torch.Tensor):
        """store: a zeroed flat buffer of `numel(...)` elements (part of the pool's)."""
        self.d_in, self.d_out, self.num_slots = d_in, d_out, num_slots
        split = num_slots * max_rank * d_in
        self._a_store, self._bt_store = store[:split], store[split:]
        self.set_stride(1)

    @staticmethod
    def numel(d_in: int, d_out: int, num_slots: int, max_rank: int) -> int:
        return num_slots * max_rank * (d_in + d_out)

    def set_stride(self, rank: int) -> None:
        self.rank = rank
        s = self.num_slots
        self.A = self._a_store[: s * rank * self.d_in].view(s, rank, self.d_in)
        self.BT = self._bt_store[: s * rank * self.d_out].view(s, rank, self.d_out)

    def restride(self, new_rank: int) -> None:
        """Re-lay the slots at a larger stride, moving the last slot first so no
        slot is overwritten before it moves."""
        old_a, old_bt, old = self.A.clone(), self.BT.clone(), self.rank
        self.set_stride(new_rank)
        self.A.zero_()
        self.BT.zero_()
        self.A[:, :old] = old_a
        self.BT[:, :old] = old_bt

    def write(self, slot: int, module: LoraModule | None) -> None:
        self.A[slot].zero_()
        self.BT[slot].zero_()
        if module is None:
            return
        r = module.rank
        self.A[slot, :r] = module.A.to(self.A.dtype)
        self.BT[slot, :r] = (module.B.float() * module.scale).t().to(self.BT.dtype)

    @property
    def nbytes(self) -> int:
        return (self._a_store.numel() + self._bt_store.numel()) * self._a_store.element_size()


class SlotPool:
    """Maps adapter keys to device slots, LRU among slots not used by the running step.

    Keys are caller-chosen strings (an adapter name, or a merge's content hash).
    Thread-safe: the engine thread acquires, admin threads release.
    """

    def __init__(self, spec: BaseModelSpec, num_slots: int, max_rank: int, device, dtype):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.device, self.dtype = torch.device(device), dtype
        # One buffer for every module's slots, on huge pages where the host allows:
        # a decode step reads the slots of every layer, cold (see loramux.hugepages).
        sizes = {name: ModuleSlots.numel(t.d_in, t.d_out, num_slots, max_rank) for name, t in spec.targets.items()}
        arena = hugepages.empty(sum(sizes.values()), dtype, device).zero_()
        self.modules, offset = {}, 0
        for name, t in spec.targets.items():
            store = arena[offset : offset + sizes[name]]
            self.modules[name] = ModuleSlots(t.d_in, t.d_out, num_slots, max_rank, store)
            offset += sizes[name]
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._rank_of: dict[str, int] = {}
        self._free = list(range(num_slots))
        self._lock = threading.Lock()
        self.stats = SlotStats()

    @property
    def rank(self) -> int:
        """Current rank stride R of every module's buffers."""
        return next(iter(self.modules.values())).rank

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)

    def slot_of(self, key: str) -> int | None:
        with self._lock:
            return self._slot_of.get(key)

    def acquire(self, key: str, modules: dict[str, LoraModule], busy: set[int] = frozenset()) -> int:
        """Slot holding `modules` under `key`, writing them in if not resident.

        busy: slots the running batch uses; they are never evicted. Raises
        ResourceExhausted when every slot is busy (the scheduler waits and retries).
        """
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._slot_of.move_to_end(key)
                self.stats.hits += 1
                return slot
            self.stats.misses += 1
            rank = max(m.rank for m in modules.values())
            if rank > self.max_rank:
                raise InvalidArgument(
                    f"adapter {key!r} has rank {rank}; device slots hold at most {self.max_rank}"
                )
            slot = self._take_slot(busy)
            if rank > self.rank:
                for buf in self.modules.values():
                    buf.restride(rank)
                self.stats.repacks += 1
            for name, buf in self.modules.items():
                buf.write(slot, modules.get(name))
            self._slot_of[key] = slot
            self._rank_of[key] = rank
            return slot

    def _take_slot(self, busy: set[int]) -> int:
        if self._free:
            self._free.sort()  # lowest first keeps the active prefix [:k] short
            return self._free.pop(0)
        for key, slot in self._slot_of.items():
            if slot not in busy:
                self._evict(key)
                self.stats.evictions += 1
                self._free.sort()
                return self._free.pop(0)
        raise ResourceExhausted(
            f"all {self.num_slots} device slots are in use by running requests"
        )

    def _evict(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        self._rank_of.pop(key, None)
        for buf in self.modules.values():
            buf.write(slot, None)
        self._free.append(slot)

    def release(self, key: str) -> bool:
        """Free the slot of `key` (adapter unloaded or evicted from the host)."""
        with self._lock:
            if key not in self._slot_of:
                return False
            self._evict(key)
            return True
