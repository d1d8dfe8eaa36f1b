"""Hardware-counter probe of the W4A4 GEMMs and their baselines (run under Nsight Compute, PYTHONPATH=src).

Builds 7B-shaped operands, runs every kernel once to compile it, then runs each named case once between
``cudaProfilerStart`` / ``cudaProfilerStop``, so that a profiler started with ``--profile-from-start off``
sees exactly those launches, in this order:

    ncu --profile-from-start off --clock-control none --set full -o OUT/probe \\
        python bench/gpu_ncu_probe.py --cases levels2048,fp8_2048,gemv_qkv

Cases (7B q/k/v is N x K = 12288 x 4096, o is 4096 x 4096):
  levels2048 / groupfree2048 / grouped2048: the Gluon kernel at M = 2048 on q/k/v with integer-multiplier
    group scales, one scale per row, Atom's promoted groups; fp8_2048 / int8_2048 / fp16_2048: cuBLAS
    FP8 ``_scaled_mm``, INT8 ``_int_mm``, FP16 ``matmul`` on the same shape;
  gemv_qkv / gemv_o: the one-token GEMV (Atom groups of 128); m16_qkv / m16_o: the M = 16 decode kernel;
  fp16_1_qkv / fp16_16_o: cuBLAS FP16 at M = 1 and 16.
With --time it also prints each case's CUDA-graph median (us, outside the profiled range).

--probe-bench (no profiler needed): the Gluon one-sum loops at M = 2048 on 7B q/k/v and gate_up with
work left out (``w4a4_gemm_hopper``'s probe bits; timing only, wrong outputs) next to cuBLAS FP16 and FP8,
so that each part's cost shows as a difference.
"""

from __future__ import annotations

import argparse

import torch

from atomq.bench import gemm as B
from atomq.kernels import quantize as Q
from atomq.kernels import w4a4_gemm_hopper as H
from atomq.kernels.w4a4_gemm import pick_config, prepare_weight, w4a4_gemm
from gpu_gemm_check import _fp16_fp8_ms  # bench/ is on the path when this runs as a script
from atomq.quant import plan_split, quantize_weight_rtn

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096)}


def _w4a4_case(m: int, layer: str, gs: int | None, levels: int | None):
    n, k = SHAPES[layer]
    split = plan_split(k, 128, gs)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    p = prepare_weight(quantize_weight_rtn(w, split, 4, 0.85, levels=levels), levels=levels)
    a = Q.quantize_act(x, None, split, out="int8", levels=levels)
    return lambda: w4a4_gemm(a, p, uniform_act_scales=levels is not None)


def _cublas_case(m: int, layer: str, kind: str):
    n, k = SHAPES[layer]
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    if kind == "fp16":
        return lambda: torch.matmul(x, w.t())
    if kind == "int8":
        xi, wi = x.to(torch.int8), w.to(torch.int8)
        return lambda: torch._int_mm(xi, wi.t())
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
    return lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


CASES = {
    "levels2048": lambda: _w4a4_case(2048, "qkv", 128, 15),
    "groupfree2048": lambda: _w4a4_case(2048, "qkv", None, None),
    "grouped2048": lambda: _w4a4_case(2048, "qkv", 128, None),
    "fp8_2048": lambda: _cublas_case(2048, "qkv", "fp8"),
    "int8_2048": lambda: _cublas_case(2048, "qkv", "int8"),
    "fp16_2048": lambda: _cublas_case(2048, "qkv", "fp16"),
    "gemv_qkv": lambda: _w4a4_case(1, "qkv", 128, None),
    "gemv_o": lambda: _w4a4_case(1, "o", 128, None),
    "m16_qkv": lambda: _w4a4_case(16, "qkv", 128, None),
    "m16_o": lambda: _w4a4_case(16, "o", 128, None),
    "fp16_1_qkv": lambda: _cublas_case(1, "qkv", "fp16"),
    "fp16_16_o": lambda: _cublas_case(16, "o", "fp16"),
}


PROBES = {"all": 0, "no unpack": H.PROBE_NO_UNPACK, "no w copy": H.PROBE_NO_WEIGHT_COPY,
          "no a copy": H.PROBE_NO_ACT_COPY, "no copies": H.PROBE_NO_WEIGHT_COPY | H.PROBE_NO_ACT_COPY,
          "mma only": H.PROBE_NO_UNPACK | H.PROBE_NO_WEIGHT_COPY | H.PROBE_NO_ACT_COPY}


def probe_bench(m: int = 2048, layers=("qkv", "gate_up")) -> None:
    """us of the default Gluon one-sum configurations with the probe bits, FP16 and FP8 alongside."""
    shapes = {**SHAPES, "gate_up": (22016, 4096)}
    lines = []
    for layer in layers:
        n, k = shapes[layer]
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        base = {key[:-3]: v * 1e3 for key, v in _fp16_fp8_ms(x, w).items()}
        for fmt, gs, levels in (("levels", 128, 15), ("groupfree", None, None)):
            split = plan_split(k, 128, gs)
            pw = quantize_weight_rtn(w, split, 4, 0.85, levels=levels)
            a = Q.quantize_act(x, None, split, out="int8", levels=levels)
            ps = [prepare_weight(pw, levels=levels) for _ in range(B._copies(n * k // 2))]
            mult = levels is not None
            cfg = pick_config(m, n, ps[0].kp, gluon=True, grouped=False, mult=mult)
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            cells = []
            for name, bits in PROBES.items():
                def run(bits=bits):
                    for p in ps:
                        H.w4a4_gemm_hopper(a, p, None, out, block_m=cfg.block_m, num_warps=cfg.num_warps,
                                           stages=cfg.num_stages, group_m=cfg.group_m, mult=mult,
                                           ctas_per_sm=cfg.ctas_per_sm, probe=bits)
                us = B._time_ms(run, len(ps)) * 1e3
                cells.append(f"{name} {us:6.1f}")
            line = (f"{layer:7s} M={m} {fmt:9s} c{cfg.ctas_per_sm} | fp16 {base['fp16']:6.1f} fp8 {base['fp8']:6.1f} | "
                    + " | ".join(cells))
            print(line, flush=True)
            lines.append(line)
            del ps
    print("\nprobe bench (us; timing only, the probed outputs are wrong):")
    print("\n".join(lines), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--time", action="store_true", help="also print CUDA-graph medians (outside the profiled range)")
    ap.add_argument("--probe-bench", action="store_true", help="only the probe bench (no profiled range)")
    ns = ap.parse_args()
    if ns.probe_bench:
        probe_bench()
        return 0
    names = [c for c in ns.cases.split(",") if c]
    unknown = set(names) - CASES.keys()
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {sorted(CASES)}")
    fns = {name: CASES[name]() for name in names}
    for fn in fns.values():  # compile and warm up outside the profiled range
        fn()
    torch.cuda.synchronize()
    if ns.time:
        for name, fn in fns.items():
            print(f"{name:16s} {B._time_ms(fn) * 1e3:8.1f} us (L2 warm)", flush=True)
    torch.cuda.profiler.start()
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled:", ", ".join(names), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
