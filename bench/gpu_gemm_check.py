"""GPU check + benchmark of the W4A4 GEMM and fused quantize kernels (run with PYTHONPATH=src).

1. correctness of every kernel against ref.py at full Llama-2 size (fresh random inputs each check);
2. optional variant sweep of GEMM tile/operand choices (--sweep);
3. the benchmark (atomq.bench.gemm.run_gemm_bench), JSON to --out; a short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

import torch

from atomq.bench import gemm as B
from atomq.kernels import quantize as Q
from atomq.kernels import ref
from atomq.kernels import w4a4_gemm as gemm_module
from atomq.kernels.w4a4_gemm import GemmConfig, prepare_weight, w4a4_gemm
from atomq.quant import PackedWeight, plan_split, unpack_int4

FAILS: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def check_quantize() -> None:
    for cfg in (Q.QuantizeLaunch(),):
        print(f"quantize kernel {cfg}", flush=True)
        _check_quantize(cfg)


def _check_quantize(cfg) -> None:
    for m, k in ((1, 4096), (333, 4096), (4096, 8192), (64, 11008), (1000, 28672)):
        split = plan_split(k, 128, 128)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 2
        idx = torch.randperm(k, device="cuda").to(torch.int32)
        r = ref.quantize_act(x, idx, split)
        a = Q.quantize_act(x, idx, split, config=cfg)
        same = all(torch.equal(u, v) for u, v in zip(a, r))
        op = Q.quantize_act(x, idx, split, out="int8", config=cfg)
        same &= torch.equal(op.qa, unpack_int4(r.q4))
        f8 = Q.quantize_act(x, idx, split, out="fp8", config=cfg)
        same &= torch.equal(f8.qa.float(), op.qa.float())
        report(f"quantize_act M={m} K={k}", same, "packed, int8 and fp8 outputs bit-exact" if same else "mismatch")
        res = torch.randn_like(x)
        wn = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
        (a, nr), (r, rr) = (Q.rmsnorm_quantize(x, res, wn, 1e-5, idx, split, config=cfg),
                            ref.rmsnorm_quantize(x, res, wn, 1e-5, idx, split))
        mism = [(u != v).sum().item() for u, v in zip(a, r)]
        qd = max((unpack_int4(a.q4).int() - unpack_int4(r.q4).int()).abs().max().item(), 0)
        frac = sum(mism) / sum(u.numel() for u in a)
        report(f"rmsnorm_quantize M={m} K={k}", torch.equal(nr, rr) and frac <= 1e-3 and qd <= 1,
               f"residual exact={torch.equal(nr, rr)}, mismatches q4/s4/q8/s8={mism} (fraction {frac:.1e}), "
               f"max int diff {qd}")
        ks = plan_split(k, 128, 128)
        gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.float16) * 2
        a, r = Q.silu_mul_quantize(gu, ks, config=cfg), ref.silu_mul_quantize(gu, ks)
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
    # decode variants: row-major layout, split K with the in-kernel (fused) or kernel reduction; the
    # fused reduction must be deterministic (fixed summation order) and equal to the two-kernel one
    for n, k, m in ((4096, 11008, 16), (22016, 4096, 1), (8192, 28672, 64)):
        x, w, pw, split = B.make_problem(n, k, m)
        a = Q.quantize_act(x, None, split, out="int8")
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        p16, p1 = prepare_weight(pw), prepare_weight(pw, row_tile=1)
        yr = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
        ys = {}
        for name, p, cfg in (("rt16 fused", p16, GemmConfig(block_n=64, block_m=16 if m <= 16 else 64, split_k=8)),
                             ("rt16 2-kernel", p16, GemmConfig(block_n=64, block_m=16 if m <= 16 else 64, split_k=8,
                                                               fused_reduce=False)),
                             ("rt1 fused bn32", p1, GemmConfig(block_n=32, block_m=16 if m <= 16 else 64, split_k=5)),
                             ("rt16 default", p16, None)):
            y = w4a4_gemm(a, p, bias, config=cfg)
            y2 = w4a4_gemm(a, p, bias, config=cfg)
            ys[name] = y
            rel = ((y.double() - yr).norm() / yr.norm()).item()
            report(f"w4a4_gemm decode {name} M={m} N={n} K={k}", rel <= 1e-3 and torch.equal(y, y2),
                   f"rel err {rel:.2e}, repeat equal {torch.equal(y, y2)}")
        report(f"fused == 2-kernel reduction M={m} N={n}", torch.equal(ys["rt16 fused"], ys["rt16 2-kernel"]), "")
    # group size 64 and per-row weights on a ragged K
    for gs, k in ((64, 4160), (None, 4096), (32, 4128)):
        x, w, pw, split = B.make_problem(4096, k, 77, gs=gs)
        a = Q.quantize_act(x, None, split, out="int8")
        y = w4a4_gemm(a, prepare_weight(pw))
        yr = ref.w4a4_gemm(a.to_actq(), pw, out_dtype=torch.float64)
        rel = ((y.double() - yr).norm() / yr.norm()).item()
        report(f"w4a4_gemm group={gs} K={k} {split}", rel <= 1e-3, f"rel err {rel:.2e}")


G = GemmConfig
GLUON_VARIANTS = {  # groups of 128
    "g_bm128_w4_s4": G(kernel="gluon", block_m=128, num_warps=4, num_stages=4),
    "g_bm64_w4_s4": G(kernel="gluon", block_m=64, num_warps=4, num_stages=4),
    "g_bm128_w8_s4": G(kernel="gluon", block_m=128, num_warps=8, num_stages=4),
}
ROW_VARIANTS = {  # one scale per row and per token (no groups)
    "r_bm128_w4_s4": G(kernel="gluon", block_m=128, num_warps=4, num_stages=4),
    "r_bm128_w8_s4": G(kernel="gluon", block_m=128, num_warps=8, num_stages=4),
    "r_bm128_w8_s6": G(kernel="gluon", block_m=128, num_warps=8, num_stages=6),
    "r_bm64_w4_s6": G(kernel="gluon", block_m=64, num_warps=4, num_stages=6),
    "r_bm64_w8_s4": G(kernel="gluon", block_m=64, num_warps=8, num_stages=4),
    "r_bm128_w8_s4_gm4": G(kernel="gluon", block_m=128, num_warps=8, num_stages=4, group_m=4),
    "r_bm128_w8_s4_gm16": G(kernel="gluon", block_m=128, num_warps=8, num_stages=4, group_m=16),
}


def prefill_sweep(gs: int | None = 128) -> list[dict]:
    """Time the Triton kernel and the Gluon variants against FP16 and FP8 at M >= 256 (gs: the weight
    and activation group size; None = one scale per row / token)."""
    variants = GLUON_VARIANTS if gs else ROW_VARIANTS
    cfgs = {"triton": (None, "int8"), **{k: (v, "int8") for k, v in variants.items()}}
    rows, table = [], []
    shapes = [(n, k) for _, _, n, k in B.LLAMA2_SHAPES[:4]] + [(57344, 8192), (8192, 28672)]
    ms = (256, 1024, 4096, 16384) if gs else (256, 2048, 8192)
    for n, k in shapes:
        for m in ms:
            if n * m > 57344 * 4096:  # keep the run short: the largest products only at M <= 4096
                continue
            t = time.time()
            row = B.bench_gemm_shape(n, k, m, cfgs, which=("fp8",), gs=gs)
            row["group_size"] = gs
            rows.append(row)
            best = min((nm for nm in cfgs if nm != "triton" and nm + "_ms" in row), key=lambda nm: row[nm + "_ms"],
                       default=None)
            line = (f"N={n:5d} K={k:5d} M={m:5d} fp16 {row['fp16_ms'] * 1e3:7.1f} fp8 {row.get('fp8_ms', 0) * 1e3:7.1f} |"
                    + "".join(f" {nm} {row[nm + '_ms'] * 1e3:.1f}" if nm + "_ms" in row else f" {nm} ERR"
                              for nm in cfgs))
            if best:
                line += (f" | best {best}: {row['fp16_ms'] / row[best + '_ms']:.2f}x fp16, "
                         f"{row.get('fp8_ms', 0) / row[best + '_ms']:.2f}x fp8, triton {row['fp16_ms'] / row['triton_ms']:.2f}x fp16")
            for nm in cfgs:
                if nm + "_error" in row:
                    print(f"   {nm}: {row[nm + '_error']}", flush=True)
            print(f"{line} ({time.time() - t:.0f}s)", flush=True)
            table.append(line)
    print(f"\nprefill sweep table, groups {gs} (us):", flush=True)
    for line in table:
        print(line, flush=True)
    return rows


def check_gluon() -> None:
    """The Gluon prefill kernel (sm_90): ragged M and N, bias, both output dtypes, each tile variant."""
    cases = ((4096, 4096, 333), (22016, 4096, 4096), (4096 + 80, 11008, 1000), (8192, 28672, 65))
    for (n, k, m), gs in [(c, g) for g in (128, None) for c in cases]:
        x, w, pw, split = B.make_problem(n, k, m, gs=gs)
        a = Q.quantize_act(x, None, split, out="int8")
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        cols = torch.randperm(n, device="cuda")[:256]
        sub = _sub_weight(pw, cols)
        pwp = prepare_weight(pw)
        for name, cfg in (GLUON_VARIANTS if gs else ROW_VARIANTS).items():
            for dt in (torch.float16, torch.bfloat16):
                try:
                    y = w4a4_gemm(a, pwp, bias.to(dt), out_dtype=dt, config=cfg)
                except Exception as e:  # reported, the other checks go on
                    report(f"gluon {name} M={m} N={n} K={k}", False, f"{type(e).__name__}: {str(e)[:300]}")
                    continue
                yr = ref.w4a4_gemm(a.to_actq(), sub, bias.to(dt)[cols], out_dtype=torch.float64)
                rel = ((y[:, cols].double() - yr).norm() / yr.norm()).item()
                tol = 1e-3 if dt == torch.float16 else 8e-3
                report(f"gluon {name} M={m} N={n} K={k} ->{str(dt)[6:]}", rel <= tol and bool(torch.isfinite(y).all()),
                       f"rel err {rel:.2e} (tol {tol})")


def row_bench() -> list[dict]:
    """Group-free W4A4 (one scale per row and per token, 128 INT8 outliers) with the default kernels
    against cuBLAS FP16 and FP8 at M in {16, 256, 2048, 8192}."""
    rows = []
    print("\ngroup-free W4A4, default kernels (us):", flush=True)
    for model, layer, n, k in B.LLAMA2_SHAPES:
        for m in (16, 256, 2048, 8192):
            if n * m > 57344 * 2048:
                continue
            row = B.bench_gemm_shape(n, k, m, {"ours": (None, "int8")}, which=("fp8",), gs=None)
            row.update(model=model, layer=layer, group_size=None)
            rows.append(row)
            print(f"{model:10s} {layer:7s} M={m:5d} ours {row['ours_ms'] * 1e3:8.1f} fp16 {row['fp16_ms'] * 1e3:8.1f} "
                  f"fp8 {row['fp8_ms'] * 1e3:8.1f} | {row['fp16_ms'] / row['ours_ms']:.2f}x fp16 "
                  f"{row['fp8_ms'] / row['ours_ms']:.2f}x fp8", flush=True)
    return rows


def _variant_cells(row: dict, names, ratio_to: str | None = None) -> str:
    """' name us' for each variant of a bench row (ERR where it failed), with row[ratio_to] / its time."""
    cells = ""
    for name in names:
        v = row.get(name + "_ms")
        cells += f" {name} ERR" if not v else f" {name} {v * 1e3:6.1f}" + (f" ({row[ratio_to] / v:.2f}x)" if ratio_to else "")
    return cells


def _print_table(title: str, lines: list[str]) -> None:
    print(f"\n{title}", flush=True)
    for line in lines:
        print(line, flush=True)


def groupfree_sweep() -> list[dict]:
    """Group-free W4A4 (one scale per row / token, 128 INT8 outliers) on the Gluon kernel: tile variants
    against the default on the products nearest the 1.4x FP16 line; each variant's output checked against
    the default's first."""
    C = functools.partial(GemmConfig, kernel="gluon", block_m=128)
    variants = {"default": None, "w8s3": C(num_warps=8, num_stages=3), "w8s5": C(num_warps=8, num_stages=5),
                "w8s6": C(num_warps=8, num_stages=6), "w8gm4": C(num_warps=8, group_m=4),
                "w8gm16": C(num_warps=8, group_m=16), "w8bm64": C(num_warps=8, block_m=64),
                "w4s4": C(num_warps=4), "w4s6": C(num_warps=4, num_stages=6), "w4bm256": C(num_warps=4, block_m=256)}
    rows, lines = [], []
    for n, k, m in ((4096, 4096, 2048), (4096, 4096, 8192), (12288, 4096, 8192)):
        x, _, pw, split = B.make_problem(n, k, m, gs=None)
        a = Q.quantize_act(x, None, split, out="int8")
        pwp = prepare_weight(pw)
        want = w4a4_gemm(a, pwp).float()
        for name, cfg in variants.items():
            if cfg is None:
                continue
            try:
                got = w4a4_gemm(a, pwp, config=cfg).float()
                err = ((got - want).norm() / want.norm()).item()
                report(f"group-free {name} N={n} K={k} M={m} = default", err < 1e-3, f"rel diff {err:.1e}")
            except Exception as e:
                report(f"group-free {name} N={n} K={k} M={m}", False, f"{type(e).__name__}: {str(e)[:200]}")
                variants[name] = None
        del x, a, pwp, want
        row = B.bench_gemm_shape(n, k, m, {nm: (c, "int8") for nm, c in variants.items() if c is not None or nm == "default"},
                                 which=("fp8",), gs=None)
        rows.append(row)
        line = (f"N={n:5d} K={k:5d} M={m:5d} fp16 {row['fp16_ms'] * 1e3:7.1f} fp8 {row['fp8_ms'] * 1e3:7.1f} |"
                + _variant_cells(row, variants, ratio_to="fp16_ms"))
        print(line, flush=True)
        lines.append(line)
    _print_table("group-free variants (us, x = vs FP16):", lines)
    return rows


