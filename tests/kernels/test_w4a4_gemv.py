"""The CUDA-core W4A4 GEMV (the default for one token on small products; any M works) against ref.w4a4_gemm, through w4a4_gemm (tolerances of
test_w4a4_gemm.py). CPU: the Triton interpreter, where dp4a is emulated with integer ops; -m gpu: the
PTX dp4a at Llama-2 sizes, and the default dispatch picking it."""

import pytest
import torch

from atomq.kernels import ref

pytest.importorskip("triton")
from atomq.kernels import quantize as Q  # noqa: E402
from atomq.kernels import w4a4_gemv as G  # noqa: E402
from atomq.kernels.w4a4_gemm import GEMV_CONFIG, GEMV_RULES, GemmConfig, pick_config, prepare_weight, w4a4_gemm  # noqa: E402

from test_w4a4_gemm import TOL, _problem, _rel  # noqa: E402

CASES = [  # (M, N, K, n_outliers, group_size, K blocks per step)
    (1, 48, 320, 64, 64, 4),  # groups of 64: two groups per 128-channel block; a padded block
    (2, 40, 576, 128, 128, 2),
    (1, 32, 256, 32, None, 4),  # one scale per row and per token
    (2, 33, 704, 0, 128, 1),  # N not a multiple of the 16-row tile, no outliers
    (1, 16, 448, 0, 64, 8),  # fewer blocks than one step
    (1, 48, 352, 64, 32, 2),  # groups of 32: blocks of 64 channels (span 32); a padded block
    (2, 17, 576, 0, 32, 1),
]


@pytest.mark.parametrize("m,n,k,n_out,gs,kb", CASES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemv_matches_reference(m, n, k, n_out, gs, kb, out_dtype, device):
    x, pw, split, bias = _problem(m, n, k, n_out, gs, device, seed=m + n)
    a = Q.quantize_act(x, None, split, out="int8")
    y = w4a4_gemm(a, prepare_weight(pw), bias, out_dtype, config=GemmConfig(kernel="gemv", k_blocks=kb, ahead=1 + kb % 2))
    want = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert _rel(y, want) <= TOL[out_dtype]


@pytest.mark.parametrize("m,n,k,n_out,gs", [(1, 48, 320, 64, 64), (1, 32, 256, 32, None), (1, 48, 352, 64, 32)])
def test_gemv_takes_eight_bit_activations(m, n, k, n_out, gs, device):
    """W4A8: the dp4a products and the -8 * sum(a) correction hold for any int8 activation."""
    x, pw, split, bias = _problem(m, n, k, n_out, gs, device, seed=5 * n)
    a = Q.quantize_act(x, None, split, 8, 1.0, out="int8")
    y = w4a4_gemm(a, prepare_weight(pw), bias, torch.float16, config=GemmConfig(kernel="gemv", k_blocks=2, ahead=2))
    assert _rel(y, ref.w4a4_gemm(a.to_actq(8), pw, bias, out_dtype=torch.float64)) <= TOL[torch.float16]


@pytest.mark.parametrize("m,n,k,n_out,gs,kb,split", [
    (1, 40, 1216, 128, 128, 2, 3),  # 9 blocks: runs of 4, 4 and 1 block
    (2, 33, 1088, 0, 64, 1, 4),  # two tokens, N not a multiple of the tile, no outliers
    (1, 32, 640, 32, None, 1, 16),  # more runs asked for than blocks: one block per run
    (1, 40, 1216, 64, 32, 1, 3),  # groups of 32
])
@pytest.mark.parametrize("ahead", [1, 2])
def test_gemv_split_k_matches_reference_and_leaves_counters_zero(m, n, k, n_out, gs, kb, split, ahead, device):
    from atomq.kernels.counters import arrival_counters

    x, pw, qsplit, bias = _problem(m, n, k, n_out, gs, device, seed=k)
    a = Q.quantize_act(x, None, qsplit, out="int8")
    p = prepare_weight(pw)
    want = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    one = w4a4_gemm(a, p, bias, config=GemmConfig(kernel="gemv", k_blocks=kb, split_k=1))
    for _ in range(2):  # the second call reuses the counters the first one reset
        y = w4a4_gemm(a, p, bias, config=GemmConfig(kernel="gemv", k_blocks=kb, split_k=split, ahead=ahead))
        assert _rel(y, want) <= TOL[torch.float16]
        assert _rel(y, one.double()) <= TOL[torch.float16]
    assert int(arrival_counters(torch.device(device), 1).abs().sum()) == 0


@pytest.mark.parametrize("m,n,k,n_out,gs,kb,split", [
    (1, 48, 320, 64, 64, 4, 1), (2, 40, 576, 128, 128, 2, 1), (1, 40, 1216, 128, 128, 2, 3),
    (1, 48, 352, 64, 32, 2, 2), (1, 40, 1216, 64, 32, 1, 1)])
def test_gemv_outliers_first_gives_the_same_result(m, n, k, n_out, gs, kb, split, device, monkeypatch):
    """The outlier operands loaded ahead of the first run's loop as words (w4a4_gemm.OUTLIERS_FIRST):
    the same numbers bit for bit, with and without split K, and into the accumulator."""
    from atomq.kernels import w4a4_gemm as W

    x, pw, qsplit, bias = _problem(m, n, k, n_out, gs, device, seed=k + n)
    p = prepare_weight(pw)
    cfg = GemmConfig(kernel="gemv", k_blocks=kb, split_k=split)
    ys = {}
    for first in (False, True):
        monkeypatch.setattr(W, "OUTLIERS_FIRST", first)
        a = Q.quantize_act(x, None, qsplit, out="int8")
        ys[first] = w4a4_gemm(a, p, bias, config=cfg)
        acc = Q.quantize_act(x, None, qsplit, out="int8", acc_cols=n)
        ys[first, "acc"] = w4a4_gemm(acc, p, bias, config=cfg).clone()
    assert _rel(ys[True], ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)) <= TOL[torch.float16]
    assert torch.equal(ys[True], ys[False])
    if split == 1:  # one run per tile: its single add is the whole sum, so the order cannot differ
        assert torch.equal(ys[True, "acc"], ys[False, "acc"])


