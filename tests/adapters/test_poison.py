"""Poisonous adapters are refused at load: non-finite factors, absurd scales, a ΔW
that would drown its base layer, and JSON nested deep enough to break a parser.
Each case is a real PEFT-saved adapter, tampered with the way a corrupt or hostile
file would be."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.adapters.peft_format import (
    MAX_DELTA_TO_BASE_NORM,
    MAX_JSON_DEPTH,
    MAX_SCALE,
    delta_norm,
    read_adapter,
)
from loramux.adapters.store import AdapterStore
from loramux.errors import AdapterRefused, InvalidArgument
from loramux.model.spec import BaseModelSpec

Q0 = "model.layers.0.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _key(module: str, kind: str) -> str:
    return f"base_model.model.{module}.{kind}.weight"


def _tamper(directory: Path, module: str, kind: str, change, dtype=None) -> None:
    """Rewrite one factor of a saved adapter: tensor = change(tensor)."""
    tensors = load_file(directory / WEIGHTS)
    t = tensors[_key(module, kind)].clone()
    tensors[_key(module, kind)] = change(t if dtype is None else t.to(dtype))
    save_file(tensors, str(directory / WEIGHTS))


def _edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / CONFIG).read_text())
    config.update(fields)
    (directory / CONFIG).write_text(json.dumps(config))


def _refusal(directory: Path, spec, cfg) -> str:
    with pytest.raises(AdapterRefused) as e:
        read_adapter(directory, "bad", spec, cfg)
    assert isinstance(e.value, InvalidArgument)
    return str(e.value)


@pytest.fixture
def saved(tmp_path, peft_adapter):
    """A real PEFT adapter (r=8, α=16, every target) saved to tmp_path/bad."""
    directory = tmp_path / "bad"
    peft_adapter(directory, r=8, lora_alpha=16)
    return directory


def test_the_untampered_adapter_loads(saved, tiny_spec, adapter_cfg):
    assert len(read_adapter(saved, "bad", tiny_spec, adapter_cfg).modules) == 14


# ---------------------------------------------------------------- non-finite factors


def _set(value, where=(0, 0)):
    def change(t):
        t[where] = value
        return t
    return change


@pytest.mark.parametrize("kind, value", [
    ("lora_A", math.nan), ("lora_A", math.inf), ("lora_B", -math.inf), ("lora_B", math.nan),
])
def test_non_finite_factor_is_refused(kind, value, saved, tiny_spec, adapter_cfg):
    _tamper(saved, DOWN1, kind, _set(value))
    msg = _refusal(saved, tiny_spec, adapter_cfg)
    assert msg.startswith("adapter 'bad' refused (finite): ")
    assert DOWN1 in msg and kind in msg and "1 non-finite value(s) (NaN/Inf)" in msg


def test_float64_past_float32_range_is_refused_as_non_finite(saved, tiny_spec, adapter_cfg):
    # Finite in the file, Inf once converted to the float32 the server computes in.
    _tamper(saved, Q0, "lora_B", _set(1e300), dtype=torch.float64)
    assert "non-finite" in _refusal(saved, tiny_spec, adapter_cfg)


# ---------------------------------------------------------------- scale


FIRST = "model.layers.0.mlp.down_proj"  # modules are checked in name order


@pytest.mark.parametrize("fields, module, scale", [
    ({"lora_alpha": 1e30}, FIRST, "1.25e+29"),
    ({"lora_alpha": -1e30}, FIRST, "-1.25e+29"),
    ({"lora_alpha": 1e30, "use_rslora": True}, FIRST, "3.54e+29"),
    ({"alpha_pattern": {"q_proj": 1e30}}, Q0, "1.25e+29"),
])
def test_absurd_scale_is_refused(fields, module, scale, saved, tiny_spec, adapter_cfg):
    _edit_config(saved, **fields)
    msg = _refusal(saved, tiny_spec, adapter_cfg)
    assert msg.startswith(f"adapter 'bad' refused (scale): {module} has scale {scale} ")
    assert msg.endswith(f"the limit is ±{MAX_SCALE:g}")


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_alpha_literal_is_refused(literal, saved, tiny_spec, adapter_cfg):
    # Python's json accepts these non-standard literals; the reader must not.
    text = (saved / CONFIG).read_text()
    config = json.loads(text)
    (saved / CONFIG).write_text(text.replace(f'"lora_alpha": {config["lora_alpha"]}',
                                             f'"lora_alpha": {literal}'))
    assert "lora_alpha must be a finite number" in _refusal(saved, tiny_spec, adapter_cfg)


def test_large_but_plausible_scale_is_accepted(saved, tiny_spec, adapter_cfg):
    _edit_config(saved, lora_alpha=256)  # s = 32
    assert read_adapter(saved, "bad", tiny_spec, adapter_cfg).modules[Q0].scale == 32


# ---------------------------------------------------------------- ΔW against the base


def test_spec_holds_each_base_weight_norm(tiny_model, tiny_spec):
    modules = dict(tiny_model.named_modules())
    for name, target in tiny_spec.targets.items():
        expected = float(torch.linalg.norm(modules[name].weight))
        assert target.weight_norm == pytest.approx(expected, rel=1e-6)


def test_delta_norm_is_the_dense_frobenius_norm(saved, tiny_spec, adapter_cfg):
    adapter = read_adapter(saved, "bad", tiny_spec, adapter_cfg)
    for m in adapter.modules.values():
        assert delta_norm(m) == pytest.approx(float(torch.linalg.norm(m.delta())), rel=1e-5)


def test_huge_b_is_refused_naming_the_module_and_the_ratio(saved, tiny_spec, adapter_cfg):
    _tamper(saved, DOWN1, "lora_B", lambda b: b * 1e4)
    msg = _refusal(saved, tiny_spec, adapter_cfg)
    assert msg.startswith("adapter 'bad' refused (delta_norm): " + DOWN1 + ": ")
    assert "times the base weight's" in msg and f"the limit is {MAX_DELTA_TO_BASE_NORM:g} times" in msg


@pytest.mark.parametrize("ratio, accepted", [(0.99, True), (1.01, False)])
def test_delta_bound_is_the_named_ratio(ratio, accepted, saved, tiny_spec, adapter_cfg):
    """Scale one module's B so its ΔW is just under / over the bound."""
    module = read_adapter(saved, "bad", tiny_spec, adapter_cfg).modules[Q0]
    now = delta_norm(module) / tiny_spec.targets[Q0].weight_norm
    _tamper(saved, Q0, "lora_B", lambda b: b * (ratio * MAX_DELTA_TO_BASE_NORM / now))
    if accepted:
        assert Q0 in read_adapter(saved, "bad", tiny_spec, adapter_cfg).modules
    else:
        assert Q0 in _refusal(saved, tiny_spec, adapter_cfg)