def check_gemv() -> None:
    """The CUDA-core M <= 2 kernel against the reference: groups of 128, 64, 32 and none, bias, bf16 out."""
    for n, k, m, gs in ((22016, 4096, 1, 128), (4096, 11008, 2, 128), (12288, 4096, 1, 64), (4096, 11008, 1, None),
                        (12288, 4096, 1, 32), (4096, 11008, 1, 32)):
        x, w, pw, split = B.make_problem(n, k, m, gs=gs)
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        a = Q.quantize_act(x, None, split, out="int8")
        yr = ref.w4a4_gemm(a.to_actq(), pw, bias, out_dtype=torch.float64)
        for dt, sk in ((torch.float16, 1), (torch.float16, 0), (torch.float16, 4), (torch.bfloat16, 0)):
            y = w4a4_gemm(a, prepare_weight(pw), bias, out_dtype=dt, config=GemmConfig(kernel="gemv", split_k=sk))
            rel = ((y.double() - yr).norm() / yr.norm()).item()
            tol = 1e-3 if dt == torch.float16 else 8e-3
            report(f"gemv M={m} N={n} K={k} groups {gs} split {sk or 'auto'} ->{str(dt)[6:]}",
                   rel <= tol and bool(torch.isfinite(y).all()), f"rel err {rel:.2e} (tol {tol})")


