"""W4A4 matrix-vector product on CUDA cores: a decode path of ``w4a4_gemm`` for one token.

At M = 1 a tensor-core tile is almost all padding and the product is a stream over the 4-bit weights,
so this kernel reads them as int32 words and multiplies bytes with ``dp4a``. Operands and math are those
of ``w4a4_gemm.py`` (its docstring has the prepared layout; twin ``ref.w4a4_gemm``):

- One program per (RT-row weight tile, K run, token); it streams its run's K blocks of 2S channels
  (S = span: 64, or 32 for groups of 32), KB blocks at a time (a contiguous run of the prepared
  weights), the weights of the next AHEAD steps (1 or 2) and the activations of the next one loaded
  while the current ones are computed.
- The prepared layout puts channel j of a block in the low and channel S + j in the high nibble of
  byte j, so the low nibbles of a weight word (4 bytes) pair with the activation word holding channels
  4c..4c+3 and the high nibbles with the word of channels S + 4c..: the int8 activation operand is used
  as loaded. A block holds one group (groups of 2S), two (groups of S: one per half) or none (one scale
  per row). Weights are two's complement; XOR with 0x8 per nibble gives u = v + 8 in 0..15, masking
  gives the low / high nibbles as bytes, and ``dp4a`` (4 byte products summed into int32) does the
  rest: 6 instructions per 8 weights in the inner loop. sum(v a) = sum(u a) - 8 sum(a), exact in int32 per group; each
  group's sum is scaled by s_w * s_a in fp32.
- The INT8 outlier part and the bias are added in the same program (the first K run's). With
  ``outliers_first`` its operands load before the run's loop, the weights before the wait for the kernel
  ahead, so their latency is not added at the end of that program.
- Split K (``split`` > 1): a program takes one of ``split`` runs of K blocks, so each program's chain
  of dependent loads is shorter and more programs stream at once (a short product such as 7B o_proj
  has only 256 row tiles). Partials go to an fp32 workspace; the last program to arrive at a tile
  (an int32 arrival counter per tile and token, reset by that program) sums them in split order, so
  the result does not depend on arrival order, and writes the output: one kernel, CUDA-graph safe.
- Accumulate (``accumulate``): the output is an fp32 accumulator of zeros (zeroed by the quantize
  kernel ahead) that every run adds into with a fire-and-forget atomic (``red``); no partials, no
  counter, no last-run sum, so a run ends at its add. The consumer rounds the sum; the runs' order,
  and so its last fp32 bit, is not fixed.
"""

from __future__ import annotations

import torch

from .pdl import launch_options
from .quantize import interpreting

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_M = 1  # tokens w4a4_gemm sends here (the kernel takes any M; at M = 2 the tensor cores win)


def unsupported_reason(a, w) -> str | None:
    """Why this kernel cannot take ActOp ``a`` and PreparedWeight ``w`` (None: it can)."""
    if a.qa.dtype != torch.int8:
        return "the GEMV takes the int8 activation operand"
    if (w.span, w.group_size) not in ((64, None), (64, 64), (64, 128), (32, 32)):
        return f"the GEMV takes groups of 32, 64, 128 or none, got span {w.span} and groups of {w.group_size}"
    if w.kn % 4 or a.qa.stride(0) % 4 or a.qa.storage_offset() % 4:
        return "the GEMV reads activations as 4-byte words: Kn and the row stride must be multiples of 4"
    return None


