"""W4A4 GEMM for Hopper written in Gluon: the path of ``w4a4_gemm`` for M > 64 on sm_90.

Same operands and math as the Triton kernel in ``w4a4_gemm.py`` (read its module docstring first):
swap-AB, so each program computes an out^T tile [BLOCK_N weight rows, BLOCK_M tokens]; the weights
stay 4-bit in memory (``PreparedWeight``, span S = 64, groups of 2S = 128) and are unpacked in
registers into the left wgmma operand; the activations are the quantize kernel's int8 operand, read
by wgmma from shared memory. What differs is the schedule, written out by hand:

- One cp.async ring of STAGES slots carries everything a K block needs: the packed weight tile, the
  activation tiles (low and high nibble channels, per 128-token half) and, with groups, both scale
  vectors or the next block's multipliers, so no global load waits in the loop.
- Groups of 128 (Atom): per block, two wgmmas into a fresh int32 tile, one wait, then the promotion
  acc += float(d) * sw[n] * sa[m] with the scales read from the ring. (Promoting block k while block
  k + 1's wgmmas run would overlap the two, but ptxas then serializes every wgmma: the accumulator
  copies that LLVM inserts read registers of an in-flight wgmma. Overlap comes from two CTAs per SM.)
- One scale per row and per token (group-free recipes): a single int32 sum over all of K, scaled once
  at the end; this is the plain INT8 GEMM's pipeline plus the 4-bit unpack. wgmma reads its register
  operand while it runs, so each nibble half of a block is unpacked only after the wgmma that last read
  those registers has retired: one wgmma stays in flight during every unpack.
- Groups of 128 whose scales are integer multiples of one per row and per token (``levels``; the
  activation multipliers are already in the int8 operand): the one-sum loop, with each unpacked weight
  times its group's multiplier (uint8 [G, N], carried by the ring one block early so that they are in
  registers before the block's copy wait) and the units as the scales.
- One-sum loops only:
  - ``ctas_per_sm`` > 1: registers capped so that the programs fit one SM;
  - 256-token tiles (``block_m=256``): two 128-token wgmma tiles, two int32 sums, one unpack per block;
  - with either, the epilogue parks the main product in shared memory while the INT8 outlier part
    accumulates.

Activation scales are read transposed and in fp32 (``sa_t`` [G, M]; the multiplier loop: the units,
[1, M]); the wrapper builds that copy.
Measured against cuBLAS FP16 and FP8 in docs/KERNELS.md.
Importable without Gluon (``AVAILABLE`` says whether the kernel exists); runs on sm_90 only.
"""

from __future__ import annotations

import functools
import re

import torch

from .unpack_asm import UNPACK_INT8_ASM, unpack_int8_half_asm

try:  # guarded: Gluon is experimental and absent from older Triton releases
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    # Triton 3.7 renamed cp.async's global -> shared copy (the old name now raises; 3.6 has only the old one)
    _TRITON = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    cp_async_load = cp.async_load if _TRITON >= (3, 7) else cp.async_copy_global_to_shared
    # and the CTA-wide barrier (3.6: thread_barrier; later: barrier)
    cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier

    AVAILABLE = True
except ImportError:  # pragma: no cover
    AVAILABLE = False

SPAN = 64  # channels per nibble half; a K block of 2 * SPAN = 128 is one group
# probe bits (timing only, wrong outputs): the one-sum loops' unpack becomes one move per word; no cp.async
# of the packed weights; no cp.async of the activation tiles (the ring keeps whatever it holds)
PROBE_NO_UNPACK, PROBE_NO_WEIGHT_COPY, PROBE_NO_ACT_COPY = 1, 2, 4


