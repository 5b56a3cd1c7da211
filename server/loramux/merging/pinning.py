"""Pin a merge into the base weights and take it out again without a trace.

Pinning folds ΔW into each target weight in float32 (dequantize → add → requantize
for nf4). Unpinning puts back the *original* tensor objects (and quantization
state), so the restored weights are the loaded ones bit for bit, however many
cycles run: nothing is ever subtracted or requantized on the way back.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from loramux.errors import FailedPrecondition
from loramux.merging.lowrank import Factored
from loramux.model.lora_layers import LoraLinear


@dataclass
class _Original:
    data: torch.Tensor
    quant_state: object | None = None  # 4-bit
    int8: tuple[torch.Tensor, torch.Tensor] | None = None  # (CB, SCB) of an int8 layer


def _dense(delta: Factored | torch.Tensor) -> torch.Tensor:  # [d_out, d_in] float32
    return delta.dense() if isinstance(delta, Factored) else delta.float()


def _added(w: torch.Tensor, delta: Factored | torch.Tensor) -> torch.Tensor:
    """A new tensor W + ΔW (float32 accumulation); `w` itself is kept for unpin."""
    if w.dtype == torch.float32 and isinstance(delta, Factored):
        return torch.addmm(w, delta.B.to(w.device), delta.A.to(w.device))  # no dense ΔW temporary
    return (w.float() + _dense(delta).to(w.device)).to(w.dtype)


def _is_4bit(base: nn.Module) -> bool:
    return getattr(base.weight, "quant_state", None) is not None


def _is_8bit(base: nn.Module) -> bool:
    return base.weight.dtype == torch.int8


class WeightPinner:
    """Owns the base weights' pinned state; one pinned merge at a time.

    Not thread-safe: the engine calls it on its own thread at a step boundary.
    """

    def __init__(self, layers: dict[str, LoraLinear]):
        self.layers = layers
        self._originals: dict[str, _Original] = {}
        self.label: str | None = None

    @property
    def pinned(self) -> bool:
        return self.label is not None

    @property
    def quantized(self) -> bool:
        """Some target layer is 4- or 8-bit: pinning re-quantizes, so (W + P) − P ≠ W."""
        return any(_is_4bit(layer.base) or _is_8bit(layer.base) for layer in self.layers.values())

    def check_supported(self) -> None:
        """Every base kind can be pinned (float, nf4/fp4, int8); kept as the hook
        the engine calls before queueing a swap."""

    def pin(self, deltas: dict[str, Factored | torch.Tensor], label: str) -> float:
        """Fold `deltas` (module name → ΔW) into the base; replaces any pinned merge.
        Returns the seconds it took."""
        self.check_supported()
        start = time.perf_counter()
        self.unpin()
        for name, delta in deltas.items():
            base = self.layers[name].base
            if _is_8bit(base):
                self._originals[name] = _Original(base.weight.data, int8=_int8_parts(base))
                self._fold_8bit(base, _dense(delta))
                continue
            self._originals[name] = _Original(base.weight.data, getattr(base.weight, "quant_state", None))
            if _is_4bit(base):
                self._fold_4bit(base, _dense(delta))
            else:
                base.weight.data = _added(base.weight.data, delta)
        self.label = label
        return time.perf_counter() - start

    def unpin(self) -> float:
        """Restore every original weight object; a no-op when nothing is pinned."""
        start = time.perf_counter()
        for name, orig in self._originals.items():
            weight = self.layers[name].base.weight
            if orig.int8 is not None:
                _set_int8(self.layers[name].base, *orig.int8)
                continue
            weight.data = orig.data
            if orig.quant_state is not None:
                weight.quant_state = orig.quant_state
        self._originals.clear()
        self.label = None
        return time.perf_counter() - start

    @staticmethod
    def _fold_8bit(base: nn.Module, delta: torch.Tensor) -> None:
        """LLM.int8 row-wise: W = CB · SCB / 127; requantize W + ΔW the way
        bitsandbytes quantizes a checkpoint (from float16)."""
        import bitsandbytes.functional as bnbf

        CB, SCB = _int8_parts(base)
        dense = CB.float() * (SCB.float().unsqueeze(1) / 127.0)  # [d_out, d_in]
        new_CB, new_SCB, _ = bnbf.int8_vectorwise_quant((dense + delta.to(dense.device)).to(torch.float16))
        _set_int8(base, new_CB, new_SCB)

    @staticmethod
    def _fold_4bit(base: nn.Module, delta: torch.Tensor) -> None:
        import bitsandbytes.functional as bnbf

        weight, qs = base.weight, base.weight.quant_state
        dense = dequantize_4bit_weight(weight).float()  # [d_out, d_in]
        packed, new_qs = bnbf.quantize_4bit(
            (dense + delta.to(dense.device)).to(qs.dtype),
            blocksize=qs.blocksize,
            quant_type=qs.quant_type,
            compress_statistics=qs.nested,
            quant_storage=weight.data.dtype,
        )
        weight.data = packed
        weight.quant_state = new_qs


def dequantize_4bit_weight(w) -> torch.Tensor:  # [d_out, d_in]
    """bitsandbytes' dequantization of a 4-bit weight as it is now, without touching it.

    On CPUs with AVX512-BF16, bnb repacks a Linear4bit in place at its first forward
    (packing_format_for_cpu: nibbles tiled for its kernel, absmax cast to bf16 and
    stored transposed, [K/blocksize, N]); dequantize_4bit does not understand that
    layout. Undo it on copies; the bf16 absmax is what that kernel multiplies by.
    """
    import bitsandbytes.functional as bnbf

    qs = w.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        return bnbf.dequantize_4bit(w.data, qs)
    absmax = qs.absmax.t().reshape(-1).float()  # [N * K/blocksize], row-major blocks
    data, qs = bnbf._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(qs))
    qs.absmax, qs.nested = absmax, False  # the inverse leaves absmax transposed
    return bnbf.dequantize_4bit(data, qs)


def _int8_parts(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB [d_out, d_in] int8, SCB [d_out] float32) of a Linear8bitLt: on the weight
    until its first forward, in its matmul state after (bnb moves them there)."""
    w = base.weight
    if getattr(w, "CB", None) is not None:
        return w.CB, w.SCB
    return base.state.CB, base.state.SCB


def _set_int8(base: nn.Module, CB: torch.Tensor, SCB: torch.Tensor) -> None:
    """Make a Linear8bitLt compute with (CB, SCB), as after its first forward."""
    base.weight.data = CB
    base.weight.CB, base.weight.SCB = None, None
    base.state.CB, base.state.SCB = CB, SCB
    base.state.idx = None  # outlier columns are recomputed from the new weights
