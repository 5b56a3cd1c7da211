"""The running batch: rows, their shared left-padded KV cache and attention mask.

Rows join (prefilled separately, then concatenated at a step boundary) and leave
(selected out) between steps; this is what makes batching continuous.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: [B, T] left-padded with pad_id, mask: [B, T] 1 on real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """position_ids [B, new_tokens] of the last `new_tokens` columns of mask [B, L]:
    the count of real tokens before each, so left padding does not shift RoPE."""
    pos = mask.cumsum(-1) - 1  # [B, L]
    return pos[:, -new_tokens:].clamp(min=0)


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if layer.is_initialized]


def concat_caches(a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor):
    """Join two batches' caches row-wise. The shorter is left-padded with zeros
    (masked out) so both share one sequence length. Returns (cache, mask)."""
    la, lb = mask_a.shape[1], mask_b.shape[1]
    width = max(la, lb)
    for layer_a, layer_b in zip(_layers(a), _layers(b), strict=True):
        layer_a.keys = torch.cat([_pad_seq(layer_a.keys, width), _pad_seq(layer_b.keys, width)])
        layer_a.values = torch.cat(
            [_pad_seq(layer_a.values, width), _pad_seq(layer_b.values, width)]
        )
    mask = torch.cat([_pad_mask(mask_a, width), _pad_mask(mask_b, width)])
    return a, mask


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:  # t: [B, H, L, D]
    missing = width - t.shape[2]
    if missing == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3])
    return torch.cat([pad, t], dim=2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:  # mask: [B, L]
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)


def select_rows(cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor):
    """Keep rows `keep` [B'] of the cache and mask, then drop left columns that are
    padding in every remaining row. Returns (cache, mask)."""
    mask = mask.index_select(0, keep)
    real_cols = mask.any(0).nonzero()
    start = int(real_cols[0]) if real_cols.numel() else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, keep)[:, :, start:]
        layer.values = layer.values.index_select(0, keep)[:, :, start:]
    return cache, mask[:, start:]
