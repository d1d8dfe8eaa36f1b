"""GPTQ for Atom's mixed format (ATOM.md section 1).

Columns are processed left to right in blocks; each column is rounded, and its rounding error, scaled
by the inverse Hessian's Cholesky factor, is fed to the columns not yet rounded. Specifics here:

* damping 0.01 x mean(diag H); no act-order (the reorder already put outliers last);
* group parameters (scale, and zero when asymmetric) are computed at each group's first column from the
  error-updated weights, with the weight clip ratio;
* the outlier columns (last n_out) receive the error feedback like the others, then are rounded to
  INT8 with one scale per output row computed from their updated values;
* per-row mode (no groups) takes the scale from the original weights, as GPTQ does;
* ``levels``: each group's scale is rounded to an integer multiple (1..levels) of one unit per row, the
  unit taken from the original weights (``intq.level_base``).
"""

from __future__ import annotations

import torch

from ..quant import PackedWeight, QTensor, Split
from ..quant.intq import asym_params, level_base, snap_scales, sym_scale, sym_scale_search
from ..quant.mixed import OUTLIER_BITS


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float64 for stability), H damped by damp * mean(diag)."""
    h = h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    l = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(l)
    return torch.linalg.cholesky(hinv, upper=True)


def _blocks(split: Split, block: int) -> list[tuple[int, int]]:
    """Column ranges: the normal part in blocks aligned to groups, then the outliers as one block."""
    g = split.group_size or block
    step = max(block // g, 1) * g
    out = [(i, min(i + step, split.k_normal)) for i in range(0, split.k_normal, step)]
    if split.n_outliers:
        out.append((split.k_normal, split.k))
    return out


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, split: Split, bits: int, clip: float, sym: bool = True,
    damp: float = 0.01, block: int = 128, clip_search: bool = False, levels: int | None = None,
) -> PackedWeight:
    """w [N, K] float (reordered), h [K, K] Hessian (sum of x x^T, same order) -> PackedWeight.

    ``clip_search``: each group's scale takes the clip ratio with the least squared rounding error of the
    (error-updated) group, instead of the fixed ``clip`` (symmetric only).
    """
    n, k = w.shape
    if h.shape != (k, k) or split.k != k:
        raise ValueError(f"weight {tuple(w.shape)}, Hessian {tuple(h.shape)} and split k={split.k} disagree")
    w = w.double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0  # channels never active: any value works, zero is simplest
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)

    q = torch.zeros(n, k, dtype=torch.int16, device=w.device)
    g = split.group_size
    n_groups = split.n_groups
    scales = torch.zeros(n, n_groups, dtype=torch.float16, device=w.device)
    zeros = None if sym else torch.zeros(n, n_groups, dtype=torch.uint8, device=w.device)
    qmax = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    qmin = -(2 ** (bits - 1)) if sym else 0
    s_out = None
    if levels is not None and (g is None or not sym):
        raise ValueError("integer-multiplier scales (levels) need symmetric groups")
    unit = None if levels is None else level_base(w[:, : split.k_normal], bits, levels)  # [N, 1]
    if g is None:  # per-row: parameters from the original weights
        if sym and clip_search:
            scales[:, 0:1] = sym_scale_search(w[:, : split.k_normal], bits, None)
        elif sym:
            scales[:, 0:1] = sym_scale(w[:, : split.k_normal], bits, None, clip)
        else:
            scales[:, 0:1], zeros[:, 0:1] = asym_params(w[:, : split.k_normal], bits, None, clip)

    for b0, b1 in _blocks(split, block):
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        is_outlier = b0 >= split.k_normal
        if is_outlier:
            s_out = sym_scale(wb, OUTLIER_BITS, None, 1.0)  # [N, 1] from the error-updated outliers
            lo, hi, s, z = -(2 ** (OUTLIER_BITS - 1)), 2 ** (OUTLIER_BITS - 1) - 1, s_out.double(), None
        for j in range(b1 - b0):
            col = b0 + j
            if not is_outlier:
                gi = 0 if g is None else col // g
                if g is not None and col % g == 0:
                    if sym and clip_search:
                        scales[:, gi : gi + 1] = sym_scale_search(wb[:, j : j + g], bits, None)
                    elif sym:
                        scales[:, gi : gi + 1] = sym_scale(wb[:, j : j + g], bits, None, clip)
                    else:
                        scales[:, gi : gi + 1], zeros[:, gi : gi + 1] = asym_params(wb[:, j : j + g], bits, None, clip)
                    if unit is not None:
                        scales[:, gi : gi + 1] = snap_scales(scales[:, gi : gi + 1], unit, levels)[1]
                s = scales[:, gi].double().unsqueeze(1)
                z = None if sym else zeros[:, gi].double().unsqueeze(1)
                lo, hi = qmin, qmax
            x = wb[:, j : j + 1]
            qi = torch.round(x / s) + (0 if z is None else z)
            qi = qi.clamp(lo, hi)
            deq = (qi - (0 if z is None else z)) * s
            q[:, col : col + 1] = qi.to(torch.int16)
            e = (x - deq) / u[col, col]
            err[:, j : j + 1] = e
            wb[:, j + 1 :] -= e @ u[col : col + 1, col + 1 : b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]

    qn = q[:, : split.k_normal].to(torch.int8 if sym else torch.uint8)
    normal = QTensor(qn, scales, zeros)
    outl = QTensor(q[:, split.k_normal :].to(torch.int8), s_out, None) if split.n_outliers else None
    return PackedWeight.from_parts(normal, outl, bits)
