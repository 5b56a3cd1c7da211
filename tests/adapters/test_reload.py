"""An adapter changed on disk is served in its new version from the next request on
(two stats per request notice it); rows already running keep the weights they
started with. Versions are real PEFT saves."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loramux.adapters.store import AdapterStore
from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig, SlotConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.errors import AdapterRefused, FailedPrecondition, NotFound
from tests.adapters.conftest import gets_at_once, lora_config
from tests.conftest import make_adapter

Q0 = "model.layers.0.self_attn.q_proj"
FILES = ("adapter_config.json", "adapter_model.safetensors")


def _delta(peft_model, module: str = Q0) -> torch.Tensor:
    return peft_model.base_model.model.get_submodule(module).get_delta_weight("default")


def _swap_in(tmp_path: Path, directory: Path, save):
    """Write a new version elsewhere and rename its files over the old ones (new inodes,
    the way deploy tools replace files atomically)."""
    staging = tmp_path / "staging"
    result = save(staging)
    for f in FILES:
        os.replace(staging / f, directory / f)
    shutil.rmtree(staging)
    return result


@pytest.fixture
def store(adapter_cfg, tiny_spec) -> AdapterStore:
    return AdapterStore(adapter_cfg, tiny_spec)


def test_unchanged_adapter_is_not_read_again(root, store, peft_adapter):
    peft_adapter(root / "a")
    first = store.get("a")
    assert all(store.get("a") is first for _ in range(3))
    assert (store.stats.loads, store.stats.reloads) == (1, 0)


def test_adapter_rewritten_in_place_is_reloaded(root, store, peft_adapter):
    peft_adapter(root / "a", seed=1, r=8, lora_alpha=16)
    evicted: list[str] = []
    store.subscribe_evictions(evicted.append)
    old = store.get("a")
    new_model = peft_adapter(root / "a", seed=2, r=4, lora_alpha=8)  # PEFT writes in place
    new = store.get("a")
    assert new is not old and new.content_hash != old.content_hash and new.rank == 4
    torch.testing.assert_close(new.modules[Q0].delta(), _delta(new_model), rtol=1e-5, atol=1e-6)
    assert evicted == ["a"]  # the slot pool frees the old version's slot
    assert store.get("a") is new and store.stats.reloads == 1
    assert [i.content_hash for i in store.list()] == [new.content_hash]


def test_same_size_replacement_is_noticed(tmp_path, root, store, peft_adapter):
    peft_adapter(root / "a", seed=1)
    old = store.get("a")
    new_model = _swap_in(tmp_path, root / "a", lambda d: peft_adapter(d, seed=2))
    assert (root / "a" / FILES[1]).stat().st_size == old.files[1].size  # only the inode tells
    new = store.get("a")
    assert new.content_hash != old.content_hash
    torch.testing.assert_close(new.modules[Q0].delta(), _delta(new_model), rtol=1e-5, atol=1e-6)


def test_swapped_directory_symlink_is_noticed(tmp_path, root, store, peft_adapter):
    peft_adapter(root / "v1", seed=1)
    peft_adapter(root / "v2", seed=2)
    os.symlink("v1", root / "a")
    old = store.get("a")
    os.symlink("v2", root / "a.tmp")
    os.replace(root / "a.tmp", root / "a")  # the atomic flip of a release symlink
    new = store.get("a")
    assert new.content_hash == store.get("v2").content_hash != old.content_hash


def test_touched_but_identical_files_reload_without_evicting(root, store, peft_adapter):
    peft_adapter(root / "a")
    evicted: list[str] = []
    store.subscribe_evictions(evicted.append)
    old = store.get("a")
    st = (root / "a" / FILES[1]).stat()
    os.utime(root / "a" / FILES[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    new = store.get("a")
    assert new is not old and new.content_hash == old.content_hash
    assert evicted == [] and store.stats.reloads == 1  # same weights: slots stay valid


def test_operator_pin_and_load_survive_a_reload(root, store, peft_adapter):
    peft_adapter(root / "a", seed=1)
    peft_adapter(root / "b", seed=1)
    store.pin("a")
    store.load("b")
    peft_adapter(root / "a", seed=2, r=4)
    peft_adapter(root / "b", seed=2, r=4)
    assert store.get("a").rank == store.get("b").rank == 4
    info = {i.name: i for i in store.list()}
    assert info["a"].pinned and info["a"].explicit and info["b"].explicit
    store.unpin("a")  # the operator's one pin is still there to release
    assert not store.list()[0].pinned


def test_pin_of_a_changed_adapter_returns_the_new_version(root, store, peft_adapter):
    peft_adapter(root / "a", seed=1)
    old = store.pin("a")
    peft_adapter(root / "a", seed=2, r=4)
    assert store.pin("a").content_hash != old.content_hash


@pytest.mark.parametrize("pinned", [False, True])
def test_new_version_refused_drops_the_old_one(pinned, root, store, peft_adapter):
    """The disk is the truth: an adapter withdrawn or broken on disk stops being served."""
    peft_adapter(root / "a")
    if pinned:
        store.pin("a")
    else:
        store.get("a")
    (root / "a" / FILES[0]).write_text(json.dumps(lora_config(use_dora=True)))
    with pytest.raises(AdapterRefused, match="DoRA"):
        store.get("a")
    assert "a" not in store.cache and not store.list()[0].cached
    if pinned:
        with pytest.raises(FailedPrecondition, match="not pinned"):
            store.unpin("a")


def test_deleted_adapter_is_not_found(root, store, peft_adapter):
    peft_adapter(root / "a")
    store.get("a")
    shutil.rmtree(root / "a")
    with pytest.raises(NotFound, match="'a' not found"):
        store.get("a")
    assert store.list() == []


def test_concurrent_requests_reload_once(root, store, peft_adapter):
    peft_adapter(root / "a", seed=1)
    store.get("a")
    peft_adapter(root / "a", seed=2, r=4)
    results = gets_at_once(store, "a", 8)
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert store.stats.reloads == 1 and results[0].rank == 4


# ---------------------------------------------------------------- through the engine

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=24, ignore_eos=True)
PROMPT = "The quick brown fox"


def _engine(model_dir: Path, root: Path):
    return build_engine(EngineConfig(
        model=ModelConfig(path=model_dir),
        adapters=AdapterConfig(roots=[root], max_rank=16),
        slots=SlotConfig(num_slots=4),
    ))


def _req(params=GREEDY) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, adapter="a", sampling=params)


def _tokens(engine, params=GREEDY) -> list[int]:
    return engine.generate([_req(params)])[0].token_ids


def test_engine_serves_the_new_version_and_running_rows_finish_on_the_old(tmp_path, tiny_llama_dir):
    root = tmp_path / "root"
    make_adapter(tiny_llama_dir, root / "a", r=8, alpha=16, seed=1)
    engine = _engine(tiny_llama_dir, root)
    old_short, old_long = _tokens(engine), _tokens(engine, LONG)

    running = _req(LONG)
    engine.submit(running)
    engine.step()
    engine.step()  # the row is decoding on the old version
    make_adapter(tiny_llama_dir, root / "a", r=4, alpha=8, seed=2)  # PEFT overwrites in place
    after = _req()
    engine.submit(after)
    results = {}
    while engine.has_work():
        results.update({ev.request_id: ev.result for ev in engine.step() if ev.result})

    new_short = _tokens(_engine(tiny_llama_dir, root))  # a fresh server on the new files
    assert new_short != old_short
    assert results[after.request_id].token_ids == new_short
    assert results[running.request_id].token_ids == old_long
    assert _tokens(engine) == new_short and engine.store.stats.reloads == 1
