"""Export: merges as PEFT LoRA directories (checked by loading them in PEFT and in our
reader), the pinned model as a plain HF model (checked by loading it in transformers)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from loramux.adapters.peft_format import read_adapter
from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig
from loramux.engine.types import GenerationRequest
from loramux.errors import FailedPrecondition
from loramux.merging import export
from loramux.merging.export import export_peft_adapter, export_pinned, export_selection
from loramux.merging.spec import MixSpec
from tests.conftest import base_weights as _weights

PROMPT = "The quick brown fox"
TIES = MixSpec.build([("x", 1.0), ("y", 0.8), ("z", 0.5)], "ties", {"density": 0.5})


def _engine(model_dir, root, quantization="none"):
    return build_engine(
        EngineConfig(
            model=ModelConfig(path=model_dir, quantization=quantization),
            adapters=AdapterConfig(roots=[root], max_rank=32),
        )
    )


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapter_root):
    return _engine(tiny_llama_dir, adapter_root)


def _live(engine, **selection) -> torch.Tensor:  # [T, V]
    return engine.prompt_logits([GenerationRequest(prompt=PROMPT, **selection)])[0]


def _ids(engine) -> torch.Tensor:  # [1, T]
    return engine.tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def _hf_logits(model, ids) -> torch.Tensor:  # [T, V]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def _peft(base_dir, *adapters):
    """PEFT model on a fresh base with each adapter dir loaded under its index."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters[0], adapter_name="0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=str(i))
    return model


def _read(engine, path):
    return read_adapter(path, "exported", engine.loaded.spec, AdapterConfig(max_rank=128))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


# ---------------------------------------------------------------- PEFT adapters


@pytest.mark.parametrize("name", ["x", "y", "z"])  # y: rsLoRA, z: q/v only, r=16
def test_single_adapter_export_equals_the_original_in_peft_and_our_reader(engine, tiny_llama_dir, adapter_root, tmp_path, name):
    report = export_selection(engine, GenerationRequest(adapter=name), tmp_path / "out")
    original = engine.store.get(name)
    assert report.relative_error == 0.0 and report.rank == original.rank
    assert report.bytes == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    ids = _ids(engine)
    want = _hf_logits(_peft(tiny_llama_dir, adapter_root / name), ids)
    torch.testing.assert_close(_hf_logits(_peft(tiny_llama_dir, tmp_path / "out"), ids), want, rtol=1e-4, atol=1e-4)
    ours = _read(engine, tmp_path / "out")
    assert ours.modules.keys() == original.modules.keys()
    for m, mod in ours.modules.items():
        assert mod.scale == 1.0
        torch.testing.assert_close(mod.delta(), original.modules[m].delta(), rtol=1e-5, atol=1e-6)


