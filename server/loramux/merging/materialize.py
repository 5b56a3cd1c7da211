"""Turn a MixSpec into merged deltas: exact per module (for pinning and export),
and a low-rank virtual adapter for the device slots (per-request serving)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from loramux.adapters.types import LoraAdapter, LoraModule
from loramux.errors import FailedPrecondition, InvalidArgument
from loramux.merging import methods
from loramux.merging.lowrank import Factored, compress_dense, compress_exact, concat, gram
from loramux.merging.spec import MixSpec

# Called between modules (before each one); raises to abort the merge.
Check = Callable[[], None]


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


class OverBudget(FailedPrecondition):
    """Serving the mix at rank ≤ max_rank would exceed the error budget.

    Raised by `serving_adapter(..., refuse_over_budget=True)` at the first module
    whose compression misses the budget (the rest is not merged). module: that
    module; rel_error: its error at `rank` (= max_rank), a lower bound of the mix's
    worst error; needed_rank: the smallest rank meeting the budget there when the
    compression can tell (exact merges always can), else None ("more than max_rank").
    """

    def __init__(self, module: str, rel_error: float, budget: float, rank: int, needed_rank: int | None):
        self.module, self.rel_error, self.budget = module, rel_error, budget
        self.rank, self.needed_rank = rank, needed_rank
        needs = f"rank {needed_rank}" if needed_rank is not None else f"more than rank {rank}"
        super().__init__(
            f"{module} compressed to rank {rank} has relative error {rel_error:.3g}, above the "
            f"error budget {budget:g}; meeting the budget there needs {needs}"
        )


def module_seed(seed: int, adapter_hash: str, module: str) -> int:
    """The seed of the random draws for one (mix seed, adapter, module)."""
    h = hashlib.sha256(f"{seed}:{adapter_hash}:{module}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _factors(adapters: list[LoraAdapter], module: str) -> list[Factored | None]:
    """Each adapter's ΔW of `module` as B·A with the scale folded into B; None for
    adapters that do not train the module (their ΔW is 0 and adds no column)."""
    out: list[Factored | None] = []
    for a in adapters:
        m = a.modules.get(module)
        out.append(None if m is None else Factored(m.B.float() * m.scale, m.A.float()))
    return out


def _gram(factors: list[Factored | None]) -> torch.Tensor:
    """[N, N] float64 Gram matrix of all N inputs, absent ones (ΔW = 0) giving zero
    rows and columns: what the coefficient functions see for a zero task vector."""
    present = [i for i, f in enumerate(factors) if f is not None]
    block = gram([factors[i] for i in present]).cpu()  # [P, P]
    if len(present) == len(factors):
        return block
    g = torch.zeros(len(factors), len(factors), dtype=torch.float64)  # [N, N]
    idx = torch.tensor(present)
    g[idx.view(-1, 1), idx.view(1, -1)] = block
    return g


def _exact_combination(coeffs: list[float], factors: list[Factored | None], like: LoraModule) -> Factored:
    """Σ cᵢ ΔWᵢ as concatenated factors of the inputs that train the module and
    have a non-zero coefficient (the others add exactly nothing); rank Σ of theirs."""
    terms = [(c, f) for c, f in zip(coeffs, factors) if f is not None and c != 0.0]
    if not terms:  # every coefficient is 0: ΔW = 0, one zero column keeps the shapes
        return Factored(like.B.new_zeros(like.B.shape[0], 1), like.A.new_zeros(1, like.A.shape[1]))
    return concat(terms)


def _merged_modules(
    adapters: list[LoraAdapter], spec: MixSpec, check: Check | None = None
) -> Iterator[tuple[str, Factored | torch.Tensor]]:
    """(module, merged ΔW) for every module any input trains, in name order, one at
    a time (so a caller can consume each before the next is made). `check` is
    called before each module and may raise to abort."""
    method, params = methods.resolve_method(spec.method, dict(spec.params))
    methods.check_arity(method, len(adapters))
    likes = {}  # module → a LoraModule that trains it (for its shape)
    for a in adapters:
        for name, m in a.modules.items():
            likes.setdefault(name, m)
    inputs = None  # [N, largest d_out·d_in] float32: the dense task vectors, reused per module
    for name in sorted(likes):
        if check is not None:
            check()
        like = likes[name]
        factors = _factors(adapters, name)
        if method.low_rank_exact:
            g = None if method.name == "linear" else _gram(factors)  # linear's cᵢ are its weights
            coeffs = methods.coefficients_from_gram(method, g, spec.weights, params)
            yield name, _exact_combination(coeffs, factors, like)
            continue
        if inputs is None:
            largest = max(m.B.shape[0] * m.A.shape[1] for m in likes.values())
            inputs = torch.empty(len(adapters), largest, dtype=torch.float32, device=like.A.device)
        shape = (like.B.shape[0], like.A.shape[1])
        numel = shape[0] * shape[1]
        # Methods return new tensors and never keep their inputs, so the buffer is free again.
        dense = [
            inputs[i, :numel].view(shape).zero_() if f is None
            else torch.matmul(f.B, f.A, out=inputs[i, :numel].view(shape))
            for i, f in enumerate(factors)
        ]  # N × [d_out, d_in]
        gens = [
            torch.Generator().manual_seed(module_seed(spec.seed, a.content_hash, name))
            for a in adapters
        ]
        yield name, methods.merge_dense(method, dense, spec.weights, params, gens)


def exact_deltas(
    adapters: list[LoraAdapter], spec: MixSpec, check: Check | None = None
) -> dict[str, Factored | torch.Tensor]:
    """The merged ΔW of every module any input trains: Factored for methods whose
    result is a linear combination of the inputs (exact, rank Σ r_i over the inputs
    that train the module with a non-zero coefficient), a dense float32
    [d_out, d_in] tensor otherwise. `check` as in `serving_adapter`."""
    return dict(_merged_modules(adapters, spec, check))


def serving_adapter(
    adapters: list[LoraAdapter],
    spec: MixSpec,
    key: str,
    max_rank: int,
    error_budget: float,
    check: Check | None = None,
    *,
    refuse_over_budget: bool = False,
) -> tuple[LoraAdapter, MergeReport]:
    """The mix as a virtual adapter of rank ≤ max_rank for the device slots.

    Exact methods keep their concatenated factors when their rank is ≤ max_rank and
    are otherwise truncated exactly (QR + core SVD); dense methods are compressed
    to the smallest rank meeting error_budget (capped at max_rank). The achieved
    error is reported, never hidden; with refuse_over_budget, the first module
    whose error exceeds error_budget raises `OverBudget` instead (the rest is not
    merged). `check` is called before each module and may raise to abort.
    """
    start = time.perf_counter()
    modules: dict[str, LoraModule] = {}
    worst = 0.0
    for name, delta in _merged_modules(adapters, spec, check):  # compressed as made: one dense ΔW alive
        if isinstance(delta, Factored):
            c = compress_exact(delta, max_rank, budget=error_budget if delta.rank > max_rank else 0.0)
        else:
            c = compress_dense(delta, max_rank, error_budget)
        if refuse_over_budget and c.rel_error > error_budget:
            raise OverBudget(name, c.rel_error, error_budget, c.factored.rank, c.needed_rank)
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
