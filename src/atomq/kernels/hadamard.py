"""Online rotation (Triton): x @ R with R = diag(signs) @ kron(small, H_p / sqrt(p)), for any size n = m * p.

Rotates the down_proj input at run time (the matching R is folded into down_proj's weight offline), so
the activation quantizer sees outliers spread over all channels. ``silu_mul_rotate`` does the same to
SiLU(gate) * up computed in its loads (one pass over gate | up instead of two kernels). Twins:
``ref.rotate_online`` (the definition, and ``ref.hadamard_split`` for (m, p)) and ``ref.silu_mul_rotate``;
outputs agree within one or two output ulps (fp32 math; the dot kernel's 16-bit split of small is good to
~2^-17; the kernels mix the m blocks first, then transform: both act on different axes and commute).

A program owns one row and BLOCK_I of its m output blocks, held as an fp32 [BLOCK_I, p] tile. Two kernels
differ in the mix, tile[i, :] = sum_l small[l, i] * (x * signs)[l * p:(l + 1) * p]:
  - ``_rotate_dot_kernel`` (m >= 8 blocks of p >= 16 channels, p <= 1024): a tensor-core product
    small^T [BLOCK_I, m] @ u [m, p], its K loop over chunks of 16 input blocks (u = the row's x * signs,
    exact in x's 16-bit dtype: a sign flip). small is split into a 16-bit high part and the 16-bit rest,
    so two products give ~16 mantissa bits of small with fp32 accumulation (fp32 x: one IEEE product).
  - ``_rotate_loop_kernel`` (the other sizes: m < 8 as Llama-2-70B's 7 x 4096, p < 16, p > 1024): m
    dependent loads of one block each and a multiply-add per output element and input block.
Then the Walsh-Hadamard transform along p in log2(p) butterfly stages, all in registers: each stage pairs
the lowest index bit (reshape to [.., p / 2, 2] + split), writes (a + b, a - b) (join) and moves that bit to
the top (permute), so after log2(p) stages every bit was paired once and the order is back; scaled by
1 / sqrt(p) and stored in x's dtype. Both kernels launch with programmatic dependent launch (kernels/pdl.py)
and wait for the kernel ahead before their first load. (The transform as tensor-core products, H_p or
H_(p/16) kron H_16 with split 16-bit operands, needs 6-12 barriers per tile against the butterflies' 48-180
but measured no faster on an H100: docs/KERNELS.md.)
"""

from __future__ import annotations

import os

import torch

from . import interpreter_compat
from .pdl import launch_options
from .ref import hadamard_split

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_P = 4096  # largest power-of-two factor: one [1, p] fp32 tile must fit a program's registers
MAX_M = 64  # the mix costs m multiply-adds per output element
_TILE = 4096  # loop kernel: fp32 elements per program (16 KB of registers) unless p needs more (at most 4 * p)
DOT_MIX = True  # False: every size takes the loop kernel (for A/B)
DOT_MIN_M = 8  # fewer blocks: the [16, p] dot tile is mostly padding and the loop kernel is faster (H100)
DOT_MAX_ELEMENTS = 16384  # dot kernel: most fp32 elements of a program's [BLOCK_I, p] output tile
# silu_mul_rotate fuses SiLU * up into the rotation up to this size: beyond it (13B, Mixtral, Qwen2-7B, 70B)
# the doubled loads of the fused programs cost more than the separate pass at decode sizes (H100)
FUSE_MAX_N = 12288
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ready() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install atomq[triton])")
    interpreter_compat()


