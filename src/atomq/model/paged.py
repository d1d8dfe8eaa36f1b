"""The serving forward: a flat batch of new tokens of many sequences over a paged KV cache.

It reuses the modules and weights of ``llama.CausalLM`` with the same numerics, but is written for speed
at small batches: the residual stream is carried separately so that each residual add is fused into the
next RMSNorm, RoPE rotates q and k in place, SiLU * up is one op, and with Atom kernels the norm, the
reorder gather and the activation quantization are one kernel (as are SiLU * up and down's quantization);
``kv_pool.ops`` supplies these ops as Triton kernels or their ref.py twins. Attention: each layer first
stores the new tokens' K/V into their pages
(quantizing them when the cache is INT4 / FP8), then attends entirely from the pages, so a new token sees
exactly the K/V later steps will see (docs/KERNELS.md, "store first"). With an INT4 cache this is the
numerics of the full-sequence forward built with ``kv_bits=4`` (fake-quantized K after RoPE and V);
with ``kv_rotate`` queries and keys are Hadamard-rotated after RoPE before storing and attending, and
with ``kv_center`` the store takes the calibrated mean key off the keys (softmax ignores the shift).
The full-sequence forward (``CausalLM.forward``) is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import ref
from .args import default_sm_scale, rope_cos_sin
from .layers import Linear, RMSNorm
from .llama import Attention, CausalLM
from .methods import AtomKernel

# rotated models: SiLU * up and the down_proj input's online rotation in one kernel (False: two, for A/B)
FUSED_SILU_ROTATE = True


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


def _group(lins: list[Linear], operand: Any) -> list[torch.Tensor]:
    """The outputs [T, N_i] of linears that share one prepared input (one GEMM when merged)."""
    first = lins[0]
    if first.kernel is not None and len(first.kernel_outputs) == len(lins) > 1:
        return list(first.matmul(operand).split(first.kernel_outputs, dim=-1))
    return [lin.matmul(operand) for lin in lins]


def _norm_then_prepare(norm: RMSNorm, first: Linear | None, x: torch.Tensor, residual: torch.Tensor | None,
                       ops: Any, accumulate: bool = False) -> tuple[Any, torch.Tensor]:
    """Residual add + RMSNorm (+ reorder gather), then the input preparation of the linears that read it
    (``first`` of them; None = return the normed activations). Atom kernels do it all in one pass.
    x may be an fp32 accumulator (_accumulating): it is rounded to the residual's dtype first.
    accumulate: the Atom operand carries its GEMM's accumulator (AtomKernel.acc_cols).
    Returns (prepared input, new residual)."""
    index = getattr(norm, "reorder_index", None)
    if first is not None and isinstance(first.kernel, AtomKernel):
        from ..kernels.quantize import rmsnorm_quantize

        k = first.kernel
        weight = norm.weight if index is None else norm.gathered_weight()
        return rmsnorm_quantize(x, residual, weight, norm.eps, index, k.split, k.a_bits, k.a_clip, out="int8",
                                weight_gathered=index is not None, levels=k.a_levels,
                                acc_cols=k.acc_cols(x.shape[0]) if accumulate else 0)
    if residual is not None and x.dtype != residual.dtype:
        x = x.to(residual.dtype)
    y, residual = ops.rmsnorm(x, norm.weight, norm.eps, residual)
    if index is not None:
        y = y.index_select(-1, index.long())
    return (y if first is None else first.prepare_input(y)), residual


def _accumulating(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """lin(x) [T, N] for a call site whose consumer rounds fp32 itself (_norm_then_prepare): an Atom GEMM
    of few tokens (AtomKernel.acc_cols) then returns its fp32 accumulator, which saves its K runs the
    last-run reduction."""
    k = lin.kernel
    if isinstance(k, AtomKernel) and k.acc_cols(x.shape[0]):
        return k.matmul(k.prepare_input(x, accumulate=True))
    return lin(x)


def _mlp_accumulates(mlp: Any) -> bool:
    """Whether ``_mlp`` takes its gate/up GEMM's fp32 accumulator: Atom down_proj (SiLU * up rounds it as it
    loads), merged gate/up, no online rotation."""
    gate, _, down = (getattr(mlp, n) for n in mlp.names)
    return (isinstance(down.kernel, AtomKernel) and mlp.down_rotation is None and gate.kernel is not None
            and len(gate.kernel_outputs) == 2)


def _rope_q_k(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: Any) -> None:
    """RoPE in place on q [T, Hq, D] and k [T, Hkv, D]; one launch when k's heads follow q's in memory
    (the merged q/k/v GEMM's output), else one each."""
    t, hq, d = q.shape
    if q.stride() == (k.stride(0), d, 1) and k.stride(1) == d and k.data_ptr() == q.data_ptr() + hq * d * q.element_size():
        ops.rope_(q.as_strided((t, hq + k.shape[1], d), q.stride()), cos, sin)
    else:
        ops.rope_(q, cos, sin)
        ops.rope_(k, cos, sin)


def _paged_attention(attn: Attention, operand: Any, cos: torch.Tensor, sin: torch.Tensor, batch: StepBatch,
                     cache: Any, ops: Any, dtype: torch.dtype) -> torch.Tensor:
    """Prepared q/k/v input of T tokens -> attention output [T, hidden] in ``dtype``; writes the new K/V
    into ``cache`` first."""
    if attn.kv_pre_rope and attn.kv_bits is not None:
        raise ValueError("the paged cache stores keys after RoPE; a kv_pre_rope model cannot be served")
    q, k, v = _group([attn.q_proj, attn.k_proj, attn.v_proj], operand)  # [T, N] each (views when merged)
    t = q.shape[0]
    q = q.view(t, attn.n_heads, attn.head_dim)  # [T, Hq, D]
    k = k.view(t, attn.n_kv_heads, attn.head_dim)  # [T, Hkv, D]
    v = v.view(t, attn.n_kv_heads, attn.head_dim)
    _rope_q_k(q, k, cos, sin, ops)
    if attn.kv_hadamard is not None:
        q, k = ref.rotate_heads(q, attn.kv_hadamard), ref.rotate_heads(k, attn.kv_hadamard)
    ops.store(cache, k, v, batch.slot_mapping, attn.k_center)
    sm_scale = default_sm_scale(attn.head_dim)
    if ops.backend == "triton" and q.dtype == torch.float32:
        q = q.half()  # the kernels take fp16 / bf16 queries
    if batch.is_decode:
        o = ops.decode(q, cache, batch.block_tables, batch.context_lens, sm_scale)
    else:
        o = ops.prefill(q, cache, batch.cu_seqlens_q, batch.cached_lens, batch.block_tables, sm_scale)
    return _accumulating(attn.o_proj, o.to(dtype).reshape(t, attn.n_heads * attn.head_dim))


def _mlp(mlp: Any, operand: Any, ops: Any) -> torch.Tensor:
    """Prepared gate/up input -> MLP output [T, hidden] (fp32 when down accumulates: _accumulating); Atom:
    SiLU * up fused with down's quantization."""
    gate, up, down = (getattr(mlp, n) for n in mlp.names)
    if gate.kernel is not None and len(gate.kernel_outputs) == 2:
        gate_up = gate.matmul(operand)  # [T, 2I] = gate | up, one GEMM
    else:
        gate_up = torch.cat([gate.matmul(operand), up.matmul(operand)], dim=-1)
    if mlp.down_rotation is not None:  # rotated model: SiLU * up and the online rotation, then quantize
        backend = "triton" if down.kernel is not None else ops.backend  # down's input: the linear kernels' side
        if FUSED_SILU_ROTATE:
            h = mlp.down_rotation.silu_mul_rotate(gate_up, backend=backend)
        else:
            h = mlp.down_rotation(ops.silu_mul(gate_up), backend=backend)
        return down.matmul(down.prepare_input(h))
    if isinstance(down.kernel, AtomKernel):
        from ..kernels.quantize import silu_mul_quantize

        k = down.kernel
        m = gate_up.shape[0]
        return down.matmul(silu_mul_quantize(gate_up, k.split, k.a_bits, k.a_clip, out="int8", levels=k.a_levels,
                                             acc_cols=k.acc_cols(m), dtype=k.out_dtype))
    return down.matmul(down.prepare_input(ops.silu_mul(gate_up)))


@torch.no_grad()
def forward_paged(model: CausalLM, batch: StepBatch, kv_pool: Any) -> torch.Tensor:
    """Run the new tokens of ``batch`` through ``model`` over the paged cache.

    kv_pool: any object with ``caches`` (one PagedKVCache-like per layer) and ``ops``
    (engine.kv_pool.PagedOps: store / decode / prefill). Returns logits [L, vocab] in the model dtype
    for the rows ``batch.logits_indices``.
    """
    return model.lm_head(forward_paged_hidden(model, batch, kv_pool))  # [L, vocab]


@torch.no_grad()
def forward_paged_hidden(model: CausalLM, batch: StepBatch, kv_pool: Any) -> torch.Tensor:
    """forward_paged without the output layer: the final-normed hidden states [L, hidden] of the rows
    ``batch.logits_indices`` (a caller can then project them in slices)."""
    m, ops = model.model, kv_pool.ops
    cos, sin = rope_cos_sin(model.inv_freq, model.rope_scaling, batch.positions)  # [T, D] each
    x = m.embed_tokens(batch.token_ids)  # [T, hidden]: the last sublayer's output; residual = the stream
    residual = None
    for layer, cache in zip(m.layers, kv_pool.caches):
        attn = layer.self_attn
        a, residual = _norm_then_prepare(layer.input_layernorm, attn.q_proj, x, residual, ops)
        x = _paged_attention(attn, a, cos, sin, batch, cache, ops, residual.dtype)
        if hasattr(layer, "block_sparse_moe"):
            h, residual = _norm_then_prepare(layer.post_attention_layernorm, None, x, residual, ops)
            x = layer.block_sparse_moe(h)
        else:
            a, residual = _norm_then_prepare(layer.post_attention_layernorm, getattr(layer.mlp, layer.mlp.names[0]),
                                             x, residual, ops, accumulate=_mlp_accumulates(layer.mlp))
            x = _mlp(layer.mlp, a, ops)
    rows = batch.logits_indices
    h, _ = ops.rmsnorm(x.index_select(0, rows).to(residual.dtype), m.norm.weight, m.norm.eps,
                       residual.index_select(0, rows))
    return h  # [L, hidden]
