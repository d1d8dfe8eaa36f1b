"""One kernel for a decode step's attention over INT4 pages: RoPE, the KV-cache write and attention.

At batch 1 a decode step is latency-bound: RoPE, the KV store and decode attention are three short
kernels in a chain, each waiting for the one ahead. Here each (sequence, head, split) program

1. loads, before the wait for the q/k/v GEMM ahead (kernels/pdl.py), its staged inputs (slot, cos / sin)
   and the first two tiles of its older tokens' pages: nothing else in the step writes this layer's pages;
2. after the wait, rotates q (and, in the split holding the newest token, k) by RoPE, quantizes the new k
   and v to INT4 exactly as ``kv_cache.kv_store`` does and writes them into their slot;
3. starts the online softmax with the newest token straight from registers, then walks the older tokens'
   pages as the words kernel does (decode_attention.py, ``dot=4``), whose helpers it shares.

So the cache ends up bit-identical to RoPE + store, and the output equals the words kernel over those
pages up to fp32 summation order. Scope: INT4 pages with one query head per kv head (the words kernel's
case; Llama-2-7B/13B), head_dim 64 or 128, keys stored without a Hadamard rotation. ``q``, ``k`` and
``v`` are read, not modified. Twin: ``ref.rope_store_decode_attention_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_compat
from .counters import arrival_counters
from .decode_attention import (DecodePlan, _epilogue, _merge_if_last, _merge_splits_kernel, _nibble_planes,
                               _slot_sum, _split_range, _words_load, _words_step, plan_decode)
from .kv_cache import PagedKVCache, _check_new_kv, _rint, interpreting
from .pdl import gdc_enter, launch_options

# False: the model runs RoPE, the KV store and decode attention as three kernels (for A/B)
ENABLED = True
# the first tile of older tokens loads before the wait for the q/k/v GEMM (False: after it, for A/B)
PRELOAD = True


def unsupported_reason(cache: PagedKVCache, num_qo_heads: int) -> str | None:
    """Why ``rope_store_decode_attention`` cannot serve this cache (None: it can)."""
    if cache.mode != "int4":
        return f"needs an int4 cache, got {cache.mode}"
    if num_qo_heads != cache.num_kv_heads:
        return "needs one query head per kv head (no GQA)"
    if cache.head_dim not in (64, 128):
        return f"needs head_dim 64 or 128, got {cache.head_dim}"
    return None


def fuses(cache: PagedKVCache, num_qo_heads: int) -> bool:
    """Whether a decode step over ``cache`` runs as this one kernel (``ENABLED`` and supported)."""
    return ENABLED and unsupported_reason(cache, num_qo_heads) is None


@triton.jit
def _rope_row(X, COS_B, SIN_B, D: tl.constexpr):
    """One head's row at X [D] after RoPE as ``elementwise._rope_kernel`` computes it (fp32 math, rounded to
    the model dtype), as fp32 [D]; one element per thread: the row's work stays a few instructions."""
    d = tl.arange(0, D)
    x = tl.load(X + d).to(tl.float32)
    xp = tl.load(X + (d + D // 2) % D).to(tl.float32)  # the rotate-half partner
    cs = tl.load(COS_B + d)
    sn = tl.load(SIN_B + d)
    y = tl.where(d < D // 2, x * cs - xp * sn, x * cs + xp * sn)
    return y.to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _to_planes(x, W: tl.constexpr):
    """fp32 [8 W] -> 8 planes fp32 [1, W] (plane I, word c: element 8c + I), the words kernel's q layout."""
    a = tl.reshape(x, [W, 2, 2, 2])  # element 8c + 4 i2 + 2 i1 + i0
    e, o = tl.split(a)  # i0
    ee, eo = tl.split(e)  # i1
    oe, oo = tl.split(o)
    p0, p4 = tl.split(ee)  # i2
    p2, p6 = tl.split(eo)
    p1, p5 = tl.split(oe)
    p3, p7 = tl.split(oo)
    return (p0[None, :], p1[None, :], p2[None, :], p3[None, :], p4[None, :], p5[None, :], p6[None, :], p7[None, :])


@triton.jit
def _quantize_words(x, W: tl.constexpr):
    """fp32 [8 W] -> (int32 words [1, W], scale fp32 (an fp16 value), zero fp32): asymmetric INT4 over the
    head exactly as ``kv_cache.kv_store``; nibble I of word c is element 8c + I."""
    lo = tl.minimum(tl.min(x, 0), 0.0)
    hi = tl.maximum(tl.max(x, 0), 0.0)
    sf = tl.math.div_rn(tl.maximum(hi - lo, 1e-6), 15.0).to(tl.float16).to(tl.float32)
    zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, sf)), 0.0), 15.0)
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, sf)) + zero, 0.0), 15.0).to(tl.int32)
    shift = 4 * (tl.arange(0, 8 * W) % 8)
    w = tl.sum(tl.reshape(q << shift, [W, 8]), 1)  # disjoint nibbles: the sum is their OR
    return w[None, :], sf, zero