def gemv_bench() -> list[dict]:
    """M = 1: the CUDA-core GEMV (K blocks per step, K runs, weight steps ahead) against the tensor-core decode kernel,
    cuBLAS FP16 and torch's W4A16; us, medians of CUDA-graph replays."""
    C = GemmConfig
    tc = C(block_n=64, block_m=16, num_warps=4, num_stages=4, waves=4.0)
    g = functools.partial(C, kernel="gemv", waves=8.0)
    cfgs = {"kb4_s1_a1": g(k_blocks=4, split_k=1, ahead=1), "kb4_s1_a2": g(k_blocks=4, split_k=1, ahead=2),
            "kb4_auto_a1": g(k_blocks=4, ahead=1), "kb4_auto_a2": g(k_blocks=4, ahead=2),
            "kb4_s4_a2": g(k_blocks=4, split_k=4, ahead=2), "kb2_auto_a2": g(k_blocks=2, ahead=2),
            "kb8_auto_a2": g(k_blocks=8, ahead=2), "tc": tc}
    cfgs = {k: (v, "int8") for k, v in cfgs.items()}
    rows, lines = [], []
    for model, layer, n, k in B.LLAMA2_SHAPES:
        row = B.bench_gemm_shape(n, k, 1, cfgs, which=("w4a16",))
        row.update(model=model, layer=layer)
        rows.append(row)
        line = (f"{model:10s} {layer:7s} M=1 fp16 {row['fp16_ms'] * 1e3:6.1f} w4a16 {row.get('w4a16_ms', 0) * 1e3:6.1f} |"
                + _variant_cells(row, cfgs))
        print(line, flush=True)
        lines.append(line)
    _print_table("GEMV table (us):", lines)
    return rows


