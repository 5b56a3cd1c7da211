"""Merging adapters on their task vectors ΔW, per target module, in float32.

`methods` holds the merge methods (pure functions plus the `METHODS` registry);
`lowrank` the exact low-rank algebra for merged deltas.
"""

from loramux.merging.methods import (
    METHODS,
    REQUIRED,
    MergeMethod,
    Param,
    check_arity,
    coefficients,
    coefficients_from_gram,
    derive_seed,
    gram_matrix,
    make_generators,
    merge_dense,
    merge_module,
    resolve_method,
)

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "Param",
    "check_arity",
    "coefficients",
    "coefficients_from_gram",
    "derive_seed",
    "gram_matrix",
    "make_generators",
    "merge_dense",
    "merge_module",
    "resolve_method",
]