@triton.jit
def _newest_state(q, q_sum, kw, ks, kz, vw, vs, vz, qk_scale, BLOCK_N: tl.constexpr, ACC_ROWS: tl.constexpr):
    """The online-softmax state of _words_step after the newest token alone (its p is 1): m_i fp32,
    l_acc / wz_acc fp32 [BLOCK_N] (row 0), acc 8 planes fp32 [ACC_ROWS, W] (row 0). kw, vw: int32 words
    [1, W]; ks, kz, vs, vz fp32 scalars."""
    f = _nibble_planes(kw)
    qk = (f[0] * q[0] + f[1] * q[1] + f[2] * q[2] + f[3] * q[3]
          + f[4] * q[4] + f[5] * q[5] + f[6] * q[6] + f[7] * q[7])
    m_i = (tl.sum(tl.sum(qk, 1), 0) * 274877906944.0 - kz * q_sum) * (ks * qk_scale)  # 2**38, as _words_step
    first = tl.arange(0, BLOCK_N) == 0
    l_acc = tl.where(first, 1.0, 0.0)
    wz_acc = tl.where(first, vs * vz, 0.0)
    g = _nibble_planes(vw)
    pc = vs * 1.2676506002282294e30  # p * s_v * 2**100
    row0 = (tl.arange(0, ACC_ROWS) == 0)[:, None]
    acc = (tl.where(row0, pc * g[0], 0.0), tl.where(row0, pc * g[1], 0.0), tl.where(row0, pc * g[2], 0.0),
           tl.where(row0, pc * g[3], 0.0), tl.where(row0, pc * g[4], 0.0), tl.where(row0, pc * g[5], 0.0),
           tl.where(row0, pc * g[6], 0.0), tl.where(row0, pc * g[7], 0.0))
    return m_i, l_acc, wz_acc, acc