def gemv_groups_bench() -> list[dict]:
    """M = 1, the default one-token dispatch with groups of 128 / 64 / 32 on the 7B shapes (us)."""
    rows, lines = [], []
    for model, layer, n, k in B.LLAMA2_SHAPES:
        if model != "llama2-7b":
            continue
        line = f"{model:10s} {layer:7s} M=1 |"
        for gs, spans in ((128, None), (64, None), (32, (64,)), (32, (64, 32))):
            saved = gemm_module.GEMV_SPANS
            gemm_module.GEMV_SPANS = spans or saved
            try:
                row = B.bench_gemm_shape(n, k, 1, {"default": (None, "int8")}, baselines=False, gs=gs)
            finally:
                gemm_module.GEMV_SPANS = saved
            row.update(model=model, layer=layer, group_size=gs, gemv_spans=list(spans or saved))
            rows.append(row)
            tag = f"g{gs}" + ("" if spans is None else ("/gemv" if 32 in spans else "/tc"))
            line += f" {tag} {row.get('default_ms', float('nan')) * 1e3:6.1f}"
        print(line, flush=True)
        lines.append(line)
    _print_table("one-token default dispatch by group size (us):", lines)
    return rows


def _decode_operands(n: int, k: int, m: int):
    """One decode product: x fp16 [M, K], w fp16 [N, K], its PackedWeight and Split, prepared copies that
    rotate past L2 (the first one to check with), and the int8 activation operand."""
    from atomq.bench.gemm import _copies, make_problem

    x, w, pw, split = make_problem(n, k, m)
    first = prepare_weight(pw)
    ps = [first] + [prepare_weight(pw) for _ in range(_copies(first.w4.numel()) - 1)]
    return x, w, pw, split, ps, Q.quantize_act(x, None, split, out="int8")


def accumulate_bench(ms=(1, 16)) -> list[dict]:
    """Decode GEMMs (default dispatch) with their split-K reduction as written (partials, an arrival counter,
    the last run's sum, fp16 out) against accumulating into the operand's fp32 accumulator (ActOp.acc:
    fire-and-forget adds); 7B and 70B shapes, us. The accumulator is not re-zeroed between timed calls
    (timing only); the results are checked once against the reference first."""
    from atomq.bench.gemm import _time_ms

    rows, lines = [], []
    for model, layer, n, k in B.LLAMA2_SHAPES:
        for m in ms:
            x, _, pw, split, ps, a = _decode_operands(n, k, m)
            acc = Q.quantize_act(x, None, split, out="int8", acc_cols=n)
            yr = ref.w4a4_gemm(a.to_actq(), pw, None, out_dtype=torch.float64)
            rel = ((w4a4_gemm(acc, ps[0]).double() - yr).norm() / yr.norm()).item()
            report(f"accumulate {model} {layer} M={m}", rel <= 1e-3, f"rel err {rel:.2e}")
            row = dict(model=model, layer=layer, M=m, N=n, K=k, rel_err=rel)
            row["counter_ms"] = _time_ms(lambda: [w4a4_gemm(a, p) for p in ps], len(ps))
            row["accumulate_ms"] = _time_ms(lambda: [w4a4_gemm(acc, p) for p in ps], len(ps))
            rows.append(row)
            line = (f"{model:10s} {layer:7s} M={m:<3d}| counter {row['counter_ms'] * 1e3:6.1f} "
                    f"accumulate {row['accumulate_ms'] * 1e3:6.1f}")
            print(line, flush=True)
            lines.append(line)
    _print_table("decode GEMM: split-K reduction vs accumulating (us):", lines)
    return rows


# decode loads before the wait for the kernel ahead: (OUTLIERS_FIRST, DECODE_L2_PREFETCH) per variant
EARLY_VARIANTS = {"default": (False, 0), "outliers first": (True, 0), "l2 prefetch 2": (False, 2),
                  "both": (True, 2)}


def decode_early_bench(ms=(1, 16)) -> list[dict]:
    """Decode GEMMs (default dispatch) with more loads before the wait for the kernel ahead (EARLY_VARIANTS:
    the INT8 outlier operands ahead of the first K run's loop; the Triton kernel's first weight blocks
    prefetched into L2), next to cuBLAS FP16 and FP8; 7B and 70B shapes, us. Each shape first checks that
    every variant gives the default's output bit for bit."""
    from atomq.bench.gemm import _time_ms

    rows, lines = [], []
    defaults = gemm_module.OUTLIERS_FIRST, gemm_module.DECODE_L2_PREFETCH
    for model, layer, n, k in B.LLAMA2_SHAPES:
        for m in ms:
            x, w, _, _, ps, a = _decode_operands(n, k, m)
            row = dict(model=model, layer=layer, M=m, N=n, K=k)
            ys = {}
            for name, (out_first, l2_blocks) in EARLY_VARIANTS.items():
                gemm_module.OUTLIERS_FIRST, gemm_module.DECODE_L2_PREFETCH = out_first, l2_blocks
                ys[name] = w4a4_gemm(a, ps[0])
                report(f"{name} {model} {layer} M={m}", torch.equal(ys[name], ys["default"]), "= default bit for bit")
                row[f"{name}_ms"] = _time_ms(lambda: [w4a4_gemm(a, p) for p in ps], len(ps))
            gemm_module.OUTLIERS_FIRST, gemm_module.DECODE_L2_PREFETCH = defaults
            del ps
            row.update(_fp16_fp8_ms(x, w))
            rows.append(row)
            cells = " | ".join(f"{name} {row[name + '_ms'] * 1e3:6.1f} ({row['fp16_ms'] / row[name + '_ms']:.2f}x)"
                               for name in EARLY_VARIANTS)
            line = (f"{model:10s} {layer:7s} M={m:<3d}| fp16 {row['fp16_ms'] * 1e3:6.1f} fp8 {row['fp8_ms'] * 1e3:6.1f} "
                    f"| {cells}")
            print(line, flush=True)
            lines.append(line)
    _print_table("decode GEMM: loads before the wait (us, x = vs FP16):", lines)
    return rows