def unsupported_reason(a, w, mult: bool = False) -> str | None:
    """Why this kernel cannot take ActOp ``a`` and PreparedWeight ``w`` here (None: it can); ``mult``:
    for the integer-multiplier loop."""
    if not AVAILABLE:
        return "this Triton has no Gluon"
    if not a.qa.is_cuda or _capability(a.qa.device.index or 0) != (9, 0):
        return "the Gluon kernel runs on sm_90 (H100/H200) only"
    if a.qa.dtype != torch.int8:
        return "the Gluon kernel takes the int8 activation operand"
    if w.group_size not in (None, 2 * SPAN) or w.span != SPAN:
        return f"the Gluon kernel takes groups of {2 * SPAN} or one scale per row, got groups of {w.group_size}"
    if w.kn % 16:
        return f"the Gluon kernel needs Kn (normal channels) a multiple of 16, got {w.kn}"
    if mult and (w.group_size != 2 * SPAN or w.mult.stride(0) % 16 or w.mult.data_ptr() % 16):
        return (f"the Gluon multiplier loop takes groups of {2 * SPAN} and copies the multipliers 4 bytes at a "
                f"time (rows 16-byte aligned, as prepare_weight pads them)")
    return None


def max_registers(num_warps: int, ctas_per_sm: int) -> int:
    """Registers per thread that let ``ctas_per_sm`` programs of ``num_warps`` warps share an SM's 64K
    32-bit registers (ptxas allocates in steps of 8; 255 at most)."""
    return min(255, 65536 // (ctas_per_sm * 32 * num_warps) // 8 * 8)


def parks_main_product(block_m: int, ctas_per_sm: int) -> bool:
    """Whether the epilogue parks the main product in shared memory during the INT8 outlier part (STASH):
    with several programs per SM (registers capped) or 256-token tiles (two sums held). Its fp32 sums then
    round in another order than the unparked epilogue's."""
    return ctas_per_sm > 1 or block_m > 128


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def w4a4_gemm_hopper(a, w, bias: torch.Tensor | None, out: torch.Tensor, block_m: int = 128,
                     num_warps: int = 4, stages: int = 4, group_m: int = 8, mult: bool = False,
                     ctas_per_sm: int = 1, probe: int = 0) -> torch.Tensor:
    """out [M, N] (fp16/bf16) = W4A4 product of ActOp ``a`` (int8 operand) and PreparedWeight ``w``.

    The caller (``w4a4_gemm``) has validated shapes and dtypes and checked ``unsupported_reason``.
    Tiles: BLOCK_N = 16 * num_warps weight rows (one 64-row warpgroup per 4 warps) x block_m tokens;
    block_m = 256 (one-sum loops only) is two 128-token wgmma tiles that share every unpacked weight operand.
    mult: the integer-multiplier loop (``w.mult``; the caller vouches that each row of a.s4 holds one value).
    ctas_per_sm > 1 (one int32 sum over K only: group-free or mult): registers capped so that many programs
    share an SM. With it or block_m = 256 the epilogue parks the main product in shared memory while the
    INT8 outlier part accumulates, so the two accumulators are never in registers at once.
    probe: for timing only, the output is wrong: bits that leave work out, to see what it costs (PROBE_*).
    """
    if probe & ~(PROBE_NO_UNPACK | PROBE_NO_WEIGHT_COPY | PROBE_NO_ACT_COPY):
        raise ValueError(f"unknown probe bits in {probe}")
    m = a.qa.shape[0]
    n = w.n
    block_n = 16 * num_warps
    grouped = w.group_size is not None and not mult
    if ctas_per_sm < 1 or (ctas_per_sm > 1 and grouped):
        raise ValueError(f"ctas_per_sm must be 1, or more for the one-int32-sum loops (group-free or integer "
                         f"multipliers), got {ctas_per_sm} with groups of {w.group_size}")
    if block_m not in (64, 128, 256) or (block_m == 256 and (grouped or ctas_per_sm > 1)):
        raise ValueError(f"block_m must be 64 or 128, or 256 for the one-int32-sum loops at one program per SM, "
                         f"got {block_m} with groups of {w.group_size} and ctas_per_sm={ctas_per_sm}")
    halves = 2 if block_m == 256 else 1
    if mult:  # the units are the scales: fp32 [N] and [1, M]
        sw, sa_t = w.unit, a.s4[:, 0].float().view(1, m)
    else:  # fp32 [G, M] activation scales: one contiguous vector per group for the cp.async ring
        sw, sa_t = w.sw, a.s4.t().float().contiguous()
    has_out = w.n_out > 0
    dummy = w.sw
    n_blocks = w.kp // (2 * SPAN)
    grid = (triton.cdiv(n, block_n) * triton.cdiv(m, block_m),)
    regs = {} if ctas_per_sm == 1 else {"maxnreg": max_registers(num_warps, ctas_per_sm)}
    _w4a4_hopper_kernel[grid](
        w.w4, sw, w.mult if mult else w.w4, w.w8 if has_out else dummy, w.s8w if has_out else dummy,
        a.qa, sa_t, a.q8 if has_out else a.qa, a.s8 if has_out else a.s4,
        bias if bias is not None else dummy, out,
        m, n, w.kn, w.n_out, n_blocks,
        sw.stride(0), w.mult.stride(0) if mult else 0, w.w8.stride(0) if has_out else 0, a.qa.stride(0),
        sa_t.stride(0), a.q8.stride(0) if has_out else 0, a.s8.stride(0) if has_out else 0, out.stride(0),
        BLOCK_N=block_n, BLOCK_M=block_m // halves, S=SPAN, RT=w.row_tile, STAGES=stages, GROUP_M=group_m,
        GROUPED=grouped, MULT=mult, HAS_OUT=has_out, HAS_BIAS=bias is not None,
        STASH=parks_main_product(block_m, ctas_per_sm), HALVES=halves, PROBE=probe, num_warps=num_warps, **regs,
    )
    return out


if AVAILABLE:

    _UNPACK_INT8 = gl.constexpr(UNPACK_INT8_ASM)
    _UNPACK_LOW = gl.constexpr(unpack_int8_half_asm(0))
    _UNPACK_HIGH = gl.constexpr(unpack_int8_half_asm(4))
    _UNPACK_LOW_MULT = gl.constexpr(unpack_int8_half_asm(0, mult=True))
    _UNPACK_HIGH_MULT = gl.constexpr(unpack_int8_half_asm(4, mult=True))

    @gluon.jit
    def _unpack(wp):
        """Packed bytes int8 [BN, S] -> (low nibbles, high nibbles) int8 [BN, S] in -8..7, same layout."""
        return gl.inline_asm_elementwise(
            asm=_UNPACK_INT8, constraints="=r,=r,r", args=[wp], dtype=(gl.int8, gl.int8),
            is_pure=True, pack=4)

    @gluon.jit
    def _unpack_half(wp, m32, c32, HIGH: gl.constexpr, MULT: gl.constexpr, PROBE: gl.constexpr):
        """One nibble half of packed bytes int8 [BN, S], int8 [BN, S] in the same layout; with MULT times each
        row's multiplier (int32 [BN, S]: m32 = m, c32 = 128 - 8m in every byte). Not pure: it must not move
        above the wgmma wait ahead of it, which frees the registers it writes. PROBE bit 1: one move instead."""
        if PROBE & 1:
            return gl.inline_asm_elementwise(asm="mov.b32 $0, $1;", constraints="=r,r", args=[wp], dtype=gl.int8,
                                             is_pure=False, pack=4)
        if MULT:
            return gl.inline_asm_elementwise(
                asm=_UNPACK_HIGH_MULT if HIGH else _UNPACK_LOW_MULT, constraints="=r" + ",r" * 9,
                args=[wp, m32, c32], dtype=gl.int8, is_pure=False, pack=4)
        return gl.inline_asm_elementwise(asm=_UNPACK_HIGH if HIGH else _UNPACK_LOW, constraints="=r,r",
                                         args=[wp], dtype=gl.int8, is_pure=False, pack=4)

    @gluon.jit
    def _block_mma_overlapped(it, w_s, al_s, ah_s, mult_s, mv, d, d1, w_op: gl.constexpr, STAGES: gl.constexpr,
                              PENDING: gl.constexpr, MULT: gl.constexpr, HALVES: gl.constexpr, PROBE: gl.constexpr):
        """d += K block ``it`` in the one-sum loop: its two wgmmas, async, once its copies have landed (at
        most PENDING newer commit groups in flight). HALVES = 2: d1 is the tile's second half of tokens
        (activation slots 2 * slot + 1), which every unpacked operand also multiplies. MULT: mv uint8 [BN]
        (SliceLayout(1, w_op)) holds block it's multiplier per weight row; returns (d, d1, block it + 1's
        multipliers), which came with block it's copies.

        wgmma reads its register operand while it runs (late when the tensor cores are busy, e.g. with
        several programs per SM), so registers are unpacked into only once a wait has retired the wgmma
        that read them: each nibble half waits for the same half of the block before, and one wgmma stays
        in flight during each unpack. (The multipliers are loaded a block ahead: loading a block's own row
        between its waits and its unpacks made ptxas serialize every wgmma.)"""
        slot = it % STAGES
        cp.wait_group(PENDING)
        wp = w_s.index(slot).load(w_op)
        if MULT:  # the row's multiplier m, and 128 - 8m in every byte (int32 wraps to that bit pattern)
            mv_next = mult_s.index((it + 1) % STAGES).load(gl.SliceLayout(1, w_op))
            mv32 = mv.to(gl.int32)
            zero = gl.zeros(wp.shape, gl.int32, w_op)
            m32 = zero + mv32[:, None]
            c32 = zero + ((128 - 8 * mv32) * 0x01010101)[:, None]
        else:
            mv_next = 0
            m32 = 0
            c32 = 0
        fence_async_shared()
        wl = _unpack_half(wp, m32, c32, False, MULT, PROBE)
        if HALVES == 2:
            d = warpgroup_mma(wl, al_s.index(2 * slot).permute((1, 0)), d, is_async=True)
            d1 = warpgroup_mma(wl, al_s.index(2 * slot + 1).permute((1, 0)), d1, is_async=True)
            d, d1 = warpgroup_mma_wait(num_outstanding=2, deps=(d, d1))  # block it - 1's high wgmmas retired
            wh = _unpack_half(wp, m32, c32, True, MULT, PROBE)
            d = warpgroup_mma(wh, ah_s.index(2 * slot).permute((1, 0)), d, is_async=True)
            d1 = warpgroup_mma(wh, ah_s.index(2 * slot + 1).permute((1, 0)), d1, is_async=True)
            d, d1 = warpgroup_mma_wait(num_outstanding=2, deps=(d, d1))  # and block it's low ones
        else:
            d = warpgroup_mma(wl, al_s.index(slot).permute((1, 0)), d, is_async=True)
            d = warpgroup_mma_wait(num_outstanding=1, deps=(d,))  # the high half of block it - 1 has retired
            d = warpgroup_mma(_unpack_half(wp, m32, c32, True, MULT, PROBE), ah_s.index(slot).permute((1, 0)), d,
                              is_async=True)
            d = warpgroup_mma_wait(num_outstanding=1, deps=(d,))  # and the low half of block it
        return d, d1, mv_next

    @gluon.jit
    def _copy_mult_row(b, mult_ptr, mult_s, offs_n4, N_BLOCKS, stride_mg, STAGES: gl.constexpr):
        """cp.async the multipliers of K block ``b`` into ring slot b % STAGES (no commit): 4 per copy
        (cp.async moves 4, 8 or 16 bytes), masked by the padded row (zeros past N), which keeps every 4-byte
        piece whole for any N."""
        cp_async_load(mult_s.index(b % STAGES), mult_ptr + b * stride_mg + offs_n4,
                      mask=(offs_n4 < stride_mg) & (b < N_BLOCKS))

    @gluon.jit
    def _issue_stage(it, slot, w_rows, a_rows, sw_ptr, sa_ptr, mult_ptr, w_s, al_s, ah_s, sw_s, sa_s, mult_s,
                     offs_k, offs_n, offs_m, offs_n4, N_BLOCKS, KN, N, M, stride_swg, stride_sag, stride_mg,
                     mask_wn, rows_a, stride_am, S: gl.constexpr, RT: gl.constexpr, GROUPED: gl.constexpr,
                     MULT: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, HALVES: gl.constexpr,
                     PROBE: gl.constexpr):
        """cp.async every operand of K block ``it`` into ring slot ``slot`` as one commit group
        (masked off, so zero-filled, at and past N_BLOCKS); MULT: with block it + 1's multipliers. The
        tile's HALVES halves of BLOCK_M tokens go to activation slots HALVES * slot + h. PROBE bits 2 / 4:
        no weight / activation copies."""
        live = it < N_BLOCKS
        if not (PROBE & 2):
            cp_async_load(w_s.index(slot), w_rows + (it * (RT * S) + offs_k)[None, :], mask=mask_wn & live)
        k_lo = it * (2 * S) + offs_k
        for h in gl.static_range(0 if PROBE & 4 else HALVES):  # a_rows / rows_a: the first half's pointers, tokens
            mask_am = (rows_a + h * BLOCK_M < M)[:, None]
            a_h = a_rows + h * BLOCK_M * stride_am
            cp_async_load(al_s.index(HALVES * slot + h), a_h + k_lo[None, :],
                          mask=mask_am & (k_lo[None, :] < KN) & live)
            cp_async_load(ah_s.index(HALVES * slot + h), a_h + (k_lo + S)[None, :],
                          mask=mask_am & ((k_lo + S)[None, :] < KN) & live)
        if GROUPED:
            cp_async_load(sw_s.index(slot), sw_ptr + it * stride_swg + offs_n, mask=(offs_n < N) & live)
            cp_async_load(sa_s.index(slot), sa_ptr + it * stride_sag + offs_m, mask=(offs_m < M) & live)
        if MULT:  # the next block's multipliers, one commit group early: loaded before that block's wait
            _copy_mult_row(it + 1, mult_ptr, mult_s, offs_n4, N_BLOCKS, stride_mg, STAGES)
        cp.commit_group()

    @gluon.jit
    def _block_mma(it, w_s, al_s, ah_s, d, w_op: gl.constexpr, STAGES: gl.constexpr, PENDING: gl.constexpr):
        """Issue K block ``it``'s two wgmmas (low, high nibbles) into a fresh int32 tile (d only lends its
        registers), async, once its copies have landed (at most PENDING newer commit groups in flight).
        The promoting loop waits for them before its next unpack rewrites their register operands."""
        slot = it % STAGES
        cp.wait_group(PENDING)
        wl, wh = _unpack(w_s.index(slot).load(w_op))
        fence_async_shared()
        d = warpgroup_mma(wl, al_s.index(slot).permute((1, 0)), d, use_acc=False, is_async=True)
        return warpgroup_mma(wh, ah_s.index(slot).permute((1, 0)), d, is_async=True)

    @gluon.jit
    def _promote(acc, d, slot, sw_s, sa_s, mma: gl.constexpr):
        """acc + float(d) * sw[n] * sa[m], with the scale vectors of ring slot ``slot``."""
        swv = sw_s.index(slot).load(gl.SliceLayout(1, mma))
        sav = sa_s.index(slot).load(gl.SliceLayout(0, mma))
        return acc + d.to(gl.float32) * (swv[:, None] * sav[None, :])

    @gluon.jit
    def _w4a4_hopper_kernel(
        w_ptr, sw_ptr, mult_ptr, w8_ptr, s8w_ptr, a_ptr, sa_ptr, a8_ptr, s8a_ptr, bias_ptr, out_ptr,
        M, N, KN, NO, N_BLOCKS,
        stride_swg, stride_mg, stride_w8n, stride_am, stride_sag, stride_a8m, stride_s8am, stride_om,
        BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, S: gl.constexpr, RT: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, GROUPED: gl.constexpr, MULT: gl.constexpr,
        HAS_OUT: gl.constexpr, HAS_BIAS: gl.constexpr, STASH: gl.constexpr, HALVES: gl.constexpr,
        PROBE: gl.constexpr = 0,
    ):
        """One [BLOCK_N, HALVES * BLOCK_M] tile of out^T over all K blocks of 2S channels (one group each; or,
        not GROUPED, one int32 sum over all of K scaled once by sw[0, n] * sa[0, m]; with MULT the
        weights are multiplied by mult[block, n] as they unpack).

        w: int8 packed tiles (module docstring of w4a4_gemm); sw: fp32 [G, N] (MULT: the units [1, N]);
        mult: uint8 [G, N] (MULT only); w8: int8 [N, NO];
        s8w: fp32 [N]; a: int8 [M, KN]; sa: fp32 [G, M]; a8: int8 [M, NO]; s8a: fp16 [M, 1];
        bias: [N]; out: fp16/bf16 [M, N]. STASH: the epilogue parks the main product in shared memory
        (see ``_epilogue``). HALVES = 2 (one-sum loops): the tile is [BLOCK_N, 2 * BLOCK_M], two int32 sums
        that share every unpacked weight operand.
        """
        num_warps: gl.constexpr = gl.num_warps()
        pid = gl.program_id(0)
        num_n = gl.cdiv(N, BLOCK_N)
        num_m = gl.cdiv(M, BLOCK_M * HALVES)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gm = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gm
        pid_n = (pid % width) // gm

        # register layouts: the wgmma accumulator, its left operand, 16-byte copies, 1-D scale copies
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 32])
        w_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        cp16: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [num_warps, 1], [1, 0])
        cp1: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        cp4: gl.constexpr = gl.BlockedLayout([4], [32], [num_warps], [0])
        # shared layouts: packed weights read back in the operand layout; activations as wgmma's B
        w_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=16, per_phase=2, max_phase=4, order=[1, 0])
        a_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
        v_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

        w_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, S], w_sl)
        al_s = gl.allocate_shared_memory(gl.int8, [STAGES * HALVES, BLOCK_M, S], a_sl)
        ah_s = gl.allocate_shared_memory(gl.int8, [STAGES * HALVES, BLOCK_M, S], a_sl)
        sw_s = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N], v_sl)
        sa_s = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], v_sl)
        mult_s = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N if MULT else 4], v_sl)

        # copy addressing: weight row r of block it at (r // RT) * N_BLOCKS * RT * S + it * RT * S + (r % RT) * S
        rows_w = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, cp16))
        m0 = pid_m * BLOCK_M * HALVES  # the tile's first token
        rows_a = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(1, cp16))
        offs_k = gl.arange(0, S, gl.SliceLayout(0, cp16))
        w_rows = w_ptr + ((rows_w // RT).to(gl.int64) * N_BLOCKS * (RT * S) + (rows_w % RT) * S)[:, None]
        a_rows = a_ptr + rows_a.to(gl.int64)[:, None] * stride_am
        mask_wn = (rows_w < N)[:, None]
        offs_n1 = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, cp1)
        offs_m1 = m0 + gl.arange(0, BLOCK_M, cp1)
        offs_n4 = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, cp4)

        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
        d = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, mma)
        d1 = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, mma) if HALVES == 2 else 0
        if GROUPED:
            # per block: wgmmas, wait, promote; the slot is then refilled with block it + STAGES
            for i in gl.static_range(STAGES):
                _issue_stage(i, i, w_rows, a_rows, sw_ptr, sa_ptr, mult_ptr, w_s, al_s, ah_s, sw_s, sa_s, mult_s,
                             offs_k, offs_n1, offs_m1, offs_n4, N_BLOCKS, KN, N, M, stride_swg, stride_sag,
                             stride_mg, mask_wn, rows_a, stride_am, S, RT, GROUPED, MULT, STAGES, BLOCK_M, HALVES,
                             PROBE)
            for it in range(N_BLOCKS):
                slot = it % STAGES
                d = _block_mma(it, w_s, al_s, ah_s, d, w_op, STAGES, STAGES - 1)
                d = warpgroup_mma_wait(num_outstanding=0, deps=(d,))
                acc = _promote(acc, d, slot, sw_s, sa_s, mma)
                _issue_stage(it + STAGES, slot, w_rows, a_rows, sw_ptr, sa_ptr, mult_ptr, w_s, al_s, ah_s, sw_s,
                             sa_s, mult_s, offs_k, offs_n1, offs_m1, offs_n4, N_BLOCKS, KN, N, M, stride_swg,
                             stride_sag, stride_mg, mask_wn, rows_a, stride_am, S, RT, GROUPED, MULT, STAGES,
                             BLOCK_M, HALVES, PROBE)
        else:
            # one int32 sum (see _block_mma_overlapped for how unpacks and wgmmas overlap); once block
            # it - 1 has retired, its slot is refilled with block it + STAGES - 1. MULT: block b's
            # multipliers travel with block b - 1's copies (block 0's in a group of their own) and are
            # loaded in iteration b - 1, so they are in registers before block b's copy wait.
            if MULT:
                _copy_mult_row(0, mult_ptr, mult_s, offs_n4, N_BLOCKS, stride_mg, STAGES)
                cp.commit_group()
            for i in gl.static_range(STAGES - 1):
                _issue_stage(i, i, w_rows, a_rows, sw_ptr, sa_ptr, mult_ptr, w_s, al_s, ah_s, sw_s, sa_s, mult_s,
                             offs_k, offs_n1, offs_m1, offs_n4, N_BLOCKS, KN, N, M, stride_swg, stride_sag,
                             stride_mg, mask_wn, rows_a, stride_am, S, RT, GROUPED, MULT, STAGES, BLOCK_M, HALVES,
                             PROBE)
            if MULT:  # block 0's multipliers have landed, for every thread
                cp.wait_group(STAGES - 1)
                cta_barrier()
                mv = mult_s.index(0).load(gl.SliceLayout(1, w_op))
            else:
                mv = 0
            for it in range(N_BLOCKS):
                d, d1, mv = _block_mma_overlapped(it, w_s, al_s, ah_s, mult_s, mv, d, d1, w_op, STAGES, STAGES - 2,
                                                  MULT, HALVES, PROBE)
                nxt = it + STAGES - 1
                _issue_stage(nxt, nxt % STAGES, w_rows, a_rows, sw_ptr, sa_ptr, mult_ptr, w_s, al_s, ah_s, sw_s,
                             sa_s, mult_s, offs_k, offs_n1, offs_m1, offs_n4, N_BLOCKS, KN, N, M, stride_swg,
                             stride_sag, stride_mg, mask_wn, rows_a, stride_am, S, RT, GROUPED, MULT, STAGES,
                             BLOCK_M, HALVES, PROBE)
            if HALVES == 2:
                d, d1 = warpgroup_mma_wait(num_outstanding=0, deps=(d, d1))
            else:
                d = warpgroup_mma_wait(num_outstanding=0, deps=(d,))
            offs_ns = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, mma))
            swv = gl.load(sw_ptr + offs_ns, mask=offs_ns < N, other=0.0)
            offs_ms = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(0, mma))
            sav = gl.load(sa_ptr + offs_ms, mask=offs_ms < M, other=0.0)
            acc = d.to(gl.float32) * (swv[:, None] * sav[None, :])
        cp.wait_group(0)

        _epilogue(acc, rows_w, rows_a, pid_n, m0, w8_ptr, s8w_ptr, a8_ptr, s8a_ptr, bias_ptr, out_ptr,
                  M, N, NO, stride_w8n, stride_a8m, stride_s8am, stride_om,
                  BLOCK_N, BLOCK_M, HAS_OUT, HAS_BIAS, STASH, mma, cp16)
        if HALVES == 2:  # the second half of the tokens, once the first is stored
            offs_ms = m0 + BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(0, mma))
            sav = gl.load(sa_ptr + offs_ms, mask=offs_ms < M, other=0.0)
            acc = d1.to(gl.float32) * (swv[:, None] * sav[None, :])
            _epilogue(acc, rows_w, rows_a + BLOCK_M, pid_n, m0 + BLOCK_M, w8_ptr, s8w_ptr, a8_ptr, s8a_ptr,
                      bias_ptr, out_ptr, M, N, NO, stride_w8n, stride_a8m, stride_s8am, stride_om,
                      BLOCK_N, BLOCK_M, HAS_OUT, HAS_BIAS, STASH, mma, cp16)

    @gluon.jit
    def _epilogue(acc, rows_w, rows_a, pid_n, m0, w8_ptr, s8w_ptr, a8_ptr, s8a_ptr, bias_ptr, out_ptr,
                  M, N, NO, stride_w8n, stride_a8m, stride_s8am, stride_om,
                  BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, HAS_OUT: gl.constexpr, HAS_BIAS: gl.constexpr,
                  STASH: gl.constexpr, mma: gl.constexpr, cp16: gl.constexpr):
        """Add the INT8 outlier product and the bias to acc fp32 [BLOCK_N, BLOCK_M] (out^T) and store it
        into out [M, N]. rows_w / rows_a: the tile's weight rows and tokens in SliceLayout(1, cp16).

        STASH: acc waits in shared memory (placed over the drained cp.async ring, in fp32) while the
        outlier wgmmas fill their own int32 tile: the epilogue then needs one accumulator's registers, as
        the main loop does. The sum is the same up to rounding: the fused multiply-adds pair differently
        (the stored main product is rounded to fp32 before the outlier part is added), so the last bit of
        the output may differ from the unstashed epilogue's."""
        num_warps: gl.constexpr = gl.num_warps()
        mask_wn = (rows_w < N)[:, None]
        mask_am = (rows_a < M)[:, None]
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, mma))
        offs_m = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(0, mma))
        mask_n = offs_n < N
        mask_m = offs_m < M
        if HAS_OUT:  # INT8 outlier channels: one synchronous wgmma per 64 of them
            if STASH:  # every warpgroup's last wgmmas have read the ring before it is overwritten
                cta_barrier()
                stash_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=2, per_phase=1, max_phase=16, order=[1, 0])
                acc_s = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_M], stash_sl, acc)
            o_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
            w8_s = gl.allocate_shared_memory(gl.int8, [BLOCK_N, 64], o_sl)
            a8_s = gl.allocate_shared_memory(gl.int8, [BLOCK_M, 64], o_sl)
            offs_o = gl.arange(0, 64, gl.SliceLayout(0, cp16))
            d8 = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, mma)
            for o0 in range(0, NO, 64):
                oo = o0 + offs_o
                w8 = gl.load(w8_ptr + rows_w.to(gl.int64)[:, None] * stride_w8n + oo[None, :],
                             mask=mask_wn & (oo[None, :] < NO), other=0)
                a8 = gl.load(a8_ptr + rows_a.to(gl.int64)[:, None] * stride_a8m + oo[None, :],
                             mask=mask_am & (oo[None, :] < NO), other=0)
                w8_s.store(w8)
                a8_s.store(a8)
                fence_async_shared()
                d8 = warpgroup_mma(w8_s, a8_s.permute((1, 0)), d8)
            s8w = gl.load(s8w_ptr + offs_n, mask=mask_n, other=0.0)
            s8a = gl.load(s8a_ptr + offs_m * stride_s8am, mask=mask_m, other=0.0).to(gl.float32)
            part = d8.to(gl.float32) * (s8w[:, None] * s8a[None, :])
            if STASH:
                acc = acc_s.load(mma) + part
            else:
                acc += part
        if HAS_BIAS:
            acc += gl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(gl.float32)[:, None]

        # store out[m, n]: a layout with 8 consecutive n per thread gives 16-byte stores along out's rows
        st: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])
        res = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), st)
        sn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, st))
        sm = m0 + gl.arange(0, BLOCK_M, gl.SliceLayout(0, st))
        ptrs = out_ptr + sm.to(gl.int64)[None, :] * stride_om + sn[:, None]
        gl.store(ptrs, res, mask=(sn < N)[:, None] & (sm < M)[None, :])