@triton.jit
def _rope_store_decode_kernel(
    Q, KN, VN, COS, SIN, SLOT, K, V, KS, KZ, VS, VZ, BT, SEQ, O, PO, PL, LOCK, qk_scale, tokens_per_split,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cb,
    stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms, stride_bt,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    W: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, ACC_ROWS: tl.constexpr,
    INTERPRET: tl.constexpr, FUSED_MERGE: tl.constexpr, ADAPT: tl.constexpr, PRE: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Program (sequence b, head h, split s); module docstring. Pages: int32 words as in the words kernel.
    PRE: the first tile of older tokens loads before the wait for the q/k/v GEMM."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    start, end = _split_range(SEQ, b, s, tokens_per_split, BLOCK_N, ADAPT)  # staged before the step
    newest = tl.load(SEQ + b) - 1
    old_end = tl.minimum(end, newest)  # pages hold tokens < newest; the newest comes from registers
    slot = tl.load(SLOT + b)  # < 0: a padding row, nothing stored
    has_new = (start <= newest) & (newest < end) & (slot >= 0)
    bt = BT + b * stride_bt
    args = (K, V, KS, KZ, VS, VZ, bt, h, stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms)
    if not INTERPRET and PRE:  # the first tile in flight from the start (the interpreter's loop loads its own)
        tile = _words_load(start, old_end, *args, W, PAGE, BLOCK_N)
    gdc_enter(USE_GDC)
    if not INTERPRET and not PRE:
        tile = _words_load(start, old_end, *args, W, PAGE, BLOCK_N)
    cs = COS + b * stride_cb
    sn = SIN + b * stride_cb
    qr = _rope_row(Q + b * stride_qb + h * stride_qh, cs, sn, 8 * W)  # [D]
    q_sum = tl.sum(qr, 0)
    qp = _to_planes(qr, W)
    # 2**(111 - 4P) for P = NIBBLE_POS (decode_attention._words_step's scaled query planes)
    q = (qp[0] * 2.596148429267414e33, qp[1] * 1.6225927682921336e32, qp[2] * 1.0141204801825835e31,
         qp[3] * 6.338253001141147e29, qp[4] * 3.961408125713217e28, qp[5] * 1.0141204801825835e31,
         qp[6] * 6.338253001141147e29, qp[7] * 3.961408125713217e28)
    if has_new:
        kw, ks, kz = _quantize_words(_rope_row(KN + b * stride_knb + h * stride_knh, cs, sn, 8 * W), W)
        vw, vs, vz = _quantize_words(tl.load(VN + b * stride_vnb + h * stride_vnh + tl.arange(0, 8 * W)).to(tl.float32), W)
        pos = slot.to(tl.int64)
        blk = pos // PAGE
        off = pos % PAGE
        wo = blk * stride_kb + h * stride_kh + off * stride_ks + tl.arange(0, W)[None, :]
        tl.store(K + wo, kw)
        tl.store(V + wo, vw)
        mo = blk * stride_mb + h * stride_mh + off * stride_ms
        tl.store(KS + mo, ks.to(tl.float16))
        tl.store(KZ + mo, kz.to(tl.uint8))
        tl.store(VS + mo, vs.to(tl.float16))
        tl.store(VZ + mo, vz.to(tl.uint8))
        m_i, l_acc, wz_acc, acc = _newest_state(q, q_sum, kw, ks, kz, vw, vs, vz, qk_scale, BLOCK_N, ACC_ROWS)
    else:
        m_i = tl.max(tl.full([1], float("-inf"), tl.float32), 0)
        l_acc = tl.zeros([BLOCK_N], tl.float32)
        wz_acc = tl.zeros([BLOCK_N], tl.float32)
        z = tl.zeros([ACC_ROWS, W], tl.float32)
        acc = (z, z, z, z, z, z, z, z)
    if INTERPRET:  # the interpreter cannot run a for loop with tensor bounds
        n0 = start
        while n0 < old_end:
            tile = _words_load(n0, old_end, *args, W, PAGE, BLOCK_N)
            m_i, l_acc, wz_acc, acc = _words_step(tile, q, q_sum, m_i, l_acc, wz_acc, acc, qk_scale)
            n0 += BLOCK_N
    else:  # the next tile loads while this one is computed
        for n0 in range(start, old_end, BLOCK_N):
            nxt = _words_load(n0 + BLOCK_N, old_end, *args, W, PAGE, BLOCK_N)
            m_i, l_acc, wz_acc, acc = _words_step(tile, q, q_sum, m_i, l_acc, wz_acc, acc, qk_scale)
            tile = nxt
    # out_d = (sum_t w_t v_td - sum_t w_t z_t) / sum_t p_t; plane I carries 2**(4P - 49) (words kernel)
    wz = tl.sum(wz_acc, 0)
    o = (_slot_sum(acc[0], 562949953421312.0) - wz, _slot_sum(acc[1], 35184372088832.0) - wz,
         _slot_sum(acc[2], 2199023255552.0) - wz, _slot_sum(acc[3], 137438953472.0) - wz,
         _slot_sum(acc[4], 8589934592.0) - wz, _slot_sum(acc[5], 2199023255552.0) - wz,
         _slot_sum(acc[6], 137438953472.0) - wz, _slot_sum(acc[7], 8589934592.0) - wz)
    o = tl.join(tl.join(tl.join(o[0], o[4]), tl.join(o[2], o[6])),
                tl.join(tl.join(o[1], o[5]), tl.join(o[3], o[7])))
    o = tl.reshape(o, [1, 8 * W])
    one = tl.arange(0, 1)
    _epilogue(O, PO, PL, b, s, h + one, one == 0, tl.arange(0, 8 * W), o, tl.zeros([1], tl.float32) + m_i,
              tl.zeros([1], tl.float32) + tl.sum(l_acc, 0), stride_ob, stride_oh, stride_pb, stride_ph,
              stride_ps, stride_lb, stride_lh, SPLIT)
    if SPLIT and FUSED_MERGE:
        _merge_if_last(O, PO, PL, LOCK, b, h + one, one == 0, stride_ob, stride_oh, stride_pb, stride_ph,
                       stride_ps, stride_lb, stride_lh, 8 * W)


def rope_store_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache,
    slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
    out: torch.Tensor | None = None, plan: DecodePlan | None = None,
) -> torch.Tensor:
    """RoPE, the KV-cache write and decode attention of one new token per sequence, in one kernel.

    q, k, v: fp16/bf16 [B, H, D] before RoPE (views of the q/k/v GEMM output are fine; last dim contiguous;
    not modified); cos, sin: fp32 [B, D] (halves repeated, model/args.rope_cos_sin); cache: an int4
    PagedKVCache with H kv heads; slot_mapping: int32 [B], the new token's slot (-1: a padding row, nothing
    stored); block_table: int32 [B, max_blocks]; seq_lens: int32 [B], tokens attended including the new one.
    The new k (after RoPE) and v are written into their slots; returns out [B, H, D] in q's dtype.
    No host sync; with a plan (plan_decode) CUDA-graph safe. Twin: ref.rope_store_decode_attention_ref.
    """
    reason = unsupported_reason(cache, q.shape[1] if q.dim() == 3 else -1)
    if reason is not None:
        raise ValueError(f"rope_store_decode_attention {reason}")
    _check_new_kv(cache, k, v, slot_mapping)
    bsz, h, d = q.shape
    if q.shape != k.shape or q.dtype not in (torch.float16, torch.bfloat16) or q.stride(2) != 1:
        raise ValueError(f"q must be fp16/bf16 [B, H, D] like k {tuple(k.shape)}, last dim contiguous; got "
                         f"{q.dtype} {tuple(q.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (bsz, d) or t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError(f"{name} must be fp32 [{bsz}, {d}] with a contiguous last dim")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != bsz or block_table.stride(1) != 1:
        raise ValueError(f"block_table must be int32 [{bsz}, max_blocks], contiguous in its last dim")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (bsz,):
        raise ValueError(f"seq_lens must be int32 [{bsz}]")
    interpreter_compat()
    if plan is None:
        plan = plan_decode(bsz, h, h, d, block_table.shape[1] * cache.block_size, q.device, kv_mode="int4")
    if (plan.batch, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim, plan.dot) != (bsz, h, h, d, 4):
        raise ValueError("plan was made for another batch shape or kernel")
    out = torch.empty_like(q) if out is None else out
    if bsz == 0:
        return out
    split = plan.num_splits > 1
    po = plan.partial_out if split else out
    pl = plan.partial_lse if split else out
    ps = po.stride() if split else (0, 0, 0, 0)
    ls = pl.stride() if split else (0, 0, 0)
    pdl = launch_options(q.device)
    locks = arrival_counters(q.device, bsz * h) if split and plan.fused_merge else None
    fused = locks is not None  # else (a graph capture without counters) the merge kernel runs after
    sb, sh, ss = cache.data_strides()
    mb, mh, ms = cache.meta_strides()
    _rope_store_decode_kernel[(bsz, h, plan.num_splits)](
        q, k, v, cos, sin, slot_mapping, cache.k.view(torch.int32), cache.v.view(torch.int32), cache.k_scale,
        cache.k_zero, cache.v_scale, cache.v_zero, block_table, seq_lens, out, po, pl, locks if fused else pl,
        sm_scale * 1.4426950408889634, plan.tokens_per_split,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        sb // 4, sh // 4, ss // 4, mb, mh, ms, block_table.stride(0),
        out.stride(0), out.stride(1), ps[0], ps[1], ps[2], ls[0], ls[1],
        W=d // 8, PAGE=cache.block_size, BLOCK_N=plan.block_n, SPLIT=split, ACC_ROWS=plan.acc_rows,
        INTERPRET=interpreting(), FUSED_MERGE=fused, ADAPT=plan.adaptive, PRE=PRELOAD and pdl["USE_GDC"],
        num_warps=plan.num_warps, num_stages=1, **pdl,
    )
    if split and not fused:
        _merge_splits_kernel[(bsz, h)](
            po, pl, out, plan.num_splits, ps[0], ps[1], ps[2], ls[0], ls[1], out.stride(0), out.stride(1),
            D=d, num_warps=4, **pdl,
        )
    return out
