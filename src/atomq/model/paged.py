"""The serving forward: a flat batch of new tokens of many sequences over a paged KV cache.

It reuses the modules of ``llama.CausalLM`` (embedding, norms, quantized ``Linear``s, MoE, lm_head) and
its RoPE, and changes only attention: each layer first stores the new tokens' K/V into their pages
(quantizing them when the cache is INT4 / FP8), then attends entirely from the pages, so a new token sees
exactly the K/V later steps will see (docs/KERNELS.md, "store first"). With an INT4 cache this is the
numerics of the full-sequence forward built with ``kv_bits=4`` (fake-quantized K after RoPE and V);
with ``kv_rotate`` queries and keys are Hadamard-rotated after RoPE before storing and attending.
The full-sequence forward (``CausalLM.forward``) is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import ref
from .args import apply_rope, default_sm_scale, rope_cos_sin
from .layers import shared_forward
from .llama import Attention, CausalLM


@dataclass
class StepBatch:
    """Everything one engine step feeds the model (no hidden global state).

    B sequences contribute T new tokens in total; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
      token_ids       int64 [T]        the new tokens
      positions       int64 [T]        their positions in their sequences
      slot_mapping    int32 [T]        cache slot of each new token (block * block_size + offset)
      block_tables    int32 [B, max_blocks]  page ids per sequence (padding: 0)
      cached_lens     int32 [B]        tokens already in the cache before this step
      context_lens    int32 [B]        cached_lens + new tokens (what attention reads)
      cu_seqlens_q    int32 [B + 1]    prefix sums of new tokens per sequence, from 0
      logits_indices  int64 [L]        rows whose next-token logits are needed (a sequence's last row
                                       when its chunk reaches its end), in sequence order
      max_q_len       host int         largest new-token count of a sequence
      is_decode       host bool        every sequence has exactly one new token
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    cached_lens: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    logits_indices: torch.Tensor
    max_q_len: int
    is_decode: bool

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.cached_lens.shape[0]


def _paged_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     batch: StepBatch, cache: Any, ops: Any) -> torch.Tensor:
    """x [T, hidden] (normed, reordered) -> [T, hidden]; writes the new K/V into ``cache`` first."""
    if attn.kv_pre_rope and attn.kv_bits is not None:
        raise ValueError("the paged cache stores keys after RoPE; a kv_pre_rope model cannot be served")
    t = x.shape[0]
    q, k, v = shared_forward(x, attn.q_proj, attn.k_proj, attn.v_proj)
    q = q.view(1, t, attn.n_heads, attn.head_dim)  # [1, T, Hq, D] (apply_rope's layout)
    k = k.view(1, t, attn.n_kv_heads, attn.head_dim)
    v = v.view(t, attn.n_kv_heads, attn.head_dim)  # [T, Hkv, D]
    q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin)[0]  # [T, H, D]
    if attn.kv_hadamard is not None:
        q, k = ref.rotate_heads(q, attn.kv_hadamard), ref.rotate_heads(k, attn.kv_hadamard)
    ops.store(cache, k.contiguous(), v.contiguous(), batch.slot_mapping)
    sm_scale = default_sm_scale(attn.head_dim)
    if ops.backend == "triton" and q.dtype == torch.float32:
        q = q.half()  # the kernels take fp16 / bf16 queries
    q = q.contiguous()
    if batch.is_decode:
        o = ops.decode(q, cache, batch.block_tables, batch.context_lens, sm_scale)
    else:
        o = ops.prefill(q, cache, batch.cu_seqlens_q, batch.cached_lens, batch.block_tables, sm_scale)
    return attn.o_proj(o.to(x.dtype).reshape(t, attn.n_heads * attn.head_dim))


@torch.no_grad()
def forward_paged(model: CausalLM, batch: StepBatch, kv_pool: Any) -> torch.Tensor:
    """Run the new tokens of ``batch`` through ``model`` over the paged cache.

    kv_pool: any object with ``caches`` (one PagedKVCache-like per layer) and ``ops``
    (engine.kv_pool.PagedOps: store / decode / prefill). Returns logits [L, vocab] in the model dtype
    for the rows ``batch.logits_indices``.
    """
    m = model.model
    cos, sin = rope_cos_sin(model.inv_freq, model.rope_scaling, batch.positions)  # [T, D] each
    x = m.embed_tokens(batch.token_ids)  # [T, hidden]
    for layer, cache in zip(m.layers, kv_pool.caches):
        x = x + _paged_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, batch, cache, kv_pool.ops)
        ffn = layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp
        x = x + ffn(layer.post_attention_layernorm(x))
    h = m.norm(x.index_select(0, batch.logits_indices))  # [L, hidden]
    return model.lm_head(h)
