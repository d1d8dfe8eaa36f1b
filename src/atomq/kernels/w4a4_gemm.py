"""W4A4 mixed GEMM (Triton, Hopper): INT4 groups with per-group scales + INT8 outlier channels.

y[m, n] = sum_g s4a[m,g] * s4w[n,g] * dot(qa[m,g], qw[n,g]) + s8a[m] * s8w[n] * dot(qa_o[m], qw_o[n]) + bias[n]
(twin: ``ref.w4a4_gemm``, exact integer math in float64; here each group's dot is exact in int32, or
in fp32 for the fp8 operand form, and is scaled and accumulated in fp32).

Operands on the tensor cores are 8-bit (Hopper has no 4-bit MMA): the weights stay 4-bit in memory
and are unpacked in registers; the activations come from the quantize kernel as one INT4 value per
byte (``quantize.ActOp``, int8 or float8_e4m3fn). The kernel computes the transposed product
(out^T tile = W tile @ A tile^T, "swap-AB"), so the unpacked weights are the left operand, which
Hopper's wgmma can read from registers, and small M fills the MMA's N side (decode). Small M also
splits K over several programs (fp32 partials, summed in order by the last program of each tile, or
by a reduce kernel where no arrival counters can be had). At M > 64 on sm_90 the Gluon
kernel of ``w4a4_gemm_hopper.py`` takes over (same operands; ``pick_config``).

Prepared weight layout (``prepare_weight``, once at load time), S = min(group_size, 64) ("span"):
    w4:  int8 [NP // RT, KP * RT // 2], KP = Kn rounded up to 2S, RT = row_tile (16 by default),
         NP = N rounded up to RT. Byte j of block b (2S channels) of a row holds channel b*2S + j in
         its low nibble and channel b*2S + S + j in its high nibble, so a block unpacks into two
         [rows, S] operands with no shuffle. Rows are stored in tiles of RT: tile t holds, for each
         block b in order, the RT rows' S bytes of that block ([RT, S], contiguous), so byte j of
         block b of row r sits at (r // RT) * (KP * RT // 2) + b * RT * S + (r % RT) * S + j. A
         program that streams K over RT rows reads one contiguous slab; RT = 1 is plain row-major
         [N, KP // 2]. Padding channels and rows are 0.
    sw:  fp32 [GP, N] group scales, transposed; GP = KP // group_size (padding groups 0).
         Per-row weights (group_size None): fp32 [1, N].
    w8:  int8 [N, n_out] outlier weights, s8w: fp32 [N] (absent when n_out == 0).
    mult, unit (weights whose group scales are integer multiples of one per row, ``levels``): uint8 [GP, N]
         multipliers (padding groups 0; a view of rows padded to 16 bytes, for the Gluon kernel's 4-byte
         copies) and fp32 [N] units, sw = unit * mult. With activations whose group
         scales are all one per token (``uniform_act_scales``), the kernel multiplies each unpacked weight
         by its group's multiplier (one IMAD per 4 values, in place of an add) and sums all of K in int32:
         no per-group promotion, the group-free loop.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..quant import PackedWeight, unpack_int4
from ..quant.intq import split_level_scales
from . import interpreter_compat, w4a4_gemv
from .counters import arrival_counters
from .pdl import launch_options
from .quantize import ActOp, interpreting
from .ref import ActQ
from .unpack_asm import UNPACK_FP8_ASM, UNPACK_INT8_ASM, UNPACK_INT8_MULT1_ASM, UNPACK_INT8_MULT_ASM

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass(frozen=True)
class PreparedWeight:
    """A PackedWeight repacked for the kernel (layout in the module docstring)."""

    w4: torch.Tensor
    sw: torch.Tensor
    w8: torch.Tensor | None
    s8w: torch.Tensor | None
    n: int
    kn: int
    kp: int
    n_out: int
    group_size: int | None
    span: int
    row_tile: int = 1
    mult: torch.Tensor | None = None
    unit: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size is None else self.kn // self.group_size


def prepare_weight(w: PackedWeight, row_tile: int = 16, levels: int | None = None) -> PreparedWeight:
    """PackedWeight (4-bit symmetric, qweight uint8 [N, Kn // 2]) -> PreparedWeight on the same device.

    row_tile: rows per contiguous tile of the 4-bit weights (module docstring); 1 = row-major.
    levels: the group scales are integer multiples (1..levels) of one per row (``QuantConfig.w_scale_levels``):
    keep the multipliers for the integer-accumulating loop (module docstring).
    """
    if row_tile < 1 or row_tile & (row_tile - 1):
        raise ValueError(f"row_tile must be a power of two, got {row_tile}")
    if levels is not None and not 2 <= levels <= 15:  # nibble * multiplier must stay in one byte
        raise ValueError(f"levels must be in 2..15, got {levels}")
    if w.bits != 4 or w.zeros is not None:
        raise ValueError("the W4A4 kernel takes 4-bit symmetric weights")
    q = unpack_int4(w.qweight)  # int8 [N, Kn]
    n, kn = q.shape
    g_count = w.scales.shape[1]
    gs = None if g_count == 1 else kn // g_count  # one group over all of Kn is the per-row case
    if gs is not None and (gs < 32 or gs & (gs - 1) or kn % gs):
        raise ValueError(f"group size {gs} (Kn {kn}, {g_count} groups) must be a power of two >= 32")
    span = min(gs or 64, 64)
    kp = -(-kn // (2 * span)) * (2 * span)
    rt = row_tile
    npad = -(-n // rt) * rt
    nb = kp // (2 * span)
    qp = torch.zeros(npad, kp, dtype=torch.int8, device=q.device)
    qp[:n, :kn] = q
    qp = qp.view(npad, nb, 2, span)  # [NP, blocks, lo/hi, S]
    w4 = ((qp[:, :, 0].to(torch.int16) & 0xF) | ((qp[:, :, 1].to(torch.int16) & 0xF) << 4))
    w4 = w4.to(torch.uint8).view(torch.int8)  # [NP, blocks, S]
    w4 = w4.view(npad // rt, rt, nb, span).transpose(1, 2).reshape(npad // rt, nb * rt * span).contiguous()
    gp = 1 if gs is None else kp // gs
    sw = torch.zeros(gp, n, dtype=torch.float32, device=q.device)
    sw[:g_count] = w.scales.float().t()
    w8 = s8w = None
    n_out = 0
    if w.qweight_outlier is not None and w.qweight_outlier.shape[1] > 0:
        w8 = w.qweight_outlier.contiguous()
        s8w = w.scales_outlier.float().reshape(n).contiguous()
        n_out = w8.shape[1]
    mult = unit = None
    if levels is not None:
        parts = split_level_scales(w.scales, levels) if gs is not None else None
        if parts is None:
            raise ValueError(f"the weight's group scales are not integer multiples (1..{levels}) of one per row")
        # rows padded to 16 bytes: the Gluon kernel copies them 4 bytes at a time
        mult = torch.zeros(gp, -(-n // 16) * 16, dtype=torch.uint8, device=q.device)[:, :n]
        mult[:g_count] = parts[0].t()
        unit = parts[1].contiguous()
    return PreparedWeight(w4, sw, w8, s8w, n, kn, kp, n_out, gs, span, rt, mult, unit)


def act_operand(a: ActQ | ActOp) -> ActOp:
    """ActQ (packed INT4, or 8-bit int8) -> ActOp (int8 values); an ActOp passes through."""
    if isinstance(a, ActOp):
        return a
    return ActOp(unpack_int4(a.q4) if a.q4.dtype == torch.uint8 else a.q4, a.s4, a.q8, a.s8)


@dataclass(frozen=True)
class GemmConfig:
    """Tile configuration. BLOCK_N: weight rows per program; BLOCK_M: tokens per program."""

    block_n: int = 64
    block_m: int = 128
    kernel: str = "triton"  # "triton" (any GPU, the interpreter), "gluon" (sm_90, M > 64, groups of 128),
    # or "gemv" (CUDA cores, M <= w4a4_gemv.MAX_M)
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: choose from the grid size
    use_asm: bool = True  # unpack nibbles with inline PTX (GPU only)
    magic_cvt: bool = False  # int32 -> fp32 by an exponent trick instead of I2F (measured slower)
    defer: bool = False  # promote the previous group's dot after issuing the next one
    group_m: int = 8
    prefetch: bool = True  # load the next group's scales one iteration ahead (groups of 2S)
    fused_reduce: bool = True  # split K: the last program of a tile sums the partials (no 2nd kernel)
    waves: float = 2.0  # automatic split K: aim at waves * SMs programs
    min_iters: int = 2  # automatic split K: at least this many K blocks per split
    k_blocks: int = 4  # gemv: K blocks of 128 channels per step
    ahead: int = 1  # gemv: K steps of weights in flight, 1 or 2 (the first ones load before the wait on sm_90)
    ctas_per_sm: int = 1  # gluon, one int32 sum over K: registers capped so that this many programs share an SM


# one token: the GEMV up to GEMV_MAX_N weight rows, K split into runs so that about 8 programs per SM
# stream at once. Measured 2026-11-24 in the 7B batch-1 engine (bench/gpu_engine_check.py --variants):
# gate_up on the GEMV and weights two steps ahead both cost ~1% per decode step, though alone they win
GEMV_MAX_N = 12288
# weight spans the default dispatch sends to the GEMV (64: groups of 64, 128 or none; 32: groups of 32).
# Measured 2026-12-07 (H100, 7B shapes, one token): groups of 32 on the GEMV q/k/v 14.8, o 7.0, down 15.1 us
# against 35.1 / 15.6 / 32.8 on the tensor-core decode kernel, so they take it at every N (GEMV_MAX_N_G32)
GEMV_SPANS: tuple[int, ...] = (64, 32)
GEMV_MAX_N_G32 = 1 << 20
GEMV_CONFIG = GemmConfig(kernel="gemv", num_warps=4, k_blocks=4, waves=8.0, ahead=1)
# (most weights N x Kp, config): a one-token product takes the first rule it fits, else GEMV_CONFIG.
# Measured 2026-11-25: 8 K blocks a step with weights two steps ahead on 7B o_proj (16M) alone 8.1 -> 6.2 us,
# batch-1 decode step -0.8%; the same on q/k/v and down too: +5%
GEMV_RULES: tuple[tuple[int, GemmConfig], ...] = (
    (20_000_000, GemmConfig(kernel="gemv", num_warps=4, k_blocks=8, waves=8.0, ahead=2)),
)
# decode kernels (the one-token GEMV; the Triton kernel at M <= 16): the K run that adds the INT8 outlier
# part loads its operands before its loop (weights before the wait for the kernel ahead) instead of after
# it, where their latency lengthens that run. Same results. Not yet timed on a GPU, so off
OUTLIERS_FIRST = False
# the Triton decode kernel (M <= 16): K blocks of its run's weights each program prefetches into L2 before
# the wait for the kernel ahead (the GEMV loads its first weights there itself). Not yet timed, so 0
DECODE_L2_PREFETCH = 0
# programs per SM of the Gluon kernel's integer-multiplier loop at 8 warps (2: registers capped at 128, the
# main product parked in shared memory for the outlier epilogue). Measured 2026-12-07 (H100, 7B shapes,
# M = 2048 / 8192; docs/KERNELS.md): 1.16-1.23x faster than one program per SM when that loop retired each
# block before the next unpack; the loop now overlaps them, and one program per SM has not been timed
# since. The group-free loop ran even either way and keeps one
GLUON_MULT_CTAS_PER_SM = 2


def pick_config(m: int, n: int, kp: int, gluon: bool = False, grouped: bool = True, gemv: bool = False,
                span: int = 64, mult: bool = False) -> GemmConfig:
    """Default kernel and tiles by M (measured on H100, docs/KERNELS.md); decode tiles split K to fill
    the GPU. gluon: the Gluon kernel can take this product (sm_90); it does for M > 64. gemv: the CUDA-core
    kernel can take it; it does for one token and up to GEMV_MAX_N weight rows (GEMV_MAX_N_G32 for the
    span 32 of groups of 32; docs/KERNELS.md). mult: the Gluon kernel runs its integer-multiplier loop."""
    if gemv and m == 1 and n <= (GEMV_MAX_N_G32 if span == 32 else GEMV_MAX_N):
        return next((cfg for most, cfg in GEMV_RULES if n * kp <= most), GEMV_CONFIG)
    if interpreting():  # small tiles keep the CPU interpreter quick
        return GemmConfig(block_n=32, block_m=16, num_warps=4, num_stages=1, split_k=2 if m < 16 else 1)
    if m <= 16:  # measured 2026-11-24: prefetch wins below ~4 waves of tiles, loses on 70B gate_up (896 tiles)
        tiles = -(-n // 64)
        return GemmConfig(block_n=64, block_m=16, num_warps=4, num_stages=4, waves=4.0,
                          prefetch=tiles < 4 * _num_sms(torch.cuda.current_device()))
    if m <= 64:  # the prefetch costs registers with BLOCK_M 64 (measured slower)
        bm = 32 if m <= 32 else 64
        return GemmConfig(block_n=64, block_m=bm, num_warps=4, num_stages=4, prefetch=False)
    if gluon:  # measured 2026-11-24 (KERNELS.md, Gluon notes): 8 warps except small products at M <= 256
        small = m <= 256 and (n * kp < 100 * 2**20 if grouped else n <= 4096)
        if grouped and small:
            return GemmConfig(kernel="gluon", block_m=64, num_warps=4, num_stages=4)
        # group-free, tall products at large M: wider groups of M tiles per weight column block (measured
        # 2026-11-24: 7B q/k/v and gate_up at M = 2048 / 8192 2-5% faster; 70B gate_up slower)
        gm = 16 if not grouped and m >= 2048 and 12288 <= n <= 32768 else 8
        ctas = GLUON_MULT_CTAS_PER_SM if mult and not small else 1
        return GemmConfig(kernel="gluon", block_m=128, num_warps=4 if small else 8, num_stages=4, group_m=gm,
                          ctas_per_sm=ctas)
    return GemmConfig(block_n=64, block_m=128, num_warps=4, num_stages=4, prefetch=False)


def _hopper():
    from . import w4a4_gemm_hopper

    return w4a4_gemm_hopper


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(cfg: GemmConfig, tiles: int, n_iters: int, m: int, device: torch.device) -> int:
    """K splits: enough programs for two waves on the GPU when M is small, each with >= 2 K blocks."""
    if cfg.split_k:
        return max(1, min(cfg.split_k, n_iters))
    if m > 64:
        return 1
    n_sm = _num_sms(device.index or 0)
    if tiles >= 2 * n_sm:  # enough tiles: no partials
        return 1
    want = int(cfg.waves * n_sm + tiles - 1) // tiles
    return max(1, min(want, n_iters // max(1, cfg.min_iters), 16))


def _gemv_split(cfg: GemmConfig, programs: int, n_blocks: int, device: torch.device) -> int:
    """GEMV K runs: up to ``cfg.waves`` programs per SM, each run at least two steps of K blocks."""
    if cfg.split_k:
        return max(1, cfg.split_k)
    want = int(cfg.waves * _num_sms(device.index or 0)) // programs
    return max(1, min(want, n_blocks // (2 * cfg.k_blocks), 16))


def w4a4_gemm(
    a: ActQ | ActOp, w: PreparedWeight | PackedWeight, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16, config: GemmConfig | None = None, uniform_act_scales: bool = False,
) -> torch.Tensor:
    """Mixed W4A4 GEMM (twin: ref.w4a4_gemm).

    a: ActOp (qa int8 or float8_e4m3fn [M, Kn], s4 fp16 [M, G], q8 int8 [M, n_out], s8 fp16 [M, 1])
       or a packed ActQ (unpacked here with torch, slower). w: PreparedWeight (or PackedWeight, repacked
       on every call: prepare once for speed). bias: [N] or None. Returns out_dtype (fp16/bf16) [M, N].
       With ``a.acc`` (fp32 [M, N] zeros, from the quantize kernel that made ``a``) the decode kernels
       (GEMV, Triton) add each K run's partial sum into it with fire-and-forget atomics, with no arrival
       counter and no last-run reduction, and return it unrounded; the consumer rounds (the sum order of
       the runs, so the last fp32 bit, is not fixed). Other kernels ignore it.
    uniform_act_scales: the caller vouches that each row of a.s4 holds one value (activations whose group
       scales are integer multiples folded into qa); with a weight prepared with ``levels`` the tensor-core
       kernel then accumulates all of K in int32 (module docstring).
    """
    if triton is None:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install atomq[triton])")
    interpreter_compat()
    if isinstance(w, PackedWeight):
        w = prepare_weight(w)
    a = act_operand(a)
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float16 or bfloat16, got {out_dtype}")
    m, kn = a.qa.shape
    if kn != w.kn or a.s4.shape != (m, w.n_groups):
        raise ValueError(f"activation [M={m}, Kn={kn}], scales {tuple(a.s4.shape)} do not match the weight "
                         f"(Kn={w.kn}, {w.n_groups} groups)")
    fp8 = a.qa.dtype == torch.float8_e4m3fn
    if not fp8 and a.qa.dtype != torch.int8:
        raise TypeError(f"activation operand must be int8 or float8_e4m3fn, got {a.qa.dtype}")
    if a.qa.stride(-1) != 1 or a.s4.stride(-1) != 1:
        raise ValueError("activation operand and scales must have contiguous rows")
    has_out = w.n_out > 0
    if has_out and (a.q8 is None or a.q8.shape != (m, w.n_out)):
        raise ValueError(f"weight has {w.n_out} outlier channels but the activation has "
                         f"{None if a.q8 is None else tuple(a.q8.shape)}")
    if bias is not None and bias.shape != (w.n,):
        raise ValueError(f"bias must be [{w.n}], got {tuple(bias.shape)}")
    acc = a.acc
    if acc is not None and (acc.dtype != torch.float32 or acc.shape != (m, w.n) or acc.stride(-1) != 1
                            or acc.device != a.qa.device):
        raise ValueError(f"the accumulator must be fp32 [{m}, {w.n}] with contiguous rows on {a.qa.device}, got "
                         f"{acc.dtype} {tuple(acc.shape)} on {acc.device}")
    n = w.n
    out = torch.empty(m, n, dtype=out_dtype, device=a.qa.device)
    if m == 0:
        return out
    mult = w.mult is not None and uniform_act_scales and a.qa.dtype == torch.int8  # the int32-sum loop applies
    if config is None:
        gpu = a.qa.is_cuda and not interpreting()
        gluon = m > 64 and gpu and _hopper().unsupported_reason(a, w, mult) is None
        gemv = m <= w4a4_gemv.MAX_M and gpu and w.span in GEMV_SPANS and w4a4_gemv.unsupported_reason(a, w) is None
        # the Gluon multiplier loop is its group-free loop, so it takes the group-free tiles
        grouped = w.group_size is not None and not (gluon and mult)
        config = pick_config(m, n, w.kp, gluon=gluon, grouped=grouped, gemv=gemv, span=w.span,
                             mult=gluon and mult)
    cfg = config
    if cfg.kernel == "gemv":
        reason = w4a4_gemv.unsupported_reason(a, w)
        if reason:
            raise ValueError(reason)
        tiles = triton.cdiv(n, w.row_tile) * m
        split = _gemv_split(cfg, tiles, w.kp // 128, a.qa.device)
        locks = arrival_counters(out.device, tiles) if split > 1 and acc is None else None
        if acc is None and locks is None:  # one run (also under a graph capture before the counters exist)
            split = 1
        return w4a4_gemv.w4a4_gemv(a, w, bias, out if acc is None else acc, blocks=cfg.k_blocks,
                                   num_warps=cfg.num_warps, split=split, locks=locks, ahead=cfg.ahead,
                                   accumulate=acc is not None, outliers_first=OUTLIERS_FIRST)
    if cfg.kernel == "gluon":
        hopper = _hopper()
        reason = hopper.unsupported_reason(a, w, mult)
        if reason:
            raise ValueError(reason)
        return hopper.w4a4_gemm_hopper(a, w, bias, out, block_m=cfg.block_m, num_warps=cfg.num_warps,
                                       stages=cfg.num_stages, group_m=cfg.group_m, mult=mult,
                                       ctas_per_sm=cfg.ctas_per_sm)
    n_iters = w.kp // (2 * w.span)
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = _split_k(cfg, tiles, n_iters, m, a.qa.device)
    per_split = triton.cdiv(n_iters, split)
    split = triton.cdiv(n_iters, per_split)
    if acc is not None:  # every K run adds into the accumulator: no partials, no counters
        out = target = acc
    else:
        target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=out.device)
    dummy = w.sw
    locks = arrival_counters(out.device, tiles) if split > 1 and cfg.fused_reduce and acc is None else None
    fused = locks is not None
    q8, s8 = (a.q8, a.s8) if has_out else (a.s4, a.s4)
    gpu = not interpreting()
    # the outlier operands ahead of the loop: one tile of all outlier channels, in registers across it
    out_first = OUTLIERS_FIRST and has_out and cfg.block_m <= 16 and w.n_out <= 128
    l2_blocks = DECODE_L2_PREFETCH if cfg.block_m <= 16 and gpu else 0  # the interpreter runs no PTX
    block_o = max(32, triton.next_power_of_2(w.n_out)) if out_first else 64
    _w4a4_kernel[(tiles, split)](
        w.w4, w.sw, w.w8 if has_out else dummy, w.s8w if has_out else dummy,
        w.mult if mult else dummy, w.unit if mult else dummy,
        a.qa, a.s4, q8, s8,
        bias if bias is not None else dummy, target, out, locks if fused else dummy,
        m, n, kn, w.n_groups, w.n_out, n_iters, per_split, split,
        w.sw.stride(0), w.w8.stride(0) if has_out else 0, w.mult.stride(0) if mult else 0,
        a.qa.stride(0), a.s4.stride(0), q8.stride(0), s8.stride(0),
        target.stride(0) if split > 1 and acc is None else 0, target.stride(-2), target.stride(-1),
        S=w.span, GS=w.group_size or 0, RT=w.row_tile, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_O=block_o,
        GROUP_M=cfg.group_m, HAS_OUT=has_out, HAS_BIAS=bias is not None, PARTIAL=split > 1 and acc is None,
        OP_FP8=fp8, USE_ASM=cfg.use_asm and gpu, MAGIC_CVT=cfg.magic_cvt, DEFER=cfg.defer and gpu,
        PREFETCH=cfg.prefetch and not cfg.defer and w.group_size == 2 * w.span and not mult, FUSED=fused,
        MULT=mult, ACC=acc is not None, OUT_FIRST=out_first, L2_BLOCKS=l2_blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(out.device),
    )
    if split > 1 and not fused and acc is None:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else dummy, out, m * n, n, split, target.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block,
        )
    return out


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:

    from .pdl import gdc_enter

    _UNPACK_INT8 = tl.constexpr(UNPACK_INT8_ASM)
    _UNPACK_FP8 = tl.constexpr(UNPACK_FP8_ASM)

    @triton.jit
    def _unpack(wp, USE_ASM: tl.constexpr, OP_FP8: tl.constexpr):
        """Packed bytes int8 [BN, S] -> (low nibbles, high nibbles), each int8 or fp8 e4m3 [BN, S] in -8..7."""
        if USE_ASM:
            if OP_FP8:
                lo, hi = tl.inline_asm_elementwise(
                    asm=_UNPACK_FP8,
                    constraints="=r,=r,r", args=[wp], dtype=(tl.float8e4nv, tl.float8e4nv), is_pure=True,
                    pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(
                    asm=_UNPACK_INT8,
                    constraints="=r,=r,r", args=[wp], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            lo = (wp << 4) >> 4
            hi = wp >> 4
            if OP_FP8:
                lo = lo.to(tl.float32).to(tl.float8e4nv)
                hi = hi.to(tl.float32).to(tl.float8e4nv)
        return lo, hi

    _UNPACK_INT8_MULT = tl.constexpr(UNPACK_INT8_MULT_ASM)
    _UNPACK_INT8_MULT1 = tl.constexpr(UNPACK_INT8_MULT1_ASM)

    @triton.jit
    def _unpack_mult(wp, ml, mh, USE_ASM: tl.constexpr, SHARED: tl.constexpr):
        """Packed bytes int8 [BN, S] and the row multipliers of the low / high halves' groups (int32 [BN],
        0..15; SHARED: one group, mh is ml) -> (low nibbles * ml, high nibbles * mh), int8 [BN, S] each."""
        if USE_ASM:  # per-row bytes broadcast to the packed bytes' shape: m, and 128 - 8m (wraps to int8)
            zero = tl.zeros_like(wp)
            m_lo, c_lo = zero + ml.to(tl.int8)[:, None], zero + (128 - 8 * ml).to(tl.int8)[:, None]
            if SHARED:
                lo, hi = tl.inline_asm_elementwise(
                    asm=_UNPACK_INT8_MULT1, constraints="=r,=r,r,r,r", args=[wp, m_lo, c_lo],
                    dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(
                    asm=_UNPACK_INT8_MULT, constraints="=r,=r,r,r,r,r,r",
                    args=[wp, m_lo, c_lo, zero + mh.to(tl.int8)[:, None], zero + (128 - 8 * mh).to(tl.int8)[:, None]],
                    dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
        else:
            lo = (((wp << 4) >> 4).to(tl.int32) * ml[:, None]).to(tl.int8)
            hi = ((wp >> 4).to(tl.int32) * mh[:, None]).to(tl.int8)
        return lo, hi

    @triton.jit
    def _dot(a, b, acc, OP_FP8: tl.constexpr):
        """a [BN, K] @ b [K, BM] (+ acc): int8 -> int32, fp8 -> fp32 (exact for these small integers)."""
        if OP_FP8:
            return tl.dot(a, b, acc, out_dtype=tl.float32)
        else:
            return tl.dot(a, b, acc, out_dtype=tl.int32)

    @triton.jit
    def _to_f32(d, OP_FP8: tl.constexpr, MAGIC_CVT: tl.constexpr):
        """A group's exact dot (int32, |d| < 2**22, or fp32 for fp8 operands) as fp32."""
        if OP_FP8:
            return d
        elif MAGIC_CVT:
            return (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            return d.to(tl.float32)

    @triton.jit
    def _scales(sw_ptr, sa_ptr, g, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m):
        """fp32 [BN, BM] outer product sw[g, n] * sa[m, g] (0 outside the matrix and past G groups)."""
        swv = tl.load(sw_ptr + g * stride_swg + offs_n, mask=mask_n, other=0.0)
        sav = tl.load(sa_ptr + offs_m * stride_sam + g, mask=mask_m & (g < G), other=0.0).to(tl.float32)
        return swv[:, None] * sav[None, :]

    @triton.jit
    def _prefetch_l2(ptrs, mask):
        """Prefetch the lines holding ptrs (where mask) into L2; no value, no wait (GPU only)."""
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                                  "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _load_w8(w8_ptr, offs_n, mask_n, o0, NO, stride_w8n, live, BLOCK_O: tl.constexpr):
        """INT8 outlier weights int8 [BLOCK_N, BLOCK_O] of channels o0.. (0 past NO or where not live)."""
        offs_o = o0 + tl.arange(0, BLOCK_O)
        return tl.load(w8_ptr + offs_n[:, None].to(tl.int64) * stride_w8n + offs_o[None, :],
                       mask=mask_n[:, None] & (offs_o[None, :] < NO) & live, other=0)

    @triton.jit
    def _load_a8(a8_ptr, offs_m, mask_m, o0, NO, stride_a8m, live, BLOCK_O: tl.constexpr):
        """INT8 outlier activations, transposed: int8 [BLOCK_O, BLOCK_M] of channels o0.. (0 as _load_w8)."""
        offs_o = o0 + tl.arange(0, BLOCK_O)
        return tl.load(a8_ptr + offs_m[None, :].to(tl.int64) * stride_a8m + offs_o[:, None],
                       mask=mask_m[None, :] & (offs_o[:, None] < NO) & live, other=0)

    @triton.jit
    def _w4a4_kernel(
        w_ptr, sw_ptr, w8_ptr, s8w_ptr, mult_ptr, unit_ptr, a_ptr, sa_ptr, a8_ptr, s8a_ptr, bias_ptr, out_ptr,
        fin_ptr, lock_ptr, M, N, KN, G, NO, N_ITERS, PER_SPLIT, SPLIT,
        stride_swg, stride_w8n, stride_mg, stride_am, stride_sam, stride_a8m, stride_s8am,
        stride_os, stride_om, stride_on,
        S: tl.constexpr, GS: tl.constexpr, RT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr, HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr, OP_FP8: tl.constexpr, USE_ASM: tl.constexpr, MAGIC_CVT: tl.constexpr,
        DEFER: tl.constexpr, PREFETCH: tl.constexpr, FUSED: tl.constexpr, MULT: tl.constexpr,
        ACC: tl.constexpr, OUT_FIRST: tl.constexpr, L2_BLOCKS: tl.constexpr, USE_GDC: tl.constexpr,
    ):
        """One [BLOCK_N, BLOCK_M] tile of out^T over K blocks [pid_k * PER_SPLIT, ...) of 2S channels.

        Tensors as in the module docstring; a: int8/fp8 [M, KN]; sa: fp16 [M, G]; a8: int8 [M, NO];
        s8a: fp16 [M, 1]; out: [M, N] (PARTIAL: fp32 [SPLIT, M, N]). FUSED (with PARTIAL): the last
        program to finish a tile (arrival counter lock[tile]) sums the SPLIT partials in order, adds
        the bias and writes fin [M, N]; it then resets the counter to 0. USE_GDC: kernels/pdl.py.
        MULT (groups): weights times their group's multiplier (mult uint8 [GP, N]) as they unpack, one int32
        sum over K, scaled once by unit[n] (fp32 [N]) * sa[m, 0] (each row of sa holds one value).
        ACC: out is an fp32 [M, N] accumulator that every K run adds its tile into (the bias with run 0).
        OUT_FIRST: run 0 loads all NO <= BLOCK_O outlier channels before its loop (the weights before the
        wait for the kernel ahead) and multiplies them after it, in one dot (the same int32 sum).
        L2_BLOCKS: the first L2_BLOCKS K blocks of the run's weights are prefetched into L2 before that wait.
        """
        EARLY: tl.constexpr = OUT_FIRST or L2_BLOCKS > 0  # loads before the wait: index math first
        if not EARLY:
            gdc_enter(USE_GDC)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        num_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gm
        pid_n = (pid % width) // gm

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n = offs_n < N
        mask_m = offs_m < M
        offs_s = tl.arange(0, S)
        # row r, block it: (r // RT) * (N_ITERS * RT * S) + it * (RT * S) + (r % RT) * S (module docstring)
        w_rows = w_ptr + ((offs_n // RT).to(tl.int64) * N_ITERS * (RT * S) + (offs_n % RT) * S)[:, None]
        a_cols = a_ptr + offs_m[None, :].to(tl.int64) * stride_am
        it0 = pid_k * PER_SPLIT
        it1 = tl.minimum(it0 + PER_SPLIT, N_ITERS)
        if EARLY:
            for b in tl.static_range(L2_BLOCKS):  # the line of each row's S bytes of block it0 + b
                _prefetch_l2(w_ptr + (offs_n // RT).to(tl.int64) * N_ITERS * (RT * S) + (it0 + b) * (RT * S)
                             + (offs_n % RT) * S, mask_n & (it0 + b < it1))
            if OUT_FIRST:  # (HAS_OUT) masked off, so no traffic, in the other K runs
                w8f = _load_w8(w8_ptr, offs_n, mask_n, 0, NO, stride_w8n, pid_k == 0, BLOCK_O)
            gdc_enter(USE_GDC)
            if OUT_FIRST:
                a8f = _load_a8(a8_ptr, offs_m, mask_m, 0, NO, stride_a8m, pid_k == 0, BLOCK_O)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if OP_FP8:
            d_prev = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            d_prev = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
        acc_i = d_prev
        if PREFETCH:  # scale vectors of the current group; the loop loads the next group's ahead of use
            swv = tl.load(sw_ptr + it0 * stride_swg + offs_n, mask=mask_n & (it0 < G), other=0.0)
            sav = tl.load(sa_ptr + offs_m * stride_sam + it0, mask=mask_m & (it0 < G), other=0.0).to(tl.float32)
        for it in range(it0, it1):
            wp = tl.load(w_rows + (it * (RT * S) + offs_s)[None, :], mask=mask_n[:, None], other=0)
            if MULT:  # the groups' multipliers of the low and high halves (one group per block, or one each)
                ml = tl.load(mult_ptr + (it if GS == 2 * S else 2 * it) * stride_mg + offs_n, mask=mask_n,
                             other=0).to(tl.int32)
                if GS == 2 * S:
                    mh = ml
                else:
                    mh = tl.load(mult_ptr + (2 * it + 1) * stride_mg + offs_n, mask=mask_n, other=0).to(tl.int32)
                wl, wh = _unpack_mult(wp, ml, mh, USE_ASM, GS == 2 * S)
            else:
                wl, wh = _unpack(wp, USE_ASM, OP_FP8)
            k_lo = it * (2 * S) + offs_s
            k_hi = k_lo + S
            al = tl.load(a_cols + k_lo[:, None], mask=mask_m[None, :] & (k_lo[:, None] < KN), other=0.0)
            ah = tl.load(a_cols + k_hi[:, None], mask=mask_m[None, :] & (k_hi[:, None] < KN), other=0.0)
            if MULT:
                acc_i = _dot(wh, ah, _dot(wl, al, acc_i, OP_FP8), OP_FP8)
            elif GS == 0:
                if OP_FP8:  # fresh fp32 per block keeps every partial sum exact
                    acc_i += _dot(wh, ah, _dot(wl, al, None, OP_FP8), OP_FP8)
                else:
                    acc_i = _dot(wh, ah, _dot(wl, al, acc_i, OP_FP8), OP_FP8)
            elif GS == 2 * S:
                if PREFETCH:
                    gn = it + 1
                    swn = tl.load(sw_ptr + gn * stride_swg + offs_n, mask=mask_n & (gn < G), other=0.0)
                    san = tl.load(sa_ptr + offs_m * stride_sam + gn, mask=mask_m & (gn < G),
                                  other=0.0).to(tl.float32)
                d = _dot(wh, ah, _dot(wl, al, None, OP_FP8), OP_FP8)
                if PREFETCH:
                    acc += _to_f32(d, OP_FP8, MAGIC_CVT) * (swv[:, None] * sav[None, :])
                    swv = swn
                    sav = san
                elif DEFER:
                    g = tl.maximum(it - 1, 0)
                    acc += _to_f32(d_prev, OP_FP8, MAGIC_CVT) * _scales(
                        sw_ptr, sa_ptr, g, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m)
                    d_prev = d
                else:
                    acc += _to_f32(d, OP_FP8, MAGIC_CVT) * _scales(
                        sw_ptr, sa_ptr, it, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m)
            else:  # GS == S: the low and high halves are two groups
                d = _dot(wl, al, None, OP_FP8)
                acc += _to_f32(d, OP_FP8, MAGIC_CVT) * _scales(
                    sw_ptr, sa_ptr, 2 * it, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m)
                d = _dot(wh, ah, None, OP_FP8)
                acc += _to_f32(d, OP_FP8, MAGIC_CVT) * _scales(
                    sw_ptr, sa_ptr, 2 * it + 1, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m)
        if MULT:
            unit = tl.load(unit_ptr + offs_n, mask=mask_n, other=0.0)
            sa0 = tl.load(sa_ptr + offs_m * stride_sam, mask=mask_m, other=0.0).to(tl.float32)
            acc = acc_i.to(tl.float32) * (unit[:, None] * sa0[None, :])
        elif GS == 0:
            acc = acc_i.to(tl.float32) * _scales(
                sw_ptr, sa_ptr, 0, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m)
        elif DEFER:
            if it1 > it0:
                acc += _to_f32(d_prev, OP_FP8, MAGIC_CVT) * _scales(
                    sw_ptr, sa_ptr, it1 - 1, G, stride_swg, stride_sam, offs_n, offs_m, mask_n, mask_m)

        if HAS_OUT:
            if pid_k == 0:
                d8 = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
                if OUT_FIRST:
                    d8 = tl.dot(w8f, a8f, d8, out_dtype=tl.int32)
                else:
                    for o0 in range(0, NO, BLOCK_O):
                        w8 = _load_w8(w8_ptr, offs_n, mask_n, o0, NO, stride_w8n, True, BLOCK_O)
                        a8 = _load_a8(a8_ptr, offs_m, mask_m, o0, NO, stride_a8m, True, BLOCK_O)
                        d8 = tl.dot(w8, a8, d8, out_dtype=tl.int32)
                s8w = tl.load(s8w_ptr + offs_n, mask=mask_n, other=0.0)
                s8a = tl.load(s8a_ptr + offs_m * stride_s8am, mask=mask_m, other=0.0).to(tl.float32)
                acc += d8.to(tl.float32) * (s8w[:, None] * s8a[None, :])

        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        mask = mask_n[:, None] & mask_m[None, :]
        if ACC:
            if HAS_BIAS and pid_k == 0:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")  # no result used: a fire-and-forget red
        elif PARTIAL:
            tl.store(ptrs + pid_k * stride_os, acc, mask=mask)
            if FUSED:
                tl.debug_barrier()  # every thread's partial is stored before the release below
                arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
                if arrived == SPLIT - 1:
                    tot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                    for s in range(0, SPLIT):  # fixed order: the result does not depend on arrival order
                        tot += tl.load(ptrs + s * stride_os, mask=mask, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        tot += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
                    fptrs = fin_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
                    tl.store(fptrs, tot.to(fin_ptr.dtype.element_ty), mask=mask)
                    tl.atomic_xchg(lock_ptr + pid, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT, stride_s,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """out [M, N] = sum over SPLIT of part fp32 [SPLIT, M, N] (+ bias [N]), cast to out's dtype."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part_ptr + s * stride_s + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