def _fp16_fp8_ms(x: torch.Tensor, w: torch.Tensor) -> dict:
    """The baselines of one product, x fp16 [M, K] and w fp16 [N, K]: cuBLAS FP16 and FP8 ``_scaled_mm``
    (per-token x per-channel scales), ms, weights rotated past L2."""
    m, n = x.shape[0], w.shape[0]
    ws = [w] + [w.clone() for _ in range(B._copies(w.numel() * 2) - 1)]
    out = {"fp16_ms": B._time_ms(lambda: [torch.matmul(x, wi.t()) for wi in ws], len(ws))}
    del ws
    w8s = [w.to(torch.float8_e4m3fn) for _ in range(B._copies(w.numel()))]
    x8, sa, sb = x.to(torch.float8_e4m3fn), torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
    out["fp8_ms"] = B._time_ms(lambda: [torch._scaled_mm(x8, wi.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                                        for wi in w8s], len(w8s))
    return out


def levels_bench(ms=(16, 64, 256, 2048), group_sizes=(32, 128), models=("llama2-7b",)) -> list[dict]:
    """Group scales as integer multiples of one per row / token (``levels``): the integer-accumulating
    loops (Triton; Gluon for groups of 128 above M = 64, the default there) against the promoting default
    (Triton at M <= 64 and for groups of 32, Gluon for groups of 128 above), the group-free default, cuBLAS
    FP16 and FP8 ``_scaled_mm``; us. Each levels result is checked against ref.w4a4_gemm on 256 columns."""
    from atomq.quant import quantize_weight_rtn

    rows, lines = [], []
    for gs in group_sizes:
        for model, layer, n, k in B.LLAMA2_SHAPES:
            if model not in models:
                continue
            for m in ms:
                split = plan_split(k, 128, gs)
                w = torch.randn(n, k, device="cuda", dtype=torch.float16)
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                pw = quantize_weight_rtn(w, split, 4, 0.85, levels=15)
                p = prepare_weight(pw, levels=15)
                a = Q.quantize_act(x, None, split, out="int8", levels=15)
                cols = torch.randperm(n, device="cuda")[:256]
                sub = PackedWeight(pw.qweight[cols], pw.scales[cols], None, pw.qweight_outlier[cols],
                                   pw.scales_outlier[cols], 4)
                yr = ref.w4a4_gemm(ref.ActQ(a.qa, a.s4, a.q8, a.s8), sub, out_dtype=torch.float64)
                tri = gemm_module.pick_config(m, n, p.kp, gluon=False)
                for name, cfg in (("default", None), ("triton", tri)):
                    y = w4a4_gemm(a, p, config=cfg, uniform_act_scales=True)
                    rel = ((y[:, cols].double() - yr).norm() / yr.norm()).item()
                    report(f"levels {name} g{gs} {model} {layer} M={m}", rel < 1e-3, f"rel {rel:.1e}")
                ps = [p] + [prepare_weight(pw, levels=15) for _ in range(B._copies(p.w4.numel()) - 1)]
                row = {"M": m, "N": n, "K": k, "model": model, "layer": layer, "group_size": gs}
                row["levels_ms"] = B._time_ms(lambda: [w4a4_gemm(a, q, config=tri, uniform_act_scales=True)
                                                       for q in ps], len(ps))
                row["levels_default_ms"] = B._time_ms(lambda: [w4a4_gemm(a, q, uniform_act_scales=True)
                                                               for q in ps], len(ps))
                row["grouped_ms"] = B._time_ms(lambda: [w4a4_gemm(a, q) for q in ps], len(ps))
                del ps
                pf = prepare_weight(quantize_weight_rtn(w, plan_split(k, 128, None), 4, 0.85))
                af = Q.quantize_act(x, None, plan_split(k, 128, None), out="int8")
                pfs = [pf] + [prepare_weight(quantize_weight_rtn(w, plan_split(k, 128, None), 4, 0.85))
                              for _ in range(B._copies(pf.w4.numel()) - 1)]
                row["groupfree_default_ms"] = B._time_ms(lambda: [w4a4_gemm(af, q) for q in pfs], len(pfs))
                del pfs
                row.update(_fp16_fp8_ms(x, w))
                rows.append(row)
                us = {key: row[key + "_ms"] * 1e3 for key in ("fp16", "fp8", "grouped", "levels", "levels_default",
                                                                "groupfree_default")}
                line = (f"g{gs:<3d} {model[-3:]} {layer:7s} M={m:<5d} fp16 {us['fp16']:7.1f} fp8 {us['fp8']:7.1f} "
                        f"grouped {us['grouped']:7.1f} levels triton {us['levels']:7.1f} default "
                        f"{us['levels_default']:7.1f} ({us['fp16'] / us['levels_default']:.2f}x fp16, "
                        f"{us['fp8'] / us['levels_default']:.2f}x fp8, {us['grouped'] / us['levels_default']:.2f}x "
                        f"grouped) groupfree {us['groupfree_default']:7.1f}")
                print(line, flush=True)
                lines.append(line)
    _print_table("integer-multiplier scales (us):", lines)
    return rows


def ctas_bench(ms=(2048, 8192), models=("llama2-7b", "llama2-70b"), names=None) -> list[dict]:
    """The Gluon kernel's one-int32-sum loops (group-free; groups of 128 with integer multipliers) with
    several programs per SM (registers capped, the main product parked in shared memory for the outlier
    epilogue) and with 256-token tiles (two wgmma halves per unpack) against one program per SM, cuBLAS
    FP16 and FP8 ``_scaled_mm``; us. Every variant is first checked against ref.w4a4_gemm on 256 columns.
    names: the variants to run (all when None)."""
    from atomq.quant import quantize_weight_rtn

    def variants(m, n, kp):
        base = gemm_module.pick_config(m, n, kp, gluon=True, grouped=False)
        return {"c1": dataclasses.replace(base, ctas_per_sm=1), "c2": dataclasses.replace(base, ctas_per_sm=2),
                "c2s3": dataclasses.replace(base, ctas_per_sm=2, num_stages=3),
                "m256": dataclasses.replace(base, block_m=256, ctas_per_sm=1),
                "m256s3": dataclasses.replace(base, block_m=256, ctas_per_sm=1, num_stages=3)}

    def chosen(m, n, kp):
        every = variants(m, n, kp)
        if names is not None and not names <= every.keys():
            raise SystemExit(f"--ctas-variants: unknown {sorted(names - every.keys())}; known: {sorted(every)}")
        return {k: v for k, v in every.items() if names is None or k in names}

    rows, lines = [], []
    for model, layer, n, k in B.LLAMA2_SHAPES:
        if model not in models:
            continue
        for m in ms:
            if n * m > 57344 * 2048:
                continue
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cols = torch.randperm(n, device="cuda")[:256]
            row = {"M": m, "N": n, "K": k, "model": model, "layer": layer}
            for fmt, gs, levels in (("groupfree", None, None), ("levels", 128, 15)):
                split = plan_split(k, 128, gs)
                pw = quantize_weight_rtn(w, split, 4, 0.85, levels=levels)
                a = Q.quantize_act(x, None, split, out="int8", levels=levels)
                sub = PackedWeight(pw.qweight[cols], pw.scales[cols], None, pw.qweight_outlier[cols],
                                   pw.scales_outlier[cols], 4)
                yr = ref.w4a4_gemm(ref.ActQ(a.qa, a.s4, a.q8, a.s8), sub, out_dtype=torch.float64)
                p = prepare_weight(pw, levels=levels)
                ps = [p] + [prepare_weight(pw, levels=levels) for _ in range(B._copies(p.w4.numel()) - 1)]
                for name, cfg in chosen(m, n, p.kp).items():
                    try:
                        y = w4a4_gemm(a, p, config=cfg, uniform_act_scales=levels is not None)
                        rel = ((y[:, cols].double() - yr).norm() / yr.norm()).item()
                        report(f"{fmt} {name} {model} {layer} M={m}", rel < 1e-3, f"rel {rel:.1e}")
                        if rel < 1e-3:
                            row[f"{fmt}_{name}_ms"] = B._time_ms(
                                lambda: [w4a4_gemm(a, q, config=cfg, uniform_act_scales=levels is not None)
                                         for q in ps], len(ps))
                    except Exception as e:  # a variant that fails is reported, the others still run
                        report(f"{fmt} {name} {model} {layer} M={m}", False, f"{type(e).__name__}: {str(e)[:200]}")
                del ps, p, a
            row.update(_fp16_fp8_ms(x, w))
            rows.append(row)
            cells = " ".join(f"{key[:-3]} {v * 1e3:7.1f} ({row['fp16_ms'] / v:.2f}x)" for key, v in row.items()
                             if key.endswith("_ms") and key not in ("fp16_ms", "fp8_ms"))
            line = (f"{model[-3:]} {layer:7s} M={m:<5d} fp16 {row['fp16_ms'] * 1e3:7.1f} fp8 "
                    f"{row['fp8_ms'] * 1e3:7.1f} | {cells}")
            print(line, flush=True)
            lines.append(line)
    _print_table("programs per SM (us, x = vs FP16):", lines)
    return rows


def outlier_bench() -> list[dict]:
    """The cost of 256 INT8 outlier channels against 128, groups of 32, default dispatch, 7B shapes (us)."""
    rows, lines = [], []
    for model, layer, n, k in B.LLAMA2_SHAPES:
        if model != "llama2-7b":
            continue
        for m in (1, 16, 64, 2048):
            line = f"g32 {layer:7s} M={m:<5d} |"
            for n_out in (128, 256):
                row = B.bench_gemm_shape(n, k, m, {"default": (None, "int8")}, baselines=n_out == 128,
                                         which=(), gs=32, n_out=n_out)
                row.update(model=model, layer=layer, group_size=32, n_outliers=n_out)
                rows.append(row)
                if n_out == 128:
                    line += f" fp16 {row['fp16_ms'] * 1e3:7.1f}"
                line += f" out{n_out} {row.get('default_ms', float('nan')) * 1e3:7.1f}"
            print(line, flush=True)
            lines.append(line)
    _print_table("128 against 256 outlier channels, groups of 32 (us):", lines)
    return rows


def quant_bench() -> list[dict]:
    """Fused norm + quantize variants against the measured copy bandwidth (us and fraction of copy)."""
    QC = Q.QuantizeLaunch
    cp = B.copy_gbps()
    # (gather of x and residual or of the new residual) x (norm weight gathered per call or given in output order)
    variants = {"inputs/w_gather": (QC(gather_residual=False), False), "res/w_gather": (QC(), False),
                "inputs/w_out": (QC(gather_residual=False), True), "res/w_out (default)": (QC(), True)}
    rows, lines = [], []
    for kind, k in (("rmsnorm", 4096), ("rmsnorm", 8192), ("silu", 11008), ("gather", 4096)):  # decode sizes
        for m in (1, 16):
            line = f"{kind:13s} K={k:5d} M={m:5d} |"
            for name, cfg in {"norm_block 256": QC(norm_block=256), "default": QC()}.items():
                if kind != "rmsnorm" and name != "default":
                    continue
                r = B.bench_quantize(m, k, kind, config=cfg)
                r.update(variant=name, vs_copy=r["gbps"] / cp)
                rows.append(r)
                line += f" {name} {r['ms'] * 1e3:7.1f}us"
            print(line, flush=True)
            lines.append(line)
    for m in (16, 4096):  # the rows kernel (one row per program, the gather through shared memory) = chunk
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        idx = torch.randperm(4096, device="cuda").to(torch.int32)
        split = plan_split(4096, 128, 128)
        got = Q.quantize_act(x, idx, split, out="int8", config=QC(kernel="rows"))
        want = Q.quantize_act(x, idx, split, out="int8")
        same = all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
        print(f"[{'ok' if same else 'FAIL'}] rows kernel gather = chunk kernel, M={m}: outputs equal {same}", flush=True)
    rows_cfg = {"rows kernel": (QC(kernel="rows"), True)}
    for kind, k in (("rmsnorm", 4096), ("rmsnorm", 8192), ("rmsnorm-noidx", 4096), ("gather", 4096)):
        for m in (16, 4096, 16384):
            line = f"{kind:13s} K={k:5d} M={m:5d} |"
            kind_variants = variants if kind == "rmsnorm" else {"default": (QC(), True)}
            if kind in ("rmsnorm", "gather"):
                kind_variants = {**kind_variants, **rows_cfg}
            for name, (cfg, wg) in kind_variants.items():
                r = B.bench_quantize(m, k, kind, config=cfg, weight_gathered=wg)
                r.update(variant=name, vs_copy=r["gbps"] / cp)
                rows.append(r)
                line += f" {name} {r['ms'] * 1e3:7.1f}us {r['vs_copy']:.2f}"
            print(line, flush=True)
            lines.append(line)
    print(f"\ncopy {cp:.0f} GB/s; quantize table:")
    for line in lines:
        print(line)
    return rows


def sweep() -> list[dict]:
    """Time decode GEMM and quantize variants (lab notes in docs/KERNELS.md); a table is printed last."""
    C = GemmConfig
    dec = {
        "old": (C(block_m=16, prefetch=False, fused_reduce=False), "int8", 1),
        "rt1_pf": (C(block_m=16), "int8", 1),
        "rt16": (C(block_m=16, prefetch=False), "int8", 16),
        "rt16_pf": (C(block_m=16), "int8", 16),
        "pf_w4": (C(block_m=16, waves=4), "int8", 16),
        "pf_bn32_w2": (C(block_n=32, block_m=16), "int8", 16),
        "pf_bn32_w4": (C(block_n=32, block_m=16, waves=4), "int8", 16),
        "pf_bn32_w8": (C(block_n=32, block_m=16, waves=8, min_iters=4), "int8", 16),
        "pf_bn16_w4": (C(block_n=16, block_m=16, waves=4, num_warps=2), "int8", 16),
        "pf_bn16_w8": (C(block_n=16, block_m=16, waves=8, num_warps=2, min_iters=4), "int8", 16),
        "pf_bn128_w4": (C(block_n=128, block_m=16, waves=4, num_warps=4), "int8", 16),
    }
    rows, table = [], []
    shapes = [(22016, 4096, 16), (4096, 4096, 16), (4096, 11008, 1), (4096, 11008, 16),
              (8192, 28672, 16), (57344, 8192, 16), (22016, 4096, 64), (8192, 28672, 64)]
    for n, k, m in shapes:
        cfgs = dict(dec)
        if m > 16:
            cfgs = {name: (dataclasses.replace(c, block_m=64), op, rt) for name, (c, op, rt) in dec.items()}
        t = time.time()
        row = B.bench_gemm_shape(n, k, m, cfgs, baselines=False)
        xh = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(B._copies(n * k * 2))]
        row["fp16_ms"] = B._time_ms(lambda: [torch.matmul(xh, wi.t()) for wi in ws], len(ws))
        del ws
        rows.append(row)
        line = f"N={n:5d} K={k:5d} M={m:3d} fp16 {row['fp16_ms'] * 1e3:6.1f} |"
        for name in cfgs:
            v = row.get(name + "_ms")
            line += f" {name} {v * 1e3:.1f}" if v else f" {name} ERR"
            if not v:
                print(f"   {name}: {row.get(name + '_error')}", flush=True)
        print(f"{line} ({time.time() - t:.0f}s)", flush=True)
        table.append(line)
    # prefill guard: the tiled layout and the scale prefetch on the compute-bound shape
    pre = {"old": (C(prefetch=False), "int8", 1), "rt16": (C(prefetch=False), "int8", 16),
           "rt16_pf": (C(), "int8", 16), "rt1_pf": (C(), "int8", 1)}
    for n, k, m in ((22016, 4096, 4096), (4096, 4096, 256)):
        row = B.bench_gemm_shape(n, k, m, pre, baselines=False)
        rows.append(row)
        line = f"prefill N={n} K={k} M={m} |" + "".join(
            f" {nm} {row[nm + '_ms'] * 1e3:.1f}" if nm + "_ms" in row else f" {nm} ERR" for nm in pre)
        print(line, flush=True)
        table.append(line)
    print("\nGEMM sweep table (us):", flush=True)
    for line in table:
        print(line, flush=True)
    # quantize kernels (rows kernel only without the gather: with tl.gather it did not compile in time)
    cp = B.copy_gbps()
    QC = Q.QuantizeLaunch
    for kind, k in (("rmsnorm", 4096), ("silu", 11008)):
        bk = 1 << (k - 1).bit_length()
        for m in (16, 4096):
            cands = {"chunk": QC(kernel="chunk")}
            for r_, w_ in ((1, 8), (1, 16), (2, 16)):
                if kind == "silu" and r_ * bk <= Q.ROWS_MAX_ELEMS and (m >= 1024 or r_ == 1):
                    cands[f"r{r_}w{w_}"] = QC(rows=r_, num_warps=w_)
            line = f"q {kind:7s} K={k:5d} M={m:5d} |"
            for name, c in cands.items():
                try:
                    r = B.bench_quantize(m, k, kind, config=c)
                    r.update(variant=name, vs_copy=r["gbps"] / cp)
                    rows.append(r)
                    line += f" {name} {r['ms'] * 1e3:.1f}us/{r['vs_copy']:.2f}"
                except Exception as e:
                    line += f" {name} ERR"
                    print(f"   {kind} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            print(line, flush=True)
            table.append(line)
    print(f"\ncopy {cp:.0f} GB/s; sweep table (us):", flush=True)
    for line in table:
        print(line)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gemm_bench.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--prefill-sweep", action="store_true")
    ap.add_argument("--row-sweep", action="store_true", help="the prefill sweep of the group-free variants only")
    ap.add_argument("--groupfree-sweep", action="store_true", help="Gluon tile variants of the group-free GEMM")
    ap.add_argument("--gluon-only", action="store_true", help="check only the Gluon kernel")
    ap.add_argument("--row-bench", action="store_true", help="also time group-free W4A4 against FP16 and FP8")
    ap.add_argument("--gemv-bench", action="store_true", help="also time the M <= 4 CUDA-core GEMV variants")
    ap.add_argument("--accumulate-bench", action="store_true",
                    help="also time the decode GEMMs' split-K reduction against accumulating into ActOp.acc")
    ap.add_argument("--gemv-groups", action="store_true", help="time one token at groups of 128 / 64 / 32 (7B)")
    ap.add_argument("--quant-bench", action="store_true", help="also time the norm + quantize gather variants")
    ap.add_argument("--levels-bench", action="store_true", help="integer-multiplier group scales")
    ap.add_argument("--levels-groups", default="32,128", help="group sizes of --levels-bench")
    ap.add_argument("--levels-ms", default="16,64,256,2048", help="M of --levels-bench")
    ap.add_argument("--levels-models", default="llama2-7b", help="models of --levels-bench (llama2-7b,llama2-70b)")
    ap.add_argument("--ctas-bench", action="store_true", help="Gluon one-sum loops with several programs per SM")
    ap.add_argument("--ctas-ms", default="2048,8192", help="M of --ctas-bench")
    ap.add_argument("--ctas-models", default="llama2-7b,llama2-70b", help="models of --ctas-bench")
    ap.add_argument("--ctas-variants", default="", help="variants of --ctas-bench (default: all)")
    ap.add_argument("--outlier-bench", action="store_true", help="128 against 256 outlier channels (7B, g32)")
    ap.add_argument("--decode-early-bench", action="store_true",
                    help="decode GEMMs with more loads before the wait for the kernel ahead (M = 1, 16)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, B.MS)))
    args = ap.parse_args()
    print(json.dumps(B.env_info()), flush=True)
    torch.manual_seed(0)
    if args.gluon_only:
        check_gluon()
    elif not args.no_check:
        check_quantize()
        check_gemm()
        check_gemv()
        check_gluon()
    if args.prefill_sweep:
        rows = prefill_sweep(128) + prefill_sweep(None)
        with open(args.out.replace(".json", "_prefill.json"), "w") as f:
            json.dump(rows, f, indent=1)
    if args.row_sweep:
        with open(args.out.replace(".json", "_row_sweep.json"), "w") as f:
            json.dump(prefill_sweep(None), f, indent=1)
    if args.groupfree_sweep:
        with open(args.out.replace(".json", "_groupfree_sweep.json"), "w") as f:
            json.dump(groupfree_sweep(), f, indent=1)
    if args.quant_bench:
        with open(args.out.replace(".json", "_quant.json"), "w") as f:
            json.dump(quant_bench(), f, indent=1)
    if args.gemv_bench:
        if args.no_check:  # checks come before timings
            check_gemv()
        with open(args.out.replace(".json", "_gemv.json"), "w") as f:
            json.dump(gemv_bench(), f, indent=1)
    if args.gemv_groups:
        if args.no_check:  # checks come before timings
            check_gemv()
        with open(args.out.replace(".json", "_gemv_groups.json"), "w") as f:
            json.dump(gemv_groups_bench(), f, indent=1)
    if args.accumulate_bench:
        with open(args.out.replace(".json", "_accumulate.json"), "w") as f:
            json.dump(accumulate_bench(), f, indent=1)
    if args.levels_bench:
        with open(args.out.replace(".json", "_levels.json"), "w") as f:
            ints = lambda v: tuple(int(x) for x in v.split(","))  # noqa: E731
            json.dump(levels_bench(ints(args.levels_ms), ints(args.levels_groups), tuple(args.levels_models.split(","))),
                      f, indent=1)
    if args.ctas_bench:
        with open(args.out.replace(".json", "_ctas.json"), "w") as f:
            json.dump(ctas_bench(tuple(int(v) for v in args.ctas_ms.split(",")), tuple(args.ctas_models.split(",")),
                             set(args.ctas_variants.split(",")) if args.ctas_variants else None),
                      f, indent=1)
    if args.outlier_bench:
        with open(args.out.replace(".json", "_outliers.json"), "w") as f:
            json.dump(outlier_bench(), f, indent=1)
    if args.decode_early_bench:
        with open(args.out.replace(".json", "_decode_early.json"), "w") as f:
            json.dump(decode_early_bench(), f, indent=1)
    if args.row_bench:
        with open(args.out.replace(".json", "_rows.json"), "w") as f:
            json.dump(row_bench(), f, indent=1)
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