def w4a4_gemv(a, w, bias: torch.Tensor | None, out: torch.Tensor, blocks: int = 4, num_warps: int = 4,
              split: int = 1, locks: torch.Tensor | None = None, ahead: int = 1, accumulate: bool = False,
              outliers_first: bool = False) -> torch.Tensor:
    """out [M, N] = a @ w^T (+ bias) (one program per row tile of the prepared weight, K run and token);
    a: ActOp (int8 operand), w: PreparedWeight.

    blocks: K blocks of 128 channels per step (KB; blocks of 64 channels, groups of 32, take twice as many
    a step). split: K runs (rounded so each holds a whole number of steps); split > 1 needs ``locks``,
    zeroed int32 [>= row tiles * M] that the kernel leaves zeroed.
    ahead: K steps of weights in flight (1 or 2). accumulate: ``out`` is an fp32 accumulator of zeros that
    every K run adds into (no partials, no counters; the order of the runs' adds is not fixed).
    outliers_first: the first run loads the INT8 outlier operands before its loop, as 4-byte words (same
    result; ignored where they cannot be read so: outlier count, row strides or addresses not multiples of 4).
    Validated by ``w4a4_gemm``; no sync.
    """
    m, n = a.qa.shape[0], w.n
    rt = w.row_tile
    tiles = triton.cdiv(n, rt)
    n_blocks = w.kp // (2 * w.span)
    kb = blocks * 64 // w.span  # blocks a step: the same bytes a step whatever the block size
    if ahead not in (1, 2):
        raise ValueError(f"ahead must be 1 or 2, got {ahead}")
    if accumulate and out.dtype != torch.float32:
        raise ValueError(f"accumulating needs an fp32 out, got {out.dtype}")
    per = triton.cdiv(triton.cdiv(n_blocks, max(1, split)), kb) * kb  # K blocks per run
    split = triton.cdiv(n_blocks, per)
    if split > 1 and not accumulate and (locks is None or locks.numel() < tiles * m):
        raise ValueError(f"split K over {split} runs needs {tiles * m} arrival counters")
    partial = split > 1 and not accumulate
    part = torch.empty(split, m, n, dtype=torch.float32, device=out.device) if partial else out
    has_out = w.n_out > 0
    dummy = w.sw
    q8, s8 = (a.q8, a.s8) if has_out else (a.s4, a.s4)
    outliers_first = outliers_first and has_out and all(
        v % 4 == 0 for v in (w.n_out, w.w8.stride(0), q8.stride(0), w.w8.data_ptr(), q8.data_ptr()))
    _gemv_kernel[(tiles, split, m)](
        w.w4.view(torch.int32), w.sw, w.w8 if has_out else dummy, w.s8w if has_out else dummy,
        a.qa.view(torch.int32), a.s4, q8, s8, bias if bias is not None else dummy, out,
        part, locks if partial else dummy,
        n, w.kn, w.n_groups, w.n_out, n_blocks, per, w.w4.stride(0) // 4, w.sw.stride(0),
        w.w8.stride(0) if has_out else 0, a.qa.stride(0) // 4, a.s4.stride(0), q8.stride(0), s8.stride(0),
        out.stride(0),
        part.stride(0) if partial else 0,
        RT=rt, KB=kb, W=w.span // 4, GS=w.group_size or 0, HAS_OUT=has_out, HAS_BIAS=bias is not None,
        PARTIAL=partial, ACC=accumulate,
        AHEAD=ahead, OUT_FIRST=outliers_first,
        BLOCK_O=max(16, triton.next_power_of_2(max(w.n_out, 1))), USE_ASM=not interpreting(),
        num_warps=num_warps, num_stages=1, **launch_options(out.device),
    )
    return out


