"""Paged prefill / extend attention: causal attention of a ragged batch of new tokens over the cache.

Choice: store first, then attend entirely from pages. The caller writes the new tokens' K/V with
``kv_store`` (the same quantized numbers decode will later read), then calls this kernel; a new
token thus sees exactly the quantized keys and values of itself and of every earlier token, which
also covers prefix reuse (cached_lens > 0 from a shared prefix) and chunked prefill (cached_lens =
tokens of earlier chunks). One code path, and prefill and decode agree on the numbers.

Work split: one program per (tile of ``block_m`` new tokens, sequence, query head); it walks the
kv positions [0, last visible position of its tile] in tiles of ``block_n`` with an online softmax
(fp32, base 2) and tensor-core dots on fp16 operands. The head dim is handled as two half-width
tiles (even / odd elements), which for INT4 are the low / high nibbles of each byte (exact integers
q - zero, scales applied per token as in decode_attention.py); fp16 and fp8 pages are read the same
way through stride-2 loads. Layouts: kv_cache.py. Twin: ref.paged_prefill_attention_ref.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .decode_attention import unpack_int4_tile
from .kv_cache import PagedKVCache, interpreting


@triton.jit
def _load_halves(P, S, Z, off, moff, nm, d, MODE: tl.constexpr, DEQ: tl.constexpr):
    """Rows ``off`` [N] of a pool -> (even, odd) fp16 [N, D2] and the per-token scale fp32 [N].

    int4: (q_lo - z, 16 * (q_hi - z)) exact integers and the fp16 scale; fp16 / fp8: the values
    (fp8 not yet scaled by its per-head scale) and a scale of 1.
    """
    if MODE == 2:
        x = tl.load(P + off[:, None] + d[None, :], mask=nm[:, None], other=0)
        z = tl.load(Z + moff, mask=nm, other=0).to(tl.float32)
        s = tl.load(S + moff, mask=nm, other=0.0).to(tl.float32)
        e, o = unpack_int4_tile(x, z[:, None], True, DEQ)
    else:
        ptr = P + off[:, None] + 2 * d[None, :]
        e = tl.load(ptr, mask=nm[:, None], other=0.0).to(tl.float16)
        o = tl.load(ptr + 1, mask=nm[:, None], other=0.0).to(tl.float16)
        s = tl.where(nm, 1.0, 0.0)
    return e, o, s


@triton.jit
def _prefill_step(n0, kv_end, qpos, qe, qo, m_i, l_i, acc_e, acc_o, qk_scale, K, V, KS, KZ, VS, VZ, bt, h,
                  stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms,
                  D2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
                  DEQ: tl.constexpr):
    d = tl.arange(0, D2)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < kv_end
    page = tl.load(bt + n // PAGE, mask=nm, other=0).to(tl.int64)
    slot = n % PAGE
    off = page * stride_kb + h * stride_kh + slot * stride_ks
    moff = page * stride_mb + h * stride_mh + slot * stride_ms
    ke, ko, ks = _load_halves(K, KS, KZ, off, moff, nm, d, MODE, DEQ)
    hi_w = 0.0625 if MODE == 2 else 1.0
    sc = tl.dot(qe, tl.trans(ke)) + tl.dot(qo, tl.trans(ko)) * hi_w  # [BLOCK_M, BLOCK_N]
    sc = sc * (ks * qk_scale)[None, :]
    vis = nm[None, :] & (n[None, :] <= qpos[:, None])  # causal
    sc = tl.where(vis, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    ve, vo, vs = _load_halves(V, VS, VZ, off, moff, nm, d, MODE, DEQ)
    pw = (p * vs[None, :]).to(tl.float16)
    acc_e = acc_e * alpha[:, None] + tl.dot(pw, ve)
    acc_o = acc_o * alpha[:, None] + tl.dot(pw, vo) * hi_w
    return m_new, l_i, acc_e, acc_o


@triton.jit
def _prefill_kernel(
    Q, K, V, KS, KZ, VS, VZ, CU, CACHED, BT, O, qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms, stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, D2: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, DEQ: tl.constexpr, INTERPRET: tl.constexpr,
):
    mt = tl.program_id(0)
    b = tl.program_id(1)
    hq = tl.program_id(2)
    h = hq // GROUP
    t0 = tl.load(CU + b)
    qlen = tl.load(CU + b + 1) - t0
    cached = tl.load(CACHED + b)
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < qlen
    qpos = cached + rows  # absolute position of each new token
    kv_end = tl.minimum(cached + qlen, cached + (mt + 1) * BLOCK_M)
    if mt * BLOCK_M >= qlen:
        kv_end = 0  # tile past this sequence's new tokens: nothing to do
    d = tl.arange(0, D2)
    qp = Q + (t0 + rows).to(tl.int64)[:, None] * stride_qt + hq * stride_qh + 2 * d[None, :]
    qe = tl.load(qp, mask=rm[:, None], other=0.0).to(tl.float16)
    qo = tl.load(qp + 1, mask=rm[:, None], other=0.0).to(tl.float16)
    if MODE == 1:
        qk_scale = qk_scale * tl.load(KS + h)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_e = tl.zeros([BLOCK_M, D2], tl.float32)
    acc_o = tl.zeros([BLOCK_M, D2], tl.float32)
    bt = BT + b * stride_bt
    if INTERPRET:  # the interpreter cannot run a for loop with tensor bounds
        n0 = 0
        while n0 < kv_end:
            m_i, l_i, acc_e, acc_o = _prefill_step(
                n0, kv_end, qpos, qe, qo, m_i, l_i, acc_e, acc_o, qk_scale, K, V, KS, KZ, VS, VZ, bt, h,
                stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms, D2, PAGE, BLOCK_N, MODE, DEQ)
            n0 += BLOCK_N
    else:
        for n0 in range(0, kv_end, BLOCK_N):
            m_i, l_i, acc_e, acc_o = _prefill_step(
                n0, kv_end, qpos, qe, qo, m_i, l_i, acc_e, acc_o, qk_scale, K, V, KS, KZ, VS, VZ, bt, h,
                stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms, D2, PAGE, BLOCK_N, MODE, DEQ)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc_e = acc_e / l_safe[:, None]
    acc_o = acc_o / l_safe[:, None]
    if MODE == 1:
        vsc = tl.load(VS + h)
        acc_e = acc_e * vsc
        acc_o = acc_o * vsc
    op = O + (t0 + rows).to(tl.int64)[:, None] * stride_ot + hq * stride_oh + 2 * d[None, :]
    tl.store(op, acc_e.to(O.dtype.element_ty), mask=rm[:, None])
    tl.store(op + 1, acc_o.to(O.dtype.element_ty), mask=rm[:, None])


@dataclass(frozen=True)
class PrefillPlan:
    """Launch parameters for one ragged batch: max_q_len (host int, bounds the grid), tiles, warps."""

    max_q_len: int
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    deq: int = 1


def plan_prefill(max_q_len: int, head_dim: int, **overrides) -> PrefillPlan:
    """A plan for new-token counts up to max_q_len (host integer: no device read)."""
    block_m = 64 if max_q_len >= 64 else 16
    bn = 64 if head_dim <= 64 else 32
    return PrefillPlan(max_q_len, **{"block_m": block_m, "block_n": bn, **overrides})


_MODE_ID = {"fp16": 0, "fp8": 1, "int4": 2}


def paged_prefill_attention(
    q: torch.Tensor, cache: PagedKVCache, cu_seqlens_q: torch.Tensor, cached_lens: torch.Tensor,
    block_table: torch.Tensor, sm_scale: float, out: torch.Tensor | None = None, plan: PrefillPlan | None = None,
) -> torch.Tensor:
    """Causal attention of new tokens over the paged cache, which must already hold them (kv_store first).

    q: fp16/bf16 [T, Hq, D], ragged: sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]
    (cu_seqlens_q int32 [B + 1], starting at 0); cached_lens: int32 [B], tokens of sequence b in the
    cache before the new ones (new token i sits at position cached_lens[b] + i and sees positions
    <= its own); block_table: int32 [B, max_blocks] covering cached_lens[b] + new tokens; sm_scale:
    softmax scale. Returns [T, Hq, D] of q's dtype. Without a plan the grid is sized for T new
    tokens per sequence (no device read; idle tiles exit at once). Twin: ref.paged_prefill_attention_ref.
    """
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q must be [T, Hq, {cache.head_dim}] with Hq a multiple of {cache.num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or q.stride(2) != 1:
        raise ValueError(f"q must be fp16/bf16 with a contiguous last dim, got {q.dtype}")
    bsz = cached_lens.shape[0]
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape != (bsz + 1,):
        raise ValueError(f"cu_seqlens_q must be int32 [{bsz + 1}], got {cu_seqlens_q.dtype} "
                         f"{tuple(cu_seqlens_q.shape)}")
    if cached_lens.dtype != torch.int32 or cached_lens.dim() != 1:
        raise ValueError("cached_lens must be int32 [B]")
    if block_table.dtype != torch.int32 or block_table.shape[0] != bsz or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be int32 [{bsz}, max_blocks], contiguous rows")
    t, hq, d = q.shape
    if plan is None:
        plan = plan_prefill(max(t, 1), d)
    if plan.deq == 2 and interpreting():
        raise ValueError("deq=2 (PTX unpack) needs a GPU; use deq=1 under TRITON_INTERPRET=1")
    out = torch.empty_like(q) if out is None else out
    if t == 0 or bsz == 0:
        return out
    hkv = cache.num_kv_heads
    sb, sh, ss = cache.data_strides()
    mb, mh, ms = cache.meta_strides()
    mode = _MODE_ID[cache.mode]
    dummy = q
    grid = (triton.cdiv(plan.max_q_len, plan.block_m), bsz, hq)
    _prefill_kernel[grid](
        q, cache.k, cache.v,
        cache.k_scale if cache.k_scale is not None else dummy, cache.k_zero if cache.k_zero is not None else dummy,
        cache.v_scale if cache.v_scale is not None else dummy, cache.v_zero if cache.v_zero is not None else dummy,
        cu_seqlens_q, cached_lens, block_table, out, sm_scale * math.log2(math.e),
        q.stride(0), q.stride(1), sb, sh, ss, mb, mh, ms, block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=hq // hkv, D2=d // 2, PAGE=cache.block_size, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        MODE=mode, DEQ=plan.deq, INTERPRET=interpreting(), num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out
