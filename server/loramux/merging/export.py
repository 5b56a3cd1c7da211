"""Export a merge: as a PEFT LoRA directory (any adapter, named merge or mix) or, for
the pinned model, as a plain full-precision HF model directory.

Both write into a temp directory next to the destination and rename it into place,
so a failed export never leaves a half-written directory behind, and both refuse a
destination that already exists.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from loramux.adapters.peft_format import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE
from loramux.errors import FailedPrecondition, InvalidArgument
from loramux.merging.lowrank import Factored, compress_exact
from loramux.merging.pinning import dequantize_4bit_weight
from loramux.model.loader import LoadedModel
from loramux.model.lora_layers import LoraLinear


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote.

    path: the final directory. bytes: total size of the files in it.
    rank: largest LoRA rank over modules (0 for a dense model).
    relative_error: worst per-module ‖ΔW_written − ΔW‖_F / ‖ΔW‖_F (0.0 when exact).
    """

    path: Path
    bytes: int
    rank: int
    relative_error: float


# ---- staging ---------------------------------------------------------------

@contextlib.contextmanager
def _staged(out_dir: Path):
    """Yield a fresh temp dir beside `out_dir`; rename it to `out_dir` on success,
    delete it on any failure. Refuses an existing `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise FailedPrecondition(f"export destination {out_dir} already exists; pick a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():  # created while we were writing
            raise FailedPrecondition(f"export destination {out_dir} appeared during the export")
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- factorization ---------------------------------------------------------

def _svd_rank(S: torch.Tensor, shape, max_rank: int | None, budget: float) -> int:
    """Smallest k whose discarded energy Σ_{i≥k} σᵢ² ≤ budget²·‖ΔW‖², never above
    the numerical rank (σ > σ₀·max(m, n)·eps, float64) nor max_rank; at least 1."""
    S = S.double()
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 1
    numerical = int((S > S[0] * max(shape) * torch.finfo(torch.float64).eps).sum())
    energy = S**2
    tail = energy.sum() - torch.cumsum(energy, 0)  # tail[k-1] = energy discarded by rank k
    ok = (tail <= budget**2 * energy.sum()).nonzero()
    k = min(int(ok[0]) + 1 if ok.numel() else S.numel(), numerical)
    return max(1, min(k, max_rank) if max_rank is not None else k)


def _rel_error(f: Factored, delta: torch.Tensor) -> float:
    """‖B·A − ΔW‖_F / ‖ΔW‖_F of the float32 factors actually written, in float64."""
    diff = float(torch.linalg.norm(f.B.double() @ f.A.double() - delta.double()))
    norm = float(torch.linalg.norm(delta.double()))
    return diff / norm if norm > 0 else diff


def _factor_dense(delta: torch.Tensor, max_rank: int | None, budget: float) -> tuple[Factored, float]:
    """Factor a dense ΔW [d_out, d_in] by a plain SVD (float64; optimal by
    Eckart–Young) at the rank `_svd_rank` picks. Returns the float32 factors and
    their measured relative error, float32 round-off included."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # [m, q], [q], [q, n]
    k = _svd_rank(S, delta.shape, max_rank, budget)
    f = Factored(B=(U[:, :k] * S[:k]).float().contiguous(), A=Vh[:k].float().contiguous())
    return f, _rel_error(f, delta)


def _factor(delta: Factored | torch.Tensor, max_rank: int | None, budget: float):
    """(Factored, rel_error): factored deltas exact unless over max_rank (then
    QR + core SVD); dense deltas through _factor_dense."""
    if not isinstance(delta, Factored):
        return _factor_dense(delta, max_rank, budget)
    if max_rank is not None and delta.rank > max_rank:
        c = compress_exact(delta, max_rank, budget)
        return c.factored, c.rel_error
    return Factored(delta.B.float().contiguous(), delta.A.float().contiguous()), 0.0


# ---- PEFT adapter ----------------------------------------------------------

