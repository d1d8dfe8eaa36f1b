"""W4A4 GEMM against ref.w4a4_gemm (exact integer math in float64). Tolerance: norm-wise relative error
1e-3 for fp16 output (measured ~2e-4, the output rounding), 8e-3 for bf16 (docs/KERNELS.md)."""

import pytest
import torch

from atomq.kernels import ref
from atomq.quant import PackedWeight, plan_split, quantize_weight_rtn, unpack_int4

pytest.importorskip("triton")
from atomq.kernels import quantize as Q  # noqa: E402
from atomq.kernels.w4a4_gemm import GemmConfig, prepare_weight, w4a4_gemm  # noqa: E402

TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
CPU_CASES = [  # (M, N, K, n_outliers, group_size)
    (1, 48, 320, 64, 64),
    (7, 40, 576, 128, 128),  # groups of 64, 7 groups (odd: padded block)
    (33, 64, 448, 0, 64),
    (7, 48, 640, 128, 128),  # groups of 128
    (17, 32, 352, 32, 32),
    (5, 32, 256, 32, None),  # one scale per row
]
GPU_CASES = [(m, n, k) for n, k in ((12288, 4096), (4096, 11008), (8192, 28672)) for m in (1, 16, 64, 333, 4096)]


def _problem(m, n, k, n_out, gs, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    split = plan_split(k, n_out, gs)
    w = torch.randn(n, k, generator=g).to(device)
    pw = quantize_weight_rtn(w, split, 4, 0.85)
    x = torch.randn(m, k, generator=g).to(torch.float16).to(device)
    bias = torch.randn(n, generator=g).to(torch.float16).to(device)
    return x, pw, split, bias


def _rel(y, yr):
    return ((y.double() - yr.double()).norm() / yr.double().norm()).item()


def _nibbles(b):
    lo = ((b & 0xF).to(torch.int16) ^ 8) - 8
    hi = ((b >> 4).to(torch.int16) ^ 8) - 8
    return lo.to(torch.int8), hi.to(torch.int8)


def test_prepare_weight_layout(device):
    x, pw, split, _ = _problem(1, 20, 352, 32, 32, device, 0)
    q = unpack_int4(pw.qweight)  # [N, Kn]
    p = prepare_weight(pw, row_tile=1)  # row-major
    assert p.span == 32 and p.kp == 320 and p.w4.shape == (20, 160) and p.sw.shape == (10, 20)
    lo, hi = _nibbles(p.w4.view(torch.uint8)[:, : p.span])  # first block: channels 0..S-1 low, S..2S-1 high
    assert torch.equal(lo, q[:, : p.span]) and torch.equal(hi, q[:, p.span: 2 * p.span])
    # tiles of 16 rows (N padded to 32): block b of rows 16t..16t+15 is one contiguous [16, S] chunk
    p = prepare_weight(pw)
    assert p.row_tile == 16 and p.w4.shape == (2, 16 * 160)
    nb, s = p.kp // (2 * p.span), p.span
    tiles = p.w4.view(torch.uint8).view(2, nb, 16, s)
    for t in range(2):
        for blk in (0, nb - 1):
            lo, hi = _nibbles(tiles[t, blk])
            rows = slice(16 * t, min(16 * t + 16, 20))
            nr = rows.stop - rows.start
            c = blk * 2 * s
            assert torch.equal(lo[:nr], q[rows, c: c + s]) and torch.equal(hi[:nr], q[rows, c + s: c + 2 * s])
            assert not lo[nr:].any() and not hi[nr:].any()  # padding rows are 0


@pytest.mark.parametrize("m,n,k,n_out,gs", CPU_CASES)
def test_w4a4_gemm(m, n, k, n_out, gs, device):
    x, pw, split, bias = _problem(m, n, k, n_out, gs, device, m * 31 + k)
    a = Q.quantize_act(x, None, split, out="int8")
    prepared = prepare_weight(pw)
    for b, dt in ((bias, torch.float16), (None, torch.bfloat16)):
        y = w4a4_gemm(a, prepared, b, out_dtype=dt)
        assert y.shape == (m, n) and y.dtype == dt
        yr = ref.w4a4_gemm(a.to_actq(), pw, b, out_dtype=torch.float64)
        assert _rel(y, yr) <= TOL[dt]
    # the packed ActQ and the raw PackedWeight are accepted too
    y2 = w4a4_gemm(a.to_actq(), pw, bias)
    assert _rel(y2, ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)) <= TOL[torch.float16]


