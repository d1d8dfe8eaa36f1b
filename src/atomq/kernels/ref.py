"""Plain-PyTorch reference ops: the test oracle, the CPU fallback and the fake-quant accuracy path.

Every Triton kernel in this package has a twin here with the same signature. Integer outputs of a
kernel must equal its twin's exactly; float outputs agree within docs/NUMERICS.md's tolerances.

Activation layout ("ActQ"): for an input of K channels split as ``Split(k, n_outliers, group_size)``
(normal channels first, outliers last, see quant/layout.py):
    q4:  uint8 [M, Kn // 2]   INT4 normal part, packed (quant/pack.py nibble order); with 8-bit
                              activations (W4A8 on the same GEMM) int8 [M, Kn], one value per byte
    s4:  fp16  [M, G]         one scale per token and group
    q8:  int8  [M, n_out]     INT8 outlier part (absent when n_out == 0)
    s8:  fp16  [M, 1]         one scale per token
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..quant import PackedWeight, Split, pack_int4, quantize_mixed, unpack_int4
from ..quant.intq import asym_params, quantize_asym, quantize_levels
from ..quant.mixed import quantize_outliers

# --------------------------------------------------------------------------------------------------
# Norms and activation quantization
# --------------------------------------------------------------------------------------------------


class ActQ(NamedTuple):
    """A quantized activation matrix (layout in the module docstring)."""

    q4: torch.Tensor
    s4: torch.Tensor
    q8: torch.Tensor | None
    s8: torch.Tensor | None


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with optional residual add, computed in fp32.

    x, residual: [M, K] (any float dtype; with a residual, x is rounded to its dtype first: x may be a
    GEMM's fp32 accumulator); weight: [K]. Returns (normed [M, K] in x's dtype (residual's when given),
    new residual [M, K] = x + residual, or x when residual is None).
    """
    if residual is not None:
        x = (x.to(residual.dtype).float() + residual.float()).to(residual.dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), x


def quantize_act(
    x: torch.Tensor, index: torch.Tensor | None, split: Split, bits: int = 4, clip: float = 0.9,
    levels: int | None = None,
) -> ActQ:
    """Gather x [M, K] by ``index`` (int32 [K], or None) and quantize to the ActQ layout (bits 4, or 8:
    the normal part unpacked int8). ``levels`` (4 bits, groups): group scales are integer multiples
    (1..levels) of one unit per token; q4 then holds q * multiplier unpacked (int8, |v| <= 8 * levels) and
    every group of s4 the token's unit (quant.intq.quantize_levels)."""
    if bits not in (4, 8):
        raise ValueError(f"activations are quantized to 4 or 8 bits, got {bits}")
    if index is not None:
        x = x.index_select(-1, index.long())
    if levels is not None:
        if bits != 4 or split.group_size is None:
            raise ValueError("integer-multiplier activation scales need 4-bit groups")
        qm, unit = quantize_levels(x[..., : split.k_normal], bits, split.group_size, clip, levels)
        qo = quantize_outliers(x, split)
        s4 = unit.expand(*unit.shape[:-1], split.n_groups).contiguous()
        return ActQ(qm, s4, qo.q if qo else None, qo.scale if qo else None)
    qn, qo = quantize_mixed(x, split, bits, clip)
    return ActQ(pack_int4(qn.q) if bits == 4 else qn.q, qn.scale, qo.q if qo else None, qo.scale if qo else None)


def rmsnorm_quantize(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    index: torch.Tensor | None, split: Split, bits: int = 4, clip: float = 0.9, weight_gathered: bool = False,
    levels: int | None = None,
) -> tuple[ActQ, torch.Tensor]:
    """Fused (residual add +) RMSNorm + reorder gather + quantization. Returns (ActQ, new residual).

    weight_gathered: ``weight`` is given in output order (weight[index]), as the serving path keeps it."""
    if weight_gathered and index is not None:
        weight = torch.empty_like(weight).index_copy_(0, index.long(), weight)  # back to input order
    y, res = rmsnorm(x, weight, eps, residual)
    return quantize_act(y, index, split, bits, clip, levels), res


def silu_mul_quantize(gate_up: torch.Tensor, split: Split, bits: int = 4, clip: float = 0.9,
                      levels: int | None = None, dtype: torch.dtype | None = None) -> ActQ:
    """gate_up [M, 2 * I] (gate first, then up) -> quantized SiLU(gate) * up (down_proj input); gate_up is
    rounded to ``dtype`` first (default its own)."""
    gate_up = gate_up if dtype is None else gate_up.to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    h = (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
    return quantize_act(h, None, split, bits, clip, levels)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2 * I] (gate first, then up) -> SiLU(gate) * up [M, I], fp32 math, gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate_up.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place by RoPE (rotate-half convention); cos, sin fp32 [T, D]. Returns x.

    x is usually the q and k heads of a merged q/k/v output, viewed together (last dim contiguous)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    x.copy_(xf * cos[:, None, :] + rot * sin[:, None, :])
    return x


