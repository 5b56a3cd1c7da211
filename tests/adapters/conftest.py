"""Fixtures for the adapter tests: a tiny random Llama in memory, its BaseModelSpec,
real PEFT adapters saved by PEFT, and a writer for hand-crafted (bad) adapters."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loramux.config import AdapterConfig
from loramux.model.loader import build_spec
from loramux.model.spec import BaseModelSpec
from tests.conftest import tiny_config

SPEC_NAME = "tiny-llama"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_model():
    """LlamaForCausalLM, 2 layers, hidden 64: q [64→64], k/v [64→32], mlp 64↔128."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


@pytest.fixture(scope="session")
def tiny_spec(tiny_model) -> BaseModelSpec:
    """Every nn.Linear under model.model.layers, by full module name."""
    return build_spec(tiny_model, SPEC_NAME)


@pytest.fixture
def root(tmp_path) -> Path:
    """An empty adapter root."""
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def adapter_cfg(root) -> AdapterConfig:
    return AdapterConfig(roots=[root], max_rank=32, name_mismatch="refuse")


@pytest.fixture
def peft_adapter(tiny_model):
    """make(directory, seed=0, **LoraConfig kwargs) -> PeftModel, saved to directory.

    lora_A and lora_B are both random (PEFT zeroes B by default, which would make
    every delta comparison trivially pass).
    """
    from peft import LoraConfig, get_peft_model

    def make(directory: Path, seed: int = 0, **kwargs):
        kwargs.setdefault("target_modules", list(ALL_TARGETS))
        torch.manual_seed(seed)
        base = copy.deepcopy(tiny_model)
        base.name_or_path = SPEC_NAME  # PEFT saves it as base_model_name_or_path
        model = get_peft_model(base, LoraConfig(**kwargs))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        model.save_pretrained(directory)
        return model

    return make


def lora_config(**overrides) -> dict:
    """A minimal valid adapter_config.json (r=4, alpha=8) with overrides."""
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": False,
        "bias": "none",
        "base_model_name_or_path": SPEC_NAME,
        "target_modules": ["q_proj"],
    }
    config.update(overrides)
    return config


def lora_tensors(spec: BaseModelSpec, modules=("model.layers.0.self_attn.q_proj",), r=4,
                 dtype=torch.float32) -> dict[str, torch.Tensor]:
    """PEFT-style keys → random A [r, d_in] and B [d_out, r] for each module.

    Entries have std 0.1, so ΔW's norm is about that of the tiny model's weights, as
    for a trained adapter; unit entries would be refused as 200 times the base.
    """
    gen = torch.Generator().manual_seed(0)
    out = {}
    for m in modules:
        t = spec.targets[m]
        a = torch.randn(r, t.d_in, generator=gen) * 0.1  # [r, d_in]
        b = torch.randn(t.d_out, r, generator=gen) * 0.1  # [d_out, r]
        out[f"base_model.model.{m}.lora_A.weight"] = a.to(dtype)
        out[f"base_model.model.{m}.lora_B.weight"] = b.to(dtype)
    return out


def write_adapter(directory: Path, config: dict | None, tensors: dict | None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (None skips a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture
def good_adapter(tiny_spec):
    """make(directory, **config overrides) -> a valid hand-written adapter directory."""

    def make(directory: Path, r: int = 4, modules=("model.layers.0.self_attn.q_proj",), **cfg):
        tensors = lora_tensors(tiny_spec, modules, r)
        return write_adapter(directory, lora_config(r=r, **cfg), tensors)

    return make


def gets_at_once(store, name: str, n: int) -> list:
    """`store.get(name)` from n threads released together; their results."""
    barrier = threading.Barrier(n)
    results = []

    def run():
        barrier.wait()
        results.append(store.get(name))

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
