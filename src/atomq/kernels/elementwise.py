"""Small fused kernels of the serving forward (Triton): residual add + RMSNorm, RoPE in place, SiLU * up.

At decode batch sizes a step is many tiny ops; each of these replaces several PyTorch kernels (fp32 casts,
a reduction, concatenations) by one pass. Twins in ``ref.py``: ``rmsnorm``, ``rope_``, ``silu_mul``; float
outputs agree within rounding (fp32 math in both; the kernels' reductions and rsqrt differ in the last bits).
"""

from __future__ import annotations

import torch

from . import interpreter_compat
from . import pdl
from .pdl import launch_options

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _ready() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install atomq[triton])")
    interpreter_compat()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual add +) RMSNorm (twin: ref.rmsnorm). x, residual: [M, K] same dtype, rows contiguous;
    weight [K]. Returns (normed [M, K] in x's dtype, new residual = x + residual, or x without one)."""
    _ready()
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a 2-D input with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    if weight.shape != (k,):
        raise ValueError(f"norm weight must be [{k}], got {tuple(weight.shape)}")
    y = torch.empty_like(x)
    res_out = x
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
            raise ValueError("residual must match x's shape and dtype with contiguous rows")
        res_out = torch.empty_like(x)
    if m:
        block = triton.next_power_of_2(k)
        _rmsnorm_kernel[(m,)](x, residual if residual is not None else x, res_out, weight, y, k, float(eps),
                              x.stride(0), residual.stride(0) if residual is not None else 0, res_out.stride(0),
                              HAS_RES=residual is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8,
                              **launch_options(x.device))
    return y, res_out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in place on x [T, H, D] (any token / head strides, last dim contiguous); cos, sin fp32 [T, D]
    (halves repeated). Twin: ref.rope_. Returns x."""
    _ready()
    t, h, d = x.shape
    if x.stride(-1) != 1 or d % 2:
        raise ValueError(f"x must have a contiguous, even last dim, got {tuple(x.shape)} strides {x.stride()}")
    if cos.shape != (t, d) or sin.shape != (t, d) or cos.dtype != torch.float32:
        raise ValueError(f"cos / sin must be fp32 [{t}, {d}]")
    if t:
        _rope_kernel[(t,)](x, cos.contiguous(), sin.contiguous(), h, x.stride(0), x.stride(1),
                           HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), PRELOAD=pdl.PRELOAD_STAGED, num_warps=4,
                           **launch_options(x.device))
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2 * I] (gate first, then up; rows contiguous) -> SiLU(gate) * up [M, I] (twin: ref.silu_mul)."""
    _ready()
    m, two_i = gate_up.shape
    if two_i % 2 or gate_up.stride(-1) != 1:
        raise ValueError("gate_up must be [M, 2 * I] with contiguous rows")
    inter = two_i // 2
    out = torch.empty(m, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if m:
        _silu_mul_kernel[(m, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block, **launch_options(out.device))
    return out


if triton is not None:
    from .pdl import gdc_enter

    @triton.jit
    def _rmsnorm_kernel(x_ptr, r_ptr, rout_ptr, w_ptr, y_ptr, K, eps, stride_x, stride_r, stride_ro,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:  # the sum is rounded to the model dtype first, as the residual stream stores it
            x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(rout_ptr.dtype.element_ty)
            tl.store(rout_ptr + row * stride_ro + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_x + offs, (xf * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, H, stride_t, stride_h, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     PRELOAD: tl.constexpr, USE_GDC: tl.constexpr):
        """PRELOAD: cos / sin (made from the positions at the step's start) load before the wait."""
        t = tl.program_id(0)
        heads = tl.arange(0, BLOCK_H)[:, None]
        offs = tl.arange(0, HALF)[None, :]
        mask = heads < H
        if not PRELOAD:
            gdc_enter(USE_GDC)
        c1 = tl.load(cos_ptr + t * 2 * HALF + offs)
        c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + offs)
        s1 = tl.load(sin_ptr + t * 2 * HALF + offs)
        s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + offs)
        if PRELOAD:
            gdc_enter(USE_GDC)
        lo_ptr = x_ptr + t * stride_t + heads * stride_h + offs
        x1 = tl.load(lo_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(lo_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        dt = x_ptr.dtype.element_ty
        tl.store(lo_ptr, (x1 * c1 - x2 * s1).to(dt), mask=mask)
        tl.store(lo_ptr + HALF, (x2 * c2 + x1 * s2).to(dt), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_o, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
        gdc_enter(USE_GDC)
        row = tl.program_id(0).to(tl.int64)  # rows * 2I can pass 2**31
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < I
        g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.exp(-g)
        tl.store(out_ptr + row * stride_o + offs, (g / (1.0 + e) * u).to(out_ptr.dtype.element_ty), mask=mask)