def _peft_config(ranks: dict[str, int], base_model_name: str | None) -> dict:
    """adapter_config.json with lora_alpha == r for every module, so PEFT's scale is 1
    and the written B·A is ΔW itself. Modules off the most common rank go in
    rank_pattern / alpha_pattern, keyed by their escaped full name (PEFT and
    read_adapter match keys as regexes anchored at a dot)."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "bias": "none",
        "lora_dropout": 0.0,
    }


def export_peft_adapter(
    deltas: dict[str, Factored | torch.Tensor],
    out_dir: Path,
    *,
    base_model_name: str | None,
    max_rank: int | None = None,
    error_budget: float = 0.0,
) -> ExportReport:
    """Write `deltas` (full module name → ΔW) as a PEFT LoRA directory at `out_dir`.

    Factored deltas are written exactly; above max_rank they are compressed exactly
    (QR + core SVD) to max_rank, or less where error_budget allows. Dense ones (ties,
    dare, ...) are factored by SVD at the smallest rank meeting error_budget, capped
    at max_rank — with max_rank None and budget 0, the full numerical rank, exact up
    to float32 round-off. Keys `base_model.model.<module>.lora_{A,B}.weight`,
    A [r, d_in], B [d_out, r], float32. The achieved worst error is reported.
    Raises FailedPrecondition if `out_dir` exists, InvalidArgument on bad limits.
    """
    if not deltas:
        raise InvalidArgument("nothing to export: the selection trains no module")
    if max_rank is not None and max_rank < 1:
        raise InvalidArgument(f"export max_rank must be at least 1, got {max_rank}")
    if not 0.0 <= error_budget < 1.0:
        raise InvalidArgument(f"export error_budget must be in [0, 1), got {error_budget}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    worst = 0.0
    for name, delta in sorted(deltas.items()):
        f, err = _factor(delta, max_rank, error_budget)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A.cpu().contiguous()  # [r, d_in]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.B.cpu().contiguous()  # [d_out, r]
        ranks[name], worst = f.rank, max(worst, err)
    with _staged(out_dir) as tmp:
        safetensors.torch.save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config = _peft_config(ranks, base_model_name)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ExportReport(Path(out_dir), _dir_bytes(Path(out_dir)), max(ranks.values()), worst)


# ---- dense model -----------------------------------------------------------

def _copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy: never aliases the live weights, which may also be
    inference tensors (pins fold under inference_mode) that cannot be Parameters."""
    return t.detach().to("cpu", torch.float32, copy=True)


def _dense_weight(base: nn.Module) -> torch.Tensor:  # [d_out, d_in] float32, CPU
    """The weight `base` computes with, including a pinned fold."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        return _copy(dequantize_4bit_weight(w))
    if w.dtype == torch.int8:
        raise FailedPrecondition("exporting an int8 base is not supported; use nf4 or none")
    return _copy(w)


def _plain_state_dict(model: nn.Module, layers: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers under their HF names
    (`<target>.weight`, not `<target>.base.weight`), float32 copies on CPU.

    Walks modules itself instead of calling model.state_dict(): bnb's Linear4bit
    rewrites its live weight in place when asked for its state dict.
    """
    wrapped = tuple(f"{name}." for name in layers)
    sd: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if mod_name in layers or mod_name.startswith(wrapped):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for k, p in mod.named_parameters(recurse=False):
            sd[prefix + k] = _copy(p)
        for k, b in mod.named_buffers(recurse=False):
            if k not in mod._non_persistent_buffers_set:
                sd[prefix + k] = _copy(b)
    for name, layer in layers.items():
        sd[f"{name}.weight"] = _dense_weight(layer.base)
        if layer.base.bias is not None:
            sd[f"{name}.bias"] = _copy(layer.base.bias)
    return sd


def _fresh_model(loaded: LoadedModel) -> nn.Module:
    """An empty (meta) float32 model of the same architecture, without quantization."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = copy.deepcopy(loaded.model.generation_config)
    return model.requires_grad_(False)


def save_dense_model(
    loaded: LoadedModel, layers: dict[str, LoraLinear], out_dir: Path
) -> ExportReport:
    """Save the model as it computes now (a pinned merge included) as a float32 HF
    model directory plus the tokenizer. Reads the live weights and copies them;
    the live model and its wrappers are left as they are. Call it where no pin
    swap can run concurrently (the engine thread). An int8 base is refused:
    Linear8bitLt also quantizes activations, so no float model computes the same."""
    if loaded.quantization == "int8":
        raise FailedPrecondition("exporting an int8 base is not supported; use nf4 or none")
    sd = _plain_state_dict(loaded.model, layers)
    model = _fresh_model(loaded)
    # strict: every HF name must be present exactly once, so a wrapper key left
    # behind (or a missing weight) fails here, not in whoever loads the export.
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced tied parameters one by one
    with _staged(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return ExportReport(Path(out_dir), _dir_bytes(Path(out_dir)), 0, 0.0)


# ---- engine helpers --------------------------------------------------------

def export_selection(
    engine, selection, out_dir: Path, *, max_rank: int | None = None, error_budget: float = 0.0
) -> ExportReport:
    """Export the adapter, named merge or mix that `selection` (a GenerationRequest)
    names as a PEFT adapter for the engine's base model."""
    return export_peft_adapter(
        engine.exact_deltas(selection),
        out_dir,
        base_model_name=engine.loaded.spec.name,
        max_rank=max_rank,
        error_budget=error_budget,
    )


def export_pinned(engine, out_dir: Path) -> ExportReport:
    """Save the engine's model as it computes now (with any pinned merge) densely."""
    return save_dense_model(engine.loaded, engine.pinner.layers, out_dir)