def _dense_truth(base_dir, adapter_root, weighted, ids) -> torch.Tensor:
    """Logits of base + Σ wᵢ ΔWᵢ, with each ΔWᵢ taken from PEFT's get_delta_weight."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    ref = _peft(base_dir, *(adapter_root / n for n, _ in weighted))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for name, layer in ref.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            delta = sum(
                w * layer.get_delta_weight(str(i)) for i, (_, w) in enumerate(weighted) if str(i) in layer.lora_A
            )
            model.get_submodule(name).weight += delta
    return _hf_logits(model, ids)


def test_linear_mix_export_equals_engine_mix_and_dense_truth(engine, tiny_llama_dir, adapter_root, tmp_path):
    weighted = [("x", 0.7), ("y", 0.5), ("z", -0.3)]  # ranks 8/4/16, y rsLoRA, z on q/v only
    mix = MixSpec.build(weighted, "linear")
    report = export_selection(engine, GenerationRequest(mix=mix), tmp_path / "mix")
    assert report.relative_error == 0.0 and report.rank == 8 + 4 + 16
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    # q/v carry z's rank too, so ranks differ per module: scale 1 everywhere needs both patterns.
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"] != {}
    ids = _ids(engine)
    got = _hf_logits(_peft(tiny_llama_dir, tmp_path / "mix"), ids)
    torch.testing.assert_close(got, _live(engine, mix=mix), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, _dense_truth(tiny_llama_dir, adapter_root, weighted, ids), rtol=1e-4, atol=1e-4)


def test_dense_ties_export_is_exact_and_matches_the_pinned_merge(engine, tiny_llama_dir, tmp_path):
    report = export_selection(engine, GenerationRequest(mix=TIES), tmp_path / "ties")
    assert report.relative_error < 1e-5
    exact = engine.merges.exact_deltas(TIES)
    ours = _read(engine, tmp_path / "ties")
    for m, mod in ours.modules.items():
        assert mod.rank == min(exact[m].shape)  # ties is full rank: nothing truncated
        assert _rel(mod.delta(), exact[m]) < 1e-5
    config = json.loads((tmp_path / "ties" / "adapter_config.json").read_text())
    assert config["r"] == 64 and set(config["rank_pattern"].values()) == {32}  # k/v are [32, 64]
    got = _hf_logits(_peft(tiny_llama_dir, tmp_path / "ties"), _ids(engine))
    engine.pin(GenerationRequest(mix=TIES))
    try:
        want = _live(engine)  # the exact merged model
    finally:
        engine.unpin()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "mix, max_rank, budget",
    [
        (TIES, 8, 0.0),  # dense, capped: truncated SVD
        (TIES, None, 0.5),  # dense, smallest rank within the budget
        (MixSpec.build([("x", 1.0), ("z", 1.0)], "linear"), 6, 0.0),  # factored over max_rank: QR + core SVD
    ],
)
def test_compressed_export_reports_the_error_it_has(engine, tmp_path, mix, max_rank, budget):
    report = export_selection(engine, GenerationRequest(mix=mix), tmp_path / "c", max_rank=max_rank, error_budget=budget)
    exact = {m: d if isinstance(d, torch.Tensor) else d.dense() for m, d in engine.merges.exact_deltas(mix).items()}
    tensors = safetensors.torch.load_file(tmp_path / "c" / "adapter_model.safetensors")
    errors, optimal = [], []
    for m, delta in exact.items():
        A = tensors[f"base_model.model.{m}.lora_A.weight"]  # [r, d_in]
        B = tensors[f"base_model.model.{m}.lora_B.weight"]  # [d_out, r]
        S = torch.linalg.svdvals(delta.double())
        errors.append(_rel(B @ A, delta))
        # Eckart–Young: the best rank-r error is the discarded singular energy.
        optimal.append(float(S[A.shape[0]:].norm() / S.norm()))
        if budget:
            assert errors[-1] <= budget and float(S[A.shape[0] - 1:].norm() / S.norm()) > budget
    assert report.relative_error > 1e-3
    assert report.relative_error == pytest.approx(max(errors), rel=1e-4)
    assert max(errors) == pytest.approx(max(optimal), rel=1e-4)
    assert report.rank == (max_rank or report.rank) and (budget == 0 or report.rank < 64)


# ---------------------------------------------------------------- dense (pinned) model


def _float_nf4_path(engine) -> None:
    """Keep bnb's Linear4bit on its float32 dequantize-then-matmul path. On CPUs with
    AVX512-BF16 it otherwise repacks the weight in place at the first forward and
    multiplies in bf16 (covered by the test below)."""
    for layer in engine.pinner.layers.values():
        layer.base.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_pinned_export_loads_in_transformers_and_leaves_the_engine_alone(tiny_llama_dir, adapter_root, tmp_path, quantization):
    from transformers import AutoModelForCausalLM

    engine = _engine(tiny_llama_dir, adapter_root, quantization)
    _float_nf4_path(engine)
    base_logits, base_weights = _live(engine), _weights(engine)
    engine.pin(GenerationRequest(mix=TIES))
    live = _live(engine)
    report = export_pinned(engine, tmp_path / "dense")
    assert report.rank == 0 and report.relative_error == 0.0 and report.bytes > 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    # nf4 too: the saved weights are the dequantized pinned ones, which is exactly
    # what the float nf4 forward multiplies by (measured difference: 0).
    torch.testing.assert_close(_hf_logits(saved, _ids(engine)), live, rtol=1e-4, atol=1e-4)
    assert torch.equal(_live(engine), live)  # the live model is undisturbed
    engine.unpin()
    assert torch.equal(_live(engine), base_logits)
    after = _weights(engine)
    assert all(torch.equal(after[k], base_weights[k]) for k in base_weights)


def _has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:
        return False


@pytest.mark.skipif(not _has_avx512bf16(), reason="bnb repacks nf4 for CPU only with AVX512-BF16")
def test_nf4_export_reads_bnb_cpu_repacked_weights_without_touching_them(tiny_llama_dir, adapter_root, tmp_path):
    import copy

    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    engine = _engine(tiny_llama_dir, adapter_root, "nf4")
    want = {}  # before any forward: the standard layout, absmax rounded to bf16 as the kernel will
    for name, layer in engine.pinner.layers.items():
        qs = copy.copy(layer.base.weight.quant_state)
        qs.absmax = qs.absmax.bfloat16().float()
        want[name] = bnbf.dequantize_4bit(layer.base.weight.data, qs)
    live = _live(engine)  # repacks every Linear4bit in place
    weight = engine.pinner.layers["model.layers.0.mlp.down_proj"].base.weight  # 2 blocks per row
    packed, absmax = weight.data.clone(), weight.quant_state.absmax.clone()
    assert weight.quant_state.packing_format_for_cpu
    export_pinned(engine, tmp_path / "dense")
    assert torch.equal(weight.data, packed) and torch.equal(weight.quant_state.absmax, absmax)
    assert weight.quant_state.packing_format_for_cpu
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for name, w in want.items():
        assert torch.equal(saved.get_submodule(name).weight, w.float()), name
    # Same weights; the live kernel rounds activations to bf16 at every linear
    # (2^-9 relative each, 14 linears deep), the export computes in float32.
    # Measured: 1.3e-2 on logits of std 0.64.
    torch.testing.assert_close(_hf_logits(saved, _ids(engine)), live, rtol=5e-2, atol=5e-2)
    assert torch.equal(_live(engine), live)


def test_dense_export_of_tied_embedding_model(tmp_path, adapter_root):
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    gemma = build_tiny_model("gemma", tmp_path / "gemma")  # ties lm_head to embed_tokens
    engine = build_engine(EngineConfig(model=ModelConfig(path=gemma)))
    export_pinned(engine, tmp_path / "dense")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert saved.get_output_embeddings().weight is saved.get_input_embeddings().weight
    torch.testing.assert_close(_hf_logits(saved, _ids(engine)), _live(engine), rtol=1e-4, atol=1e-4)


def test_int8_base_is_refused(tiny_llama_dir, adapter_root, tmp_path):
    engine = _engine(tiny_llama_dir, adapter_root, "int8")
    with pytest.raises(FailedPrecondition, match="int8"):
        export_pinned(engine, tmp_path / "out" / "dense")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- destinations


def test_existing_destination_is_refused(engine, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FailedPrecondition, match="already exists"):
        export_selection(engine, GenerationRequest(adapter="x"), tmp_path / "taken")
    with pytest.raises(FailedPrecondition, match="already exists"):
        export_pinned(engine, tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert not any((tmp_path / "taken").iterdir())


def test_failed_export_leaves_no_temp_dir(engine, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_peft_config", boom)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        export_selection(engine, GenerationRequest(adapter="x"), tmp_path / "a")
    monkeypatch.setattr(engine.loaded.tokenizer, "save_pretrained", boom)  # after the model
    with pytest.raises(RuntimeError, match="disk full"):
        export_pinned(engine, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
