"""Adapter domain types: raw LoRA weights as loaded from disk, on the host."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class FileStamp:
    """One file an adapter was read from, as a stat saw it: enough to notice that the
    file was replaced or rewritten without reading it again.

    path: how requests reach it (<root>/<name>/<file>, symlinks followed at each
      stat, so a swapped directory symlink shows as another inode).
    dev, ino, size, mtime_ns, ctime_ns: from the descriptor the bytes were read from,
      before reading (a write after that stat changes mtime or size, so it is seen).
    """

    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path, st: os.stat_result) -> "FileStamp":
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def is_current(self) -> bool:
        """One stat: the file at `path` is still the one this stamp describes.

        ctime is compared too: a copy that restores mtime (cp -p, rsync -t) over a
        same-size file still moves ctime. False when it is gone or unreadable.
        """
        try:
            now = FileStamp.of(self.path, os.stat(self.path))
        except OSError:
            return False
        return now == self


@dataclass(frozen=True)
class LoraModule:
    """The LoRA pair for one target linear.

    A: [r, d_in] float32, B: [d_out, r] float32, scale: s in ΔW = s·B·A
    (lora_alpha / r, or lora_alpha / √r with use_rslora; per-module when the
    adapter has rank_pattern / alpha_pattern).
    """

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def delta(self) -> torch.Tensor:
        """Dense ΔW = s·B·A, [d_out, d_in] float32."""
        return (self.B.float() @ self.A.float()) * self.scale


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter held on the host.

    name: the name it was loaded under (unique in the store).
    modules: full base-module name → LoraModule. Only modules the adapter trains.
    content_hash: sha256 over the safetensors bytes and the config fields that
      change the math (ranks, alphas, rslora); the merge cache keys on it.
    files: the files it was read from, as they were then (empty for adapters
      made in memory: merges, compensations); the store reloads an adapter whose
      files no longer match.
    """

    name: str
    modules: dict[str, LoraModule]
    content_hash: str
    base_model_name: str | None = None
    source: Path | None = None
    config: dict = field(default_factory=dict)
    files: tuple[FileStamp, ...] = ()

    def files_changed(self) -> bool:
        """True when any file it was read from changed on disk (one stat each)."""
        return not all(f.is_current() for f in self.files)

    @property
    def rank(self) -> int:
        """Largest rank over all modules (the slot width it needs)."""
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())
