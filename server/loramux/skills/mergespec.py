"""Merge specs for `loramux eval`: the one-line form, files, sweeps and --pairs-all.

One line:

    METHOD:ADAPTER=WEIGHT[,ADAPTER=WEIGHT...][:KEY=VALUE[,KEY=VALUE...]]

    linear:sql=0.5,json=0.5
    ties:sql=1,json=1:density=0.5
    dare_ties:sql=1,json=1:density=0.5,seed=3     seed: DARE's random drops
    slerp:sql=1,json=1:t=0.3

VALUE is read as true/false, an integer, a number, else text. A file (.toml or .json)
holds a list `merges` whose entries are such lines or tables
`{method = "ties", adapters = {sql = 1, json = 1}, params = {density = 0.5}, seed = 0}`.

A sweep `METHOD.KEY=V1,V2,...` merges every pair of adapters once per value. KEY is a
parameter of METHOD (`ties.density`, `dare_ties.density`, `slerp.t`, ...) or one of
two weight knobs: `weight` (the pair's first adapter gets w, the second 1 − w) and
`scale` (both get s). Whatever the sweep does not set comes from `PAIR_DEFAULTS`.

Every spec is checked here (method, parameters, arity, adapter names), so a typo
fails before the model loads.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loramux.errors import InvalidArgument
from loramux.merging.methods import METHODS, check_arity, resolve_method
from loramux.merging.spec import MixSpec

SPEC_SYNTAX = "METHOD:ADAPTER=WEIGHT[,ADAPTER=WEIGHT...][:KEY=VALUE[,KEY=VALUE...]]"
SWEEP_SYNTAX = "METHOD.KEY=V1,V2,... (KEY: a parameter of METHOD, or weight, or scale)"
WEIGHT_KNOBS = ("weight", "scale")

# Methods whose result is a mean of the agreeing inputs (TIES's disjoint mean) or an
# interpolation take weight 1 per adapter; sums take 1/N, so a default pair merge keeps
# each task vector at about its own size (ties of [1, 1] ≈ average where both agree).
UNIT_WEIGHT_METHODS = frozenset({"ties", "dare_ties", "della", "slerp"})
# Required parameters a pair merge gets when the spec or sweep does not set them.
PAIR_DEFAULTS: Mapping[str, Mapping[str, object]] = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "magnitude_prune": {"density": 0.5},
    "breadcrumbs": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.1},
    "slerp": {"t": 0.5},
}
# --pairs-all: these methods on every pair, then karcher over all adapters.
PAIR_METHODS = ("linear", "ties", "dare_ties", "slerp")

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_value(text: str) -> object:
    """true/false → bool, an integer → int, a number → float, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _fail(spec: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"merge spec {spec!r}: {why}; expected {SPEC_SYNTAX}")


def _pairs(spec: str, part: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in part.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise _fail(spec, f"{what} {item.strip()!r} is not KEY=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def parse_merge(text: str) -> MixSpec:
    """One merge from its one-line form (see the module docstring)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise _fail(text, "give a method, adapters and optional parameters separated by ':'")
    method = parts[0].strip()
    if method not in METHODS:
        raise _fail(text, f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    adapters = []
    for name, weight in _pairs(text, parts[1], "adapter"):
        try:
            w = float(weight)
        except ValueError:
            raise _fail(text, f"weight of {name!r} is not a number: {weight!r}") from None
        adapters.append((name, w))
    params = dict(_pairs(text, parts[2], "parameter")) if len(parts) == 3 else {}
    seed = params.pop("seed", "0")
    try:
        seed = int(seed)
    except ValueError:
        raise _fail(text, f"seed must be an integer, got {seed!r}") from None
    return build_merge(adapters, method, {k: parse_value(v) for k, v in params.items()}, seed,
                       where=f"merge spec {text!r}")


def build_merge(adapters: Iterable[tuple[str, float]], method: str,
                params: Mapping[str, object] | None = None, seed: int = 0, *,
                where: str = "merge") -> MixSpec:
    """A validated MixSpec: known method, valid parameters, the arity it takes,
    adapter names that can name a directory. InvalidArgument says `where` it failed."""
    try:
        spec = MixSpec.build(list(adapters), method, dict(params or {}), seed)
        for name in spec.names:
            if not _NAME.match(name):
                raise InvalidArgument(f"adapter name {name!r} has characters other than "
                                      "letters, digits, '_', '-' and '.'")
        check_arity(spec.method, len(spec.adapters))
        resolve_method(spec.method, dict(spec.params))
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None
    return spec


def label(spec: MixSpec) -> str:
    """How the report names a merge: its description, plus the seed when not 0."""
    text = spec.describe()
    return text if spec.seed == 0 else f"{text[:-1]},seed={spec.seed})"


# ------------------------------------------------------------------ files


def load_merge_file(path: Path) -> list[MixSpec]:
    """The merges of a .toml or .json file (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read merge file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode())
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise InvalidArgument(f"merge file {path} does not parse: {e}") from None
    entries = data.get("merges") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument(f"merge file {path}: expected a non-empty list `merges`")
    return [_merge_entry(entry, f"merge file {path}, entry {i + 1}") for i, entry in enumerate(entries)]


def _merge_entry(entry: object, where: str) -> MixSpec:
    if isinstance(entry, str):
        try:
            return parse_merge(entry)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e}") from None
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where}: expected a spec line or a table, got {entry!r}")
    unknown = set(entry) - {"method", "adapters", "params", "seed"}
    if unknown:
        raise InvalidArgument(f"{where}: unknown key(s) {sorted(unknown)}; "
                              "known: method, adapters, params, seed")
    adapters = entry.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise InvalidArgument(f"{where}: `adapters` must be a table of name = weight")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in adapters.values()):
        raise InvalidArgument(f"{where}: every adapter weight must be a number")
    params = entry.get("params", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where}: `params` must be a table")
    seed = entry.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidArgument(f"{where}: `seed` must be an integer")
    return build_merge(adapters.items(), str(entry.get("method", "linear")), params, seed,
                       where=where)


