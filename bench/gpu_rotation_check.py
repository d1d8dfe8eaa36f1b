"""GPU check + benchmark of the online rotation kernels (kernels/hadamard.py; run with PYTHONPATH=src).

1. correctness at full size: rotate_online and silu_mul_rotate (both kernels) against their ref.py twins,
   fresh random inputs per check, fp16 / bf16 (and one fp32 case);
2. ``--sweep``: launch variants of the tensor-core mix (output blocks per program, warps) against the loop
   kernel, per size and row count;
3. the rotated down_proj input before (SiLU * up kernel, then the loop rotation) and now (one
   silu_mul_rotate), against a copy of the rotation's bytes (x.clone()). JSON to --out; table printed last.
"""

from __future__ import annotations

import argparse
import json

import torch

from atomq.bench.gemm import _time_ms, env_info
from atomq.kernels import elementwise as E
from atomq.kernels import hadamard as Hd
from atomq.kernels import ref

NS = (576, 1536, 4096, 11008, 13824, 14336, 18944, 28672)  # SmolLM2, Llama-2-7B / 13B, Mixtral, Qwen2-7B, 70B
MS = (1, 16, 64, 256, 4096, 16384)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # as tests/kernels/test_hadamard.py
FAILS: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    tol = TOL[want.dtype]
    err = (got.float() - want.float()).abs()
    bound = tol + tol * want.float().abs()
    rel = (err.norm() / want.float().norm()).item()
    ok = got.dtype == want.dtype and got.shape == want.shape and bool(torch.isfinite(got).all()) and bool(
        (err <= bound).all())
    report(name, ok, f"max |err| {err.max().item():.2e}, rel L2 {rel:.1e}")


def check() -> None:
    for n in NS:
        m, p = ref.hadamard_split(n)
        signs, small = (t.cuda() for t in ref.random_rotation_factors(n, n))
        for rows in (1, 64, 4096):
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(rows, n, device="cuda").to(dtype)
                gu = (torch.randn(rows, 2 * n, device="cuda") * 2).to(dtype)
                want, want_g = ref.rotate_online(x, signs, small), ref.silu_mul_rotate(gu, signs, small)
                for kernel in ("dot", "loop") if Hd.dot_fits(m, p) else ("loop",):
                    tag = f"n={n} ({m}x{p}) M={rows} {str(dtype)[6:]} {kernel}"
                    _compare(f"rotate {tag}", Hd.rotate_online(x, signs, small, kernel=kernel), want)
                    _compare(f"silu_mul_rotate {tag}", Hd.silu_mul_rotate(gu, signs, small, kernel=kernel, fuse=True),
                             want_g)
    n = 11008
    signs, small = (t.cuda() for t in ref.random_rotation_factors(n, 1))
    x = torch.randn(33, n, device="cuda")
    _compare("rotate n=11008 M=33 float32 dot (IEEE)", Hd.rotate_online(x, signs, small), ref.rotate_online(x, signs, small))


def _variants(m: int, p: int) -> dict[str, dict]:
    out = {"loop": dict(kernel="loop")}
    if Hd.dot_fits(m, p):
        m_pad = max(16, 1 << (m - 1).bit_length())
        for bi in (16, 32, 64):
            if bi <= m_pad and bi * p <= Hd.DOT_MAX_ELEMENTS:
                for w in (4, 8):
                    out[f"dot bi{bi} w{w}"] = dict(kernel="dot", block_i=bi, num_warps=w)
    return out


def sweep() -> list[dict]:
    rows, lines = [], []
    for n in (576, 1536, 11008, 13824, 18944):
        m, p = ref.hadamard_split(n)
        signs, small = (t.cuda() for t in ref.random_rotation_factors(n, 0))
        for rows_m in (1, 64, 256, 4096, 16384):
            x = torch.randn(rows_m, n, device="cuda", dtype=torch.bfloat16)
            line = f"n={n:6d} M={rows_m:5d} |"
            for name, kw in _variants(m, p).items():
                t = _time_ms(lambda: Hd.rotate_online(x, signs, small, **kw), rep=30)
                rows.append({"n": n, "M": rows_m, "variant": name, "ms": t})
                line += f" {name} {t * 1e3:.1f}"
            print(line, flush=True)
            lines.append(line)
    print("\nsweep (us, bf16):")
    for line in lines:
        print(line)
    return rows


def bench() -> list[dict]:
    rows, lines = [], []
    for n in NS:
        m, p = ref.hadamard_split(n)
        signs, small = (t.cuda() for t in ref.random_rotation_factors(n, 0))
        for rows_m in MS:
            x = torch.randn(rows_m, n, device="cuda", dtype=torch.bfloat16)
            gu = torch.randn(rows_m, 2 * n, device="cuda", dtype=torch.bfloat16)
            r = {"n": n, "split": [m, p], "M": rows_m, "kernel": "dot" if Hd.uses_dot(m, p) else "loop"}
            r["copy_ms"] = _time_ms(lambda: x.clone(), rep=30)
            r["rotate_loop_ms"] = _time_ms(lambda: Hd.rotate_online(x, signs, small, kernel="loop"), rep=30)
            r["rotate_ms"] = _time_ms(lambda: Hd.rotate_online(x, signs, small), rep=30)
            r["before_ms"] = _time_ms(lambda: Hd.rotate_online(E.silu_mul(gu), signs, small, kernel="loop"), rep=30)
            r["fused_ms"] = _time_ms(lambda: Hd.silu_mul_rotate(gu, signs, small, fuse=True), rep=30)
            r["default_ms"] = _time_ms(lambda: Hd.silu_mul_rotate(gu, signs, small), rep=30)
            rows.append(r)
            us = {k[:-3]: v * 1e3 for k, v in r.items() if k.endswith("_ms")}
            line = (f"| {n} ({m} x {p}) | {rows_m} | {r['kernel']} | {us['copy']:.1f} | {us['rotate_loop']:.1f} | "
                    f"{us['rotate']:.1f} | {us['rotate_loop'] / us['rotate']:.2f}x | {us['before']:.1f} | "
                    f"{us['fused']:.1f} | {us['default']:.1f} | {us['before'] / us['default']:.2f}x |")
            print(line, flush=True)
            lines.append(line)
    print("\n| n (m x p) | M | kernel | copy | rotate, loop kernel (before) | rotate, default | speedup | "
          "SiLU*up + loop rotate (before) | silu_mul_rotate, fused | silu_mul_rotate, default | speedup |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for line in lines:
        print(line)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="rotation_bench.json")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    print(env_info(), flush=True)
    result = {"env": env_info()}
    if not args.no_check:
        check()
        print(f"checks: {len(FAILS)} failures {FAILS}", flush=True)
    if args.sweep:
        result["sweep"] = sweep()
    if not args.no_bench:
        result["bench"] = bench()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if FAILS:
        raise SystemExit(f"{len(FAILS)} checks failed: {FAILS}")


if __name__ == "__main__":
    main()