@pytest.mark.parametrize("m,n,k,n_out,gs", [(7, 40, 576, 128, 128), (17, 32, 352, 32, 32), (5, 32, 256, 32, None)])
def test_w4a8_through_the_same_kernel(m, n, k, n_out, gs, device):
    """8-bit activations in the int8 operand: the tensor-core kernel's int8 dots take them as they are."""
    x, pw, split, bias = _problem(m, n, k, n_out, gs, device, m * 13 + k)
    a = Q.quantize_act(x, None, split, 8, 1.0, out="int8")
    y = w4a4_gemm(a, prepare_weight(pw), bias)
    assert _rel(y, ref.w4a4_gemm(a.to_actq(8), pw, bias, out_dtype=torch.float64)) <= TOL[torch.float16]
    # closer to the float product than W4A4 (what 8-bit activations are for)
    wf = pw.dequantize(torch.float64)
    exact = x.double() @ wf.t() + bias.double()
    a4 = Q.quantize_act(x, None, split, 4, 0.9, out="int8")
    assert _rel(y, exact) < 0.5 * _rel(w4a4_gemm(a4, prepare_weight(pw), bias), exact)


@pytest.mark.parametrize("m,n,k,n_out,gs", [(7, 40, 576, 128, 128), (17, 32, 352, 32, 32), (5, 48, 448, 0, 64)])
def test_integer_multiplier_scales_accumulate_in_int32(m, n, k, n_out, gs, device):
    """Group scales that are integer multiples of one per weight row / token: the kernel folds the
    multipliers into its int8 operands and sums all of K in int32; it equals the reference and the
    promoting loop, with and without split K."""
    x, _, split, bias = _problem(m, n, k, n_out, gs, device, m * 5 + k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)).to(device)
    pw = quantize_weight_rtn(w, split, 4, 0.85, levels=15)
    a = Q.quantize_act(x, None, split, out="int8", levels=15)
    assert a.qa.abs().max() > 8  # the multipliers are in the operand
    p = prepare_weight(pw, levels=15)
    yr = ref.w4a4_gemm(ref.ActQ(a.qa, a.s4, a.q8, a.s8), pw, bias, out_dtype=torch.float64)
    for split_k in (1, 3):
        cfg = GemmConfig(block_n=32, block_m=16, num_warps=4, num_stages=1, split_k=split_k)
        y = w4a4_gemm(a, p, bias, config=cfg, uniform_act_scales=True)
        assert _rel(y, yr) <= TOL[torch.float16]
        assert _rel(w4a4_gemm(a, p, bias, config=cfg), yr) <= TOL[torch.float16]  # the promoting loop
    with pytest.raises(ValueError, match="integer multiples"):
        prepare_weight(quantize_weight_rtn(w, split, 4, 0.85), levels=15)
    with pytest.raises(ValueError, match="levels must be in 2..15"):  # nibble * multiplier fits one byte
        prepare_weight(pw, levels=16)


def test_split_k_matches(device):
    x, pw, split, bias = _problem(3, 32, 576, 128, 64, device, 5)
    a = Q.quantize_act(x, None, split, out="int8")
    p = prepare_weight(pw)
    cfg = dict(block_n=32, block_m=16, num_warps=4, num_stages=1)
    yr = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    y1 = w4a4_gemm(a, p, bias, config=GemmConfig(split_k=1, **cfg))
    assert _rel(y1, yr) <= 1e-3
    p1 = prepare_weight(pw, row_tile=1)
    for fused in (True, False):  # split partials summed in-kernel by the last program, or by the reduce kernel
        for w in (p, p1):
            y3 = w4a4_gemm(a, w, bias, config=GemmConfig(split_k=3, fused_reduce=fused, **cfg))
            assert _rel(y3, yr) <= 1e-3
            assert torch.equal(y3, w4a4_gemm(a, w, bias, config=GemmConfig(split_k=3, fused_reduce=fused, **cfg)))


