"""INT4 packing: two 4-bit values per byte along the last dimension.

Nibble order: element 2i goes to the LOW nibble (bits 0-3) of byte i, element 2i+1 to the HIGH nibble
(bits 4-7). Signed values are stored in two's complement (-8..7 -> 0x8..0x7); unsigned values (0..15)
as they are. A packed tensor is uint8 [..., K // 2]; K must be even.
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 in [-8, 7] or uint8 in [0, 15], shape [..., K] -> uint8 [..., K // 2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dimension ({q.shape[-1]}) into int4 pairs")
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack_int4 expects int8 or uint8, got {q.dtype}")
    nib = q.to(torch.int16) & 0xF  # two's complement nibble
    lo, hi = nib[..., 0::2], nib[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """uint8 [..., K // 2] -> int8 [..., K] in [-8, 7] (signed) or uint8 [..., K] in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1)  # [..., K//2, 2]
    nib = nib.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        return (nib - ((nib & 0x8) << 1)).to(torch.int8)  # sign-extend bit 3
    return nib.to(torch.uint8)
