"""The Gluon W4A4 prefill kernel (sm_90 only).

On any machine: it compiles for sm_90 (Triton ships ptxas), and ptxas reports no spills and no
serialized wgmma, the integer-multiplier loop included. On an H100 (``-m gpu``): equal to ref.w4a4_gemm
within the tolerances of test_w4a4_gemm.py, groups of 128 and one scale per row, ragged M and N, bias,
fp16 and bf16 out; the multiplier loop too, and the default dispatch takes it.
"""

import os
import subprocess

import pytest
import torch

from atomq.kernels import ref

triton = pytest.importorskip("triton")
hopper = pytest.importorskip("atomq.kernels.w4a4_gemm_hopper")
if not hopper.AVAILABLE:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

from atomq.kernels import quantize as Q  # noqa: E402
from atomq.kernels.w4a4_gemm import GemmConfig, prepare_weight, w4a4_gemm  # noqa: E402
from atomq.quant import plan_split, quantize_weight_rtn  # noqa: E402

TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
PTR_TYPES = {"w_ptr": "*i8", "sw_ptr": "*fp32", "mult_ptr": "*u8", "w8_ptr": "*i8", "s8w_ptr": "*fp32", "a_ptr": "*i8",
             "sa_ptr": "*fp32", "a8_ptr": "*i8", "s8a_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp16"}


def _triton_ptxas() -> str | None:
    """The ptxas Triton itself runs for sm_90 (Triton >= 3.7 ships a newer one beside the old)."""
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):
        try:
            return compiler.get_ptxas(90).path
        except Exception:  # noqa: BLE001 - older signatures or a missing binary: fall back to the bundled one
            pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str) -> str:
    """ptxas's verbose report (registers, spills, serialized wgmma) on PTX for sm_90a; skips the test
    where Triton's ptxas is not installed. The other compile tests use it too."""
    ptxas = _triton_ptxas()
    if ptxas is None or not os.path.exists(ptxas):
        pytest.skip("Triton's ptxas is not installed")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"atomq_ptxas_{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    try:
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.remove(path)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


# compiled in a fresh process: the interpreter that runs the other kernel tests leaves triton.language
# patched after a kernel calls a jit helper, and a later compile in the same process would trace through
# those patches (the GEMM and GEMV compile tests do the same)
_COMPILE_SM90 = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from atomq.kernels import w4a4_gemm_hopper as hopper

