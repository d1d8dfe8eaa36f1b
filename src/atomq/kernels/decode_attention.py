"""Paged decode attention over INT4, FP8 or FP16 pages: one query token per sequence, GQA, split-K.

Work split (flash-decoding): one program per (sequence, kv head, split). A program loads all
``group = Hq // Hkv`` query heads that share its kv head, walks its range of pages in tiles of
``block_n`` tokens with an online softmax in fp32 (base 2), and either writes the normalized output
(one split) or a partial output plus its log-sum-exp, which the last split program of the (sequence,
kv head) to finish merges (words kernel; arrival counters, kernels/counters.py) or a second kernel
merges. The split count comes from ``plan_decode`` (host integers only), so ``run`` never reads device
values.

INT4 arithmetic (exact integers, scales applied once per token):
    score[g, t] = sm_scale * s_k[t] * sum_d q[g, d] * (qk[t, d] - z_k[t])
    out[g, :]   = sum_t p[g, t] * s_v[t] * (qv[t, :] - z_v[t]) / sum_t p[g, t]
``q - z`` is an integer in [-15, 15] (exact in fp16); the low and high nibbles of each byte are kept
as two half-width tiles (even and odd head_dim elements), so no interleave is needed in registers.
Without GQA (one query row) the tensor cores have nothing to share, and the default is a CUDA-core
kernel (``dot=4``, _decode_int4_words_kernel): pages read as int32 words, nibbles turned into exact
floats by one AND each (denormals), products accumulated per token slot and reduced once.
FP8: the per-head scales multiply the scores and the output once.

Layouts: kv_cache.py. Twin: ref.paged_decode_attention_ref.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreter_compat
from .counters import arrival_counters
from .kv_cache import PagedKVCache, interpreting
from .pdl import gdc_enter, launch_options


# --------------------------------------------------------------------------------------------------
# Shared device helpers (also used by prefill_attention.py)
# --------------------------------------------------------------------------------------------------


_UNPACK_ASM = tl.constexpr("""
{
.reg .b32 t0, t1, a0, a1, b0, b1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 a0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 a1, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 b0, t0, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 b1, t1, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 $0, a0, $5;
sub.f16x2 $1, a1, $6;
sub.f16x2 $2, b0, $7;
sub.f16x2 $3, b1, $8;
}
""")


@triton.jit
def unpack_int4_tile(x, z, F16: tl.constexpr, DEQ: tl.constexpr):
    """x uint8 [..] (packed pairs), z fp32 zero points broadcastable to x ([N, 1] or [1, N])
    -> (lo - z, 16 * (hi - z)), exact integers of x's shape.

    F16: return fp16 tiles (tensor-core operands), else fp32. DEQ 0: integer-to-float conversion
    instructions; DEQ 1: exponent trick (OR the nibble into the mantissa of 2**23 or 1024, subtract);
    DEQ 2 (GPU only, F16): the fp16 exponent trick in PTX, 4 bytes at a time (prmt + lop3 + sub.f16x2).
    """
    if DEQ == 0:
        lo = (x & 15).to(tl.float32) - z
        hi = (x & 240).to(tl.float32) - 16.0 * z
        if F16:
            lo = lo.to(tl.float16)
            hi = hi.to(tl.float16)
    elif DEQ == 1 or not F16:
        if F16:
            w = x.to(tl.int16)
            lo = ((w & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            hi = ((w & 240) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            lo = lo - (1024.0 + z).to(tl.float16)
            hi = hi - (1024.0 + 16.0 * z).to(tl.float16)
        else:
            w = x.to(tl.int32)
            lo = ((w & 15) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
            hi = ((w & 240) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + 16.0 * z)
    else:
        zl = tl.broadcast_to((1024.0 + z).to(tl.float16), x.shape)
        zh = tl.broadcast_to((1024.0 + 16.0 * z).to(tl.float16), x.shape)
        lo, hi = tl.inline_asm_elementwise(
            _UNPACK_ASM, "=r,=r,=r,=r,r,r,r,r,r", [x, zl, zh], dtype=(tl.float16, tl.float16), is_pure=True,
            pack=4)
    return lo, hi


@triton.jit
def qk_tile(q, k, DOT: tl.constexpr):
    """q [G, X], k [N, X] -> q @ k^T, fp32 [G, N]. DOT 0: FMA reduction; 1: tl.dot(q, k^T); 2, 3: (k @ q^T)^T."""
    if DOT == 0:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    elif DOT == 1:
        s = tl.dot(q, tl.trans(k))
    else:  # 2, 3: k as the A operand
        s = tl.trans(tl.dot(k, tl.trans(q)))
    return s


@triton.jit
def pv_tile(p, v, DOT: tl.constexpr):
    """p fp32 [G, N], v [N, X] -> p @ v, fp32 [G, X] (same DOT modes as qk_tile; p is rounded to v's dtype)."""
    if DOT == 0:
        o = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    elif DOT == 1:
        o = tl.dot(p.to(v.dtype), v)
    else:
        o = tl.trans(tl.dot(tl.trans(v), tl.trans(p.to(v.dtype))))
    return o


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _split_range(SEQ, b, s, tokens_per_split, BLOCK_N: tl.constexpr, ADAPT: tl.constexpr):
    """Tokens [start, end) of split s for sequence b. ADAPT: the sequence's own length is spread over all
    splits in whole tiles (a short context in a plan sized for a long one still uses every split); else
    tokens_per_split each. The last split takes any remainder."""
    seq_len = tl.load(SEQ + b)
    if ADAPT:
        tokens_per_split = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    if s == tl.num_programs(2) - 1:  # the last split takes any remainder
        end = seq_len
    return start, end


@triton.jit
def _epilogue(O, PO, PL, b, s, qh, gm, dcol, acc, m_i, l_i, stride_ob, stride_oh, stride_pb, stride_ph,
              stride_ps, stride_lb, stride_lh, SPLIT: tl.constexpr):
    """Write acc / l (normalized) to O, or the partial output and log2-sum-exp of split s."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        po = PO + b * stride_pb + qh[:, None] * stride_ph + s * stride_ps + dcol[None, :]
        tl.store(po, o, mask=gm[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(PL + b * stride_lb + qh * stride_lh + s, lse, mask=gm)
    else:
        tl.store(O + b * stride_ob + qh[:, None] * stride_oh + dcol[None, :], o.to(O.dtype.element_ty),
                 mask=gm[:, None])


@triton.jit
def _merge_partials(O, PO, PL, b, qh, gm, n, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                    stride_lb, stride_lh, D: tl.constexpr):
    """O[b, qh] = the n splits' partial outputs of query heads ``qh`` [G] (mask gm) merged by their
    log2-sum-exp weights, in split order with a running maximum (empty splits, lse -inf, weigh 0)."""
    d = tl.arange(0, D)
    m = tl.full(qh.shape, float("-inf"), tl.float32)
    w = tl.zeros(qh.shape, tl.float32)
    acc = tl.zeros([qh.shape[0], D], tl.float32)
    for s in range(0, n):
        lse = tl.load(PL + b * stride_lb + qh * stride_lh + s, mask=gm, other=float("-inf"), cache_modifier=".cg")
        po = tl.load(PO + b * stride_pb + qh[:, None] * stride_ph + s * stride_ps + d[None, :],
                     mask=gm[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        live = m_new > float("-inf")
        a_old = tl.where(live, tl.exp2(m - m_new), 0.0)
        a_new = tl.where(live, tl.exp2(lse - m_new), 0.0)
        acc = acc * a_old[:, None] + po * a_new[:, None]
        w = w * a_old + a_new
        m = m_new
    o = acc / tl.where(w > 0.0, w, 1.0)[:, None]
    tl.store(O + b * stride_ob + qh[:, None] * stride_oh + d[None, :], o.to(O.dtype.element_ty), mask=gm[:, None])


@triton.jit
def _merge_if_last(O, PO, PL, LOCK, b, qh, gm, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                   stride_lb, stride_lh, D: tl.constexpr):
    """Split decode, after this split's _epilogue: the last split program of (b, kv head) to arrive
    (an int32 counter in LOCK per (b, kv head), reset by that program) merges every split's partial
    output of its query heads ``qh`` into O (_merge_partials, as the merge kernel does)."""
    tl.debug_barrier()  # every thread's partial is stored before the release below
    lock = LOCK + b * tl.num_programs(1) + tl.program_id(1)
    n = tl.num_programs(2)
    if tl.atomic_add(lock, 1, sem="acq_rel") == n - 1:
        _merge_partials(O, PO, PL, b, qh, gm, n, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                        stride_lb, stride_lh, D)
        tl.atomic_xchg(lock, 0)


@triton.jit
def _int4_step(n0, end, qe, qo, m_i, l_i, acc_e, acc_o, qk_scale, K, V, KS, KZ, VS, VZ, bt, h,
               stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms,
               D2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, DEQ: tl.constexpr):
    """One tile of BLOCK_N tokens [n0, n0 + BLOCK_N) ∩ [.., end): online-softmax update."""
    d = tl.arange(0, D2)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < end
    page = tl.load(bt + n // PAGE, mask=nm, other=0).to(tl.int64)
    slot = n % PAGE
    kvo = page * stride_kb + h * stride_kh + slot * stride_ks  # [BLOCK_N]
    mo = page * stride_mb + h * stride_mh + slot * stride_ms
    kp = tl.load(K + kvo[:, None] + d[None, :], mask=nm[:, None], other=0)  # uint8 [BLOCK_N, D2]
    kz = tl.load(KZ + mo, mask=nm, other=0).to(tl.float32)
    ks = tl.load(KS + mo, mask=nm, other=0.0).to(tl.float32)
    if DOT != 3:
        vp = tl.load(V + kvo[:, None] + d[None, :], mask=nm[:, None], other=0)
    vz = tl.load(VZ + mo, mask=nm, other=0).to(tl.float32)
    vs = tl.load(VS + mo, mask=nm, other=0.0).to(tl.float32)
    klo, khi = unpack_int4_tile(kp, kz[:, None], DOT > 0, DEQ)
    sc = qk_tile(qe, klo, DOT) + qk_tile(qo, khi, DOT) * 0.0625
    sc = tl.where(nm[None, :], sc * (ks * qk_scale)[None, :], float("-inf"))  # log2 units
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pw = p * vs[None, :]
    if DOT == 3:  # V^T as the A operand of the dot, loaded transposed: no transpose of the big tile
        vpt = tl.load(V + kvo[None, :] + d[:, None], mask=nm[None, :], other=0)  # uint8 [D2, BLOCK_N]
        vlo, vhi = unpack_int4_tile(vpt, vz[None, :], True, DEQ)
        pt = tl.trans(pw.to(tl.float16))  # [BLOCK_N, BLOCK_G]
        acc_e = acc_e * alpha[:, None] + tl.trans(tl.dot(vlo, pt))
        acc_o = acc_o * alpha[:, None] + tl.trans(tl.dot(vhi, pt))
    else:
        vlo, vhi = unpack_int4_tile(vp, vz[:, None], DOT > 0, DEQ)
        acc_e = acc_e * alpha[:, None] + pv_tile(pw, vlo, DOT)
        acc_o = acc_o * alpha[:, None] + pv_tile(pw, vhi, DOT)
    return m_new, l_i, acc_e, acc_o


@triton.jit
def _fp_step(n0, end, q, m_i, l_i, acc, scale, K, V, bt, h, stride_kb, stride_kh, stride_ks,
             D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, FP8: tl.constexpr):
    """fp16 / fp8 twin of _int4_step."""
    d = tl.arange(0, D)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < end
    page = tl.load(bt + n // PAGE, mask=nm, other=0).to(tl.int64)
    kvo = page * stride_kb + h * stride_kh + (n % PAGE) * stride_ks
    k = tl.load(K + kvo[:, None] + d[None, :], mask=nm[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + kvo[:, None] + d[None, :], mask=nm[:, None], other=0.0)
    if FP8:
        k = k.to(tl.float16)
        v = v.to(tl.float16)
    sc = tl.where(nm[None, :], qk_tile(q, k, DOT) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + pv_tile(p, v, DOT)
    return m_new, l_i, acc


@triton.jit
def _decode_int4_kernel(
    Q, K, V, KS, KZ, VS, VZ, BT, SEQ, O, PO, PL, LOCK, qk_scale, tokens_per_split,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms, stride_bt,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D2: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT: tl.constexpr, DEQ: tl.constexpr, INTERPRET: tl.constexpr,
    FUSED_MERGE: tl.constexpr, ADAPT: tl.constexpr, USE_GDC: tl.constexpr,
):
    gdc_enter(USE_GDC)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    start, end = _split_range(SEQ, b, s, tokens_per_split, BLOCK_N, ADAPT)
    g = tl.arange(0, BLOCK_G)
    gm = g < GROUP
    qh = h * GROUP + g
    d = tl.arange(0, D2)
    qp = Q + b * stride_qb + qh[:, None] * stride_qh + 2 * d[None, :]
    qe = tl.load(qp, mask=gm[:, None], other=0.0)  # [BLOCK_G, D2] even head_dim elements
    qo = tl.load(qp + 1, mask=gm[:, None], other=0.0)  # odd elements
    if DOT > 0:
        qe = qe.to(tl.float16)
        qo = qo.to(tl.float16)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_e = tl.zeros([BLOCK_G, D2], tl.float32)
    acc_o = tl.zeros([BLOCK_G, D2], tl.float32)
    bt = BT + b * stride_bt
    if INTERPRET:  # the interpreter cannot run a for loop with tensor bounds
        n0 = start
        while n0 < end:
            m_i, l_i, acc_e, acc_o = _int4_step(n0, end, qe, qo, m_i, l_i, acc_e, acc_o, qk_scale, K, V, KS, KZ, VS, VZ, bt, h,
                                                stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms,
                                                D2, PAGE, BLOCK_N, DOT, DEQ)
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc_e, acc_o = _int4_step(n0, end, qe, qo, m_i, l_i, acc_e, acc_o, qk_scale, K, V, KS, KZ, VS, VZ, bt, h,
                                                stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms,
                                                D2, PAGE, BLOCK_N, DOT, DEQ)
    _epilogue(O, PO, PL, b, s, qh, gm, 2 * d, acc_e, m_i, l_i, stride_ob, stride_oh, stride_pb, stride_ph,
              stride_ps, stride_lb, stride_lh, SPLIT)
    _epilogue(O, PO, PL, b, s, qh, gm, 2 * d + 1, acc_o * 0.0625, m_i, l_i, stride_ob, stride_oh, stride_pb,
              stride_ph, stride_ps, stride_lb, stride_lh, SPLIT)
    if SPLIT and FUSED_MERGE:
        _merge_if_last(O, PO, PL, LOCK, b, qh, gm, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                       stride_lb, stride_lh, 2 * D2)


# Nibble I of an int32 word of int4 pages is head_dim element 8c + I (word c). _nibble_planes turns a
# word into 8 floats with one AND each (planes 5-7 after one shift): the nibble n stays in the
# mantissa with a zero exponent field, i.e. the denormal n * 2**(4P - 149) with P its nibble position
# below: exact, no int-to-float conversion, and FMA takes denormal inputs at full rate (Triton's fp32
# mul/fma are not flush-to-zero). The powers of two are folded into q and into the final output.
NIBBLE_POS = (0, 1, 2, 3, 4, 2, 3, 4)


@triton.jit
def _nibble_planes(w):
    """int32 words [..] -> tuple of 8 fp32 [..]: plane I = n_I * 2**(4 * NIBBLE_POS[I] - 149)."""
    u = w >> 12  # nibbles 5, 6, 7 at positions 2, 3, 4 (bits above 19 are masked off)
    return ((w & 0xF).to(tl.float32, bitcast=True), (w & 0xF0).to(tl.float32, bitcast=True),
            (w & 0xF00).to(tl.float32, bitcast=True), (w & 0xF000).to(tl.float32, bitcast=True),
            (w & 0xF0000).to(tl.float32, bitcast=True), (u & 0xF00).to(tl.float32, bitcast=True),
            (u & 0xF000).to(tl.float32, bitcast=True), (u & 0xF0000).to(tl.float32, bitcast=True))


@triton.jit
def _words_load(n0, end, K, V, KS, KZ, VS, VZ, bt, h, stride_kb, stride_kh, stride_ks, stride_mb, stride_mh,
                stride_ms, W: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens [n0, n0 + BLOCK_N) ∩ [.., end) of one kv head: K and V words int32 [BLOCK_N, W], their zero
    points and scales fp32 [BLOCK_N], and the token mask [BLOCK_N] (nothing is read past ``end``)."""
    c = tl.arange(0, W)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < end
    page = tl.load(bt + n // PAGE, mask=nm, other=0).to(tl.int64)
    slot = n % PAGE
    kvo = page * stride_kb + h * stride_kh + slot * stride_ks  # [BLOCK_N], in int32 words
    mo = page * stride_mb + h * stride_mh + slot * stride_ms
    kw = tl.load(K + kvo[:, None] + c[None, :], mask=nm[:, None], other=0)
    vw = tl.load(V + kvo[:, None] + c[None, :], mask=nm[:, None], other=0)
    kz = tl.load(KZ + mo, mask=nm, other=0).to(tl.float32)
    ks = tl.load(KS + mo, mask=nm, other=0.0).to(tl.float32)
    vz = tl.load(VZ + mo, mask=nm, other=0).to(tl.float32)
    vs = tl.load(VS + mo, mask=nm, other=0.0).to(tl.float32)
    return kw, vw, kz, ks, vz, vs, nm


@triton.jit
def _words_step(tile, q, q_sum, m_i, l_acc, wz_acc, acc, qk_scale):
    """Online-softmax update with one tile from _words_load, for one query head on CUDA cores.

    q: 8 fp32 planes [1, W], plane I pre-scaled by 2**(111 - 4 NIBBLE_POS[I]) so that q'_I * plane_I =
    q_d * k_d * 2**-38 for every plane; q_sum: sum_d q_d. acc: 8 fp32 planes [ACC_ROWS, W] of
    sum_t w_t * 2**100 * plane_I(v_t) per accumulator row (token row r of every tile adds into row
    r % ACC_ROWS); l_acc, wz_acc: fp32 [BLOCK_N] per-row sums of p_t and of w_t z_t (w_t = p_t s_t);
    m_i: fp32 scalar, the reference maximum (log2 units).
    """
    kw, vw, kz, ks, vz, vs, nm = tile
    f = _nibble_planes(kw)
    qk = (f[0] * q[0] + f[1] * q[1] + f[2] * q[2] + f[3] * q[3]
          + f[4] * q[4] + f[5] * q[5] + f[6] * q[6] + f[7] * q[7])
    # s_k * sum_d q_d (k_d - z): the integer part exact up to fp32 sums
    sc = (tl.sum(qk, 1) * 274877906944.0 - kz * q_sum) * (ks * qk_scale)  # [BLOCK_N], log2 units; 2**38
    sc = tl.where(nm, sc, float("-inf"))
    m_tile = tl.max(sc, 0)
    if m_tile > m_i + 8.0:  # rescale only when the max grows by 2**8: p <= 256 in between
        alpha = tl.exp2(m_i - m_tile)
        acc = (acc[0] * alpha, acc[1] * alpha, acc[2] * alpha, acc[3] * alpha,
               acc[4] * alpha, acc[5] * alpha, acc[6] * alpha, acc[7] * alpha)
        l_acc = l_acc * alpha
        wz_acc = wz_acc * alpha
        m_i = m_tile
    p = tl.exp2(sc - m_i)
    l_acc += p
    pw = p * vs
    wz_acc += pw * vz
    g = _nibble_planes(vw)
    pc = (pw * 1.2676506002282294e30)[:, None]  # 2**100: products stay normal floats
    acc = (acc[0] + _fold(pc * g[0], acc[0]), acc[1] + _fold(pc * g[1], acc[1]),
           acc[2] + _fold(pc * g[2], acc[2]), acc[3] + _fold(pc * g[3], acc[3]),
           acc[4] + _fold(pc * g[4], acc[4]), acc[5] + _fold(pc * g[5], acc[5]),
           acc[6] + _fold(pc * g[6], acc[6]), acc[7] + _fold(pc * g[7], acc[7]))
    return m_i, l_acc, wz_acc, acc


@triton.jit
def _fold(x, like):
    """[BLOCK_N, W] -> [R, W] (R = like's rows): row r sums rows r, r + R, ... (in one thread for the
    blocked layout of the page loads, which wraps rows every R = 8 * num_warps)."""
    R: tl.constexpr = like.shape[0]
    if R == x.shape[0]:
        return x
    else:
        return tl.sum(tl.reshape(x, [x.shape[0] // R, R, x.shape[1]]), 0)


@triton.jit
def _slot_sum(a, scale):
    """Accumulator plane [ACC_ROWS, W] -> its column sums times a power of two, [W]."""
    return tl.sum(a, 0) * scale


@triton.jit
def _decode_int4_words_kernel(
    Q, K, V, KS, KZ, VS, VZ, BT, SEQ, O, PO, PL, LOCK, qk_scale, tokens_per_split,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms, stride_bt,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    W: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
    ACC_ROWS: tl.constexpr, INTERPRET: tl.constexpr,
    FUSED_MERGE: tl.constexpr, ADAPT: tl.constexpr, PRELOAD: tl.constexpr, USE_GDC: tl.constexpr,
):
    """INT4 decode for one query head per kv head (no GQA) on CUDA cores, no tensor-core operands.

    K and V pages are read as int32 words (8 nibbles); each nibble becomes an exact float with one AND
    (_nibble_planes), q . k is an FMA chain per token, and p * v is accumulated per token row
    ([ACC_ROWS, D] fp32 in 8 planes; the tile's rows r, r + ACC_ROWS, ... add into row r inside one
    thread) and summed over rows once at the end, so the loop's only cross-thread step is the tile's
    score max. The accumulators are rescaled only when the running max grows by 2**8.

    PRELOAD (with PREFETCH, under programmatic dependent launch): the first tile's pages load before the
    wait for the kernel ahead, which in a decode step writes only each sequence's newest token (the KV
    store); that token is masked out there and its tile loaded again after the wait when it holds it.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    start, end = _split_range(SEQ, b, s, tokens_per_split, BLOCK_N, ADAPT)  # lengths: staged before the step
    bt = BT + b * stride_bt
    args = (K, V, KS, KZ, VS, VZ, bt, h, stride_kb, stride_kh, stride_ks, stride_mb, stride_mh, stride_ms)
    if PRELOAD:  # pages of older tokens only; tl.load(SEQ + b) - 1 is the newest token's position
        old_end = tl.minimum(end, tl.load(SEQ + b) - 1)
        tile = _words_load(start, old_end, *args, W, PAGE, BLOCK_N)
    gdc_enter(USE_GDC)
    c = tl.arange(0, W)
    qp = Q + b * stride_qb + h * stride_qh + 8 * c[None, :]  # plane I holds elements 8c + I
    q0 = tl.load(qp).to(tl.float32)
    q1 = tl.load(qp + 1).to(tl.float32)
    q2 = tl.load(qp + 2).to(tl.float32)
    q3 = tl.load(qp + 3).to(tl.float32)
    q4 = tl.load(qp + 4).to(tl.float32)
    q5 = tl.load(qp + 5).to(tl.float32)
    q6 = tl.load(qp + 6).to(tl.float32)
    q7 = tl.load(qp + 7).to(tl.float32)
    q_sum = tl.sum(tl.sum(q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7, 1), 0)
    # 2**(111 - 4P) for P = NIBBLE_POS: |q| < 2**16 (fp16/bf16 range of a real q) keeps q' finite
    q = (q0 * 2.596148429267414e33, q1 * 1.6225927682921336e32, q2 * 1.0141204801825835e31,
         q3 * 6.338253001141147e29, q4 * 3.961408125713217e28, q5 * 1.0141204801825835e31,
         q6 * 6.338253001141147e29, q7 * 3.961408125713217e28)
    m_i = float("-inf")
    l_acc = tl.zeros([BLOCK_N], tl.float32)
    wz_acc = tl.zeros([BLOCK_N], tl.float32)
    z = tl.zeros([ACC_ROWS, W], tl.float32)
    acc = (z, z, z, z, z, z, z, z)
    if INTERPRET:  # the interpreter cannot run a for loop with tensor bounds
        n0 = start
        while n0 < end:
            tile = _words_load(n0, end, *args, W, PAGE, BLOCK_N)
            m_i, l_acc, wz_acc, acc = _words_step(tile, q, q_sum, m_i, l_acc, wz_acc, acc, qk_scale)
            n0 += BLOCK_N
    elif PREFETCH:  # registers hold the next tile while this one is computed
        if PRELOAD:
            if old_end < tl.minimum(end, start + BLOCK_N):  # the first tile holds the newest token
                tile = _words_load(start, end, *args, W, PAGE, BLOCK_N)
        else:
            tile = _words_load(start, end, *args, W, PAGE, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            nxt = _words_load(n0 + BLOCK_N, end, *args, W, PAGE, BLOCK_N)
            m_i, l_acc, wz_acc, acc = _words_step(tile, q, q_sum, m_i, l_acc, wz_acc, acc, qk_scale)
            tile = nxt
    else:
        for n0 in range(start, end, BLOCK_N):
            tile = _words_load(n0, end, *args, W, PAGE, BLOCK_N)
            m_i, l_acc, wz_acc, acc = _words_step(tile, q, q_sum, m_i, l_acc, wz_acc, acc, qk_scale)
    # out_d = (sum_t w_t v_td - sum_t w_t z_t) / sum_t p_t; plane I carries 2**(4P - 49)
    wz = tl.sum(wz_acc, 0)
    o = (_slot_sum(acc[0], 562949953421312.0) - wz, _slot_sum(acc[1], 35184372088832.0) - wz,
         _slot_sum(acc[2], 2199023255552.0) - wz, _slot_sum(acc[3], 137438953472.0) - wz,
         _slot_sum(acc[4], 8589934592.0) - wz, _slot_sum(acc[5], 2199023255552.0) - wz,
         _slot_sum(acc[6], 137438953472.0) - wz, _slot_sum(acc[7], 8589934592.0) - wz)
    # join appends a minor axis, so the first join picks bit 2 of I: [W, 2, 2, 2] row-major = element 8c + I
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


@triton.jit
def _decode_fp_kernel(
    Q, K, V, KS, VS, BT, SEQ, O, PO, PL, LOCK, qk_scale, tokens_per_split,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_bt,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
    FUSED_MERGE: tl.constexpr, ADAPT: tl.constexpr, USE_GDC: tl.constexpr,
):
    gdc_enter(USE_GDC)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    start, end = _split_range(SEQ, b, s, tokens_per_split, BLOCK_N, ADAPT)
    g = tl.arange(0, BLOCK_G)
    gm = g < GROUP
    qh = h * GROUP + g
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + qh[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
    if DOT > 0:
        q = q.to(tl.float16)
    scale = qk_scale
    if FP8:
        scale = scale * tl.load(KS + h)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    bt = BT + b * stride_bt
    if INTERPRET:
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _fp_step(n0, end, q, m_i, l_i, acc, scale, K, V, bt, h, stride_kb, stride_kh,
                                     stride_ks, D, PAGE, BLOCK_N, DOT, FP8)
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _fp_step(n0, end, q, m_i, l_i, acc, scale, K, V, bt, h, stride_kb, stride_kh,
                                     stride_ks, D, PAGE, BLOCK_N, DOT, FP8)
    if FP8:
        acc = acc * tl.load(VS + h)
    _epilogue(O, PO, PL, b, s, qh, gm, d, acc, m_i, l_i, stride_ob, stride_oh, stride_pb, stride_ph,
              stride_ps, stride_lb, stride_lh, SPLIT)
    if SPLIT and FUSED_MERGE:
        _merge_if_last(O, PO, PL, LOCK, b, qh, gm, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                       stride_lb, stride_lh, D)


@triton.jit
def _merge_splits_kernel(
    PO, PL, O, num_splits, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    D: tl.constexpr, USE_GDC: tl.constexpr,
):
    gdc_enter(USE_GDC)
    qh = tl.program_id(1) + tl.arange(0, 1)
    _merge_partials(O, PO, PL, tl.program_id(0), qh, qh >= 0, num_splits, stride_ob, stride_oh, stride_pb,
                    stride_ph, stride_ps, stride_lb, stride_lh, D)


# --------------------------------------------------------------------------------------------------
# Plan / run
# --------------------------------------------------------------------------------------------------


# split plans of the words kernel (dot 4): its last split program merges the splits. Measured 2026-11-24
# (7B shapes, max_model_len 4096, PDL on): Atom decode 5% faster at batch 4 and even at batch 1; the FP16
# kernel 1-2% slower that way, so the other kernels keep the merge kernel (fused_merge=True forces it)
FUSED_MERGE = True
# splits sized by each sequence's length at run time (_split_range), not by the plan's max_seq_len
ADAPTIVE_SPLITS = True
# the fewest tokens a split is planned for (plan_decode)
MIN_TOKENS_PER_SPLIT = 256
# tokens per tile of the words kernel (dot 4) when the plan does not name one
WORDS_BLOCK_N = 128
# words kernel under programmatic dependent launch: the first tile of older tokens loads before the wait
PRELOAD_PAGES = True
# warps of the words kernel when its programs (sequences x heads x splits) do not fill the GPU, e.g. batch 1
# with a short planned context (one program per head); 4 otherwise (the batch-64 sweep's best). Measured
# 2026-12-07 in the 7B batch-1 engine (H100): 4 warps 2.398-2.408 ms a step, 8 warps 2.419-2.433, 16 warps
# 2.491-2.498 (BENCHMARKS.md), so 4 here too
WORDS_FEW_PROGRAM_WARPS = 4


@dataclass
class DecodePlan:
    """Launch parameters and workspace for one batch shape (from plan_decode; host values only).

    partial_out: fp32 [B, Hq, num_splits, D] and partial_lse: fp32 [B, Hq, num_splits] (None when
    num_splits == 1). dot: 0 FMA reduction, 1 / 2 tensor-core tl.dot forms (q or K as the A operand),
    3 (int4 only): K and a transposed-loaded V as A operands, 4 (int4, one q head per kv head): the
    CUDA-core words kernel; deq: int4 unpack variant (unpack_int4_tile, dots 0-3); prefetch (dot 4):
    load the next tile into registers while computing this one; acc_rows (dot 4): rows of the per-slot
    accumulators (token rows r, r + acc_rows, ... are summed into row r; the default, 8 * num_warps, is
    where the page loads' layout wraps, so the fold stays within a thread); fused_merge (num_splits > 1):
    the last split program of each (sequence, kv head) merges the partials (no merge kernel);
    adaptive: each sequence's tokens are spread over all splits at run time (else tokens_per_split each).
    """

    batch: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    num_splits: int
    tokens_per_split: int
    block_n: int
    num_warps: int
    num_stages: int
    dot: int
    deq: int
    prefetch: bool
    acc_rows: int
    partial_out: torch.Tensor | None
    partial_lse: torch.Tensor | None
    fused_merge: bool = True
    adaptive: bool = True


def plan_decode(
    batch: int, num_qo_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int, device="cuda",
    *, kv_mode: str = "int4", num_sms: int | None = None, num_splits: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    dot: int | None = None, deq: int = 1, prefetch: bool = True, acc_rows: int | None = None,
    min_tokens_per_split: int | None = None, fused_merge: bool | None = None, adaptive: bool | None = None,
) -> DecodePlan:
    """Choose the split count and tile sizes; allocate the split workspace.

    max_seq_len only balances the work: a longer sequence is still handled (its last split takes the
    remainder). Splits are added until batch * kv_heads * splits fills about two waves of the GPU.
    Defaults are the fastest variants of the H100 sweep at batch 64 x 4096 (docs/KERNELS.md):
    int4 with GQA: K as the A operand of the dot (dot 2), exponent-trick unpack (deq 1), 64-token tiles,
    2 pipeline stages; int4 with one q head per kv head: the words kernel (dot 4) with prefetch, 128-token
    tiles; fp16 / fp8: dot 1, 64-token tiles, 3 stages; 4 warps.
    """
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads {num_qo_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_qo_heads // num_kv_heads
    int4 = kv_mode == "int4"
    if dot is None:
        dot = (4 if group == 1 else 2) if int4 else 1
    if num_stages is None:
        num_stages = 2 if int4 and group > 1 else 3
    if block_n is None:
        block_n = WORDS_BLOCK_N if dot == 4 else 64 if dot else 32
    if num_sms is None:
        dev = torch.device(device)
        num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    if num_splits is None:
        min_tokens_per_split = MIN_TOKENS_PER_SPLIT if min_tokens_per_split is None else min_tokens_per_split
        base = max(batch * num_kv_heads, 1)
        num_splits = max(1, min(-(-2 * num_sms // base), -(-max_seq_len // min_tokens_per_split)))
    tokens = -(-max(max_seq_len, 1) // num_splits)
    tokens = -(-tokens // block_n) * block_n
    num_splits = max(1, -(-max(max_seq_len, 1) // tokens))
    po = pl = None
    if num_splits > 1:
        po = torch.empty(batch, num_qo_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        pl = torch.empty(batch, num_qo_heads, num_splits, dtype=torch.float32, device=device)
    if num_warps is None:
        few = dot == 4 and batch * num_kv_heads * num_splits < num_sms
        num_warps = WORDS_FEW_PROGRAM_WARPS if few else 4
    if acc_rows is None:
        acc_rows = min(block_n, 8 * num_warps)
    if block_n % acc_rows:
        raise ValueError(f"acc_rows {acc_rows} must divide block_n {block_n}")
    fused_merge = FUSED_MERGE and dot == 4 if fused_merge is None else fused_merge
    adaptive = ADAPTIVE_SPLITS if adaptive is None else adaptive
    return DecodePlan(batch, num_qo_heads, num_kv_heads, head_dim, num_splits, tokens, block_n,
                      num_warps, num_stages, dot, deq, prefetch, acc_rows, po, pl, fused_merge, adaptive)


def _check(q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q must be [B, Hq, {cache.head_dim}] with Hq a multiple of {cache.num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or q.stride(2) != 1:
        raise ValueError(f"q must be fp16/bf16 with a contiguous last dim, got {q.dtype} {q.stride()}")
    b = q.shape[0]
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be int32 [{b}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table must be contiguous in its last dim")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (b,):
        raise ValueError(f"seq_lens must be int32 [{b}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")


def paged_decode_attention(
    q: torch.Tensor, cache: PagedKVCache, block_table: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
    out: torch.Tensor | None = None, plan: DecodePlan | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its pages.

    q: fp16/bf16 [B, Hq, D] (Hq = group * Hkv; q head i reads kv head i // group); cache: PagedKVCache
    (int4 / fp8 / fp16); block_table: int32 [B, max_blocks]; seq_lens: int32 [B], tokens to attend
    (<= max_blocks * block_size; 0 gives zeros); sm_scale: softmax scale (usually D ** -0.5).
    Returns out [B, Hq, D] of q's dtype. With a plan (plan_decode) the call allocates nothing beyond
    ``out`` (none when ``out`` is given) and never synchronizes: CUDA-graph safe.
    Twin: ref.paged_decode_attention_ref.
    """
    _check(q, cache, block_table, seq_lens)
    interpreter_compat()  # the split merge loops over a program count
    bsz, hq, d = q.shape
    hkv = cache.num_kv_heads
    if plan is None:
        plan = plan_decode(bsz, hq, hkv, d, block_table.shape[1] * cache.block_size, q.device, kv_mode=cache.mode)
    if (plan.batch, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim) != (bsz, hq, hkv, d):
        raise ValueError("plan was made for another batch shape")
    if plan.dot == 4 and (cache.mode != "int4" or hq != hkv):
        raise ValueError("dot=4 (CUDA-core INT4 path) needs int4 pages and one query head per kv head")
    if plan.deq == 2 and interpreting():
        raise ValueError("deq=2 (PTX unpack) needs a GPU; use deq=1 under TRITON_INTERPRET=1")
    out = torch.empty_like(q) if out is None else out
    group = hq // hkv
    block_g = max(16, triton.next_power_of_2(group)) if plan.dot else triton.next_power_of_2(group)
    split = plan.num_splits > 1
    po = plan.partial_out if split else out
    pl = plan.partial_lse if split else out
    ps = po.stride() if split else (0, 0, 0, 0)
    ls = pl.stride() if split else (0, 0, 0)
    grid = (bsz, hkv, plan.num_splits)
    qk_scale = sm_scale * math.log2(math.e)
    sb, sh, ss = cache.data_strides()
    pdl = launch_options(q.device)
    locks = arrival_counters(q.device, bsz * hkv) if split and plan.fused_merge else None
    fused = locks is not None  # else (a graph capture without counters) the merge kernel runs after
    lock = locks if fused else pl
    common = dict(GROUP=group, BLOCK_G=block_g, PAGE=cache.block_size, BLOCK_N=plan.block_n, SPLIT=split,
                  DOT=plan.dot, INTERPRET=interpreting(), FUSED_MERGE=fused, ADAPT=plan.adaptive,
                  num_warps=plan.num_warps, num_stages=plan.num_stages, **pdl)
    if cache.mode == "int4" and plan.dot == 4:
        mb, mh, ms = cache.meta_strides()
        _decode_int4_words_kernel[grid](
            q, cache.k.view(torch.int32), cache.v.view(torch.int32), cache.k_scale, cache.k_zero,
            cache.v_scale, cache.v_zero, block_table, seq_lens, out, po, pl, lock, qk_scale, plan.tokens_per_split,
            q.stride(0), q.stride(1), sb // 4, sh // 4, ss // 4, mb, mh, ms, block_table.stride(0),
            out.stride(0), out.stride(1), ps[0], ps[1], ps[2], ls[0], ls[1],
            W=d // 8, PAGE=cache.block_size, BLOCK_N=plan.block_n, SPLIT=split, PREFETCH=plan.prefetch,
            ACC_ROWS=plan.acc_rows, INTERPRET=interpreting(), FUSED_MERGE=fused, ADAPT=plan.adaptive,
            PRELOAD=PRELOAD_PAGES and plan.prefetch and pdl["USE_GDC"] and not interpreting(),
            num_warps=plan.num_warps, num_stages=plan.num_stages, **pdl,
        )
    elif cache.mode == "int4":
        mb, mh, ms = cache.meta_strides()
        _decode_int4_kernel[grid](
            q, cache.k, cache.v, cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero, block_table, seq_lens,
            out, po, pl, lock, qk_scale, plan.tokens_per_split,
            q.stride(0), q.stride(1), sb, sh, ss, mb, mh, ms, block_table.stride(0),
            out.stride(0), out.stride(1), ps[0], ps[1], ps[2], ls[0], ls[1],
            D2=d // 2, DEQ=plan.deq, **common,
        )
    else:
        fp8 = cache.mode == "fp8"
        _decode_fp_kernel[grid](
            q, cache.k, cache.v, cache.k_scale if fp8 else q, cache.v_scale if fp8 else q, block_table, seq_lens,
            out, po, pl, lock, qk_scale, plan.tokens_per_split,
            q.stride(0), q.stride(1), sb, sh, ss, block_table.stride(0),
            out.stride(0), out.stride(1), ps[0], ps[1], ps[2], ls[0], ls[1],
            D=d, FP8=fp8, **common,
        )
    if split and not fused:
        _merge_splits_kernel[(bsz, hq)](
            po, pl, out, plan.num_splits, ps[0], ps[1], ps[2], ls[0], ls[1], out.stride(0), out.stride(1),
            D=d, num_warps=4, **pdl,
        )
    return out
