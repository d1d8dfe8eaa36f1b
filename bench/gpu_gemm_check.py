"""GPU check + benchmark of the W4A4 GEMM and fused quantize kernels (run with PYTHONPATH=src).

1. correctness of every kernel against ref.py at full Llama-2 size (fresh random inputs each check);
2. optional variant sweep of GEMM tile/operand choices (--sweep);
3. the benchmark (atomq.bench.gemm.run_gemm_bench), JSON to --out; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from atomq.bench import gemm as B
from atomq.kernels import quantize as Q
from atomq.kernels import ref
from atomq.kernels.w4a4_gemm import GemmConfig, prepare_weight, w4a4_gemm
from atomq.quant import PackedWeight, plan_split, unpack_int4

FAILS: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def check_quantize() -> None:
    for m, k in ((1, 4096), (333, 4096), (4096, 8192), (64, 11008)):
        split = plan_split(k, 128, 128)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 2
        idx = torch.randperm(k, device="cuda").to(torch.int32)
        r = ref.quantize_act(x, idx, split)
        a = Q.quantize_act(x, idx, split)
        same = all(torch.equal(u, v) for u, v in zip(a, r))
        op = Q.quantize_act(x, idx, split, out="int8")
        same &= torch.equal(op.qa, unpack_int4(r.q4))
        f8 = Q.quantize_act(x, idx, split, out="fp8")
        same &= torch.equal(f8.qa.float(), op.qa.float())
        report(f"quantize_act M={m} K={k}", same, "packed, int8 and fp8 outputs bit-exact" if same else "mismatch")
        res = torch.randn_like(x)
        wn = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
        (a, nr), (r, rr) = (Q.rmsnorm_quantize(x, res, wn, 1e-5, idx, split),
                            ref.rmsnorm_quantize(x, res, wn, 1e-5, idx, split))
        mism = [(u != v).sum().item() for u, v in zip(a, r)]
        qd = max((unpack_int4(a.q4).int() - unpack_int4(r.q4).int()).abs().max().item(), 0)
        frac = sum(mism) / sum(u.numel() for u in a)
        report(f"rmsnorm_quantize M={m} K={k}", torch.equal(nr, rr) and frac <= 1e-3 and qd <= 1,
               f"residual exact={torch.equal(nr, rr)}, mismatches q4/s4/q8/s8={mism} (fraction {frac:.1e}), "
               f"max int diff {qd}")
        ks = plan_split(k, 128, 128)
        gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.float16) * 2
        a, r = Q.silu_mul_quantize(gu, ks), ref.silu_mul_quantize(gu, ks)
        mism = [(u != v).sum().item() for u, v in zip(a, r)]
        report(f"silu_mul_quantize M={m} K={k}", sum(mism) == 0, f"mismatches q4/s4/q8/s8={mism}")


def _sub_weight(pw: PackedWeight, cols: torch.Tensor) -> PackedWeight:
    """The PackedWeight of a subset of output rows (to keep the float64 reference small)."""
    return PackedWeight(pw.qweight[cols], pw.scales[cols], None, pw.qweight_outlier[cols] if pw.qweight_outlier
                        is not None else None, pw.scales_outlier[cols] if pw.scales_outlier is not None else None, 4)


def check_gemm() -> None:
    cases = [(n, k) for _, _, n, k in B.LLAMA2_SHAPES[:4]] + [(8192, 28672)]
    for n, k in cases:
        for m in (1, 16, 333, 4096):
            x, w, pw, split = B.make_problem(n, k, m)
            pwp = prepare_weight(pw)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            cols = torch.randperm(n, device="cuda")[:256]
            sub = _sub_weight(pw, cols)
            for op, dt in (("int8", torch.float16), ("fp8", torch.bfloat16)):
                a = Q.quantize_act(x, None, split, out=op)
                y = w4a4_gemm(a, pwp, bias, out_dtype=dt)
                yr = ref.w4a4_gemm(a.to_actq(), sub, bias[cols], out_dtype=torch.float64)
                ys = y[:, cols].double()
                rel = ((ys - yr).norm() / yr.norm()).item()
                tol = 1e-3 if dt == torch.float16 else 8e-3
                ok = rel <= tol and bool(torch.isfinite(y).all())
                report(f"w4a4_gemm M={m} N={n} K={k} {op}->{str(dt)[6:]}", ok, f"rel err {rel:.2e} (tol {tol})")
    # group size 64 and per-row weights on a ragged K
    for gs, k in ((64, 4160), (None, 4096), (32, 4128)):
        x, w, pw, split = B.make_problem(4096, k, 77, gs=gs)
        a = Q.quantize_act(x, None, split, out="int8")
        y = w4a4_gemm(a, prepare_weight(pw))
        yr = ref.w4a4_gemm(a.to_actq(), pw, out_dtype=torch.float64)
        rel = ((y.double() - yr).norm() / yr.norm()).item()
        report(f"w4a4_gemm group={gs} K={k} {split}", rel <= 1e-3, f"rel err {rel:.2e}")


def sweep() -> list[dict]:
    """Time GEMM variants on a few shapes (lab notes in docs/KERNELS.md)."""
    C = GemmConfig
    pre = {
        "v_default": (None, "int8"),
        "v_fp8op": (None, "fp8"),
        "v_magic": (C(magic_cvt=True), "int8"),
        "v_s3": (C(num_stages=3), "int8"),
        "v_bm64": (C(block_m=64), "int8"),
        "v_bm256_w8": (C(block_m=256, num_warps=8), "int8"),
        "v_bm256_w8_fp8op": (C(block_m=256, num_warps=8), "fp8"),
        "v_bn128_bm128_w8": (C(block_n=128, block_m=128, num_warps=8), "int8"),
        "v_bn128_bm128_w8_fp8op": (C(block_n=128, block_m=128, num_warps=8), "fp8"),
        "v_bn64_bm128_w4_fp8op_magic": (C(magic_cvt=True), "fp8"),
    }
    dec = {
        "v_default": (None, "int8"),
        "v_fp8op": (None, "fp8"),
        "v_bn128": (C(block_n=128, block_m=16), "int8"),
        "v_split8": (C(block_m=16, split_k=8), "int8"),
        "v_split16": (C(block_m=16, split_k=16), "int8"),
    }
    rows = []
    for n, k, m, cfgs in ((22016, 4096, 4096, pre), (22016, 4096, 16, dec), (4096, 11008, 1, dec),
                          (8192, 28672, 16, dec)):
        t = time.time()
        row = B.bench_gemm_shape(n, k, m, cfgs, baselines=True)
        rows.append(row)
        print(f"sweep N={n} K={k} M={m} ({time.time() - t:.0f}s): fp16 {row['fp16_ms'] * 1e3:.1f} us, "
              f"fp8 {row.get('fp8_ms', float('nan')) * 1e3:.1f} us", flush=True)
        for name in cfgs:
            if name + "_ms" in row:
                print(f"   {name:22s} {row[name + '_ms'] * 1e3:9.1f} us  x{row[name + '_vs_fp16']:.2f} fp16", flush=True)
            else:
                print(f"   {name:22s} {row.get(name + '_error')}", flush=True)
    # groups vs no groups (per-row weights and activations) on the prefill shape, default tiles
    for gs in (128, None):
        x, w, pw, split = B.make_problem(22016, 4096, 4096, gs=gs)
        a = Q.quantize_act(x, None, split, out="int8")
        pwp = prepare_weight(pw)
        ms = B._time_ms(lambda: w4a4_gemm(a, pwp))
        print(f"   group={gs}: {ms * 1e3:.1f} us", flush=True)
        rows.append({"sweep": "groups", "group": gs, "ms": ms})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemm_bench.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, B.MS)))
    args = ap.parse_args()
    print(json.dumps(B.env_info()), flush=True)
    torch.manual_seed(0)
    if not args.no_check:
        check_quantize()
        check_gemm()
    if args.sweep:
        rows = sweep()
        with open(args.out.replace(".json", "_sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)
    if not args.no_bench:
        rows = B.run_gemm_bench(args.out, ms=tuple(int(v) for v in args.ms.split(",")))
        print("\nmodel      layer    M      ours_us  fp16_us  fp8_us   vs_fp16 vs_fp8 ours_TFLOPS")
        for r in rows:
            if "layer" in r:
                print(f"{r['model']:10s} {r['layer']:7s} {r['M']:5d} {r.get('ours_ms', 0) * 1e3:8.1f} "
                      f"{r.get('fp16_ms', 0) * 1e3:8.1f} {r.get('fp8_ms', 0) * 1e3:8.1f} "
                      f"{r.get('ours_vs_fp16', 0):6.2f} {r.get('fp8_ms', 0) / r.get('ours_ms', 1):6.2f} "
                      f"{r.get('ours_tflops', 0):7.0f}")
        print("\nquantize kind   M      K      GB/s   vs copy")
        for r in rows:
            if "kind" in r:
                print(f"{r['kind']:8s} {r['M']:6d} {r['K']:6d} {r['gbps']:7.0f} {r['vs_copy']:6.2f}")
    print(f"\n{len(FAILS)} check failures: {FAILS}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