def parse_merges(items: Sequence[str]) -> list[MixSpec]:
    """--merges values: one-line specs, or paths of .toml / .json files."""
    out: list[MixSpec] = []
    for item in items:
        if item.endswith((".toml", ".json")):
            out += load_merge_file(Path(item))
        else:
            out.append(parse_merge(item))
    return out


# ------------------------------------------------------------------ sweeps


@dataclass(frozen=True)
class Sweep:
    """`METHOD.KEY=V1,V2,...`: one pair merge per value and pair of adapters."""

    method: str
    key: str
    values: tuple[object, ...]


def parse_sweep(text: str) -> Sweep:
    head, eq, tail = text.partition("=")
    method, dot, key = head.strip().partition(".")
    if not eq or not dot or not method or not key:
        raise InvalidArgument(f"sweep {text!r}: expected {SWEEP_SYNTAX}")
    if method not in METHODS:
        raise InvalidArgument(f"sweep {text!r}: unknown method {method!r}; "
                              f"known: {', '.join(sorted(METHODS))}")
    knobs = list(METHODS[method].params) + list(WEIGHT_KNOBS)
    if key not in knobs:
        raise InvalidArgument(f"sweep {text!r}: {method} has no parameter {key!r}; "
                              f"sweepable: {', '.join(knobs)}")
    values = tuple(parse_value(v) for v in tail.split(",") if v.strip())
    if not values:
        raise InvalidArgument(f"sweep {text!r}: give at least one value after '='")
    if key in WEIGHT_KNOBS and not all(_is_number(v) for v in values):
        raise InvalidArgument(f"sweep {text!r}: {key} values must be numbers")
    return Sweep(method, key, values)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def default_weights(method: str, n: int) -> list[float]:
    return [1.0] * n if method in UNIT_WEIGHT_METHODS else [1.0 / n] * n


def pair_merge(method: str, pair: Sequence[str], *, weights: Sequence[float] | None = None,
               params: Mapping[str, object] | None = None, seed: int = 0) -> MixSpec:
    """A merge of `pair` by `method` with PAIR_DEFAULTS filled in."""
    chosen = {**PAIR_DEFAULTS.get(method, {}), **(params or {})}
    w = default_weights(method, len(pair)) if weights is None else list(weights)
    return build_merge(zip(pair, w), method, chosen, seed, where=f"{method} of {'+'.join(pair)}")


def expand_sweep(sweep: Sweep, adapters: Sequence[str]) -> list[MixSpec]:
    """The sweep's merges over every pair of `adapters` (in the order given)."""
    out = []
    for pair in itertools.combinations(adapters, 2):
        for value in sweep.values:
            if sweep.key == "weight":
                out.append(pair_merge(sweep.method, pair, weights=[value, 1.0 - value]))
            elif sweep.key == "scale":
                out.append(pair_merge(sweep.method, pair, weights=[value, value]))
            else:
                out.append(pair_merge(sweep.method, pair, params={sweep.key: value}))
    return out


def linear_average(adapters: Sequence[str]) -> MixSpec:
    """Σ ΔWᵢ / N: the reference every merge of the same adapters is compared with."""
    return pair_merge("linear", adapters)


def is_linear_average(spec: MixSpec) -> bool:
    """linear with equal weights that sum to 1 (or any equal weights with normalize)."""
    if spec.method != "linear" or len(spec.adapters) < 2:
        return False
    w = spec.weights
    equal = all(math.isclose(x, w[0], rel_tol=1e-9) for x in w) and w[0] > 0
    normalized = bool(dict(spec.params).get("normalize", False))
    return equal and (normalized or math.isclose(sum(w), 1.0, rel_tol=1e-9))


def pairs_all(adapters: Sequence[str]) -> list[MixSpec]:
    """PAIR_METHODS on every pair of adapters, then the karcher mean of all of them
    (when there are at least three; for two it is the slerp midpoint direction)."""
    out = [pair_merge(m, pair) for pair in itertools.combinations(adapters, 2)
           for m in PAIR_METHODS]
    if len(adapters) >= 3:
        out.append(pair_merge("karcher", adapters))
    return out


def check_adapters(specs: Iterable[MixSpec], known: Sequence[str]) -> None:
    """InvalidArgument for a merge naming an adapter that is not being evaluated."""
    for spec in specs:
        missing = [n for n in spec.names if n not in known]
        if missing:
            raise InvalidArgument(
                f"merge {label(spec)} names adapter(s) {missing} that are not evaluated; "
                f"adapters: {', '.join(known) or 'none'}")


def unique(specs: Iterable[MixSpec]) -> list[MixSpec]:
    """Specs in order, each once (a sweep and --pairs-all may make the same merge)."""
    seen: set[MixSpec] = set()
    out = []
    for s in specs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