def _interpreting() -> bool:
    # Triton 3.9's CPU interpreter multiplies bf16 dot operands wrongly; there the bf16 mix runs in fp32
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor, n: int) -> tuple[int, int]:
    """Validate the factors for rotations of size n (x's dtype, device and row layout included)."""
    if not all(isinstance(t, torch.Tensor) for t in (x, signs, small)):
        raise TypeError("the rotation expects tensors x, signs, small")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if signs.dtype != torch.float32 or small.dtype != torch.float32:
        raise TypeError(f"signs and small must be float32, got {signs.dtype} and {small.dtype}")
    if x.dim() < 1 or n < 1:
        raise ValueError(f"x must be [..., n] with n >= 1, got {tuple(x.shape)}")
    if x.device != signs.device or x.device != small.device:
        raise ValueError(f"x, signs and small must be on one device, got {x.device}, {signs.device}, {small.device}")
    m, p = hadamard_split(n)
    if signs.shape != (n,):
        raise ValueError(f"signs must be [{n}] for an input of {n} channels, got {tuple(signs.shape)}")
    if small.dim() != 2 or small.shape != (m, m):
        raise ValueError(f"small must be [{m}, {m}] for n = {n} = {m} * {p}, got {tuple(small.shape)}")
    if p > MAX_P or m > MAX_M:
        raise ValueError(f"n = {n} = {m} * {p} is not supported: needs a power-of-two factor <= {MAX_P} "
                         f"and an odd factor <= {MAX_M}")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"x must have contiguous rows (last stride 1), got strides {x.stride()}")
    return m, p


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] -> [rows, k] without a copy."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"x's leading dims must flatten without a copy, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}") from e


def dot_fits(m: int, p: int) -> bool:
    """Whether the dot kernel can rotate a size n = m * p (one [>= 16, p] tile of output blocks per program)."""
    return m > 1 and p >= 16 and 16 * p <= DOT_MAX_ELEMENTS


def uses_dot(m: int, p: int) -> bool:
    """Whether a size n = m * p takes the tensor-core mix (``_rotate_dot_kernel``) by default."""
    return DOT_MIX and m >= DOT_MIN_M and dot_fits(m, p)


