"""Integer quantization primitives: symmetric and asymmetric, per row or per group, 2 to 8 bits.

Conventions used everywhere in atomq:

* Quantization runs along the last dimension (K, the reduction dimension of a linear layer).
* ``group_size=None`` means one scale per row; otherwise K must be divisible by ``group_size``.
* Scales are stored in fp16 and the integers are computed with the fp16-rounded scale, so that the
  stored (q, scale) pair dequantizes to exactly what the reference used.
* Rounding is round-half-to-even (``torch.round``); kernels must reproduce it bit for bit.
* Symmetric b-bit: q in [-2^(b-1), 2^(b-1)-1], scale = clip * max|x| / (2^(b-1)-1), x ~ q * scale.
* Asymmetric b-bit: q in [0, 2^b-1], scale = clip * (max-min) / (2^b-1), zero = round(-min/scale),
  x ~ (q - zero) * scale. The zero is an integer, stored as uint8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SCALE_DTYPE = torch.float16
# Below this magnitude a row or group is treated as all-zero (avoids inf/NaN from 0/0 and fp16 underflow).
_MIN_RANGE = 1e-6


class QTensor(NamedTuple):
    """An integer tensor with its quantization parameters.

    q: int8 for symmetric, uint8 for asymmetric, shape [..., K] (unpacked).
    scale: fp16 [..., K // group] (per group) or [..., 1] (per row).
    zero: uint8, same shape as scale, or None for symmetric.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View [..., K] as [..., G, g] (g = group_size, or K when per row)."""
    k = x.shape[-1]
    g = k if group_size is None else group_size
    if g <= 0 or k % g:
        raise ValueError(f"last dimension {k} is not divisible by group size {group_size}")
    return x.reshape(*x.shape[:-1], k // g, g)


def sym_scale(x: torch.Tensor, bits: int, group_size: int | None, clip: float = 1.0) -> torch.Tensor:
    """fp16 scale [..., G] for symmetric quantization of x [..., K]."""
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    amax = _grouped(x.float(), group_size).abs().amax(dim=-1).clamp_min(_MIN_RANGE)
    return (amax * clip / qmax).to(SCALE_DTYPE)


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def sym_scale_search(x: torch.Tensor, bits: int, group_size: int | None, clips=CLIP_GRID) -> torch.Tensor:
    """fp16 scale [..., G] whose clip ratio (from ``clips``) minimizes each group's squared rounding error."""
    best_err, best = None, None
    for c in clips:
        scale = sym_scale(x, bits, group_size, c)
        err = (_grouped(dequantize(quantize_sym(x, bits, group_size, scale=scale)) - x.float(), group_size)
               .pow(2).sum(-1))
        if best is None:
            best_err, best = err, scale
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def level_base(x: torch.Tensor, bits: int, levels: int, clip: float = 1.0) -> torch.Tensor:
    """fp16 [..., 1]: the unit of integer-multiplier group scales over the last dimension of x [..., K],
    clip * max|x| / (qmax * levels) rounded up to 7 significant bits, so that ``levels`` units cover the
    largest group and every multiple unit * m (m <= 15) is exact in fp16."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_RANGE)
    t = (amax * clip / torch.full_like(amax, qmax * levels)).contiguous()  # a tensor divisor: exact on CUDA too
    # ceil to 7 significant bits on the fp32 bit pattern: exact on every device (the kernels do the same)
    t = ((t.view(torch.int32) + 0x1FFFF) & -0x20000).view(torch.float32)
    return t.to(SCALE_DTYPE)


def snap_scales(scale: torch.Tensor, base: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales [..., G] rounded to integer multiples of base [..., 1]: (multiplier uint8 [..., G] in
    1..levels, scale fp16 [..., G] = base * multiplier, exact)."""
    mult = torch.round(scale.float() / base.float()).clamp(1, levels)
    return mult.to(torch.uint8), (base.float() * mult).to(SCALE_DTYPE)


def split_level_scales(scale: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stored group scales fp16 [N, G] that are integer multiples of one unit per row -> (multiplier uint8
    [N, G] in 1..levels, unit fp32 [N], with scale == unit * multiplier exactly), or None when some row's
    scales are not. Per row, the unit is the row's largest scale divided by the largest j <= levels that
    leaves every quotient an integer in 1..levels (any such split serves a GEMM equally)."""
    s = scale.float().cpu()  # exact IEEE divisions (CUDA divides by a scalar through its reciprocal)
    top = s.amax(dim=-1, keepdim=True)
    unit = torch.zeros_like(top)
    found = torch.zeros_like(top, dtype=torch.bool)
    for j in range(levels, 0, -1):
        u = top / j
        m = s / u
        ok = ((m == m.round()) & (m >= 1) & (m <= levels) & (u * m.round() == s)).all(dim=-1, keepdim=True)
        take = ok & ~found
        unit = torch.where(take, u, unit)
        found |= ok
    if not bool(found.all()):
        return None
    return torch.round(s / unit).to(torch.uint8).to(scale.device), unit.squeeze(-1).to(scale.device)


def sym_scale_levels(x: torch.Tensor, bits: int, group_size: int, clip: float, levels: int) -> torch.Tensor:
    """fp16 scale [..., G] for symmetric groups whose scales are integer multiples (1..levels) of one
    per-row unit (``level_base`` with the same clip): the clipped group scale rounded to the nearest one."""
    return snap_scales(sym_scale(x, bits, group_size, clip), level_base(x, bits, levels, clip), levels)[1]


def quantize_levels(x: torch.Tensor, bits: int, group_size: int, clip: float, levels: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric groups with integer-multiplier scales, in the form an integer GEMM consumes:
    x [..., K] -> (q * multiplier int8 [..., K], |value| <= 8 * levels; unit fp16 [..., 1]), so that
    x ~ unit * (q * multiplier). Same numbers as quantize_sym with ``sym_scale_levels``."""
    unit = level_base(x, bits, levels, clip)
    mult, scale = snap_scales(sym_scale(x, bits, group_size, clip), unit, levels)
    q = quantize_sym(x, bits, group_size, scale=scale).q
    qm = q.to(torch.int16) * mult.to(torch.int16).repeat_interleave(group_size, dim=-1)
    return qm.to(torch.int8), unit


def quantize_sym(
    x: torch.Tensor, bits: int, group_size: int | None = None, clip: float = 1.0,
    scale: torch.Tensor | None = None,
) -> QTensor:
    """Symmetric quantization of x [..., K] -> QTensor(q int8 [..., K], scale fp16 [..., G], None)."""
    if scale is None:
        scale = sym_scale(x, bits, group_size, clip)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    xg = _grouped(x.float(), group_size)  # [..., G, g]
    q = torch.clamp(torch.round(xg / scale.float().unsqueeze(-1)), qmin, qmax)
    return QTensor(q.reshape(x.shape).to(torch.int8), scale, None)


def asym_params(
    x: torch.Tensor, bits: int, group_size: int | None, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp16 [..., G], zero uint8 [..., G]) for asymmetric quantization of x [..., K].

    The range is [min, max] extended to include 0 (so zero is representable), shrunk by ``clip``.
    """
    check_bits(bits)
    qmax = 2**bits - 1
    xg = _grouped(x.float(), group_size)
    lo = xg.amin(dim=-1).clamp(max=0) * clip
    hi = xg.amax(dim=-1).clamp(min=0) * clip
    scale = ((hi - lo).clamp_min(_MIN_RANGE) / qmax).to(SCALE_DTYPE)
    zero = torch.clamp(torch.round(-lo / scale.float()), 0, qmax).to(torch.uint8)
    return scale, zero


def quantize_asym(
    x: torch.Tensor, bits: int, group_size: int | None = None, clip: float = 1.0,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QTensor:
    """Asymmetric quantization of x [..., K] -> QTensor(q uint8 [..., K], scale, zero)."""
    scale, zero = asym_params(x, bits, group_size, clip) if params is None else params
    xg = _grouped(x.float(), group_size)
    q = torch.round(xg / scale.float().unsqueeze(-1)) + zero.float().unsqueeze(-1)
    q = torch.clamp(q, 0, 2**bits - 1)
    return QTensor(q.reshape(x.shape).to(torch.uint8), scale, zero)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QTensor -> float tensor [..., K] of ``dtype`` (computed in fp32)."""
    q = qt.q
    scale = qt.scale.float()
    g = q.shape[-1] // scale.shape[-1]
    qg = _grouped(q.float(), g)  # [..., G, g]
    if qt.zero is not None:
        qg = qg - qt.zero.float().unsqueeze(-1)
    return (qg * scale.unsqueeze(-1)).reshape(q.shape).to(dtype)


def fake_quant(
    x: torch.Tensor, bits: int, group_size: int | None = None, clip: float = 1.0, sym: bool = True
) -> torch.Tensor:
    """Quantize then dequantize x [..., K]; returns a tensor of x's dtype and shape."""
    qt = quantize_sym(x, bits, group_size, clip) if sym else quantize_asym(x, bits, group_size, clip)
    return dequantize(qt, x.dtype)
