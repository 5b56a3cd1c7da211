"""LoRA training on the tiny random Llama: the loss drops, the adapter loads."""

from __future__ import annotations

import json

import pytest
import torch

from loramux.adapters.peft_format import read_adapter
from loramux.adapters.store import AdapterStore
from loramux.config import AdapterConfig
from loramux.model.loader import build_spec
from loramux.skills.train import (
    IGNORE,
    TrainConfig,
    build_parser,
    config_from_args,
    encode,
    lr_factor,
    train,
)
from loramux.skills.tasks import make_task


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("skill-adapters")
    # One thread: on a shared 2-core machine, two contend and run ~10x slower.
    cfg = TrainConfig(task="json", out=root / "json", model=tiny_llama_dir, steps=30,
                      batch_size=4, lr=1e-2, warmup_steps=2, train_examples=40,
                      validation_examples=8, log_every=10, rank=4, alpha=8, threads=1)
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    return cfg, result, lines


def test_training_reduces_loss_and_reports_progress(trained):
    cfg, result, lines = trained
    assert len(result.losses) == cfg.steps
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.8, (first, last)  # from ~ln(512) = 6.2 to ~4.9
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 3 and "s/step" in progress[0] and "eta" in progress[0]


def test_saved_adapter_loads_through_reader_and_store(trained, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    cfg, result, _ = trained
    out = cfg.out
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "training.json"}
    spec = build_spec(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tiny_llama_dir))
    acfg = AdapterConfig(roots=[out.parent], max_rank=8, name_mismatch="refuse")
    adapter = read_adapter(out, "json", spec, acfg)
    assert len(adapter.modules) == 2 * 7 and adapter.rank == 4
    deltas = [m.delta() for m in adapter.modules.values()]
    assert all(torch.isfinite(d).all() for d in deltas)
    assert any(d.abs().max() > 0 for d in deltas)  # B moved away from its zero init
    assert AdapterStore(acfg, spec).get("json").content_hash == adapter.content_hash


def test_training_json_records_run(trained):
    cfg, result, _ = trained
    record = json.loads((cfg.out / "training.json").read_text())
    assert record["task"] == "json" and record["steps"] == 30 and record["data_seed"] == 0
    assert record["final_loss"] == pytest.approx(result.final_loss)
    assert record["validation_loss"] is not None
    assert record["command"].startswith("python -m loramux.skills.train --task json")
    assert record["config"]["rank"] == 4
    # The recorded command parses back to the same configuration.
    import shlex

    args = build_parser().parse_args(shlex.split(record["command"])[3:])
    assert config_from_args(args) == cfg


def test_loss_covers_only_the_answer(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ex = make_task("json").examples("validation")[0]
    enc = encode(tok, ex)
    answer = [t for t in enc.labels if t != IGNORE]
    assert enc.labels[: len(enc.labels) - len(answer)] == [IGNORE] * (len(enc.labels) - len(answer))
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == ex.reference


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == 0.0
