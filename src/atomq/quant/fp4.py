"""FP4 E2M1 element format with a per-group scale (the FP4 variant of Atom).

E2M1 has 1 sign, 2 exponent and 1 mantissa bit; its magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
A code is 4 bits: sign in bit 3, magnitude index (into the table above) in bits 0-2, so codes pack with
``pack_int4`` (as unsigned nibbles). Scale per group: clip * max|x| / 6, stored fp16.
Rounding picks the nearest representable value; ties go to the even mantissa (like IEEE).
"""

from __future__ import annotations

import torch

from .intq import SCALE_DTYPE, _grouped, _MIN_RANGE

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# Midpoints between neighbours; a value exactly on a midpoint rounds to the even mantissa (index even).
_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2


def quantize_fp4(
    x: torch.Tensor, group_size: int | None = None, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes uint8 [..., K] in 0..15, scale fp16 [..., G])."""
    xg = _grouped(x.float(), group_size)
    scale = (xg.abs().amax(dim=-1).clamp_min(_MIN_RANGE) * clip / 6.0).to(SCALE_DTYPE)
    y = (xg / scale.float().unsqueeze(-1)).clamp(-6.0, 6.0)
    mag = y.abs()
    mids = _MIDPOINTS.to(x.device)
    idx = torch.bucketize(mag, mids, right=True)  # nearest, ties to the upper neighbour
    tie = (idx > 0) & (mag == mids[(idx - 1).clamp_min(0)])
    idx = torch.where(tie & (idx % 2 == 1), idx - 1, idx)  # ties to even index (even mantissa)
    codes = idx | ((y < 0).to(idx.dtype) << 3)
    return codes.reshape(x.shape).to(torch.uint8), scale


def dequantize_fp4(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """codes uint8 [..., K], scale fp16 [..., G] -> float [..., K]."""
    c = codes.long()
    mag = E2M1_VALUES.to(codes.device)[c & 0x7]
    val = torch.where((c & 0x8) != 0, -mag, mag)
    g = codes.shape[-1] // scale.shape[-1]
    out = _grouped(val, g) * scale.float().unsqueeze(-1)
    return out.reshape(codes.shape).to(dtype)


def fake_quant_fp4(x: torch.Tensor, group_size: int | None = None, clip: float = 1.0) -> torch.Tensor:
    codes, scale = quantize_fp4(x, group_size, clip)
    return dequantize_fp4(codes, scale, x.dtype)
