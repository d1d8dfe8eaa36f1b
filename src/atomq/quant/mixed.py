"""Atom's mixed-precision format: INT4 groups over the normal channels plus INT8 outlier channels.

Used for weights (stored, see ``PackedWeight``) and activations (computed at run time, see
``quantize_mixed``). The split of the K channels is a ``layout.Split``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .intq import (QTensor, dequantize, level_base, quantize_asym, quantize_sym, snap_scales, sym_scale,
                   sym_scale_levels, sym_scale_search)
from .layout import Split
from .pack import pack_int4, unpack_int4

OUTLIER_BITS = 8


def quantize_mixed(
    x: torch.Tensor, split: Split, bits: int, clip: float, sym: bool = True, levels: int | None = None,
) -> tuple[QTensor, QTensor | None]:
    """x [..., K] (already reordered) -> (normal part [..., Kn], outlier part [..., n_out] or None).

    The normal part is ``bits``-bit per group with ``clip``; the outliers are symmetric INT8 per row
    with no clipping. ``levels`` (symmetric groups): every group scale is an integer multiple, 1..levels,
    of one unit per row (``intq.level_base``).
    """
    if x.shape[-1] != split.k:
        raise ValueError(f"expected last dimension {split.k}, got {tuple(x.shape)}")
    normal = x[..., : split.k_normal]
    if levels is not None:
        if not sym or split.group_size is None:
            raise ValueError("integer-multiplier scales need symmetric groups")
        qn = quantize_sym(normal, bits, split.group_size,
                          scale=sym_scale_levels(normal, bits, split.group_size, clip, levels))
    elif sym:
        qn = quantize_sym(normal, bits, split.group_size, clip)
    else:
        qn = quantize_asym(normal, bits, split.group_size, clip)
    return qn, quantize_outliers(x, split)


def quantize_outliers(x: torch.Tensor, split: Split) -> QTensor | None:
    """The outlier part of x [..., K] (reordered): symmetric INT8 per row, no clip; None without outliers."""
    if not split.n_outliers:
        return None
    return quantize_sym(x[..., split.k_normal :], OUTLIER_BITS, None, 1.0)


def dequantize_mixed(qn: QTensor, qo: QTensor | None, dtype=torch.float32) -> torch.Tensor:
    parts = [dequantize(qn, dtype)]
    if qo is not None:
        parts.append(dequantize(qo, dtype))
    return torch.cat(parts, dim=-1)


def fake_quant_mixed(x: torch.Tensor, split: Split, bits: int, clip: float, sym: bool = True,
                     levels: int | None = None) -> torch.Tensor:
    """Quantize-dequantize x [..., K] in the mixed format; same shape and dtype as x."""
    return dequantize_mixed(*quantize_mixed(x, split, bits, clip, sym, levels), dtype=x.dtype)


@dataclass
class PackedWeight:
    """One linear's weight [N, K] in the atomq on-disk format (reordered input channels).

    qweight: uint8 [N, Kn // 2] (4 bits, packed as ``pack.py`` says) or int8/uint8 [N, Kn] (other bits)
    scales:  fp16 [N, G]            G = Kn // group_size, or 1 per row
    zeros:   uint8 [N, G] or None   asymmetric only
    qweight_outlier: int8 [N, n_out] or None
    scales_outlier:  fp16 [N, 1] or None
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    qweight_outlier: torch.Tensor | None
    scales_outlier: torch.Tensor | None
    bits: int

    @classmethod
    def from_parts(cls, qn: QTensor, qo: QTensor | None, bits: int) -> "PackedWeight":
        q = qn.q
        if bits == 4:
            q = pack_int4(q)
        return cls(q, qn.scale, qn.zero, qo.q if qo else None, qo.scale if qo else None, bits)

    def unpacked(self) -> QTensor:
        q = self.qweight
        if self.bits == 4:
            q = unpack_int4(q, signed=self.zeros is None)
        return QTensor(q, self.scales, self.zeros)

    def outlier(self) -> QTensor | None:
        if self.qweight_outlier is None:
            return None
        return QTensor(self.qweight_outlier, self.scales_outlier, None)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """-> float [N, K] in reordered channel order."""
        return dequantize_mixed(self.unpacked(), self.outlier(), dtype)

    def rows(self, start: int, stop: int) -> "PackedWeight":
        """Output rows [start, stop): every tensor is row-major per output row."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return PackedWeight(self.qweight[start:stop], self.scales[start:stop], cut(self.zeros),
                            cut(self.qweight_outlier), cut(self.scales_outlier), self.bits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"qweight": self.qweight, "scales": self.scales}
        for name in ("zeros", "qweight_outlier", "scales_outlier"):
            if getattr(self, name) is not None:
                sd[name] = getattr(self, name)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], bits: int) -> "PackedWeight":
        return cls(sd["qweight"], sd["scales"], sd.get("zeros"), sd.get("qweight_outlier"),
                   sd.get("scales_outlier"), bits)


def quantize_weight_rtn(
    w: torch.Tensor, split: Split, bits: int, clip: float, sym: bool = True, clip_search: bool = False,
    levels: int | None = None,
) -> PackedWeight:
    """Round-to-nearest weight quantization: w [N, K] (reordered) -> PackedWeight.

    ``clip_search``: per (row, group) the clip ratio with the least squared error (symmetric only).
    ``levels``: group scales are rounded to integer multiples (1..levels) of one unit per row, the unit
    from the row's largest normal weight (clip 1.0, as GPTQ takes it; ``intq.snap_scales``).
    """
    if w.shape[-1] != split.k:
        raise ValueError(f"expected last dimension {split.k}, got {tuple(w.shape)}")
    if levels is not None and (not sym or split.group_size is None):
        raise ValueError("integer-multiplier scales need symmetric groups")
    normal, gs = w[:, : split.k_normal], split.group_size
    if not sym:
        qn = quantize_asym(normal, bits, gs, clip)
    else:
        scale = sym_scale_search(normal, bits, gs) if clip_search else sym_scale(normal, bits, gs, clip)
        if levels is not None:
            scale = snap_scales(scale, level_base(normal, bits, levels), levels)[1]
        qn = quantize_sym(normal, bits, gs, scale=scale)
    return PackedWeight.from_parts(qn, quantize_outliers(w, split), bits=bits)
