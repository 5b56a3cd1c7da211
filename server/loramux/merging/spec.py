"""What a mix of adapters is: the request-level description of a merge."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from loramux.errors import InvalidArgument

MAX_MIX_ADAPTERS = 16
# Useful weights are around 0-2 (task arithmetic goes to a few); far beyond, a
# delta only overflows float32 activations and the row produces NaN.
MAX_MIX_WEIGHT = 100.0


@dataclass(frozen=True)
class MixSpec:
    """A merge of adapters by `method` with `params`.

    adapters: (name, weight) pairs in the order given; weights may be negative.
    params: method parameters as sorted (key, value) pairs (density, t, ...).
    seed: seeds the random methods (DARE), per (seed, adapter, module).
    """

    adapters: tuple[tuple[str, float], ...]
    method: str = "linear"
    params: tuple[tuple[str, object], ...] = ()
    seed: int = 0

    @classmethod
    def build(cls, adapters, method="linear", params=None, seed=0) -> "MixSpec":
        pairs = tuple((str(n), float(w)) for n, w in adapters)
        if not pairs:
            raise InvalidArgument("a mix needs at least one adapter")
        if len(pairs) > MAX_MIX_ADAPTERS:
            raise InvalidArgument(f"a mix takes at most {MAX_MIX_ADAPTERS} adapters, got {len(pairs)}")
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"a mix names an adapter twice: {names}")
        for n, w in pairs:
            if not math.isfinite(w):
                raise InvalidArgument(f"weight of {n!r} is not finite: {w}")
            if abs(w) > MAX_MIX_WEIGHT:
                raise InvalidArgument(
                    f"weight of {n!r} is {w:g}; weights are limited to ±{MAX_MIX_WEIGHT:g}"
                )
        if not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InvalidArgument(f"seed must be an integer in [0, 2^63), got {seed!r}")
        return cls(pairs, str(method), tuple(sorted((params or {}).items())), seed)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.adapters]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.adapters]

    def key(self, content_hashes: dict[str, str], serving: tuple) -> str:
        """Content hash of the mix: adapter contents (not names), weights, method,
        parameters, seed and the serving compression settings."""
        blob = json.dumps(
            [[content_hashes[n], w] for n, w in self.adapters]
            + [self.method, [list(p) for p in self.params], self.seed, list(serving)],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        parts = ",".join(f"{n}={w:g}" for n, w in self.adapters)
        extra = "".join(f",{k}={v}" for k, v in self.params)
        return f"{self.method}({parts}{extra})"
