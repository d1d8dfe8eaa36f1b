"""Model runner: a scheduled step (sequences + token counts) -> StepBatch tensors -> paged forward -> logits.

The runner owns the model and the KV pool; it knows nothing about queues or sampling. The per-step
metadata is built on the host in plain Python lists and moved to the device once per step.
"""

from __future__ import annotations

import torch

from ..model.llama import CausalLM
from ..model.paged import StepBatch, forward_paged
from .kv_pool import KVPool
from .sequence import Sequence


def build_step_batch(seqs: list[Sequence], num_new_tokens: list[int], block_size: int,
                     device: torch.device) -> StepBatch:
    """Tensors for one step. Sequence b computes tokens [num_computed, num_computed + n_b) and needs
    logits when that reaches the end of its tokens (a finished prefill or a decode step)."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cached, context, cu, logit_rows = [], [], [0], []
    for seq, n in zip(seqs, num_new_tokens):
        start = seq.num_computed_tokens
        if n < 1 or start + n > seq.num_tokens or len(seq.block_table) * block_size < start + n:
            raise RuntimeError(f"sequence {seq.seq_id}: bad step ({n} tokens from {start}, "
                               f"{seq.num_tokens} tokens, {len(seq.block_table)} blocks)")
        tokens += seq.token_ids[start:start + n]
        positions += range(start, start + n)
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        cached.append(start)
        context.append(start + n)
        cu.append(cu[-1] + n)
        if start + n == seq.num_tokens:
            logit_rows.append(cu[-1] - 1)
    width = max(len(s.block_table) for s in seqs)
    tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]  # [B, max_blocks]

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return StepBatch(
        token_ids=torch.tensor(tokens, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=i32(slots),
        block_tables=i32(tables),
        cached_lens=i32(cached),
        context_lens=i32(context),
        cu_seqlens_q=i32(cu),
        logits_indices=torch.tensor(logit_rows, dtype=torch.int64, device=device),
        max_q_len=max(num_new_tokens),
        is_decode=all(n == 1 for n in num_new_tokens),
    )


class ModelRunner:
    def __init__(self, model: CausalLM, kv_pool: KVPool):
        self.model = model
        self.kv_pool = kv_pool
        self.device = kv_pool.device

    def run(self, seqs: list[Sequence], num_new_tokens: list[int]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute one step. Returns (sequences that get a next token, their logits fp32 [L, vocab])."""
        batch = build_step_batch(seqs, num_new_tokens, self.kv_pool.block_size, self.device)
        wanting = [s for s, n in zip(seqs, num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]
        logits = forward_paged(self.model, batch, self.kv_pool)
        return wanting, logits.float()
