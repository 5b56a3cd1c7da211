"""Shared fixtures: tiny random models of several families, a tiny tokenizer, and
real PEFT adapters saved by PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB = 512
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "def add(a, b):\n    return a + b",
    '{"name": "Ada", "city": "London", "year": 1843}',
    "Héllo wörld — naïve café, 東京 and emoji 🙂 too.",
] * 20


def build_tiny_tokenizer(out_dir: Path):
    """A byte-level BPE with chat specials, trained in-process (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        eos_token_id=2,
        pad_token_id=0,
    )
    extra = {"mistral": {"sliding_window": None}, "gemma": {"head_dim": 16}}.get(family, {})
    return AutoConfig.for_model(family, **common, **extra)


def build_tiny_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny `family` model plus the tiny tokenizer to out_dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    # Default init is tiny; widen it so logits are far from ties and LoRA deltas show.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out_dir)
    build_tiny_tokenizer(out_dir)
    return out_dir


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: float = 16,
    rslora: bool = False,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    seed: int = 0,
    std: float = 0.1,
    **extra,
) -> Path:
    """Save a real PEFT LoRA adapter with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets), **extra
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, tiny_llama_dir) -> Path:
    """Adapters for the tiny llama: X (r=8, α=16), Y (r=4, α=8, rslora), Z (attn only)."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_llama_dir, root / "x", r=8, alpha=16, seed=1)
    make_adapter(tiny_llama_dir, root / "y", r=4, alpha=8, rslora=True, seed=2)
    make_adapter(tiny_llama_dir, root / "z", r=16, alpha=8, seed=3, targets=("q_proj", "v_proj"))
    return root


def base_weights(engine) -> dict[str, torch.Tensor]:
    """Copies of every tensor that defines an engine's base model, 4-bit absmax included."""
    out = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    for name, layer in engine.pinner.layers.items():
        qs = getattr(layer.base.weight, "quant_state", None)
        if qs is not None:
            out[name + ".absmax"] = qs.absmax.clone()
    return out
