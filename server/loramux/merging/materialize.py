"""Turn a MixSpec into merged deltas: exact per module (for pinning and export),
and a low-rank virtual adapter for the device slots (per-request serving)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loramux.adapters.types import LoraAdapter, LoraModule
from loramux.errors import InvalidArgument
from loramux.merging import methods
from loramux.merging.lowrank import Factored, compress_dense, compress_exact, concat, gram
from loramux.merging.spec import MixSpec


@dataclass(frozen=True)
class MergeReport:
    """How a merge was served.

    rank: largest rank over modules of the served (virtual) adapter.
    rel_error: largest relative Frobenius error over modules between the served
      low-rank delta and the exact merged ΔW (0.0 when exact).
    """

    method: str
    rank: int
    rel_error: float
    seconds: float
    cache_hit: bool = False


def module_seed(seed: int, adapter_hash: str, module: str) -> int:
    """The seed of the random draws for one (mix seed, adapter, module)."""
    h = hashlib.sha256(f"{seed}:{adapter_hash}:{module}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _factors(adapters: list[LoraAdapter], module: str, like: LoraModule) -> list[Factored]:
    """Each adapter's ΔW of `module` as B·A with the scale folded into B; a zero
    rank-1 factor for adapters that do not train the module (ΔW = 0)."""
    out = []
    for a in adapters:
        m = a.modules.get(module)
        if m is None:
            out.append(Factored(like.B.new_zeros(like.B.shape[0], 1), like.A.new_zeros(1, like.A.shape[1])))
        else:
            out.append(Factored(m.B.float() * m.scale, m.A.float()))
    return out


def _merged_modules(
    adapters: list[LoraAdapter], spec: MixSpec
) -> Iterator[tuple[str, Factored | torch.Tensor]]:
    """(module, merged ΔW) for every module any input trains, in name order, one at
    a time (so a caller can consume each before the next is made)."""
    method, params = methods.resolve_method(spec.method, dict(spec.params))
    methods.check_arity(method, len(adapters))
    likes = {}  # module → a LoraModule that trains it (for its shape)
    for a in adapters:
        for name, m in a.modules.items():
            likes.setdefault(name, m)
    inputs = None  # [N, largest d_out·d_in] float32: the dense task vectors, reused per module
    for name in sorted(likes):
        like = likes[name]
        factors = _factors(adapters, name, like)
        if method.low_rank_exact:
            g = None if method.name == "linear" else gram(factors)  # linear's cᵢ are its weights
            coeffs = methods.coefficients_from_gram(method, g, spec.weights, params)
            yield name, concat(list(zip(coeffs, factors)))
            continue
        if inputs is None:
            largest = max(m.B.shape[0] * m.A.shape[1] for m in likes.values())
            inputs = torch.empty(len(adapters), largest, dtype=torch.float32, device=like.A.device)
        shape = (like.B.shape[0], like.A.shape[1])
        numel = shape[0] * shape[1]
        # Methods return new tensors and never keep their inputs, so the buffer is free again.
        dense = [torch.matmul(f.B, f.A, out=inputs[i, :numel].view(shape)) for i, f in enumerate(factors)]
        gens = [
            torch.Generator().manual_seed(module_seed(spec.seed, a.content_hash, name))
            for a in adapters
        ]
        yield name, methods.merge_dense(method, dense, spec.weights, params, gens)


def exact_deltas(adapters: list[LoraAdapter], spec: MixSpec) -> dict[str, Factored | torch.Tensor]:
    """The merged ΔW of every module any input trains: Factored for methods whose
    result is a linear combination of the inputs (exact, rank Σ r_i), a dense
    float32 [d_out, d_in] tensor otherwise."""
    return dict(_merged_modules(adapters, spec))


def serving_adapter(
    adapters: list[LoraAdapter],
    spec: MixSpec,
    key: str,
    max_rank: int,
    error_budget: float,
) -> tuple[LoraAdapter, MergeReport]:
    """The mix as a virtual adapter of rank ≤ max_rank for the device slots.

    Exact methods keep their concatenated factors when Σ r_i ≤ max_rank and are
    otherwise truncated exactly (QR + core SVD); dense methods are compressed to
    the smallest rank meeting error_budget (capped at max_rank). The achieved
    error is reported, never hidden.
    """
    start = time.perf_counter()
    modules: dict[str, LoraModule] = {}
    worst = 0.0
    for name, delta in _merged_modules(adapters, spec):  # compressed as made: one dense ΔW alive
        if isinstance(delta, Factored):
            c = compress_exact(delta, max_rank, budget=error_budget if delta.rank > max_rank else 0.0)
        else:
            c = compress_dense(delta, max_rank, error_budget)
        worst = max(worst, c.rel_error)
        modules[name] = LoraModule(A=c.factored.A.contiguous(), B=c.factored.B.contiguous(), scale=1.0)
    if not modules:
        raise InvalidArgument(f"mix {spec.describe()} trains no module")
    merged = LoraAdapter(
        name=f"mix:{key[:16]}",
        modules=modules,
        content_hash=key,
        config={"mix": spec.describe()},
    )
    report = MergeReport(spec.method, merged.rank, worst, time.perf_counter() - start)
    return merged, report
