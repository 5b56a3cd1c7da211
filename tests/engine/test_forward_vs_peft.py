"""One batched forward with rows [none, X, Y, X] equals PEFT row by row: logits to
float32 tolerance and greedy generations token for token, on float32 and nf4."""

from __future__ import annotations

import pytest
import torch

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from tests.conftest import build_tiny_model, make_adapter

PROMPTS = [
    "The quick brown fox",
    "SELECT name FROM users WHERE",
    "def add(a, b):",
    "Héllo wörld — naïve café, 東京 and emoji 🙂 too. The quick brown",
]
ROW_ADAPTERS = [None, "x", "y", "x"]  # x: r=8 α=16; y: r=4 α=8 rslora


def _engine(model_dir, adapter_root, quantization="none", **model_kw):
    cfg = EngineConfig(
        model=ModelConfig(path=model_dir, quantization=quantization, **model_kw),
        adapters=AdapterConfig(roots=[adapter_root], max_rank=16),
    )
    return build_engine(cfg)


def _peft_models(model_dir, adapter_root, quantization="none"):
    """One PEFT model per adapter (plus the bare base), each on its own base copy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def base():
        q = None
        if quantization == "nf4":
            q = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        elif quantization == "int8":
            q = BitsAndBytesConfig(load_in_8bit=True)
        m = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=q, device_map="cpu" if q else None, dtype=torch.float32
        )
        return m.eval()

    models = {None: base()}
    for name in ("x", "y"):
        models[name] = PeftModel.from_pretrained(base(), adapter_root / name).eval()
    return models


@pytest.fixture(scope="module", params=["none", "nf4", "int8"])
def setup(request, tiny_llama_dir, adapter_root):
    q = request.param
    return _engine(tiny_llama_dir, adapter_root, q), _peft_models(tiny_llama_dir, adapter_root, q), q


# bitsandbytes' CPU 4-bit matmul rounds its input to bfloat16, so a float32-rounding
# difference in the LoRA sum (another summation order than PEFT's) can flip one
# bfloat16 rounding and move a logit by ~2^-8 of its size; float and int8 bases
# stay at float32 rounding.
TOLERANCE = {"none": 1e-4, "nf4": 2e-2, "int8": 1e-4}


def test_batched_logits_match_peft(setup):
    engine, peft, q = setup
    reqs = [GenerationRequest(prompt=p, adapter=a) for p, a in zip(PROMPTS, ROW_ADAPTERS)]
    got = engine.prompt_logits(reqs)
    tok = engine.tokenizer
    tol = TOLERANCE[q]
    for (p, a), logits in zip(zip(PROMPTS, ROW_ADAPTERS), got):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = peft[a](input_ids=ids).logits[0]
        torch.testing.assert_close(logits, want, rtol=tol, atol=tol)
    # The adapters really change the output, far beyond the tolerance (else the
    # test proves nothing).
    with torch.no_grad():
        ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
        assert (peft["x"](input_ids=ids).logits - peft[None](input_ids=ids).logits).abs().max() > 10 * tol


def test_greedy_generation_matches_peft(setup):
    engine, peft, _ = setup
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [
        GenerationRequest(prompt=p, adapter=a, sampling=params)
        for p, a in zip(PROMPTS, ROW_ADAPTERS)
    ]
    results = engine.generate(reqs)
    tok = engine.tokenizer
    for (p, a), res in zip(zip(PROMPTS, ROW_ADAPTERS), results):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = peft[a].generate(
                input_ids=ids, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                pad_token_id=tok.pad_token_id,
            )
        assert res.token_ids == out[0, ids.shape[1]:].tolist(), (p, a)
        assert res.finish_reason == "length"


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
def test_other_families_match_peft(family, tmp_path):
    """Targets are found by module name, so other architectures work the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(family, tmp_path / family)
    make_adapter(model_dir, tmp_path / "ad" / "a", r=4, alpha=8, seed=5)
    engine = _engine(model_dir, tmp_path / "ad")
    reqs = [GenerationRequest(prompt=PROMPTS[0], adapter="a"), GenerationRequest(prompt=PROMPTS[2])]
    got = engine.prompt_logits(reqs)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "ad" / "a")
    with torch.no_grad():
        ids = engine.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        torch.testing.assert_close(got[0], ref(input_ids=ids).logits[0], rtol=1e-4, atol=1e-4)
        ids = engine.tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
        with ref.disable_adapter():
            torch.testing.assert_close(got[1], ref(input_ids=ids).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_tracks_float32(tiny_llama_dir, adapter_root, dtype):
    """bfloat16 compute (the CUDA default) and float16 stay within their rounding
    of float32, adapter rows included (the slots hold the model's dtype)."""
    reqs = lambda: [GenerationRequest(prompt=p, adapter=a) for p, a in zip(PROMPTS, ROW_ADAPTERS)]
    f32 = _engine(tiny_llama_dir, adapter_root).prompt_logits(reqs())
    half_engine = _engine(tiny_llama_dir, adapter_root, dtype=dtype)
    assert half_engine.pool.dtype == getattr(torch, dtype)
    for a, b in zip(f32, half_engine.prompt_logits(reqs())):
        assert (a - b.float()).abs().max() < 0.05 * a.abs().max()
