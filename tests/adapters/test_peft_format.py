"""read_adapter against adapters saved by PEFT itself, and every refusal."""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramux.adapters.peft_format import read_adapter
from loramux.config import AdapterConfig
from loramux.errors import AdapterRefused, InvalidArgument
from tests.adapters.conftest import SPEC_NAME, lora_config, lora_tensors, write_adapter

Q0 = "model.layers.0.self_attn.q_proj"

PEFT_CONFIGS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.up_proj": 5},
    ),
    "rslora_patterns": dict(r=16, lora_alpha=4, use_rslora=True, rank_pattern={"o_proj": 3}),
    "rank1_attn_only": dict(r=1, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    "one_layer": dict(r=2, lora_alpha=2, layers_to_transform=[1]),
}


def _peft_lora_layers(peft_model) -> dict:
    """Full base-module name → PEFT LoRA Linear layer."""
    from peft.tuners.lora.layer import Linear

    prefix = "base_model.model."
    return {
        n[len(prefix) :]: m for n, m in peft_model.named_modules() if isinstance(m, Linear)
    }


# ---------------------------------------------------------------- parity with PEFT


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_delta_matches_peft(kind, tmp_path, tiny_spec, peft_adapter, adapter_cfg):
    peft_model = peft_adapter(tmp_path / kind, seed=len(kind), **PEFT_CONFIGS[kind])
    adapter = read_adapter(tmp_path / kind, kind, tiny_spec, adapter_cfg)
    layers = _peft_lora_layers(peft_model)
    assert set(adapter.modules) == set(layers)
    for module, layer in layers.items():
        ours = adapter.modules[module]
        assert ours.rank == layer.r["default"]
        assert ours.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        ref = layer.get_delta_weight("default")  # [d_out, d_in]
        assert ref.abs().max() > 0
        torch.testing.assert_close(ours.delta(), ref, rtol=1e-5, atol=1e-6)


def test_patterns_really_vary_rank_and_scale(tmp_path, tiny_spec, peft_adapter, adapter_cfg):
    # Guards the parity test against a config whose patterns silently did nothing.
    peft_adapter(tmp_path / "p", **PEFT_CONFIGS["patterns"])
    mods = read_adapter(tmp_path / "p", "p", tiny_spec, adapter_cfg).modules
    assert mods["model.layers.0.self_attn.q_proj"].rank == 2
    assert mods["model.layers.1.mlp.down_proj"].rank == 6
    assert mods["model.layers.0.mlp.down_proj"].rank == 4
    assert mods["model.layers.1.self_attn.v_proj"].scale == pytest.approx(3 / 4)
    assert mods["model.layers.0.mlp.up_proj"].scale == pytest.approx(5 / 4)
    assert mods["model.layers.1.mlp.up_proj"].scale == pytest.approx(8 / 4)


def test_merged_deltas_reproduce_peft_logits(tmp_path, tiny_model, tiny_spec, peft_adapter,
                                             adapter_cfg):
    peft_model = peft_adapter(tmp_path / "p", seed=3, **PEFT_CONFIGS["patterns"])
    adapter = read_adapter(tmp_path / "p", "p", tiny_spec, adapter_cfg)
    merged = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for module, lora in adapter.modules.items():
            merged.get_submodule(module).weight += lora.delta()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))  # [B, T]
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits  # [B, T, V]
        ours = merged(input_ids=ids).logits
        base = tiny_model(input_ids=ids).logits
    assert (ref - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_keys_with_adapter_name_are_accepted(tmp_path, tiny_spec, peft_adapter, adapter_cfg):
    peft_adapter(tmp_path / "plain", **PEFT_CONFIGS["plain"])
    tensors = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    renamed = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): v
        for k, v in tensors.items()
    }
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    write_adapter(tmp_path / "named", config, renamed)
    a = read_adapter(tmp_path / "plain", "plain", tiny_spec, adapter_cfg)
    b = read_adapter(tmp_path / "named", "named", tiny_spec, adapter_cfg)
    assert set(a.modules) == set(b.modules)
    for m in a.modules:
        assert torch.equal(a.modules[m].delta(), b.modules[m].delta())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_tensors_become_float32_contiguous_cpu(dtype, tmp_path, tiny_spec, adapter_cfg):
    write_adapter(tmp_path / "a", lora_config(), lora_tensors(tiny_spec, dtype=dtype))
    adapter = read_adapter(tmp_path / "a", "a", tiny_spec, adapter_cfg)
    for m in adapter.modules.values():
        for t in (m.A, m.B):
            assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"


