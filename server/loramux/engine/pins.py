"""The pin controller: which merge is folded into the base weights, its epoch, and
swaps queued by operators and applied by the engine at a drained step boundary."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from loramux.errors import FailedPrecondition
from loramux.merging.lowrank import Factored
from loramux.merging.pinning import WeightPinner


@dataclass(frozen=True)
class PinState:
    """The base weights' pin: epoch (bumped by every pin/unpin), the pinned label,
    P's factors when other adapters can be served exactly on top of it, else why not.
    Replaced, never mutated, so a request resolved on another thread reads one
    consistent state."""

    epoch: int = 0
    label: str | None = None
    factors: dict[str, Factored] | None = None
    refusal: str | None = None


@dataclass
class Swap:
    """A queued pin (deltas set) or unpin (deltas None) and its outcome."""

    deltas: dict | None
    label: str | None
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0
    error: Exception | None = None


class PinController:
    """Owns the pin state and the one pending swap. `request` may be called from
    any thread; `apply` only on the engine thread, with no row in flight."""

    def __init__(self, pinner: WeightPinner):
        self.pinner = pinner
        self.state = PinState()
        self._pending: Swap | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        return self._pending is not None

    @property
    def label(self) -> str | None:
        return self.pinner.label

    def request(self, deltas, label: str | None) -> Swap:
        """Queue a pin (deltas) or unpin (None); applied at the next drained step."""
        self.pinner.check_supported()
        swap = Swap(deltas, label)
        with self._lock:
            if self._pending is not None:
                raise FailedPrecondition("another pin or unpin is in progress")
            self._pending = swap
        return swap

    def apply(self) -> None:
        """Apply the pending swap (the caller has drained every row)."""
        swap = self._pending
        if swap is None:
            return
        try:
            if swap.deltas is None:
                swap.seconds = self.pinner.unpin()
            else:
                swap.seconds = self.pinner.pin(swap.deltas, swap.label)
        except Exception as e:  # reported to the caller, the engine goes on
            swap.error = e
        factors, refusal = self._compensation_for(swap.deltas)
        self.state = PinState(self.state.epoch + 1, self.pinner.label, factors, refusal)
        with self._lock:
            self._pending = None
        swap.done.set()

    def _compensation_for(self, deltas) -> tuple[dict | None, str | None]:
        if not self.pinner.pinned:
            return None, None
        if self.pinner.quantized:
            return None, (
                "the base is quantized (re-quantizing with the merge moved every weight), "
                "so adapters cannot be served exactly on top of it"
            )
        if not all(isinstance(d, Factored) for d in deltas.values()):
            return None, "its ΔW is dense (not low rank), so it cannot be subtracted exactly per request"
        return deltas, None
