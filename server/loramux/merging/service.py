"""Mixes on demand: resolve a MixSpec to a cached virtual adapter, and keep the
operator's named merges."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

from loramux.adapters.host_cache import HostAdapterCache
from loramux.adapters.naming import validate_adapter_name
from loramux.adapters.store import AdapterStore
from loramux.adapters.types import LoraAdapter
from loramux.config import MergeConfig
from loramux.errors import FailedPrecondition, NotFound
from loramux.merging import materialize
from loramux.merging.materialize import Check, MergeReport, OverBudget
from loramux.merging.spec import MixSpec

# Refused mixes remembered (by cache key), so that asking again is answered without
# merging again; a message is a few hundred bytes.
MAX_REFUSALS = 1024


class _Aborted(Exception):
    """A merge stopped by its caller's check. Carries the check's exception and
    which resolve() it belongs to, so that callers who shared the flight retry."""

    def __init__(self, owner: object, cause: BaseException):
        super().__init__(f"merge aborted: {cause!r}")
        self.owner, self.cause = owner, cause


def _owned(check: Check | None, owner: object) -> Check | None:
    """`check`, its exception wrapped in _Aborted(owner)."""
    if check is None:
        return None

    def wrapped() -> None:
        try:
            check()
        except BaseException as e:
            raise _Aborted(owner, e) from e

    return wrapped


class MergeService:
    """Resolves mixes through a byte-bounded cache keyed by content hash; identical
    concurrent misses merge once (the cache's single flight)."""

    def __init__(self, store: AdapterStore, cfg: MergeConfig):
        self.store, self.cfg = store, cfg
        self.cache = HostAdapterCache(cfg.cache_bytes)
        self._reports: dict[str, MergeReport] = {}
        self._named: dict[str, MixSpec] = {}
        self._named_reports: dict[str, MergeReport] = {}  # as merged at create()
        self._refusals: OrderedDict[str, str] = OrderedDict()  # mix name → refusal, oldest first
        self._lock = threading.Lock()
        self.cache.subscribe(self._forget_report)

    def resolve(self, spec: MixSpec, check: Check | None = None) -> tuple[LoraAdapter, MergeReport]:
        """The served virtual adapter of `spec` and how it was made.

        FailedPrecondition when serving it at rank ≤ max_rank would exceed the error
        budget (remembered: asking again is refused without merging). `check` is
        called before each module of a merge this call runs and raises to abort
        it; its exception propagates and nothing is cached. A caller waiting on
        another caller's merge of the same mix calls `check` while it waits (and
        stops waiting with its exception; the merge goes on for the others), and
        merges in its place when that caller aborts.
        """
        adapters = [self.store.get(n) for n in spec.names]
        key = spec.key({a.name: a.content_hash for a in adapters}, self._serving())
        name = f"mix:{key}"
        self._raise_if_refused(name)
        hit = name in self.cache
        owner = object()  # tells this call's aborts from those of callers sharing the flight

        def merge() -> LoraAdapter:
            try:
                merged, report = materialize.serving_adapter(
                    adapters, spec, key, self.cfg.max_rank, self.cfg.error_budget,
                    _owned(check, owner), refuse_over_budget=True,
                )
            except OverBudget as e:
                raise FailedPrecondition(self._refuse(name, spec, e)) from None
            merged = replace(merged, name=name)
            with self._lock:
                self._reports[name] = report
            return merged

        while True:
            try:
                merged = self.cache.get_or_load(name, merge, check=check)
                break
            except _Aborted as e:
                if e.owner is not owner:
                    continue  # the merge we waited on was stopped by its own caller: run ours
                cause = e.cause
            raise cause
        with self._lock:
            report = self._reports.get(name) or MergeReport(spec.method, merged.rank, 0.0, 0.0)
        return merged, replace(report, cache_hit=hit)

    def exact_deltas(self, spec: MixSpec, check: Check | None = None):
        """Uncompressed merged ΔW per module (pinning and export use these); `check`
        is called before each module and raises to abort."""
        return materialize.exact_deltas([self.store.get(n) for n in spec.names], spec, check)

    def is_cached(self, spec: MixSpec) -> bool:
        """The served adapter of `spec` is in the merge cache, or its refusal over
        the error budget is remembered (either way no merge is needed). Looks only
        at adapters already loaded; loads nothing, counts nothing."""
        loaded = {a.name: a.content_hash for a, _ in self.store.cache.snapshot()}
        if any(n not in loaded for n in spec.names):
            return False
        name = f"mix:{spec.key(loaded, self._serving())}"
        with self._lock:
            if name in self._refusals:  # answered without a merge too
                return True
        return name in self.cache

    def _serving(self) -> tuple:
        return (self.cfg.max_rank, self.cfg.error_budget)

    # ---- refusals over the error budget ------------------------------------

    def _raise_if_refused(self, name: str) -> None:
        with self._lock:
            message = self._refusals.get(name)
            if message is not None:
                self._refusals.move_to_end(name)
        if message is not None:
            raise FailedPrecondition(message)

    def _refuse(self, name: str, spec: MixSpec, e: OverBudget) -> str:
        """Remember that `spec` (cache key `name`) is refused; the message."""
        message = refusal_message(spec, e, self.cfg.max_rank)
        with self._lock:
            self._refusals[name] = message
            self._refusals.move_to_end(name)
            while len(self._refusals) > MAX_REFUSALS:
                self._refusals.popitem(last=False)
        return message

    def _forget_report(self, name: str) -> None:
        with self._lock:
            self._reports.pop(name, None)

    # ---- named merges ------------------------------------------------------

    def create(self, name: str, spec: MixSpec, replace_existing: bool = False) -> MergeReport:
        """Register `spec` under `name` after merging it once (so errors surface now)."""
        validate_adapter_name(name)
        with self._lock:
            if name in self._named and not replace_existing:
                raise FailedPrecondition(f"a merge named {name!r} already exists; delete it first")
        _, report = self.resolve(spec)
        with self._lock:
            self._named[name] = spec
            self._named_reports[name] = report
        return report

    def report_of(self, name: str) -> MergeReport | None:
        """How the named merge was served when it was created."""
        with self._lock:
            return self._named_reports.get(name)

    def get(self, name: str) -> MixSpec:
        with self._lock:
            spec = self._named.get(name)
        if spec is None:
            raise NotFound(f"no merge named {name!r}; create it first (known: {sorted(self._named)})")
        return spec

    def delete(self, name: str) -> None:
        with self._lock:
            self._named_reports.pop(name, None)
            if self._named.pop(name, None) is None:
                raise NotFound(f"no merge named {name!r}")

    def list(self) -> dict[str, MixSpec]:
        with self._lock:
            return dict(self._named)


def _number(x: float) -> str:
    """x as typed, shortest first (1, 0.5, then repr's round-trip digits)."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def _cli_mix(spec: MixSpec) -> str:
    """The `loramux` flags that name `spec` (exactly: weights round-trip)."""
    flags = ["--mix", ",".join(f"{n}={_number(w)}" for n, w in spec.adapters)]
    if spec.method != "linear":
        flags += ["--method", spec.method]
    for k, v in spec.params:
        flags += ["--param", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    if spec.seed:
        flags += ["--mix-seed", str(spec.seed)]
    return " ".join(flags)


def refusal_message(spec: MixSpec, e: OverBudget, max_rank: int) -> str:
    """Why `spec` is not served per request, and what to do instead."""
    flags = _cli_mix(spec)
    return (
        f"mix {spec.describe()} is not served: {e}. The merge stopped at this first "
        f"module over budget; other modules may need more. Instead: pin it (its exact ΔW "
        f"folded into the base weights, no error: `loramux pin {flags}`), or export it "
        f"exactly as a PEFT adapter (`loramux export DEST {flags}`), or raise the server's "
        f"error budget above {e.rel_error:.3g} (`error_budget` in the [merges] table of "
        f"`loramux serve --config`, now {e.budget:g}; requests carry no budget of their own) "
        f"or the served rank (`max_rank` in [merges], now {max_rank}, at most the slot "
        f"rank `--max-rank`)"
    )
