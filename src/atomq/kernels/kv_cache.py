"""Paged KV cache: layout, allocation and the store kernel (quantize new K/V and write them into pages).

Layout (one ``PagedKVCache`` per layer; K and V have separate pools of identical shape)
---------------------------------------------------------------------------------------
The pool is cut into ``num_blocks`` pages of ``block_size`` (= 16) token slots. A token's slot is
``slot = block * block_size + offset``. Two memory orders are supported; every kernel takes strides,
so both work everywhere, and ``"HND"`` (head-major) is the default because a (page, head) tile is one
contiguous run of bytes (1 KiB for INT4 at head_dim 128) -- see docs/KERNELS.md for the measurement.

======  ====================================================  ======================================
mode    k / v pool                                             per-slot metadata
======  ====================================================  ======================================
int4    uint8 [num_blocks, H, block_size, D // 2] (HND)        k_scale / v_scale fp16 [num_blocks, H, block_size]
        uint8 [num_blocks, block_size, H, D // 2] (NHD)        k_zero / v_zero uint8, same shape as the scales
                                                               (NHD: [num_blocks, block_size, H])
fp16    float16 [num_blocks, H, block_size, D] (or NHD)        none
fp8     float8_e4m3fn [num_blocks, H, block_size, D] (or NHD)  k_scale / v_scale fp32 [H] (per head; a
                                                               per-tensor scale is the same value H times)
======  ====================================================  ======================================

INT4 numbers are exactly those of ``ref.kv_quantize``: asymmetric per (token, head) over head_dim,
no clipping, ``scale = max(max(x,0) - min(x,0), 1e-6) / 15`` rounded to fp16, ``zero = round(-min /
scale)`` in [0, 15], ``q = clamp(round(x / scale) + zero, 0, 15)``, round half to even, packed two per
byte with element 2i in the low nibble (quant/pack.py). FP8: ``q = e4m3(clamp(x / scale_h, -448, 448))``,
round to nearest even.

Batch metadata (int32, on the cache's device):
    block_table  [batch, max_blocks]  page ids of each sequence, in order (unused entries: any valid id)
    seq_lens     [batch]              tokens in the cache per sequence (attention reads slots < seq_len)
    slot_mapping [num_new_tokens]     destination slot of each new token, -1 = skip (padding)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .kv_layout import BLOCK_SIZE, KV_LAYOUTS, KV_MODES, PagedKVCache, kv_bytes_per_token  # noqa: F401
from . import interpreter_compat, pdl
from .pdl import gdc_enter, launch_options

FP8_MAX = 448.0


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def allocate_kv_cache(
    num_blocks: int, num_kv_heads: int, head_dim: int, mode: str = "int4", device="cuda",
    block_size: int = BLOCK_SIZE, layout: str = "HND",
    fp8_k_scale: torch.Tensor | float = 1.0, fp8_v_scale: torch.Tensor | float = 1.0,
) -> PagedKVCache:
    """Allocate one layer's pools (uninitialized memory; slots are valid once written by kv_store)."""
    if mode not in KV_MODES:
        raise ValueError(f"mode must be one of {KV_MODES}, got {mode!r}")
    if layout not in KV_LAYOUTS:
        raise ValueError(f"layout must be one of {KV_LAYOUTS}, got {layout!r}")
    if head_dim < 32 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 32, got {head_dim}")
    h, bs = num_kv_heads, block_size
    lead = (num_blocks, h, bs) if layout == "HND" else (num_blocks, bs, h)
    if mode == "int4":
        pool = lambda: torch.empty(*lead, head_dim // 2, dtype=torch.uint8, device=device)  # noqa: E731
        return PagedKVCache(
            mode, pool(), pool(),
            k_scale=torch.empty(lead, dtype=torch.float16, device=device),
            v_scale=torch.empty(lead, dtype=torch.float16, device=device),
            k_zero=torch.empty(lead, dtype=torch.uint8, device=device),
            v_zero=torch.empty(lead, dtype=torch.uint8, device=device),
            block_size=bs, layout=layout,
        )
    dt = torch.float16 if mode == "fp16" else torch.float8_e4m3fn
    k = torch.empty(*lead, head_dim, dtype=dt, device=device)
    v = torch.empty(*lead, head_dim, dtype=dt, device=device)
    if mode == "fp16":
        return PagedKVCache(mode, k, v, block_size=bs, layout=layout)
    ks = torch.as_tensor(fp8_k_scale, dtype=torch.float32, device=device).expand(h).contiguous()
    vs = torch.as_tensor(fp8_v_scale, dtype=torch.float32, device=device).expand(h).contiguous()
    return PagedKVCache(mode, k, v, k_scale=ks, v_scale=vs, block_size=bs, layout=layout)


# --------------------------------------------------------------------------------------------------
# Store kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rint(x):
    """Round half to even for |x| < 2**22 (fp32 adds round to nearest even)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _store_one(
    X, t, h0, stride_xt, stride_xh, P, S, Z, base, meta_base, stride_ph, stride_mh, valid, C,
    H: tl.constexpr, BLOCK_H: tl.constexpr, D2: tl.constexpr, MODE: tl.constexpr, CENTER: tl.constexpr,
):
    """Quantize heads h0..h0+BLOCK_H of one token's keys (or values), less the vector C [H, D] if CENTER,
    and write them at pool offset ``base``."""
    hh = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, D2)
    hmask = (hh < H)[:, None] & valid
    xp = X + t.to(tl.int64) * stride_xt + hh[:, None] * stride_xh + 2 * d[None, :]
    xe = tl.load(xp, mask=hmask, other=0.0).to(tl.float32)  # [BLOCK_H, D2] even elements
    xo = tl.load(xp + 1, mask=hmask, other=0.0).to(tl.float32)  # odd elements
    if CENTER:
        cp = C + hh[:, None] * (2 * D2) + 2 * d[None, :]
        xe -= tl.load(cp, mask=hmask, other=0.0).to(tl.float32)
        xo -= tl.load(cp + 1, mask=hmask, other=0.0).to(tl.float32)
    if MODE == 2:  # int4: per (token, head) asymmetric
        lo = tl.minimum(tl.minimum(tl.min(xe, 1), tl.min(xo, 1)), 0.0)
        hi = tl.maximum(tl.maximum(tl.max(xe, 1), tl.max(xo, 1)), 0.0)
        scale = tl.math.div_rn(tl.maximum(hi - lo, 1e-6), 15.0).to(tl.float16)
        sf = scale.to(tl.float32)
        zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, sf)), 0.0), 15.0)
        qe = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xe, sf[:, None])) + zero[:, None], 0.0), 15.0)
        qo = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xo, sf[:, None])) + zero[:, None], 0.0), 15.0)
        packed = (qe.to(tl.int32) | (qo.to(tl.int32) << 4)).to(tl.uint8)
        tl.store(P + base + hh[:, None] * stride_ph + d[None, :], packed, mask=hmask)
        mmask = (hh < H) & valid
        tl.store(S + meta_base + hh * stride_mh, scale, mask=mmask)
        tl.store(Z + meta_base + hh * stride_mh, zero.to(tl.uint8), mask=mmask)
    else:
        pp = P + base + hh[:, None] * stride_ph + 2 * d[None, :]
        if MODE == 1:  # fp8 e4m3, per-head scale
            sc = tl.load(S + hh, mask=hh < H, other=1.0)[:, None]
            ye = tl.minimum(tl.maximum(tl.math.div_rn(xe, sc), -448.0), 448.0).to(P.dtype.element_ty)
            yo = tl.minimum(tl.maximum(tl.math.div_rn(xo, sc), -448.0), 448.0).to(P.dtype.element_ty)
        else:
            ye = xe.to(P.dtype.element_ty)
            yo = xo.to(P.dtype.element_ty)
        tl.store(pp, ye, mask=hmask)
        tl.store(pp + 1, yo, mask=hmask)


@triton.jit
def _kv_store_kernel(
    K, V, SLOT, KP, VP, KS, VS, KZ, VZ, KC,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ms,
    H: tl.constexpr, BLOCK_H: tl.constexpr, D2: tl.constexpr, PAGE: tl.constexpr, MODE: tl.constexpr,
    PRELOAD: tl.constexpr, USE_GDC: tl.constexpr, CENTER: tl.constexpr,
):
    """PRELOAD: the slot (staged before the step) loads before the wait for the kernel ahead. CENTER: keys
    less KC [H, D] (fp32)."""
    if not PRELOAD:
        gdc_enter(USE_GDC)
    t = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H  # a few tokens: their heads are spread over programs
    slot = tl.load(SLOT + t)
    if PRELOAD:
        gdc_enter(USE_GDC)
    valid = slot >= 0
    slot = tl.maximum(slot, 0).to(tl.int64)
    blk = slot // PAGE
    off = slot % PAGE
    base = blk * stride_pb + off * stride_ps
    meta_base = blk * stride_mb + off * stride_ms
    _store_one(K, t, h0, stride_kt, stride_kh, KP, KS, KZ, base, meta_base, stride_ph, stride_mh, valid, KC,
               H, BLOCK_H, D2, MODE, CENTER)
    _store_one(V, t, h0, stride_vt, stride_vh, VP, VS, VZ, base, meta_base, stride_ph, stride_mh, valid, KC,
               H, BLOCK_H, D2, MODE, False)


_MODE_ID = {"fp16": 0, "fp8": 1, "int4": 2}


def _check_new_kv(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    h, d = cache.num_kv_heads, cache.head_dim
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or x.shape[1:] != (h, d):
            raise ValueError(f"{name} must be [T, {h}, {d}], got {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be fp16/bf16/fp32, got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
        if x.device != cache.k.device:
            raise ValueError(f"{name} is on {x.device}, the cache on {cache.k.device}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v have {k.shape[0]} and {v.shape[0]} tokens")
    if slot_mapping.dtype != torch.int32 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int32 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")


def _check_center(cache: PagedKVCache, k_center: torch.Tensor | None) -> None:
    if k_center is None:
        return
    want = (cache.num_kv_heads, cache.head_dim)
    if k_center.shape != want or k_center.dtype != torch.float32 or not k_center.is_contiguous():
        raise ValueError(f"k_center must be contiguous fp32 {list(want)}, got {k_center.dtype} "
                         f"{list(k_center.shape)}")
    if k_center.device != cache.k.device:
        raise ValueError(f"k_center is on {k_center.device}, the cache on {cache.k.device}")


def kv_store(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_center: torch.Tensor | None = None) -> None:
    """Quantize (int4 / fp8) or copy (fp16) new keys and values into their slots, in place.

    cache: PagedKVCache (module docstring); k, v: fp16/bf16/fp32 [T, num_kv_heads, head_dim], last dim
    contiguous; slot_mapping: int32 [T], slot = block * block_size + offset, -1 = skip the token;
    k_center: fp32 [num_kv_heads, head_dim], contiguous, taken off every key before it is stored.
    No host synchronisation and no allocation: safe inside a CUDA graph. Twin: ref.kv_store_ref.
    """
    _check_new_kv(cache, k, v, slot_mapping)
    _check_center(cache, k_center)
    t = k.shape[0]
    if t == 0:
        return
    interpreter_compat()
    h, d = cache.num_kv_heads, cache.head_dim
    sb, sh, ss = cache.data_strides()
    mb, mh, ms = cache.meta_strides()
    dummy = cache.k  # placeholder pointer for the unused metadata arguments
    block_h = triton.next_power_of_2(h)
    if t < 128:  # few tokens (decode): 2 heads per program instead of all of them
        block_h = min(block_h, 2)
    _kv_store_kernel[(t, triton.cdiv(h, block_h))](
        k, v, slot_mapping, cache.k, cache.v,
        cache.k_scale if cache.k_scale is not None else dummy,
        cache.v_scale if cache.v_scale is not None else dummy,
        cache.k_zero if cache.k_zero is not None else dummy,
        cache.v_zero if cache.v_zero is not None else dummy,
        k_center if k_center is not None else dummy,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        sb, sh, ss, mb, mh, ms,
        H=h, BLOCK_H=block_h, D2=d // 2, PAGE=cache.block_size, MODE=_MODE_ID[cache.mode], PRELOAD=pdl.PRELOAD_STAGED,
        CENTER=k_center is not None,
        num_warps=4 if block_h * d >= 4096 else (2 if block_h * d >= 512 else 1), **launch_options(k.device),
    )