if triton is not None:

    from .pdl import gdc_enter

    _DP4A = tl.constexpr("dp4a.u32.s32 $0, $1, $2, $3;")

    @triton.jit
    def _dp4a(u, a, c, USE_ASM: tl.constexpr):
        """int32 c + sum over the 4 bytes of u (unsigned) times the 4 bytes of a (signed); same shapes."""
        if USE_ASM:
            return tl.inline_asm_elementwise(_DP4A, "=r,r,r,r", [u, a, c], dtype=tl.int32, is_pure=True, pack=1)
        else:  # the interpreter runs no PTX
            return (c + ((u & 0xFF) * ((a << 24) >> 24)) + (((u >> 8) & 0xFF) * ((a << 16) >> 24))
                    + (((u >> 16) & 0xFF) * ((a << 8) >> 24)) + (((u >> 24) & 0xFF) * (a >> 24)))

    @triton.jit
    def _load_weights(b0, W4T, n_blocks, KB: tl.constexpr, RT: tl.constexpr, W: tl.constexpr):
        """Weight words int32 [KB, RT, W] of the KB blocks from b0 (0 past n_blocks); W = S / 4 words per
        row and block."""
        k3 = (b0 + tl.arange(0, KB))[:, None, None]
        r = tl.arange(0, RT)[None, :, None]
        c = tl.arange(0, W)[None, None, :]
        return tl.load(W4T + k3 * (RT * W) + r * W + c, mask=k3 < n_blocks, other=0)

    @triton.jit
    def _load_step(b0, W4T, QA_M, S4_M, SW, G, n_blocks, kn, rows, stride_sw,
                   KB: tl.constexpr, RT: tl.constexpr, W: tl.constexpr, GS: tl.constexpr):
        """KB blocks from b0: weight words int32 [KB, RT, W]; activation words of the low / high halves
        int32 [KB, 1, W]; per half, the activation scale fp32 [KB, 1] and weight scales fp32 [KB, RT]
        (the same group twice unless GS == S, one group per half)."""
        w = _load_weights(b0, W4T, n_blocks, KB, RT, W)
        return (w,) + _load_acts(b0, QA_M, S4_M, SW, G, n_blocks, kn, rows, stride_sw, KB, RT, W, GS)

    @triton.jit
    def _load_acts(b0, QA_M, S4_M, SW, G, n_blocks, kn, rows, stride_sw,
                   KB: tl.constexpr, RT: tl.constexpr, W: tl.constexpr, GS: tl.constexpr):
        """The rest of _load_step: activation words, activation scales, weight scales."""
        kb = b0 + tl.arange(0, KB)
        k3 = kb[:, None, None]
        c = tl.arange(0, W)[None, None, :]
        ch = k3 * (8 * W) + 4 * c  # first channel of each low-half word (a block is 2S = 8W channels)
        live = k3 < n_blocks  # blocks past the run's end: their weights are masked to 0 as well
        a_lo = tl.load(QA_M + k3 * (2 * W) + c, mask=live & (ch < kn), other=0)
        a_hi = tl.load(QA_M + k3 * (2 * W) + W + c, mask=live & (ch + 4 * W < kn), other=0)
        if GS == 4 * W:  # one group per half
            g_lo = 2 * kb
            g_hi = 2 * kb + 1
        elif GS == 8 * W:  # one group per block
            g_lo = kb
            g_hi = kb
        else:  # one scale per row and per token
            g_lo = kb * 0
            g_hi = kb * 0
        ok_lo = (kb < n_blocks) & (g_lo < G)
        ok_hi = (kb < n_blocks) & (g_hi < G)
        sa_lo = tl.load(S4_M + g_lo, mask=ok_lo, other=0.0).to(tl.float32)[:, None]
        sa_hi = tl.load(S4_M + g_hi, mask=ok_hi, other=0.0).to(tl.float32)[:, None]
        sw_lo = tl.load(SW + g_lo[:, None] * stride_sw + rows[None, :], mask=ok_lo[:, None], other=0.0)
        sw_hi = tl.load(SW + g_hi[:, None] * stride_sw + rows[None, :], mask=ok_hi[:, None], other=0.0)
        return a_lo, a_hi, sa_lo, sa_hi, sw_lo, sw_hi

    @triton.jit
    def _dp4a_signed(a, b, c, USE_ASM: tl.constexpr):
        """int32 c + sum over the 4 bytes of a times the 4 bytes of b, both signed; same shapes."""
        if USE_ASM:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)
        else:
            return (c + ((a << 24) >> 24) * ((b << 24) >> 24) + ((a << 16) >> 24) * ((b << 16) >> 24)
                    + ((a << 8) >> 24) * ((b << 8) >> 24) + (a >> 24) * (b >> 24))

    @triton.jit
    def _outlier_part(W8, S8W, Q8_M, S8_M, rows, rmask, N_OUT, stride_w8, BLOCK_O: tl.constexpr):
        """The INT8 outlier part of the tile's rows, fp32 [RT] (the operands loaded after the loop)."""
        j = tl.arange(0, BLOCK_O)
        jm = j < N_OUT
        w8 = tl.load(W8 + rows[:, None] * stride_w8 + j[None, :], mask=rmask[:, None] & jm[None, :], other=0)
        a8 = tl.load(Q8_M + j, mask=jm, other=0)
        d8 = tl.sum(w8.to(tl.float32) * a8.to(tl.float32)[None, :], 1)  # exact: |d8| < 2**24
        return d8 * (tl.load(S8W + rows, mask=rmask, other=0.0) * tl.load(S8_M).to(tl.float32))

    @triton.jit
    def _outlier_weight_words(W8, S8W, rows, rmask, N_OUT, stride_w8, live, BLOCK_O: tl.constexpr):
        """The tile's outlier weights as 4-byte words int32 [RT, BLOCK_O // 4] (few registers to hold across
        the loop) and their scales fp32 [RT]; 0 where not live. N_OUT and stride_w8: multiples of 4."""
        c = tl.arange(0, BLOCK_O // 4)
        mask = rmask[:, None] & (4 * c < N_OUT)[None, :] & live
        w8 = tl.load(W8.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_w8 // 4) + c[None, :], mask=mask,
                     other=0)
        return w8, tl.load(S8W + rows, mask=rmask & live, other=0.0)

    @triton.jit
    def _outlier_act_words(Q8_M, S8_M, N_OUT, live, BLOCK_O: tl.constexpr):
        """The token's outlier activations as words int32 [BLOCK_O // 4] and their scale (fp16); 0 where not
        live."""
        c = tl.arange(0, BLOCK_O // 4)
        a8 = tl.load(Q8_M.to(tl.pointer_type(tl.int32)) + c, mask=(4 * c < N_OUT) & live, other=0)
        return a8, tl.load(S8_M, mask=live, other=0.0)

    @triton.jit
    def _compute_step(step, acc, USE_ASM: tl.constexpr, W: tl.constexpr, GS: tl.constexpr):
        """acc fp32 [KB, RT] += each block's exact group dot products times s_w * s_a."""
        w, a_lo, a_hi, sa_lo, sa_hi, sw_lo, sw_hi = step
        u = w ^ -2004318072  # 0x88888888: u = v + 8 per nibble
        z1 = tl.zeros(a_lo.shape, tl.int32)
        ones = tl.full(a_lo.shape, 0x01010101, tl.int32)
        n_lo = tl.sum(_dp4a(ones, a_lo, z1, USE_ASM), 2)  # [KB, 1] sum(a) of each half (same for all rows)
        n_hi = tl.sum(_dp4a(ones, a_hi, z1, USE_ASM), 2)
        a_lo = tl.broadcast_to(a_lo, w.shape)
        a_hi = tl.broadcast_to(a_hi, w.shape)
        d = _dp4a(u & 0x0F0F0F0F, a_lo, tl.zeros(w.shape, tl.int32), USE_ASM)  # sum(u a), low half
        if GS == 4 * W:  # the halves are two groups
            d_hi = tl.sum(_dp4a((u >> 4) & 0x0F0F0F0F, a_hi, tl.zeros(w.shape, tl.int32), USE_ASM), 2)
            acc += ((tl.sum(d, 2) - 8 * n_lo).to(tl.float32) * (sw_lo * sa_lo)
                    + (d_hi - 8 * n_hi).to(tl.float32) * (sw_hi * sa_hi))
        else:  # one group per block: one int32 sum
            d = tl.sum(_dp4a((u >> 4) & 0x0F0F0F0F, a_hi, d, USE_ASM), 2)
            acc += (d - 8 * (n_lo + n_hi)).to(tl.float32) * (sw_lo * sa_lo)
        return acc

    @triton.jit
    def _gemv_kernel(
        W4, SW, W8, S8W, QA, S4, Q8, S8, BIAS, OUT, PART, LOCK,
        N, KN, G, N_OUT, n_blocks, PER, stride_w4t, stride_sw, stride_w8, stride_qa, stride_s4, stride_q8, stride_s8,
        stride_om, stride_ps,
        RT: tl.constexpr, KB: tl.constexpr, W: tl.constexpr, GS: tl.constexpr, HAS_OUT: tl.constexpr,
        HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_O: tl.constexpr, USE_ASM: tl.constexpr,
        ACC: tl.constexpr, AHEAD: tl.constexpr, OUT_FIRST: tl.constexpr, USE_GDC: tl.constexpr,
    ):
        """out[m, tile rows] for one weight tile of RT rows, K blocks [s * PER, (s + 1) * PER) and one
        token m (module docstring).

        W4: int32 words of the prepared weights [NP // RT, KP * RT // 8] (W words per row and block);
        SW fp32 [GP, N]; W8 int8 [N, N_OUT], S8W fp32 [N]; QA: int32 words of the int8 activations
        [M, Kn // 4]; S4 fp16 [M, G]; Q8 int8 [M, N_OUT], S8 fp16 [M, 1]; BIAS [N]; OUT [M, N] fp16 / bf16.
        PARTIAL (split K): PART fp32 [SPLIT, M, N] partials, LOCK int32 [row tiles * M] arrival counters (zero before and after).
        ACC: OUT is an fp32 [M, N] accumulator of zeros that every run adds into (the bias with run 0).
        AHEAD: K steps of weight words in flight (1 or 2; activations always 1). USE_GDC (kernels/pdl.py):
        the first AHEAD steps of weights load before the wait for the kernel ahead. OUT_FIRST: run 0
        loads the outlier operands before its loop (the weights before that wait), not after it.
        """
        tile = tl.program_id(0)
        s = tl.program_id(1)
        m = tl.program_id(2).to(tl.int64)
        rows = tile * RT + tl.arange(0, RT)
        rmask = rows < N
        Q8_M = Q8 + m * stride_q8
        S8_M = S8 + m * stride_s8
        W4T = W4 + tile.to(tl.int64) * stride_w4t
        QA_M = QA + m * stride_qa
        S4_M = S4 + m * stride_s4
        b_begin = s * PER
        b_end = tl.minimum(b_begin + PER, n_blocks)  # blocks past it belong to the next run: masked
        acc = tl.zeros([KB, RT], tl.float32)
        # weights (which no kernel writes) load before the wait for the kernel ahead, AHEAD steps deep
        w_now = _load_weights(b_begin, W4T, b_end, KB, RT, W)
        if AHEAD == 2:
            w_next = _load_weights(b_begin + KB, W4T, b_end, KB, RT, W)
        if HAS_OUT and OUT_FIRST:  # masked off, so no traffic, in the runs after the first
            w8, s8w = _outlier_weight_words(W8, S8W, rows, rmask, N_OUT, stride_w8, s == 0, BLOCK_O)
        gdc_enter(USE_GDC)
        if HAS_OUT and OUT_FIRST:
            a8, s8 = _outlier_act_words(Q8_M, S8_M, N_OUT, s == 0, BLOCK_O)
        step = (w_now,) + _load_acts(b_begin, QA_M, S4_M, SW, G, b_end, KN, rows, stride_sw, KB, RT, W, GS)
        for b0 in range(b_begin, b_end, KB):  # the next KB blocks load while these are computed
            if AHEAD == 2:  # weights two steps ahead, activations and scales one
                nxt = (w_next,) + _load_acts(b0 + KB, QA_M, S4_M, SW, G, b_end, KN, rows, stride_sw, KB, RT, W, GS)
                w_next = _load_weights(b0 + 2 * KB, W4T, b_end, KB, RT, W)
            else:
                nxt = _load_step(b0 + KB, W4T, QA_M, S4_M, SW, G, b_end, KN, rows, stride_sw, KB, RT, W, GS)
            acc = _compute_step(step, acc, USE_ASM, W, GS)
            step = nxt
        y = tl.sum(acc, 0)  # [RT]
        if HAS_OUT:
            if s == 0:  # the outlier part once, with the first run
                if OUT_FIRST:  # the same exact sum as _outlier_part's, in int32
                    d8 = tl.sum(_dp4a_signed(w8, a8[None, :], tl.zeros(w8.shape, tl.int32), USE_ASM), 1)
                    y += d8.to(tl.float32) * (s8w * s8.to(tl.float32))
                else:
                    y += _outlier_part(W8, S8W, Q8_M, S8_M, rows, rmask, N_OUT, stride_w8, BLOCK_O)
        if ACC:
            if HAS_BIAS and s == 0:
                y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.atomic_add(OUT + m * stride_om + rows, y, mask=rmask, sem="relaxed")  # result unused: a red
        elif PARTIAL:
            n_split = tl.num_programs(1)
            tl.store(PART + s * stride_ps + m * N + rows, y, mask=rmask)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            lock = LOCK + tile * tl.num_programs(2) + m
            if tl.atomic_add(lock, 1, sem="acq_rel") == n_split - 1:  # the last run to finish this tile
                y = tl.zeros([RT], tl.float32)
                for j in range(0, n_split):  # fixed order: the sum does not depend on arrival order
                    y += tl.load(PART + j * stride_ps + m * N + rows, mask=rmask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
                tl.store(OUT + m * stride_om + rows, y.to(OUT.dtype.element_ty), mask=rmask)
                tl.atomic_xchg(lock, 0)
        else:
            if HAS_BIAS:
                y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
            tl.store(OUT + m * stride_om + rows, y.to(OUT.dtype.element_ty), mask=rmask)
