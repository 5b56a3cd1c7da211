"""The model runner: turns a step's chunks into one packed forward and samples.

Every token of the step sits in one row of `[1, N]` inputs with its own position
(no padding), its own LoRA slot (one routing plan for every LoRA layer) and its
own KV pool row; attention runs per sequence over its blocks (model/attention.py).
Logits are taken only at the tokens that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.adapters.slots import SlotPool
from loramux.engine.kv_cache import KvCache
from loramux.engine.sampling import sample_next
from loramux.engine.scheduler import Chunk
from loramux.model.attention import PagedStep
from loramux.model.lora_layers import LoraContext
from loramux_kernels import NO_SLOT, AttentionPlan, plan_step, select_attention


@dataclass
class StepInputs:
    """The packed step. ids, positions, slots: [N]; logit_rows: [K] indices into
    the N tokens where a row samples, in chunk order of the chunks that sample."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    attention: AttentionPlan
    logit_rows: torch.Tensor | None


class ModelRunner:
    """Engine thread only."""

    def __init__(self, model, kv: KvCache, pool: SlotPool, ctx: LoraContext, device):
        self.model, self.kv, self.pool, self.ctx, self.device = model, kv, pool, ctx, device
        self.attention = select_attention(device)

    def prepare(self, chunks: list[Chunk], all_logits: bool = False) -> StepInputs:
        ids, positions, slots, logit_rows, seqs = [], [], [], [], []
        for c in chunks:
            seq = c.seq
            ids += seq.tokens(c.start, c.start + c.count)
            positions += range(c.start, c.start + c.count)
            slots += [seq.slot if seq.adapter is not None else NO_SLOT] * c.count
            if c.samples:
                logit_rows.append(len(ids) - 1)
            seqs.append((seq.block_table, c.start + c.count, c.count))
        long = dict(dtype=torch.long, device=self.device)
        return StepInputs(
            ids=torch.tensor(ids, **long),
            positions=torch.tensor(positions, **long),
            slots=torch.tensor(slots, **long),
            attention=AttentionPlan.build(seqs, self.kv.block_size, self.device),
            logit_rows=None if all_logits else torch.tensor(logit_rows, **long),
        )

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [K, V] at inputs.logit_rows (all N tokens when it is None)."""
        self.ctx.plan = plan_step(inputs.slots, self.pool.rank, self.pool.dtype)
        try:
            out = self.model(
                input_ids=inputs.ids[None],
                position_ids=inputs.positions[None],
                use_cache=False,
                logits_to_keep=0 if inputs.logit_rows is None else inputs.logit_rows,
                loramux_step=PagedStep(self.kv, inputs.attention, self.attention),
            )
        finally:
            self.ctx.plan = None
        return out.logits[0]

    def step(self, chunks: list[Chunk]) -> list[int]:
        """Run the chunks; the sampled token of every chunk that samples, in order."""
        logits = self.forward(self.prepare(chunks))
        return sample_next(logits, [c.seq.sampler for c in chunks if c.samples])