def _without_norms(spec: BaseModelSpec) -> BaseModelSpec:
    targets = {n: dataclasses.replace(t, weight_norm=None) for n, t in spec.targets.items()}
    return dataclasses.replace(spec, targets=targets)


def test_without_base_norms_only_float32_overflow_is_refused(saved, tiny_spec, adapter_cfg):
    spec = _without_norms(tiny_spec)
    _tamper(saved, Q0, "lora_B", lambda b: b * 1e4)
    assert Q0 in read_adapter(saved, "bad", spec, adapter_cfg).modules  # nothing to compare to
    _tamper(saved, Q0, "lora_B", lambda b: b.sign() * 1e30)
    _tamper(saved, Q0, "lora_A", lambda a: a.sign() * 1e30)
    assert "past what float32 holds" in _refusal(saved, spec, adapter_cfg)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_weights_get_norms_too(quantization, tiny_llama_dir):
    """The default CUDA set-up is nf4: its bound must not silently vanish."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loramux.model.loader import build_spec

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_compute_dtype=torch.float32)
         if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    dense = build_spec(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "t")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=q,
                                                 device_map={"": "cpu"}, dtype=torch.float32)
    quantized = build_spec(model, "t")
    for name, target in dense.targets.items():
        assert quantized.targets[name].weight_norm == pytest.approx(target.weight_norm, rel=0.02)


# ---------------------------------------------------------------- JSON nesting and size


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_config_is_invalid_argument(depth, saved, tiny_spec, adapter_cfg):
    config = json.loads((saved / CONFIG).read_text())
    text = json.dumps(config)[:-1] + f', "eva_config": {_nested(depth)}}}'
    (saved / CONFIG).write_text(text)
    msg = _refusal(saved, tiny_spec, adapter_cfg)
    assert f"{CONFIG} is not valid: nesting too deep (over {MAX_JSON_DEPTH} levels)" in msg


def test_nesting_at_the_limit_is_accepted(saved, tiny_spec, adapter_cfg):
    config = json.loads((saved / CONFIG).read_text())
    config["eva_config"] = json.loads(_nested(MAX_JSON_DEPTH - 1))  # the config is level 1
    (saved / CONFIG).write_text(json.dumps(config))
    assert read_adapter(saved, "bad", tiny_spec, adapter_cfg).modules


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_safetensors_header_is_invalid_argument(depth, saved, tiny_spec, adapter_cfg):
    header = ('{"__metadata__": ' + _nested(depth) + "}").encode()
    (saved / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
    assert "header is not valid: nesting too deep" in _refusal(saved, tiny_spec, adapter_cfg)


def test_deep_config_through_the_store_is_refused_every_time(tmp_path, root, tiny_spec,
                                                             peft_adapter, adapter_cfg):
    """What a request sees: InvalidArgument (was INTERNAL from a RecursionError)."""
    peft_adapter(root / "deep")
    (root / "deep" / CONFIG).write_text('{"peft_type": "LORA", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    store = AdapterStore(adapter_cfg, tiny_spec)
    for _ in range(2):
        with pytest.raises(AdapterRefused, match="nesting too deep"):
            store.get("deep")


def test_config_over_the_size_limit_is_refused(saved, tiny_spec, adapter_cfg):
    config = json.loads((saved / CONFIG).read_text())
    config["padding"] = "x" * (1024 * 1024)
    (saved / CONFIG).write_text(json.dumps(config))
    assert "bad/adapter_config.json is" in _refusal(saved, tiny_spec, adapter_cfg)
    assert "over the config limit of 1048576 bytes" in _refusal(saved, tiny_spec, adapter_cfg)