def test_gemv_split_k_needs_counters(device):
    x, pw, qsplit, _ = _problem(1, 16, 640, 0, 128, device, seed=0)
    a = Q.quantize_act(x, None, qsplit, out="int8")
    out = torch.empty(1, 16, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="arrival counters"):
        G.w4a4_gemv(a, prepare_weight(pw), None, out, blocks=1, split=2)
    with pytest.raises(ValueError, match="fp32 out"):
        G.w4a4_gemv(a, prepare_weight(pw), None, out, blocks=1, split=2, accumulate=True)


def test_gemv_refuses_what_it_cannot_take(device):
    x, pw, split, _ = _problem(1, 16, 320, 64, 64, device, seed=0)
    a8 = Q.quantize_act(x, None, split, out="fp8")
    assert "int8" in G.unsupported_reason(a8, prepare_weight(pw))
    with pytest.raises(ValueError, match="int8"):
        w4a4_gemm(a8, prepare_weight(pw), config=GemmConfig(kernel="gemv"))


def test_pick_config_sends_one_token_on_small_products_to_the_gemv():
    assert pick_config(1, 4096, 4096, gemv=True).kernel == "gemv"
    assert pick_config(1, 4096, 4096, gemv=False).kernel == "triton"
    assert pick_config(1, 4096, 11008, gemv=True).kernel == "gemv"  # down_proj, split into K runs
    assert pick_config(1, 22016, 4096, gemv=True).kernel == "triton"  # gate_up: the tensor-core kernel
    assert pick_config(1, 22016, 4096, gemv=True, span=32).kernel == "gemv"  # but with groups of 32 the GEMV
    assert pick_config(1, 4096, 3968, gemv=True) == GEMV_RULES[0][1]  # 7B o_proj: 8 blocks a step, 2 ahead
    assert pick_config(1, 4096, 11008, gemv=True) == GEMV_CONFIG


@pytest.mark.parametrize("k", [2176, 704])  # 17 blocks: two runs of 8 and a partial one; fewer than one step
def test_gemv_rule_configs_match_reference(k, device):
    x, pw, split, bias = _problem(1, 40, k, 64, 128, device, seed=k)
    a = Q.quantize_act(x, None, split, out="int8")
    for _, cfg in GEMV_RULES:
        y = w4a4_gemm(a, prepare_weight(pw), bias, config=cfg)
        assert _rel(y, ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,gs", [(1, 22016, 4096, 128), (2, 4096, 11008, 128), (1, 12288, 4096, 64),
                                      (2, 8192, 28672, None), (1, 4096, 11008, 32)])
def test_gemv_full_size_gpu(m, n, k, gs):
    x, pw, split, bias = _problem(m, n, k, 128, gs, "cuda", seed=1)
    a = Q.quantize_act(x, None, split, out="int8")
    p = prepare_weight(pw)
    want = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    assert G.unsupported_reason(a, p) is None
    assert _rel(w4a4_gemm(a, p, bias, config=GemmConfig(kernel="gemv")), want) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("n,gs", [(4096, 128), (4096, 32), (22016, 32)])
def test_default_dispatch_uses_the_gemv_for_one_token_gpu(n, gs):
    x, pw, split, bias = _problem(1, n, 4096, 128, gs, "cuda", seed=2)
    a = Q.quantize_act(x, None, split, out="int8")
    calls = []
    real = G.w4a4_gemv
    G.w4a4_gemv = lambda *args, **kw: calls.append(1) or real(*args, **kw)
    try:
        y = w4a4_gemm(a, prepare_weight(pw), bias)
    finally:
        G.w4a4_gemv = real
    assert calls == [1]
    assert _rel(y, ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)) <= TOL[torch.float16]