@pytest.mark.parametrize("m,n_out,gs,split_k", [(1, 128, 64, 1), (3, 64, 128, 3), (16, 32, None, 2), (5, 128, 32, 1)])
def test_outliers_first_gives_the_same_result(m, n_out, gs, split_k, device, monkeypatch):
    """The outlier operands of the first K run loaded ahead of its loop, in one tile and one dot
    (w4a4_gemm.OUTLIERS_FIRST, decode tiles of at most 16 tokens): the same numbers bit for bit."""
    from atomq.kernels import w4a4_gemm as W

    x, pw, split, bias = _problem(m, 40, 576, n_out, gs, device, 7 + m)
    a = Q.quantize_act(x, None, split, out="int8")
    p = prepare_weight(pw)
    cfg = GemmConfig(split_k=split_k, block_n=32, block_m=16, num_warps=4, num_stages=1)
    ys = {}
    for first in (False, True):
        monkeypatch.setattr(W, "OUTLIERS_FIRST", first)
        ys[first] = w4a4_gemm(a, p, bias, config=cfg)
    assert _rel(ys[True], ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)) <= 1e-3
    assert torch.equal(ys[True], ys[False])


@pytest.mark.parametrize("split_k", [1, 3])
def test_accumulates_into_the_operands_accumulator(split_k, device):
    """With ActOp.acc each K run adds its tile into the zeroed fp32 accumulator (bias with run 0), which is
    returned unrounded; no partials, counters or reduce kernel."""
    x, pw, split, bias = _problem(3, 40, 576, 128, 64, device, 6)
    a = Q.quantize_act(x, None, split, out="int8", acc_cols=40)
    yr = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    cfg = GemmConfig(split_k=split_k, block_n=32, block_m=16, num_warps=4, num_stages=1)
    y = w4a4_gemm(a, prepare_weight(pw), bias, config=cfg)
    assert y is a.acc and y.dtype == torch.float32
    assert _rel(y, yr) <= 1e-3
    for bad in (torch.zeros(3, 41, device=device), torch.zeros(3, 40, dtype=torch.float16, device=device),
                torch.zeros(3, 40, device="meta")):
        with pytest.raises(ValueError, match="accumulator"):
            w4a4_gemm(a._replace(acc=bad), pw, bias)