def test_pickle_next_to_safetensors_is_ignored(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "a", lora_config(), lora_tensors(tiny_spec))
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 never opened")
    assert Q0 in read_adapter(d, "a", tiny_spec, adapter_cfg).modules


def test_result_metadata(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "a", lora_config(), lora_tensors(tiny_spec))
    adapter = read_adapter(d, "a", tiny_spec, adapter_cfg)
    assert adapter.name == "a" and adapter.base_model_name == SPEC_NAME
    assert adapter.config["r"] == 4 and adapter.rank == 4
    assert adapter.modules[Q0].scale == 2.0


# ---------------------------------------------------------------- content hash


def test_content_hash_tracks_bytes_and_math_fields(tmp_path, tiny_spec, adapter_cfg):
    tensors = lora_tensors(tiny_spec)

    def digest(name, config, t=tensors):
        d = write_adapter(tmp_path / name, config, t)
        return read_adapter(d, name, tiny_spec, adapter_cfg).content_hash

    base = digest("a", lora_config())
    assert digest("same", dict(reversed(list(lora_config().items())))) == base
    assert digest("other_target_list", lora_config(target_modules=["q_proj", "v_proj"])) == base
    assert digest("alpha", lora_config(lora_alpha=9)) != base
    assert digest("rslora", lora_config(use_rslora=True)) != base
    assert digest("alpha_pat", lora_config(alpha_pattern={"q_proj": 8})) != base
    changed = dict(tensors)
    key = f"base_model.model.{Q0}.lora_B.weight"
    changed[key] = tensors[key].clone()
    changed[key][0, 0] += 1
    assert digest("bytes", lora_config(), changed) != base


# ---------------------------------------------------------------- refusals


