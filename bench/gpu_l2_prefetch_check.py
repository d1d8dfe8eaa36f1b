"""GPU check + benchmark of the L2 weight prefetch (kernels/l2_prefetch.py; run with PYTHONPATH=src).

Each Llama-2-7B linear at M = 1 (the decode GEMM the engine picks), in a CUDA graph of
    [prefetch the leading share f of the weight's bytes] -> [one program spinning S us, standing in for
    the small kernels between two GEMMs] -> [the GEMM]
over enough weight copies that every GEMM starts cold. GEMM time = that graph minus the same graph
without the GEMM, per repetition, median of replays. "hot" = the GEMM alone on one copy, L2-resident
where it fits. Checks first: the outputs with and without the prefetch are bit-identical.
A short table is printed last; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import triton
import triton.language as tl

from atomq.bench import gemm as B
from atomq.kernels import quantize as Q
from atomq.kernels.l2_prefetch import l2_prefetch
from atomq.model.methods import AtomKernel

SHAPES = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008))
FAILS: list[str] = []


@triton.jit
def _spin_kernel(ns):
    t0 = tl.extra.cuda.globaltimer()
    t = t0
    while t - t0 < ns:
        t = tl.extra.cuda.globaltimer()


def _graph_us(fn, reps: int, replays: int = 25) -> float:
    """Median us per repetition of ``fn`` (which runs ``reps`` repetitions) captured as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


def bench_shape(name: str, n: int, k: int, shares: list[float], spins_us: list[float]) -> list[dict]:
    x, _, pw, split = B.make_problem(n, k, 1, gs=128)
    kernels = [AtomKernel(pw, split, 0.9, None, None, torch.float16)]
    nbytes = sum(t.numel() * t.element_size() for t, _ in kernels[0].weight_ranges(1 << 40))
    copies = max(2, -(-160 * 2**20 // nbytes))  # > 3x the 50 MB L2 between two uses of one copy
    for _ in range(copies - 1):
        kernels.append(AtomKernel(pw, split, 0.9, None, None, torch.float16))
    a = Q.quantize_act(x, None, split, out="int8")
    y0 = kernels[0].matmul(a)
    l2_prefetch(kernels[0].weight_ranges(nbytes))
    y1 = kernels[0].matmul(a)
    torch.cuda.synchronize()
    ok = torch.equal(y0, y1)
    print(f"[{'ok' if ok else 'FAIL'}] {name}: GEMM output with and without the prefetch identical", flush=True)
    if not ok:
        FAILS.append(name)
    rows = []
    hot = _graph_us(lambda: [kernels[0].matmul(a) for _ in range(20)], 20)
    for spin in spins_us:
        for share in shares:
            def run(gemm: bool):
                def fn():
                    for kern in kernels:
                        if share:
                            l2_prefetch(kern.weight_ranges(int(share * nbytes)))
                        _spin_kernel[(1,)](int(spin * 1e3))
                        if gemm:
                            kern.matmul(a)
                return fn
            with_gemm = _graph_us(run(True), copies)
            without = _graph_us(run(False), copies)
            row = dict(shape=name, n=n, k=k, mbytes=nbytes / 1e6, share=share, spin_us=spin,
                       gemm_us=with_gemm - without, step_us=with_gemm, hot_us=hot)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="l2_prefetch.json")
    ap.add_argument("--shares", default="0,0.25,0.5,1")
    ap.add_argument("--spins", default="2,10")
    ns = ap.parse_args()
    print(B.env_info(), flush=True)
    shares = [float(s) for s in ns.shares.split(",")]
    spins = [float(s) for s in ns.spins.split(",")]
    rows = []
    for name, n, k in SHAPES:
        rows += bench_shape(name, n, k, shares, spins)
    with open(ns.out, "w") as f:
        json.dump({"env": B.env_info(), "rows": rows, "fails": FAILS}, f, indent=1)
    print("\nLlama-2-7B linears at M = 1; us per GEMM (graph with it minus graph without); cold = share 0")
    print("| linear | MB | spin us | hot | " + " | ".join(f"share {s:g}" for s in shares) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(shares))
    for name, _, _ in SHAPES:
        for spin in spins:
            sel = [r for r in rows if r["shape"] == name and r["spin_us"] == spin]
            print(f"| {name} | {sel[0]['mbytes']:.1f} | {spin:g} | {sel[0]['hot_us']:.1f} | "
                  + " | ".join(f"{r['gemm_us']:.1f}" for r in sel) + " |")
    print(f"failures: {FAILS or 'none'}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
