"""The fused quantize kernels compile for sm_90 (offline, no GPU needed): every mode (plain gather, norm,
SiLU * up), with and without groups, levels, reorder index, residual, 8-bit groups, decode split or not,
an fp32 input and the next GEMM's accumulator.

The interpreter runs the kernels' Python, not the compiler's rules (a loop-carried value that changes
shape, say, passes there and fails to compile), so each launch the wrappers make is recorded on CPU
tensors and compiled for sm_90 in a process without the interpreter.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_RECORD_AND_COMPILE = r"""
import inspect
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atomq.kernels import quantize as Q
from atomq.quant import plan_split

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8",
         torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages", "launch_pdl")
launches = []


class Recorder:  # kernel[grid](*args, **kw) -> recorded, not run
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kw: launches.append((self.fn, args, kw))


Q._act_quant_kernel = Recorder(Q._act_quant_kernel)
Q._act_quant_rows_kernel = Recorder(Q._act_quant_rows_kernel)
Q.launch_options = lambda device: {"USE_GDC": True, "launch_pdl": True}
Q._num_sms = lambda device: 132

g = torch.Generator().manual_seed(0)
for m, k, n_out, gs, levels, bits, plain in [
        (1, 4096, 128, 128, None, 4, False), (1, 4096, 128, 128, 15, 4, False), (64, 4096, 128, 128, 15, 4, False),
        (2, 11008, 128, 32, 15, 4, False), (256, 576, 64, 32, None, 4, False), (1, 4096, 128, 128, None, 8, False),
        (1, 4096, 128, None, None, 4, True), (300, 4096, 0, None, None, 4, True)]:
    split = plan_split(k, n_out, gs)
    x = torch.randn(m, k, generator=g).half()
    idx = None if plain else torch.randperm(k, generator=g).int()  # plain: no reorder index, no residual
    w = torch.rand(k, generator=g).half()
    Q.quantize_act(x, idx, split, bits, out="int8", levels=levels)
    Q.rmsnorm_quantize(x, None if plain else x.clone(), w, 1e-5, idx, split, bits, out="int8",
                       weight_gathered=not plain, levels=levels)
    Q.silu_mul_quantize(torch.randn(m, 2 * k, generator=g).half(), split, bits, out="int8", levels=levels)
# decode accumulators: fp32 inputs (a GEMM's accumulator) rounded to fp16, the next GEMM's accumulator zeroed
split = plan_split(4096, 128, 128)
x32, res = torch.randn(1, 4096, generator=g), torch.randn(1, 4096, generator=g).half()
idx = torch.randperm(4096, generator=g).int()
Q.quantize_act(res, idx, split, out="int8", acc_cols=4096)
Q.rmsnorm_quantize(x32, res, torch.rand(4096, generator=g).half(), 1e-5, idx, split, out="int8",
                   weight_gathered=True, acc_cols=22016)
Q.silu_mul_quantize(torch.randn(1, 8192, generator=g), split, out="int8", acc_cols=4096, dtype=torch.float16)

for fn, args, kw in launches:
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    const = {n: v for n, v in kw.items() if n not in OPTIONS}
    const.update({n: p.default for i, n in enumerate(names) if i >= len(args) and n not in const})
    sig = {}
    for name, arg in zip(names, args):
        if isinstance(arg, torch.Tensor):
            sig[name] = "*" + TYPES[arg.dtype]
        else:
            sig[name] = "fp32" if isinstance(arg, float) else "i32"
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 128), options={o: kw[o] for o in OPTIONS if o in kw})
print("compiled", len(launches))
"""


def test_quantize_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _RECORD_AND_COMPILE], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled 27" in run.stdout, run.stdout