def test_validation(device):
    x, pw, split, _ = _problem(2, 32, 320, 64, 64, device, 1)
    a = Q.quantize_act(x, None, split, out="int8")
    with pytest.raises(ValueError, match="bias"):
        w4a4_gemm(a, pw, torch.zeros(7, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        w4a4_gemm(a, pw, out_dtype=torch.float32)
    no_out = PackedWeight(pw.qweight, pw.scales, None, None, None, 4)
    with pytest.raises(ValueError, match="do not match|outlier"):
        w4a4_gemm(a._replace(qa=a.qa[:, :64]), no_out)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", GPU_CASES)
def test_full_size_gpu(m, n, k):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, pw, split, bias = _problem(m, n, k, 128, 128, "cuda", m + n)
    p = prepare_weight(pw)
    cols = torch.randperm(n, device="cuda")[:256]
    sub = PackedWeight(pw.qweight[cols], pw.scales[cols], None, pw.qweight_outlier[cols], pw.scales_outlier[cols], 4)
    for op, dt in (("int8", torch.float16), ("fp8", torch.bfloat16)):
        a = Q.quantize_act(x, None, split, out=op)
        y = w4a4_gemm(a, p, bias, out_dtype=dt)
        assert bool(torch.isfinite(y).all())
        yr = ref.w4a4_gemm(a.to_actq(), sub, bias[cols], out_dtype=torch.float64)
        assert _rel(y[:, cols], yr) <= TOL[dt]


_COMPILE_MULT_SM90 = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atomq.kernels import w4a4_gemm as W

gs, span, acc = json.loads(sys.argv[1])
fn = W._w4a4_kernel
names = list(inspect.signature(fn.fn).parameters)
const = dict(S=span, GS=gs, RT=16, BLOCK_N=64, BLOCK_M=16, BLOCK_O=64, GROUP_M=8, HAS_OUT=True, HAS_BIAS=False,
             PARTIAL=False, OP_FP8=False, USE_ASM=True, MAGIC_CVT=False, DEFER=False, PREFETCH=False, FUSED=False,
             MULT=True, ACC=acc, USE_GDC=True, OUT_FIRST=False, L2_BLOCKS=0)
ints = {"w_ptr": "*i8", "w8_ptr": "*i8", "a_ptr": "*i8", "a8_ptr": "*i8", "mult_ptr": "*u8", "lock_ptr": "*i32"}
sig = {n: ints.get(n) or ("*fp32" if n.endswith("_ptr") else "constexpr" if n in const else "i32") for n in names}
src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")})
print(triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, num_stages=4)).asm["ptx"])
"""


_COMPILE_DECODE_SM90 = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atomq.kernels import w4a4_gemm as W

partial, out_first, l2_blocks = json.loads(sys.argv[1])
fn = W._w4a4_kernel
names = list(inspect.signature(fn.fn).parameters)
const = dict(S=64, GS=128, RT=16, BLOCK_N=64, BLOCK_M=16, BLOCK_O=128 if out_first else 64, GROUP_M=8, HAS_OUT=True,
             HAS_BIAS=False, PARTIAL=partial, OP_FP8=False, USE_ASM=True, MAGIC_CVT=False, DEFER=False,
             PREFETCH=partial, FUSED=partial, MULT=False, ACC=False, USE_GDC=True, OUT_FIRST=out_first,
             L2_BLOCKS=l2_blocks)
ptrs = {"w_ptr": "*i8", "w8_ptr": "*i8", "a_ptr": "*i8", "a8_ptr": "*i8", "mult_ptr": "*u8", "lock_ptr": "*i32",
        "sa_ptr": "*fp16", "s8a_ptr": "*fp16", "out_ptr": "*fp16", "fin_ptr": "*fp16"}
sig = {n: ptrs.get(n) or ("*fp32" if n.endswith("_ptr") else "constexpr" if n in const else "i32") for n in names}
# every integer a multiple of 16, as the runtime specializes the strides and sizes of real shapes
src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const})
print(triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, num_stages=4)).asm["ptx"])
"""


@pytest.mark.parametrize("partial,out_first,l2_blocks", [(True, True, 0), (False, False, 2), (True, True, 2)])
def test_decode_kernel_early_loads_compile_for_sm90(partial, out_first, l2_blocks):
    """Offline for sm_90: the M = 16 decode kernel issues its outlier weights' loads (OUTLIERS_FIRST) and one
    L2 prefetch per thread and block (DECODE_L2_PREFETCH) before ``griddepcontrol.wait``, without spills."""
    import json
    import os
    import subprocess
    import sys

    from test_w4a4_gemm_hopper import ptxas_report

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_DECODE_SM90, json.dumps([partial, out_first, l2_blocks])],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = run.stdout
    before, after = ptx.split("griddepcontrol.wait", 1)
    assert before.count("prefetch.global.L2") == l2_blocks and "prefetch.global.L2" not in after
    assert ("ld.global" in before) == out_first
    report = ptxas_report(ptx)
    assert "0 bytes spill stores" in report, report


@pytest.mark.parametrize("gs,span,acc", [(32, 32, False), (128, 64, False), (128, 64, True)])
def test_integer_multiplier_loop_compiles_for_sm90(gs, span, acc):
    """Offline for sm_90 (no GPU needed): the multiplier unpack (mad.lo on the packed bytes) feeds int8
    wgmmas, and no fp32 promotion sits in the K loop (one cvt at the end); accumulating into ActOp.acc
    adds with ``red`` only (no atomic that returns a value)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_MULT_SM90, json.dumps([gs, span, acc])],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = run.stdout
    assert "mad.lo.u32" in ptx and "wgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8" in ptx
    assert ("red.global.gpu.relaxed.add.f32" in ptx) == acc and "atom." not in ptx
