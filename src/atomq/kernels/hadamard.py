"""Online rotation (Triton): x @ R with R = diag(signs) @ kron(small, H_p / sqrt(p)), for any size n = m * p.

Rotates the down_proj input at run time (the matching R is folded into down_proj's weight offline), so
the activation quantizer sees outliers spread over all channels. Twin: ``ref.rotate_online`` (the
definition, and ``ref.hadamard_split`` for (m, p)); outputs agree within fp32 rounding before the final
cast (the kernel mixes the m blocks first, then transforms; both act on different axes and commute).

A program owns one row and BLOCK_I of its m output blocks, held as an fp32 [BLOCK_I, p] tile:
  1. mix: tile[i, :] = sum_l small[l, i] * (x * signs)[l * p:(l + 1) * p]   (m loads of one block each)
  2. Walsh-Hadamard along p in log2(p) butterfly stages, all in registers: each stage pairs the lowest
     index bit (reshape to [.., p / 2, 2] + split), writes (a + b, a - b) (join) and moves that bit to
     the top (permute), so after log2(p) stages every bit was paired once and the order is back.
  3. scale by 1 / sqrt(p), store in x's dtype.
Tiles hold at most max(_TILE, 4 * p) elements (BLOCK_I * p): large m spreads a row over several programs,
which re-read the row from L2 rather than hold m * p fp32 values in registers.
"""

from __future__ import annotations

import torch

from . import interpreter_compat
from .ref import hadamard_split

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_P = 4096  # largest power-of-two factor: one [1, p] fp32 tile must fit a program's registers
MAX_M = 64  # the mix costs m multiply-adds per output element
_TILE = 4096  # fp32 elements per program (16 KB of registers) unless p needs more (at most 4 * p)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ready() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install atomq[triton])")
    interpreter_compat()


def _check(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor) -> tuple[int, int]:
    if not all(isinstance(t, torch.Tensor) for t in (x, signs, small)):
        raise TypeError("rotate_online expects tensors x, signs, small")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if signs.dtype != torch.float32 or small.dtype != torch.float32:
        raise TypeError(f"signs and small must be float32, got {signs.dtype} and {small.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., n] with n >= 1, got {tuple(x.shape)}")
    if x.device != signs.device or x.device != small.device:
        raise ValueError(f"x, signs and small must be on one device, got {x.device}, {signs.device}, {small.device}")
    n = x.shape[-1]
    m, p = hadamard_split(n)
    if signs.shape != (n,):
        raise ValueError(f"signs must be [{n}] for an input of {n} channels, got {tuple(signs.shape)}")
    if small.dim() != 2 or small.shape != (m, m):
        raise ValueError(f"small must be [{m}, {m}] for n = {n} = {m} * {p}, got {tuple(small.shape)}")
    if p > MAX_P or m > MAX_M:
        raise ValueError(f"n = {n} = {m} * {p} is not supported: needs a power-of-two factor <= {MAX_P} "
                         f"and an odd factor <= {MAX_M}")
    if x.stride(-1) != 1 and n > 1:
        raise ValueError(f"x must have contiguous rows (last stride 1), got strides {x.stride()}")
    return m, p


def rotate_online(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """x [..., n] fp16 / bf16 / fp32 (rows contiguous; the leading dims must flatten to one without a
    copy) -> x @ R [..., n] in x's dtype, fp32 math. signs: fp32 [n] (+-1); small: fp32 [m, m] orthogonal,
    (m, p) = ref.hadamard_split(n), p <= 4096, m <= 64; all on x's device. Twin: ref.rotate_online.

    No host synchronisation and no allocation but the output: safe inside CUDA-graph capture.
    """
    _ready()
    m, p = _check(x, signs, small)
    n = x.shape[-1]
    try:
        x2 = x.view(-1, n)
    except RuntimeError as e:
        raise ValueError(f"x's leading dims must flatten without a copy, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}") from e
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out
    # tile sizes and warps from an H100 sweep (bf16, 4096 rows): small p wants small tiles (the m-loop
    # re-reads the row per program, but from L2), p >= 2048 wants >= 4 blocks per program
    block_i = min(triton.next_power_of_2(m), max(4, _TILE // p))
    tile = block_i * p
    num_warps = 8 if tile >= 8192 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    grid = (rows, triton.cdiv(m, block_i))
    _rotate_kernel[grid](x2, signs, small, out, m, x2.stride(0), n, signs.stride(0), small.stride(0),
                         small.stride(1), float(p) ** -0.5, P=p, LOG_P=p.bit_length() - 1, BLOCK_I=block_i,
                         num_warps=num_warps)
    return out


if triton is not None:

    @triton.jit
    def _rotate_kernel(x_ptr, signs_ptr, small_ptr, out_ptr, m, stride_x, stride_o, stride_s, stride_ml, stride_mi,
                       scale, P: tl.constexpr, LOG_P: tl.constexpr, BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows * n can pass 2**31
        blk = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # output blocks i of this program
        blk_mask = blk < m
        cols = tl.arange(0, P)
        x_row = x_ptr + row * stride_x
        # mix first (it commutes with the per-block transform): tile[i, :] = sum_l small[l, i] * u_l
        tile = tl.zeros((BLOCK_I, P), dtype=tl.float32)
        for lb in range(0, m):
            offs = lb * P + cols[None, :]  # [1, P]: broadcast over the rows (fewer layout conversions than 1-D)
            u = tl.load(x_row + offs).to(tl.float32) * tl.load(signs_ptr + offs * stride_s)
            s = tl.load(small_ptr + lb * stride_ml + blk * stride_mi, mask=blk_mask, other=0.0)
            tile += s[:, None] * u
        # butterflies on the lowest index bit, which then moves to the top: log2(P) rotations restore the order
        for _ in tl.static_range(LOG_P):
            a, b = tl.split(tl.reshape(tile, (BLOCK_I, P // 2, 2)))
            tile = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_I, P))
        tl.store(out_ptr + row * stride_o + blk[:, None] * P + cols[None, :],
                 (tile * scale).to(out_ptr.dtype.element_ty), mask=blk_mask[:, None])