def dot_block_i(m: int, p: int, rows: int) -> int:
    """Output blocks per program of the dot kernel: all of them (one read of each row) once there are enough
    rows to fill the GPU, 16 (more programs per row, each reading the row) for a few rows (H100 sweep)."""
    return 16 if rows < 256 else max(16, min(triton.next_power_of_2(m), DOT_MAX_ELEMENTS // p))


def _launch(x2: torch.Tensor, signs: torch.Tensor, small: torch.Tensor, out: torch.Tensor, n: int, m: int,
            p: int, gated: bool, block_i: int | None, num_warps: int | None, kernel: str | None) -> None:
    rows = x2.shape[0]
    if kernel not in (None, "dot", "loop"):
        raise ValueError(f"kernel must be None, 'dot' or 'loop', got {kernel!r}")
    if kernel == "dot" and not dot_fits(m, p):
        raise ValueError(f"the dot kernel cannot rotate n = {n} = {m} * {p}")
    if block_i is not None and (block_i < 1 or block_i & (block_i - 1)):
        raise ValueError(f"block_i must be a power of two, got {block_i}")
    common = dict(P=p, LOG_P=p.bit_length() - 1, GATED=gated, **launch_options(x2.device))
    args = (x2, signs, small, out, m, x2.stride(0), out.stride(0), signs.stride(0), small.stride(0),
            small.stride(1), float(p) ** -0.5)
    if kernel == "dot" or (kernel is None and uses_dot(m, p)):
        if block_i is not None and block_i < 16:
            raise ValueError(f"the dot kernel's block_i is a tensor-core tile: at least 16, got {block_i}")
        block_i = block_i or dot_block_i(m, p, rows)
        num_warps = num_warps or 4
        _rotate_dot_kernel[(rows, triton.cdiv(m, block_i))](
            *args, L_CHUNK=16, BLOCK_I=block_i,
            EXACT_F32=x2.dtype == torch.float32 or (x2.dtype == torch.bfloat16 and _interpreting()),
            num_warps=num_warps, **common)
        return
    # tile sizes and warps from an H100 sweep (bf16, 4096 rows): small p wants small tiles (the m-loop
    # re-reads the row per program, but from L2), p >= 2048 wants >= 4 blocks per program
    block_i = block_i or min(triton.next_power_of_2(m), max(4, _TILE // p))
    tile = block_i * p
    num_warps = num_warps or (8 if tile >= 8192 else 4 if tile >= 1024 else 2 if tile >= 256 else 1)
    _rotate_loop_kernel[(rows, triton.cdiv(m, block_i))](*args, BLOCK_I=block_i, num_warps=num_warps, **common)


def rotate_online(x: torch.Tensor, signs: torch.Tensor, small: torch.Tensor, *, block_i: int | None = None,
                  num_warps: int | None = None, kernel: str | None = None) -> torch.Tensor:
    """x [..., n] fp16 / bf16 / fp32 (rows contiguous; the leading dims must flatten to one without a
    copy) -> x @ R [..., n] in x's dtype, fp32 math. signs: fp32 [n] (+-1); small: fp32 [m, m] orthogonal,
    (m, p) = ref.hadamard_split(n), p <= 4096, m <= 64; all on x's device. Twin: ref.rotate_online.
    ``block_i``, ``num_warps``, ``kernel`` ('dot' or 'loop'): launch overrides for tests and benchmarks
    (defaults: the measured rule).

    No host synchronisation and no allocation but the output: safe inside CUDA-graph capture.
    """
    _ready()
    n = x.shape[-1] if x.dim() else 0
    m, p = _check(x, signs, small, n)
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _launch(x2, signs, small, out.view(-1, n), n, m, p, False, block_i, num_warps, kernel)
    return out


def silu_mul_rotate(gate_up: torch.Tensor, signs: torch.Tensor, small: torch.Tensor, *, fuse: bool | None = None,
                    block_i: int | None = None, num_warps: int | None = None,
                    kernel: str | None = None) -> torch.Tensor:
    """gate_up [..., 2n] (gate first, then up; rows contiguous) -> (SiLU(gate) * up) @ R [..., n] in
    gate_up's dtype. SiLU(gate) * up is rounded to that dtype before the rotation, as ``ref.silu_mul`` does;
    the rest as ``rotate_online``. Twin: ref.silu_mul_rotate. ``fuse``: SiLU * up inside the rotation's loads
    (default: for n <= FUSE_MAX_N; longer rows run the SiLU * up kernel first, measured faster there)."""
    _ready()
    two_n = gate_up.shape[-1] if gate_up.dim() else 0
    if two_n % 2:
        raise ValueError(f"gate_up must be [..., 2n] (gate | up), got {tuple(gate_up.shape)}")
    n = two_n // 2
    m, p = _check(gate_up, signs, small, n)
    x2 = _rows(gate_up)
    if not (n <= FUSE_MAX_N if fuse is None else fuse):
        from .elementwise import silu_mul

        h = silu_mul(x2).view(*gate_up.shape[:-1], n)
        return rotate_online(h, signs, small, block_i=block_i, num_warps=num_warps, kernel=kernel)
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0]:
        _launch(x2, signs, small, out.view(-1, n), n, m, p, True, block_i, num_warps, kernel)
    return out


if triton is not None:
    from .pdl import gdc_enter

    @triton.jit
    def _load_input(x_row, offs, mask, n, GATED: tl.constexpr):
        """x[offs] in x's dtype; GATED: SiLU(gate) * up from gate | up, rounded to that dtype."""
        if GATED:
            g = tl.load(x_row + offs, mask=mask, other=0.0)
            u = tl.load(x_row + n + offs, mask=mask, other=0.0)
            gf = g.to(tl.float32)
            return (gf / (1.0 + tl.exp(-gf)) * u.to(tl.float32)).to(g.dtype)
        return tl.load(x_row + offs, mask=mask, other=0.0)

    @triton.jit
    def _walsh_hadamard(tile, BLOCK_I: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
        """tile fp32 [BLOCK_I, P] -> tile @ H_P (unnormalized) along the last dim."""
        # butterflies on the lowest index bit, which then moves to the top: log2(P) rotations restore the order
        for _ in tl.static_range(LOG_P):
            a, b = tl.split(tl.reshape(tile, (BLOCK_I, P // 2, 2)))
            tile = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (BLOCK_I, P))
        return tile

    @triton.jit
    def _rotate_dot_kernel(x_ptr, signs_ptr, small_ptr, out_ptr, m, stride_x, stride_o, stride_s, stride_ml,
                           stride_mi, scale, P: tl.constexpr, LOG_P: tl.constexpr, L_CHUNK: tl.constexpr,
                           BLOCK_I: tl.constexpr, EXACT_F32: tl.constexpr, GATED: tl.constexpr,
                           USE_GDC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows * n can pass 2**31
        blk = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # output blocks i of this program
        cols = tl.arange(0, P)
        x_row = x_ptr + row * stride_x
        gdc_enter(USE_GDC)
        # the input blocks l in chunks of L_CHUNK (the K loop of small^T [BLOCK_I, m] @ u [m, P])
        tile = tl.zeros((BLOCK_I, P), dtype=tl.float32)
        for l0 in range(0, m, L_CHUNK):
            lb = l0 + tl.arange(0, L_CHUNK)
            offs = lb[:, None] * P + cols[None, :]  # [L_CHUNK, P]
            in_row = (lb < m)[:, None]
            signs = tl.load(signs_ptr + offs * stride_s, mask=in_row, other=0.0)  # 0 on the padding blocks
            small_t = tl.load(small_ptr + lb[None, :] * stride_ml + blk[:, None] * stride_mi,
                              mask=(lb < m)[None, :] & (blk < m)[:, None], other=0.0)  # [BLOCK_I, L_CHUNK]
            x = _load_input(x_row, offs, in_row, m * P, GATED)
            u = (x.to(tl.float32) * signs).to(x.dtype)  # exact: a sign flip
            if EXACT_F32:
                tile = tl.dot(small_t, u.to(tl.float32), tile, input_precision="ieee")
            else:  # small = hi + lo, each in x's dtype: ~16 mantissa bits of small, fp32 accumulation
                hi = small_t.to(x.dtype)
                lo = (small_t - hi.to(tl.float32)).to(x.dtype)
                tile = tl.dot(lo, u, tl.dot(hi, u, tile))
        tile = _walsh_hadamard(tile, BLOCK_I, P, LOG_P)
        tl.store(out_ptr + row * stride_o + blk[:, None] * P + cols[None, :],
                 (tile * scale).to(out_ptr.dtype.element_ty), mask=(blk < m)[:, None])

    @triton.jit
    def _rotate_loop_kernel(x_ptr, signs_ptr, small_ptr, out_ptr, m, stride_x, stride_o, stride_s, stride_ml,
                            stride_mi, scale, P: tl.constexpr, LOG_P: tl.constexpr, BLOCK_I: tl.constexpr,
                            GATED: tl.constexpr, USE_GDC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows * n can pass 2**31
        blk = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # output blocks i of this program
        blk_mask = blk < m
        cols = tl.arange(0, P)
        x_row = x_ptr + row * stride_x
        gdc_enter(USE_GDC)
        # mix first (it commutes with the per-block transform): tile[i, :] = sum_l small[l, i] * u_l
        tile = tl.zeros((BLOCK_I, P), dtype=tl.float32)
        for lb in range(0, m):
            offs = lb * P + cols[None, :]  # [1, P]: broadcast over the rows (fewer layout conversions than 1-D)
            x = _load_input(x_row, offs, offs >= 0, m * P, GATED)
            u = x.to(tl.float32) * tl.load(signs_ptr + offs * stride_s)
            s = tl.load(small_ptr + lb * stride_ml + blk * stride_mi, mask=blk_mask, other=0.0)
            tile += s[:, None] * u
        tile = _walsh_hadamard(tile, BLOCK_I, P, LOG_P)
        tl.store(out_ptr + row * stride_o + blk[:, None] * P + cols[None, :],
                 (tile * scale).to(out_ptr.dtype.element_ty), mask=blk_mask[:, None])
