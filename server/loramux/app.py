"""Composition root: the one place that builds the model, adapter store, device
slots, LoRA layers, KV cache and engine, and hands each its collaborators."""

from __future__ import annotations

from loramux.adapters.slots import SlotPool
from loramux.adapters.store import AdapterStore
from loramux.config import EngineConfig
from loramux.engine.engine import Engine, max_sequence_length
from loramux.engine.kv_cache import KvCache, KvGeometry, default_kv_bytes
from loramux.engine.pins import PinController
from loramux.merging.pinning import WeightPinner
from loramux.merging.service import MergeService
from loramux.model import attention, fast_layers
from loramux.model.loader import LoadedModel, load_base_model
from loramux.model.lora_layers import LoraContext, speed_up_head, wrap_targets
from loramux_kernels import select_backend


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> Engine:
    """Build a ready engine. `loaded` lets tests pass a model they built in memory."""
    config.validate()
    loaded = loaded or load_base_model(config.model)
    store = AdapterStore(config.adapters, loaded.spec)
    pool = SlotPool(
        loaded.spec,
        num_slots=config.slots.num_slots,
        max_rank=config.adapters.max_rank,
        device=loaded.device,
        dtype=loaded.dtype,
    )
    ctx = LoraContext(backend=select_backend(loaded.device))
    layers = wrap_targets(loaded.model, pool, ctx)
    speed_up_head(loaded.model, ctx)
    attention.install(loaded.model)
    fast_layers.install_fast_layers(loaded.model)  # Llama-family float32 CPU only; else a no-op
    merges = MergeService(store, config.merges)
    kv = build_kv_cache(config, loaded)
    return Engine(loaded, store, pool, ctx, config, merges, PinController(WeightPinner(layers)), kv)


def build_kv_cache(config: EngineConfig, loaded: LoadedModel) -> KvCache:
    geometry = KvGeometry.of(loaded.model.config, loaded.dtype)
    kc = config.kv_cache
    budget = kc.bytes or default_kv_bytes(geometry, config.max_batch_rows * max_sequence_length(loaded, config.max_seq_len))
    return KvCache.from_budget(geometry, budget, kc.block_size, loaded.device, kc.prefix_caching)