# --------------------------------------------------------------------------------------------------
# W4A4 GEMM
# --------------------------------------------------------------------------------------------------


def w4a4_gemm(
    a: ActQ, w: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Atom's mixed GEMM with exact integer group dot products (ATOM.md section 3).

    a: ActQ of M tokens (4-bit packed or 8-bit normal part); w: PackedWeight of N rows (4-bit symmetric,
    same split as a); bias: [N] or None.
    Returns [M, N] of out_dtype: sum_g s4a[m,g] * s4w[n,g] * dot(qa[m,g], qw[n,g])
    + s8a[m] * s8w[n] * dot(qa_o[m], qw_o[n]) (+ bias), accumulated in fp32.
    """
    qa = (unpack_int4(a.q4) if a.q4.dtype == torch.uint8 else a.q4).to(torch.int32)  # [M, Kn]
    qw = unpack_int4(w.qweight).to(torch.int32)  # [N, Kn]
    m, kn = qa.shape
    n, g = qw.shape[0], a.s4.shape[1]
    gs = kn // g
    # [G, M, gs] @ [G, gs, N] -> exact in float64 [G, M, N] (|dot| <= gs * 1024)
    dots = torch.bmm(qa.view(m, g, gs).transpose(0, 1).double(), qw.view(n, g, gs).permute(1, 2, 0).double())
    out = (dots * a.s4.double().t().unsqueeze(-1) * w.scales.double().t().unsqueeze(1)).sum(0)
    if a.q8 is not None:
        dot8 = a.q8.double() @ w.qweight_outlier.double().t()  # exact in float64
        out = out + dot8 * a.s8.double() * w.scales_outlier.double().t()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------------
# KV cache quantization
# --------------------------------------------------------------------------------------------------


def kv_quantize(x: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per (token, head) quantization over head_dim, no clipping.

    x: [T, H, D] float. Returns (q uint8 [T, H, D // 2] packed when bits == 4 else uint8 [T, H, D],
    scale fp16 [T, H], zero uint8 [T, H]).
    """
    scale, zero = asym_params(x, bits, None)  # [T, H, 1]
    q = quantize_asym(x, bits, None, params=(scale, zero)).q
    if bits == 4:
        q = pack_int4(q)
    return q, scale.squeeze(-1), zero.squeeze(-1)


def kv_dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4, dtype=torch.float16
) -> torch.Tensor:
    """Inverse of kv_quantize: -> [T, H, D] of dtype."""
    if bits == 4:
        q = unpack_int4(q, signed=False)
    return ((q.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).to(dtype)


def hadamard_matrix(n: int, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [n, n] (n a power of two): H @ H.T = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard transform needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def rotate_heads(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ h [D, D] in fp32, returned in x's dtype (per-head rotation of queries and keys)."""
    return (x.float() @ h.float()).to(x.dtype)


def fake_quant_kv(x: torch.Tensor, bits: int = 4, group: int | None = None) -> torch.Tensor:
    """Quantize-dequantize keys or values x [..., T, H, D] per (token, head); same dtype and shape.
    ``group`` (dividing D) quantizes per (token, head, group of channels) instead: a finer scale that the
    paged cache and its kernels do not store (accuracy studies only)."""
    g = group or x.shape[-1]
    if g <= 0 or x.shape[-1] % g:
        raise ValueError(f"a KV group of {g} does not divide head_dim {x.shape[-1]}")
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1] // g, g)
    return kv_dequantize(*kv_quantize(flat, bits), bits=bits, dtype=x.dtype).reshape(x.shape)



def fake_quant_kv_per_channel(x: torch.Tensor, bits: int = 4, tokens: int = 16) -> torch.Tensor:
    """Quantize-dequantize keys x [B, T, H, D] with one scale and zero per (block of ``tokens``
    consecutive tokens, head, channel) rather than per (token, head): per-channel key scales over a
    cache page (as KIVI does). The paged cache does not store this (accuracy studies only). A last
    partial block is padded with copies of the last token, which leaves its minimum and maximum as they are."""
    if tokens <= 0 or tokens % 2:
        raise ValueError(f"a key block of {tokens} tokens must be positive and even (two per packed byte)")
    b, t, h, d = x.shape
    pad = -t % tokens
    xp = torch.cat([x, x[:, -1:].expand(b, pad, h, d)], dim=1) if pad else x
    blocks = xp.reshape(b, -1, tokens, h, d).permute(0, 1, 3, 4, 2)  # [B, T/n, H, D, n]
    y = kv_dequantize(*kv_quantize(blocks.reshape(-1, d, tokens), bits), bits=bits, dtype=x.dtype)
    return y.reshape(blocks.shape).permute(0, 1, 4, 2, 3).reshape(b, -1, h, d)[:, :t]

# --------------------------------------------------------------------------------------------------
# Paged KV cache and attention
# --------------------------------------------------------------------------------------------------
# Twins of kernels/kv_cache.py, decode_attention.py and prefill_attention.py. ``cache`` is any object
# with the attributes of kv_cache.PagedKVCache (mode, layout, block_size, k, v, k_scale, v_scale,
# k_zero, v_zero); it is not imported here so that this file needs no Triton. Layouts: kv_cache.py.


def _hnd(x: torch.Tensor | None, layout: str) -> torch.Tensor | None:
    """View a pool or per-slot tensor in head-major order [blocks, H, block_size, ...]."""
    return x if x is None or layout == "HND" else x.transpose(1, 2)


def kv_store_ref(cache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 k_center: torch.Tensor | None = None) -> None:
    """Write k, v [T, H, D] into their slots (int32 [T], -1 = skip): int4 via kv_quantize, fp8 with
    the per-head scale (clamp to +-448, round to nearest even), fp16 as is; keys less k_center fp32
    [H, D] when given (in fp32). In place."""
    if k_center is not None:
        k = k.float() - k_center
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // cache.block_size, slots % cache.block_size
    for x, pool, scale, zero in ((k, cache.k, cache.k_scale, cache.k_zero),
                                 (v, cache.v, cache.v_scale, cache.v_zero)):
        x = x[keep]  # [n, H, D]
        pool_h = _hnd(pool, cache.layout)  # [blocks, H, bs, X]
        if cache.mode == "int4":
            q, s, z = kv_quantize(x, 4)
            pool_h[blk, :, off] = q
            _hnd(scale, cache.layout)[blk, :, off] = s
            _hnd(zero, cache.layout)[blk, :, off] = z
        elif cache.mode == "fp8":
            y = (x.float() / scale.float()[:, None]).clamp(-448.0, 448.0)
            pool_h[blk, :, off] = y.to(pool.dtype)
        else:
            pool_h[blk, :, off] = x.to(pool.dtype)


def paged_kv_gather(cache, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the first ``length`` tokens of one sequence (block_row: int [max_blocks]) ->
    (k, v) fp32 [length, H, D]."""
    nb = -(-length // cache.block_size)
    ids = block_row[:nb].long()
    out = []
    for pool, scale, zero in ((cache.k, cache.k_scale, cache.k_zero), (cache.v, cache.v_scale, cache.v_zero)):
        p = _hnd(pool, cache.layout)[ids]  # [nb, H, bs, X]
        h = p.shape[1]
        p = p.permute(0, 2, 1, 3).reshape(nb * cache.block_size, h, p.shape[-1])[:length]  # [L, H, X]
        if cache.mode == "int4":
            s = _hnd(scale, cache.layout)[ids].permute(0, 2, 1).reshape(-1, h)[:length]  # [L, H]
            z = _hnd(zero, cache.layout)[ids].permute(0, 2, 1).reshape(-1, h)[:length]
            x = kv_dequantize(p, s, z, 4, torch.float32)
        elif cache.mode == "fp8":
            x = p.float() * scale.float()[:, None]
        else:
            x = p.float()
        out.append(x)
    return out[0], out[1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, causal_offset: int | None):
    """q [M, Hq, D], k/v [L, Hkv, D] fp32 -> [M, Hq, D] fp32; query i sees keys j <= causal_offset + i."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,lhd->hml", q.float(), k) * sm_scale  # [Hq, M, L]
    if causal_offset is not None:
        i = torch.arange(q.shape[0], device=q.device)[:, None]
        j = torch.arange(k.shape[0], device=q.device)[None, :]
        s = s.masked_fill(j > causal_offset + i, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hml,lhd->mhd", p, v)


def paged_decode_attention_ref(
    q: torch.Tensor, cache, block_table: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
    out: torch.Tensor | None = None, plan=None,
) -> torch.Tensor:
    """One query token per sequence over its paged K/V (GQA: q head i reads kv head i // group).

    q: fp16 [B, Hq, D]; block_table: int32 [B, max_blocks]; seq_lens: int32 [B] (0 -> zeros).
    Returns out fp16 [B, Hq, D] (written into ``out`` when given). ``plan`` is ignored.
    """
    out = torch.empty_like(q) if out is None else out
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        if n == 0:
            out[b] = 0
            continue
        k, v = paged_kv_gather(cache, block_table[b], n)
        out[b] = _attend(q[b : b + 1], k, v, sm_scale, None)[0].to(out.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor, cache, cu_seqlens_q: torch.Tensor, cached_lens: torch.Tensor, block_table: torch.Tensor,
    sm_scale: float, out: torch.Tensor | None = None, plan=None,
) -> torch.Tensor:
    """Causal attention of new tokens over the cache, which already holds them (store first).

    q: fp16 [T, Hq, D], ragged: sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32 [B+1]);
    cached_lens: int32 [B], tokens that were in the cache before these; the new token i of sequence b
    sits at position cached_lens[b] + i and sees positions <= its own. Returns fp16 [T, Hq, D].
    """
    out = torch.empty_like(q) if out is None else out
    for b in range(cached_lens.shape[0]):
        s, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if e == s:
            continue
        c = int(cached_lens[b])
        k, v = paged_kv_gather(cache, block_table[b], c + e - s)
        out[s:e] = _attend(q[s:e], k, v, sm_scale, c).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Online rotation (randomized Hadamard-based orthogonal transform of any size)
# --------------------------------------------------------------------------------------------------
# Twin of kernels/hadamard.py. A size n = m * p (p the largest power of two dividing n, m odd) is
# rotated by R = diag(signs) @ kron(small, H_p / sqrt(p)): random signs, a Walsh-Hadamard transform
# over each of the m blocks of p channels, then an m x m orthogonal mix across the blocks.


def hadamard_split(n: int) -> tuple[int, int]:
    """n -> (m, p) with p the largest power of two dividing n and m = n // p (odd)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a rotation size must be a positive integer, got {n!r}")
    p = n & -n
    return n // p, p


_HADAMARD_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _hadamard_on(p: int, device: torch.device) -> torch.Tensor:
    """hadamard_matrix(p) in fp32 on ``device``, built once per (size, device) (read-only use)."""
    key = (p, torch.device(device))
    if key not in _HADAMARD_CACHE:
        _HADAMARD_CACHE[key] = hadamard_matrix(p).to(device)
    return _HADAMARD_CACHE[key]


def _check_rotation_factors(n: int, signs: torch.Tensor, small: torch.Tensor) -> tuple[int, int]:
    m, p = hadamard_split(n)
    if signs.shape != (n,):
        raise ValueError(f"signs must be [{n}] for an input of {n} channels, got {tuple(signs.shape)}")
    if small.shape != (m, m):
        raise ValueError(f"small must be [{m}, {m}] for n = {n} = {m} * {p}, got {tuple(small.shape)}")
    return m, p


def rotate_online(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """x [..., n] (any float dtype) -> x @ R in x's dtype, fp32 math (R = rotation_matrix(signs, small)).

    signs: fp32 [n], entries +-1; small: fp32 [m, m] orthogonal, (m, p) = hadamard_split(n).
    u = x * signs viewed as [..., m, p]; v = u @ H_p / sqrt(p) on the last dim; w[..., i, j] =
    sum_l small[l, i] * v[..., l, j]; returns w as [..., n].
    """
    n = x.shape[-1]
    m, p = _check_rotation_factors(n, signs, small)
    u = (x.float() * signs.float().to(x.device)).reshape(*x.shape[:-1], m, p)
    v = u @ _hadamard_on(p, u.device)
    w = small.float().to(x.device).t() @ v
    return w.reshape(x.shape).to(x.dtype)


def silu_mul_rotate(gate_up: torch.Tensor, signs: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2n] (gate first, then up) -> rotate_online(silu_mul(gate_up), signs, small) [..., n]:
    the rotated down_proj input of a rotated model, in gate_up's dtype."""
    return rotate_online(silu_mul(gate_up), signs, small)


def rotation_matrix(signs: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """R fp32 [n, n], orthogonal, with rotate_online(x, signs, small) == x @ R (signs fp32 [n],
    small fp32 [m, m]); on signs' device. R = diag(signs) @ kron(small, H_p / sqrt(p))."""
    n = signs.shape[0]
    m, p = _check_rotation_factors(n, signs, small)
    r = torch.kron(small.float().to(signs.device).contiguous(), _hadamard_on(p, signs.device))
    return r.mul_(signs.float()[:, None])


def random_rotation_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs fp32 [n] of +-1, small fp32 [m, m] orthogonal) on the CPU, a function of (n, seed) only.

    small = Q of a Gaussian matrix's QR with R's diagonal made positive (which makes Q unique);
    [[1.0]] when m == 1.
    """
    m, _ = hadamard_split(n)
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    if m == 1:
        return signs, torch.ones(1, 1)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return signs, (q * d[None, :]).float().contiguous()
