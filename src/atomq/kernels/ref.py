"""Plain-PyTorch reference ops: the test oracle, the CPU fallback and the fake-quant accuracy path.

Every Triton kernel in this package has a twin here with the same signature. Integer outputs of a
kernel must equal its twin's exactly; float outputs agree within docs/NUMERICS.md's tolerances.

Activation layout ("ActQ"): for an input of K channels split as ``Split(k, n_outliers, group_size)``
(normal channels first, outliers last, see quant/layout.py):
    q4:  uint8 [M, Kn // 2]   INT4 normal part, packed (quant/pack.py nibble order)
    s4:  fp16  [M, G]         one scale per token and group
    q8:  int8  [M, n_out]     INT8 outlier part (absent when n_out == 0)
    s8:  fp16  [M, 1]         one scale per token
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..quant import PackedWeight, Split, pack_int4, quantize_mixed, unpack_int4
from ..quant.intq import asym_params, quantize_asym

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

    x, residual: [M, K] (any float dtype); weight: [K]. Returns (normed [M, K] in x's dtype,
    new residual [M, K] = x + residual, or x when residual is None).
    """
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), x


def quantize_act(
    x: torch.Tensor, index: torch.Tensor | None, split: Split, bits: int = 4, clip: float = 0.9
) -> ActQ:
    """Gather x [M, K] by ``index`` (int32 [K], or None) and quantize to the ActQ layout (bits == 4)."""
    if bits != 4:
        raise ValueError("the packed ActQ layout is for 4-bit activations")
    if index is not None:
        x = x.index_select(-1, index.long())
    qn, qo = quantize_mixed(x, split, bits, clip)
    return ActQ(pack_int4(qn.q), qn.scale, qo.q if qo else None, qo.scale if qo else None)


def rmsnorm_quantize(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    index: torch.Tensor | None, split: Split, bits: int = 4, clip: float = 0.9,
) -> tuple[ActQ, torch.Tensor]:
    """Fused (residual add +) RMSNorm + reorder gather + quantization. Returns (ActQ, new residual)."""
    y, res = rmsnorm(x, weight, eps, residual)
    return quantize_act(y, index, split, bits, clip), res


def silu_mul_quantize(gate_up: torch.Tensor, split: Split, bits: int = 4, clip: float = 0.9) -> ActQ:
    """gate_up [M, 2 * I] (gate first, then up) -> quantized SiLU(gate) * up (down_proj input)."""
    gate, up = gate_up.chunk(2, dim=-1)
    h = (F.silu(gate.float()) * up.float()).to(gate_up.dtype)
    return quantize_act(h, None, split, bits, clip)


# --------------------------------------------------------------------------------------------------
# W4A4 GEMM
# --------------------------------------------------------------------------------------------------


def w4a4_gemm(
    a: ActQ, w: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Atom's mixed GEMM with exact integer group dot products (ATOM.md section 3).

    a: ActQ of M tokens; w: PackedWeight of N rows (4-bit symmetric, same split as a); bias: [N] or None.
    Returns [M, N] of out_dtype: sum_g s4a[m,g] * s4w[n,g] * dot(qa[m,g], qw[n,g])
    + s8a[m] * s8w[n] * dot(qa_o[m], qw_o[n]) (+ bias), accumulated in fp32.
    """
    qa = unpack_int4(a.q4).to(torch.int32)  # [M, Kn]
    qw = unpack_int4(w.qweight).to(torch.int32)  # [N, Kn]
    m, kn = qa.shape
    n, g = qw.shape[0], a.s4.shape[1]
    gs = kn // g
    # [G, M, gs] @ [G, gs, N] -> exact int32 [G, M, N] (|dot| <= gs * 64)
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


def fake_quant_kv(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Quantize-dequantize keys or values x [..., T, H, D] per (token, head); same dtype and shape."""
    flat = x.reshape(-1, x.shape[-2], x.shape[-1])
    return kv_dequantize(*kv_quantize(flat, bits), bits=bits, dtype=x.dtype).reshape(x.shape)