def test_gemv_split_rule_on_llama_shapes(monkeypatch):
    from atomq.kernels import w4a4_gemm as W

    monkeypatch.setattr(W, "_num_sms", lambda index: 132)  # an H100
    cfg = pick_config(1, 4096, 11008, gemv=True)
    dev = torch.device("cuda", 0)
    assert W._gemv_split(cfg, 4096 // 16, 11008 // 128, dev) == 4  # 7B down: 256 row tiles
    assert W._gemv_split(cfg, 12288 // 16, 4096 // 128, dev) == 1  # 7B q/k/v: 768 tiles are enough
    assert W._gemv_split(cfg, 8192 // 16, 28672 // 128, dev) == 2  # 70B down
    assert W._gemv_split(cfg, 4096 // 16, 1024 // 128, dev) == 1  # 8 blocks: runs keep two steps each


_COMPILE_SM90 = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atomq.kernels import w4a4_gemv as G

w, gs, ahead, partial, acc, out_first = json.loads(sys.argv[1])
fn = G._gemv_kernel
names = list(inspect.signature(fn.fn).parameters)
const = dict(RT=16, KB=4 * 16 // w, W=w, GS=gs, HAS_OUT=True, HAS_BIAS=True, PARTIAL=partial, BLOCK_O=128,
             USE_ASM=True, AHEAD=ahead, ACC=acc, OUT_FIRST=out_first, USE_GDC=True)
ptrs = {"W4": "*i32", "SW": "*fp32", "W8": "*i8", "S8W": "*fp32", "QA": "*i32", "S4": "*fp16", "Q8": "*i8",
        "S8": "*fp16", "BIAS": "*fp16", "OUT": "*fp32" if acc else "*fp16", "PART": "*fp32", "LOCK": "*i32"}
sig = {n: ptrs.get(n) or ("constexpr" if n in const else "i32") for n in names}
src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ptrs})
print(triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=4, num_stages=1)).asm["ptx"])
"""


def _gemv_ptx(w, gs, ahead, partial, acc, out_first) -> str:
    """PTX of the GEMV kernel compiled offline for sm_90, in a process without the interpreter."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90, json.dumps([w, gs, ahead, partial, acc, out_first])],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.parametrize("w,gs", [(16, 128), (16, 64), (8, 32)])  # words per row and block (span / 4)
@pytest.mark.parametrize("ahead,partial,acc,out_first", [
    (1, False, False, False), (2, True, False, False), (1, False, True, False), (2, False, False, True),
    (1, True, False, True)])
def test_compiles_for_sm90_with_dp4a_and_without_spills(w, gs, ahead, partial, acc, out_first):
    """Compiled offline for sm_90 (no GPU needed; a process without the interpreter): the PTX multiplies
    with dp4a and waits on the kernel ahead, an accumulating run adds with a ``red`` (no atomic that
    returns a value), and ptxas spills nothing. With the outliers first, their weights load before the
    wait and multiply with signed dp4a."""
    from test_w4a4_gemm_hopper import ptxas_report

    ptx = _gemv_ptx(w, gs, ahead, partial, acc, out_first)
    assert "dp4a.u32.s32" in ptx and "griddepcontrol.wait" in ptx
    assert ("dp4a.s32.s32" in ptx) == out_first
    if out_first:
        def loads_before_wait(text):
            return text.split("griddepcontrol.wait")[0].count("ld.global")

        assert loads_before_wait(ptx) > loads_before_wait(_gemv_ptx(w, gs, ahead, partial, acc, False))
    assert ("red.global.gpu.relaxed.add.f32" in ptx) == acc and ("atom." in ptx) == partial
    report = ptxas_report(ptx)
    assert "0 bytes spill stores" in report, report


@pytest.mark.parametrize("m,n,k,n_out,gs,kb,split", [
    (1, 40, 1216, 128, 128, 2, 3),  # runs of 4, 4 and 1 block
    (2, 33, 1088, 0, 64, 1, 4),
    (1, 40, 1216, 64, 32, 1, 1),  # one run: its add is the whole sum
])
def test_gemv_accumulates_into_the_operands_accumulator(m, n, k, n_out, gs, kb, split, device):
    """With ActOp.acc every K run adds into the zeroed fp32 accumulator (bias with run 0); no counters."""
    x, pw, qsplit, bias = _problem(m, n, k, n_out, gs, device, seed=k + m)
    a = Q.quantize_act(x, None, qsplit, out="int8", acc_cols=n)
    want = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    y = w4a4_gemm(a, prepare_weight(pw), bias, config=GemmConfig(kernel="gemv", k_blocks=kb, split_k=split))
    assert y is a.acc and y.dtype == torch.float32
    assert _rel(y, want) <= TOL[torch.float16]