const, ptr_types, num_warps, maxnreg = json.loads(sys.argv[1])
fn = hopper._w4a4_hopper_kernel
names = list(inspect.signature(fn.fn).parameters)
sig = {n: ptr_types.get(n) or ("constexpr" if n in const else "i32") for n in names}
src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                     attrs={(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const})
options = dict(num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)
print(json.dumps({"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared}))
"""


def _compile_sm90(block_m: int, num_warps: int, stages: int, grouped: bool, mult: bool = False, ctas: int = 1,
                  probe: int = 0):
    """PTX of the kernel compiled for sm_90 without a GPU, ptxas's verbose report on it, and the shared
    memory it takes (ctas: programs per SM, as w4a4_gemm_hopper's ctas_per_sm)."""
    import json
    import sys

    const = dict(BLOCK_N=16 * num_warps, BLOCK_M=min(block_m, 128), S=64, RT=16, STAGES=stages, GROUP_M=8,
                 GROUPED=grouped, MULT=mult, HAS_OUT=True, HAS_BIAS=True,
                 STASH=hopper.parks_main_product(block_m, ctas), HALVES=2 if block_m > 128 else 1, PROBE=probe)
    maxnreg = hopper.max_registers(num_warps, ctas) if ctas > 1 else None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90, json.dumps([const, PTR_TYPES, num_warps, maxnreg])],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    kernel = json.loads(run.stdout)
    return kernel["ptx"], ptxas_report(kernel["ptx"]), kernel["shared"]


@pytest.mark.parametrize("block_m,num_warps,stages,grouped,mult", [
    (128, 4, 4, True, False), (64, 8, 4, True, False), (128, 4, 6, False, False), (128, 8, 4, False, True),
    (128, 4, 4, False, True), (256, 8, 4, False, False), (256, 8, 4, False, True)])
def test_compiles_for_sm90_without_spills(block_m, num_warps, stages, grouped, mult):
    ptx, report, shared = _compile_sm90(block_m, num_warps, stages, grouped, mult)
    assert ptx.count("wgmma.mma_async") >= 2  # the two nibble halves of a K block
    assert shared + 1024 <= 228 * 1024, shared  # the ring (four activation tiles with 256 tokens) fits an SM
    assert "0 bytes spill stores" in report, report
    assert "serialized" not in report, report
    if mult:  # the multipliers ride the ring in 4-byte copies and multiply the nibbles in the unpack
        copies = [line for line in ptx.splitlines() if "cp.async.ca.shared.global" in line]
        assert "mad.lo.u32" in ptx and any(", 0x4," in line for line in copies)
        assert "cvt.rn.f32.s32" not in ptx.split("mad.lo.u32")[-1].split("wgmma.wait_group")[0]


@pytest.mark.parametrize("block_m,num_warps,stages,mult,ctas", [
    (128, 8, 4, False, 2), (128, 8, 4, True, 2), (128, 8, 3, False, 2), (128, 4, 3, False, 3)])
def test_several_programs_per_sm_fit_without_spills(block_m, num_warps, stages, mult, ctas):
    """The one-sum loops under the register cap for ``ctas`` programs per SM: the main product waits in
    shared memory during the outlier epilogue, so no spills, no serialized wgmma, and the ring plus that
    stash still fit ``ctas`` times in an SM's 228 KiB (1 KiB of it reserved per program)."""
    import re

    ptx, report, shared = _compile_sm90(block_m, num_warps, stages, False, mult, ctas=ctas)
    assert f".maxnreg {hopper.max_registers(num_warps, ctas)}" in ptx  # the cap reaches ptxas
    assert "0 bytes spill stores" in report and "serialized" not in report, report
    assert ctas * (shared + 1024) <= 228 * 1024, shared
    # the stash overwrites the ring only after a barrier behind the drain of its copies
    drained = re.split(r"cp\.async\.wait_group\s+0;", ptx)
    assert len(drained) == 2 and "bar.sync" in drained[1].split("st.shared")[0]


def test_probe_bits_leave_out_the_copies_and_the_unpack():
    """The timing probe (bench/gpu_ncu_probe.py): without copies only the multiplier rows still travel
    through cp.async, without the unpack no nibble masking is left, and unknown bits are refused."""
    ptx, _, _ = _compile_sm90(128, 8, 4, False, True, ctas=2)
    bare, report, _ = _compile_sm90(128, 8, 4, False, True, ctas=2,
                                    probe=hopper.PROBE_NO_UNPACK | hopper.PROBE_NO_WEIGHT_COPY | hopper.PROBE_NO_ACT_COPY)
    copies = [line for line in bare.splitlines() if "cp.async.ca.shared.global" in line]
    assert copies and all(", 0x4," in line for line in copies)  # the 4-byte multiplier copies alone
    assert "0x0f0f0f0f" in ptx and "0x0f0f0f0f" not in bare
    assert "0 bytes spill stores" in report and "serialized" not in report, report
    with pytest.raises(ValueError, match="probe"):
        hopper.w4a4_gemm_hopper(None, None, None, None, probe=8)


def test_several_programs_per_sm_need_one_int32_sum():
    """The promoting loop holds two accumulators, so it runs one program per SM and 128-token tiles at
    most; 0 programs is an error."""
    split = plan_split(256, 0, 128)
    pw = quantize_weight_rtn(torch.randn(32, 256), split, 4, 0.85)
    a = Q.ActOp(torch.zeros(4, 256, dtype=torch.int8), torch.ones(4, 2, dtype=torch.float16), None, None)
    for ctas in (2, 0):
        with pytest.raises(ValueError, match="ctas_per_sm"):
            hopper.w4a4_gemm_hopper(a, prepare_weight(pw), None, torch.empty(4, 32), ctas_per_sm=ctas)
    for block_m in (256, 192):  # two 128-token halves share an unpack in the one-sum loops only
        with pytest.raises(ValueError, match="block_m"):
            hopper.w4a4_gemm_hopper(a, prepare_weight(pw), None, torch.empty(4, 32), block_m=block_m)
    assert hopper.max_registers(8, 2) == 128 and hopper.max_registers(4, 3) == 168 and hopper.max_registers(8, 1) == 255


def test_two_programs_per_sm_by_default_for_the_multiplier_loop_only(monkeypatch):
    from atomq.kernels import w4a4_gemm as gemm_module
    from atomq.kernels.w4a4_gemm import GLUON_MULT_CTAS_PER_SM, pick_config

    monkeypatch.setattr(gemm_module, "interpreting", lambda: False)  # the GPU's tiles, not the interpreter's
    assert pick_config(2048, 4096, 4096, gluon=True, grouped=False, mult=True).ctas_per_sm == GLUON_MULT_CTAS_PER_SM
    assert pick_config(2048, 4096, 4096, gluon=True, grouped=False).ctas_per_sm == 1  # group-free: even (KERNELS.md)
    assert pick_config(128, 4096, 4096, gluon=True, grouped=False, mult=True).ctas_per_sm == 1  # 4-warp tiles


def test_unsupported_inputs_have_a_reason():
    split = plan_split(256, 0, 128)
    pw = quantize_weight_rtn(torch.randn(32, 256), split, 4, 0.85)
    a = Q.ActOp(torch.zeros(4, 256, dtype=torch.int8), torch.ones(4, 2, dtype=torch.float16), None, None)
    reason = hopper.unsupported_reason(a, prepare_weight(pw))
    assert reason is not None and "sm_90" in reason
    with pytest.raises(ValueError, match="sm_90"):
        w4a4_gemm(a, prepare_weight(pw), config=GemmConfig(kernel="gluon"))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(65, 4096, 4096), (333, 4096 + 80, 11008), (4096, 12288, 4096)])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_m,num_warps,ctas", [(128, 4, 1), (64, 8, 1), (128, 8, 2), (128, 4, 3), (256, 8, 1)])
@pytest.mark.parametrize("group_size", [128, None])
def test_matches_reference_on_gpu(m, n, k, out_dtype, block_m, num_warps, ctas, group_size):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs sm_90")
    if (ctas > 1 or block_m > 128) and group_size is not None:
        pytest.skip("several programs per SM and 256-token tiles take the one-sum loops only")
    g = torch.Generator(device="cpu").manual_seed(m + n)
    split = plan_split(k, 128, group_size)
    pw = quantize_weight_rtn(torch.randn(n, k, generator=g).cuda(), split, 4, 0.85)
    x = (torch.randn(m, k, generator=g) * 2).to(torch.float16).cuda()
    bias = torch.randn(n, generator=g).to(out_dtype).cuda()
    a = Q.quantize_act(x, None, split, out="int8")
    cfg = GemmConfig(kernel="gluon", block_m=block_m, num_warps=num_warps, num_stages=4 if ctas < 3 else 3,
                     ctas_per_sm=ctas)
    y = w4a4_gemm(a, prepare_weight(pw), bias, out_dtype=out_dtype, config=cfg)
    yr = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
    rel = ((y.double() - yr).norm() / yr.norm()).item()
    assert torch.isfinite(y).all() and rel <= TOL[out_dtype], rel


def test_integer_multiplier_loop_reasons(monkeypatch):
    """The multiplier loop takes groups of 128 with 16-byte aligned multiplier rows (prepare_weight pads
    them, so any N) and nothing else; checked with the device test patched away."""
    monkeypatch.setattr(hopper, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    for n, gs in [(4104, 128), (4096, 128), (40, 64)]:
        split = plan_split(512, 0, gs)
        pw = quantize_weight_rtn(torch.randn(n, 512), split, 4, 0.85, levels=15)
        p = prepare_weight(pw, levels=15)
        a = Q.ActOp(torch.zeros(4, 512, dtype=torch.int8), torch.ones(4, 512 // gs, dtype=torch.float16), None, None)
        assert p.mult.stride(0) % 16 == 0 and p.mult.shape == (512 // gs, n)
        reason = hopper.unsupported_reason(a, p, mult=True)
        assert (reason is None) == (gs == 128), (n, gs, reason)
        assert hopper.unsupported_reason(a, p) is None or gs != 128  # the promoting loop takes it too


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(65, 4096, 4096), (333, 4096 + 8, 11008), (2048, 12288, 4096)])
@pytest.mark.parametrize("block_m,num_warps,ctas", [(128, 4, 1), (128, 8, 1), (128, 8, 2), (256, 8, 1)])
def test_integer_multiplier_loop_matches_reference_on_gpu(m, n, k, block_m, num_warps, ctas, monkeypatch):
    """Group scales that are integer multiples of one per row / token: the multiplier loop equals the
    reference (and so the promoting loop of the same product)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs sm_90")
    g = torch.Generator(device="cpu").manual_seed(m + n + 1)
    split = plan_split(k, 128, 128)
    pw = quantize_weight_rtn(torch.randn(n, k, generator=g).cuda(), split, 4, 0.85, levels=15)
    x = (torch.randn(m, k, generator=g) * 2).to(torch.float16).cuda()
    bias = torch.randn(n, generator=g).to(torch.float16).cuda()
    a = Q.quantize_act(x, None, split, out="int8", levels=15)
    p = prepare_weight(pw, levels=15)
    assert hopper.unsupported_reason(a, p, mult=True) is None
    cfg = GemmConfig(kernel="gluon", block_m=block_m, num_warps=num_warps, ctas_per_sm=ctas)
    y = w4a4_gemm(a, p, bias, config=cfg, uniform_act_scales=True)
    yr = ref.w4a4_gemm(ref.ActQ(a.qa, a.s4, a.q8, a.s8), pw, bias, out_dtype=torch.float64)  # q * m: int8
    rel = ((y.double() - yr).norm() / yr.norm()).item()
    assert torch.isfinite(y).all() and rel <= TOL[torch.float16], rel
    real, calls = hopper.w4a4_gemm_hopper, []

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(hopper, "w4a4_gemm_hopper", spy)
    y_default = w4a4_gemm(a, p, bias, uniform_act_scales=True)
    assert [kw["mult"] for kw in calls] == [True]  # the default dispatch takes the multiplier loop
    parks = hopper.parks_main_product
    if parks(calls[0]["block_m"], calls[0]["ctas_per_sm"]) == parks(block_m, ctas):  # exact sums, same epilogue
        assert torch.equal(y, y_default)
    else:  # the epilogue that parks the main product rounds its fp32 sums in another order
        rel = ((y_default.double() - yr).norm() / yr.norm()).item()
        assert rel <= TOL[torch.float16], rel