def _raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None):
    """Write a safetensors file by hand: u64 LE header length, header, data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + blob + data)


def _replace_tensor(spec, key_suffix: str, value=None, new_key=None, drop=False):
    tensors = lora_tensors(spec)
    key = f"base_model.model.{Q0}.{key_suffix}"
    if drop:
        del tensors[key]
    if new_key is not None:
        tensors[new_key] = value if value is not None else torch.zeros(4, 64)
    elif value is not None:
        tensors[key] = value
    return tensors


def _refused(d: Path, spec, cfg, *fragments: str, name: str = "bad"):
    with pytest.raises(AdapterRefused) as e:
        read_adapter(d, name, spec, cfg)
    msg = str(e.value)
    assert f"adapter {name!r} refused" in msg
    for f in fragments:
        assert f in msg, msg
    return msg


PICKLE_MSG = (
    "pickle files are refused because loading them can run arbitrary code; "
    "convert to safetensors"
)


@pytest.mark.parametrize("filename", ["adapter_model.bin", "weights.pt", "model.pkl"])
def test_pickle_only_is_refused(filename, tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "bad", lora_config(), None)
    (d / filename).write_bytes(b"\x80\x04 whatever")
    _refused(d, tiny_spec, adapter_cfg, PICKLE_MSG, filename)


@pytest.mark.parametrize(
    "config, tensors, missing",
    [
        (False, True, "missing adapter_config.json"),
        (True, False, "missing adapter_model.safetensors"),
        (False, False, "missing adapter_config.json, adapter_model.safetensors"),
    ],
)
def test_missing_files(config, tensors, missing, tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(
        tmp_path / "bad", lora_config() if config else None,
        lora_tensors(tiny_spec) if tensors else None,
    )
    _refused(d, tiny_spec, adapter_cfg, missing)


CONFIG_REFUSALS = {
    "not_lora": (dict(peft_type="LOHA"), "peft_type is 'LOHA'"),
    "dora": (dict(use_dora=True), "DoRA"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    "bias_all": (dict(bias="all"), "bias='all'"),
    "bias_lora_only": (dict(bias="lora_only"), "only 'none'"),
    "lora_bias": (dict(lora_bias=True), "lora_bias"),
    "trainable_tokens": (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
    "target_parameters": (dict(target_parameters=["experts.w"]), "target_parameters"),
    "pissa": (dict(init_lora_weights="pissa_niter_4"), "changed the base weights"),
    "no_r": (dict(r=None), "r must be a positive integer"),
    "bool_r": (dict(r=True), "r must be a positive integer"),
    "no_alpha": (dict(lora_alpha=None), "lora_alpha must be a finite number"),
    "str_alpha": (dict(lora_alpha="8"), "lora_alpha must be a finite number"),
    "rslora_str": (dict(use_rslora="yes"), "use_rslora must be true or false"),
    "pattern_not_dict": (dict(rank_pattern=["q_proj"]), "rank_pattern must be an object"),
    "pattern_bad_value": (dict(rank_pattern={"q_proj": 0}), "must be a positive integer"),
    "redos_nested": (dict(rank_pattern={"(a+)+b": 4}), "too complex a regex"),
    "redos_many": (dict(alpha_pattern={".*.*.*x": 4}), "too complex a regex"),
    "bad_regex": (dict(rank_pattern={"q_(proj": 4}), "not a valid regex"),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_REFUSALS))
def test_config_refusals(kind, tmp_path, tiny_spec, adapter_cfg):
    overrides, fragment = CONFIG_REFUSALS[kind]
    d = write_adapter(tmp_path / "bad", lora_config(**overrides), lora_tensors(tiny_spec))
    _refused(d, tiny_spec, adapter_cfg, fragment)


@pytest.mark.parametrize(
    "raw, fragment", [(b"{not json", "not valid JSON"), (b"[1, 2]", "must hold a JSON object")]
)
def test_config_not_an_object(raw, fragment, tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "bad", None, lora_tensors(tiny_spec))
    (d / "adapter_config.json").write_bytes(raw)
    _refused(d, tiny_spec, adapter_cfg, fragment)


def _key_cases(spec):
    emb = "base_model.model.model.embed_tokens"
    pre = f"base_model.model.{Q0}"
    layer5 = "base_model.model.model.layers.5.self_attn.q_proj"
    zeros = torch.zeros(4, 64)
    return {
        "embedding_A": (_replace_tensor(spec, "", zeros, f"{emb}.lora_embedding_A"), "embeddings"),
        "lm_head": (
            _replace_tensor(spec, "", zeros, "base_model.model.lm_head.lora_A.weight"),
            "embeddings or lm_head",
        ),
        "dora_vector": (
            _replace_tensor(spec, "", torch.ones(64), f"{pre}.lora_magnitude_vector"),
            "DoRA magnitude",
        ),
        "modules_to_save": (
            _replace_tensor(spec, "", zeros,
                            "base_model.model.model.norm.modules_to_save.default.weight"),
            "modules_to_save copy",
        ),
        "lora_bias": (
            _replace_tensor(spec, "", torch.zeros(64), f"{pre}.lora_B.bias"), "is a bias"
        ),
        "base_bias": (_replace_tensor(spec, "", torch.zeros(64), f"{pre}.bias"), "is a bias"),
        "base_weight": (
            _replace_tensor(spec, "", torch.zeros(64, 64), f"{pre}.weight"), "unexpected key"
        ),
        "unknown_module": (
            lora_tensors(spec) | {
                f"{layer5}.lora_A.weight": zeros,  # [4, 64]
                f"{layer5}.lora_B.weight": torch.zeros(64, 4),
            },
            "targets module model.layers.5.self_attn.q_proj which the base model does not have",
        ),
        "missing_B": (_replace_tensor(spec, "lora_B.weight", drop=True), "has no lora_B weight"),
        "wrong_d_in": (
            _replace_tensor(spec, "lora_A.weight", torch.zeros(4, 65)),
            "needs lora_A [r, 64], lora_B [64, r]",
        ),
        "wrong_d_out": (
            _replace_tensor(spec, "lora_B.weight", torch.zeros(32, 4)), "do not fit the base linear"
        ),
        "three_d": (
            _replace_tensor(spec, "lora_A.weight", torch.zeros(4, 64, 1)),
            "do not fit the base linear",
        ),
        "rank_disagrees": (
            _replace_tensor(spec, "lora_B.weight", torch.zeros(64, 3)),
            "lora_A has rank 4 but lora_B has 3",
        ),
        "two_adapter_names": (
            _replace_tensor(spec, "", zeros, f"{pre}.lora_A.other.weight"), "two lora_A tensors"
        ),
        "no_tensors": ({"__dummy": torch.zeros(1)}, "unexpected key"),
        "nan": (
            _replace_tensor(spec, "lora_B.weight", torch.full((64, 4), float("nan"))),
            "non-finite",
        ),
        "inf": (
            _replace_tensor(spec, "lora_A.weight", torch.full((4, 64), float("inf"))),
            "non-finite",
        ),
    }


KEY_CASES = [
    "embedding_A", "lm_head", "dora_vector", "modules_to_save", "lora_bias", "base_bias",
    "base_weight", "unknown_module", "missing_B", "wrong_d_in", "wrong_d_out", "three_d",
    "rank_disagrees", "two_adapter_names", "no_tensors", "nan", "inf",
]


def test_key_case_list_is_complete(tiny_spec):
    assert sorted(KEY_CASES) == sorted(_key_cases(tiny_spec))


@pytest.mark.parametrize("kind", KEY_CASES)
def test_key_and_shape_refusals(kind, tmp_path, tiny_spec, adapter_cfg):
    tensors, fragment = _key_cases(tiny_spec)[kind]
    d = write_adapter(tmp_path / "bad", lora_config(), tensors)
    _refused(d, tiny_spec, adapter_cfg, fragment)


def test_empty_safetensors_is_refused(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "bad", lora_config(), None)
    _raw_safetensors(d / "adapter_model.safetensors", {"__metadata__": {"format": "pt"}})
    _refused(d, tiny_spec, adapter_cfg, "holds no LoRA weights")


def test_file_rank_must_equal_config_rank(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "bad", lora_config(r=8), lora_tensors(tiny_spec, r=4))
    _refused(d, tiny_spec, adapter_cfg, "rank 4 in the file but rank 8 in the config")
    d = write_adapter(
        tmp_path / "bad2", lora_config(r=4, rank_pattern={"q_proj": 2}), lora_tensors(tiny_spec)
    )
    _refused(d, tiny_spec, adapter_cfg, "rank 4 in the file but rank 2", name="bad2")


def test_rank_above_max_rank_is_refused_before_data_is_read(tmp_path, tiny_spec):
    # NaNs in the data would be reported if tensors were loaded before the rank check.
    tensors = lora_tensors(tiny_spec, r=8)
    tensors[f"base_model.model.{Q0}.lora_B.weight"][:] = float("nan")
    d = write_adapter(tmp_path / "bad", lora_config(r=8), tensors)
    cfg = AdapterConfig(roots=[tmp_path], max_rank=4)
    _refused(d, tiny_spec, cfg, "rank 8; max_rank allows 1..4")


def test_file_too_large_is_refused_before_parsing(tmp_path, tiny_spec):
    d = write_adapter(tmp_path / "bad", lora_config(), None)
    with open(d / "adapter_model.safetensors", "wb") as f:
        f.truncate(3 * 1024 * 1024)  # sparse garbage: parsing would fail differently
    cfg = AdapterConfig(roots=[tmp_path], max_file_bytes=1024 * 1024)
    _refused(d, tiny_spec, cfg, "3145728 bytes, over the max_file_bytes limit of 1048576")


HEADER_REFUSALS = {
    "short_file": (lambda p: p.write_bytes(b"\x01\x02"), "shorter than 8 bytes"),
    "huge_length": (lambda p: _raw_safetensors(p, {}, length=2**62), "declares a"),
    "length_past_eof": (lambda p: _raw_safetensors(p, b"{}", length=4096), "declares a 4096"),
    "garbage": (lambda p: _raw_safetensors(p, b"\xff\xfe garbage"), "header is not valid JSON"),
    "not_object": (lambda p: _raw_safetensors(p, [1, 2]), "header is not a JSON object"),
    "duplicate": (
        lambda p: _raw_safetensors(
            p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
               b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
        ),
        "duplicate key",
    ),
    "dtype": (
        lambda p: _raw_safetensors(
            p, {"x": {"dtype": "I8", "shape": [4, 64], "data_offsets": [0, 256]}}, b"\0" * 256
        ),
        "dtype 'I8'",
    ),
    "offsets_past_data": (
        lambda p: _raw_safetensors(
            p, {"x": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}, b"\0" * 8
        ),
        "byte range [0, 1024]",
    ),
    "offsets_vs_shape": (
        lambda p: _raw_safetensors(
            p, {"x": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 8]}}, b"\0" * 8
        ),
        "does not fit its shape",
    ),
    "bad_shape": (
        lambda p: _raw_safetensors(
            p, {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}
        ),
        "malformed shape",
    ),
    "extra_field": (
        lambda p: _raw_safetensors(
            p, {"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "evil": 1}}, b"\0" * 4
        ),
        "not a tensor description",
    ),
}


@pytest.mark.parametrize("kind", sorted(HEADER_REFUSALS))
def test_safetensors_header_refusals(kind, tmp_path, tiny_spec, adapter_cfg):
    write_file, fragment = HEADER_REFUSALS[kind]
    d = write_adapter(tmp_path / "bad", lora_config(), None)
    write_file(d / "adapter_model.safetensors")
    _refused(d, tiny_spec, adapter_cfg, fragment)


@pytest.mark.parametrize("filename", ["adapter_model.safetensors", "adapter_config.json"])
def test_symlinked_file_escaping_directory_is_refused(filename, tmp_path, tiny_spec,
                                                      adapter_cfg):
    outside = write_adapter(tmp_path / "outside", lora_config(), lora_tensors(tiny_spec))
    d = write_adapter(tmp_path / "root" / "bad", lora_config(), lora_tensors(tiny_spec))
    (d / filename).unlink()
    os.symlink(outside / filename, d / filename)
    _refused(d, tiny_spec, adapter_cfg, "outside the adapter directory", filename)


def test_symlinked_file_inside_directory_is_accepted(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "a", lora_config(), lora_tensors(tiny_spec))
    (d / "adapter_model.safetensors").rename(d / "blob")
    os.symlink("blob", d / "adapter_model.safetensors")
    assert Q0 in read_adapter(d, "a", tiny_spec, adapter_cfg).modules


def test_fifo_is_refused_without_blocking(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "bad", lora_config(), None)
    os.mkfifo(d / "adapter_model.safetensors")
    _refused(d, tiny_spec, adapter_cfg, "not a regular file")


# ---------------------------------------------------------------- base model name


@pytest.mark.parametrize("base", ["other-model", None])
def test_name_mismatch_refuse(base, tmp_path, tiny_spec):
    d = write_adapter(
        tmp_path / "bad", lora_config(base_model_name_or_path=base), lora_tensors(tiny_spec)
    )
    cfg = AdapterConfig(roots=[tmp_path], name_mismatch="refuse")
    msg = _refused(d, tiny_spec, cfg, "name_mismatch", "'tiny-llama'")
    assert ("'other-model'" in msg) if base else ("does not name its base model" in msg)


@pytest.mark.parametrize("policy, warned", [("warn", 1), ("ignore", 0)])
def test_name_mismatch_warn_and_ignore(policy, warned, tmp_path, tiny_spec):
    d = write_adapter(
        tmp_path / "a", lora_config(base_model_name_or_path="org/other-model"),
        lora_tensors(tiny_spec),
    )
    warnings: list[str] = []
    cfg = AdapterConfig(roots=[tmp_path], name_mismatch=policy)
    adapter = read_adapter(d, "a", tiny_spec, cfg, warn=warnings.append)
    assert Q0 in adapter.modules
    assert len(warnings) == warned
    if warned:
        assert "'org/other-model'" in warnings[0] and "'a'" in warnings[0]


def test_matching_name_does_not_warn(tmp_path, tiny_spec):
    d = write_adapter(
        tmp_path / "a", lora_config(base_model_name_or_path="/models/Tiny-Llama/"),
        lora_tensors(tiny_spec),
    )
    warnings: list[str] = []
    read_adapter(d, "a", tiny_spec, AdapterConfig(name_mismatch="warn"), warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize(
    "suffix, value, fragment",
    [
        ("lora_A.weight", torch.zeros(4, 65), "do not fit the base linear"),
        ("lora_B.weight", torch.full((64, 4), float("nan")), "non-finite"),
    ],
)
def test_other_refusals_win_whatever_the_name_policy(suffix, value, fragment, tmp_path,
                                                     tiny_spec):
    tensors = _replace_tensor(tiny_spec, suffix, value)
    d = write_adapter(tmp_path / "bad", lora_config(base_model_name_or_path="other"), tensors)
    warnings: list[str] = []
    for policy in ("warn", "ignore", "refuse"):
        with pytest.raises(AdapterRefused, match=fragment):
            read_adapter(d, "bad", tiny_spec, AdapterConfig(name_mismatch=policy),
                         warn=warnings.append)
    assert warnings == []  # a refused adapter is not also warned about


def test_refusal_is_an_invalid_argument(tmp_path, tiny_spec, adapter_cfg):
    d = write_adapter(tmp_path / "bad", lora_config(use_dora=True), lora_tensors(tiny_spec))
    with pytest.raises(InvalidArgument):
        read_adapter(d, "bad", tiny_spec, adapter_cfg)
