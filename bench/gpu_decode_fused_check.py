"""GPU check + A/B of a decode step's attention for one layer (run with PYTHONPATH=src; torch + triton only):
RoPE + KV store + INT4 decode attention as three kernels against the one fused kernel
(kernels/decode_fused.py), Llama-2-7B head shapes (32 heads x 128, no GQA).

Each case is checked first (fused output and cache = the separate kernels'), then timed as a CUDA graph of
``--reps`` back-to-back layer steps (programmatic dependent launch as in the engine): median replay / reps.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from atomq.kernels import decode_attention as dec
from atomq.kernels import decode_fused as fused
from atomq.kernels import elementwise as ew
from atomq.kernels import kv_cache as kvc
from atomq.model.args import rope_cos_sin


def make_step(batch: int, ctx: int, h: int = 32, d: int = 128):
    """A cache with ctx - 1 older tokens per sequence, the new tokens' q/k/v (one merged row each) and
    the step metadata."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    per = -(-ctx // 16)
    num_blocks = batch * per + 4
    cache = kvc.allocate_kv_cache(num_blocks, h, d, "int4", "cuda")
    bt = torch.randperm(num_blocks, device="cuda", generator=gen)[: batch * per].view(batch, per).int()
    pos = torch.arange(ctx, device="cuda")
    slots = (bt[:, pos // 16] * 16 + pos % 16).int()  # [B, ctx]
    kv = torch.randn(2, batch * ctx, h, d, device="cuda", generator=gen, dtype=torch.float16)
    kvc.kv_store(cache, kv[0], kv[1], slots.reshape(-1))
    qkv = torch.randn(batch, 3 * h * d, device="cuda", generator=gen, dtype=torch.float16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    cos, sin = rope_cos_sin(inv_freq, 1.0, torch.full((batch,), ctx - 1, device="cuda"))
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return cache, bt, slots[:, -1].contiguous(), qkv, cos, sin, seq


def separate(cache, bt, slot, qkv, cos, sin, seq, plan, h=32, d=128):
    b = qkv.shape[0]
    q, k, v = (t.view(b, h, d) for t in qkv.split(h * d, dim=1))
    ew.rope_(qkv[:, : 2 * h * d].view(b, 2 * h, d), cos, sin)
    kvc.kv_store(cache, k, v, slot)
    return dec.paged_decode_attention(q, cache, bt, seq, d**-0.5, plan=plan)


def one_kernel(cache, bt, slot, qkv, cos, sin, seq, plan, h=32, d=128):
    b = qkv.shape[0]
    q, k, v = (t.view(b, h, d) for t in qkv.split(h * d, dim=1))
    return fused.rope_store_decode_attention(q, k, v, cos, sin, cache, slot, bt, seq, d**-0.5, plan=plan)


def clone(cache):
    return type(cache)(cache.mode, *(t.clone() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale,
                                                         cache.k_zero, cache.v_zero)), block_size=cache.block_size)


def graph_us(fn, reps: int, trials: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(trials):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--contexts", default="160,1024")
    ap.add_argument("--reps", type=int, default=32)
    ns = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows, fails = [], 0
    for batch in map(int, ns.batches.split(",")):
        for ctx in map(int, ns.contexts.split(",")):
            cache, bt, slot, qkv, cos, sin, seq = make_step(batch, ctx)
            plan = dec.plan_decode(batch, 32, 32, 128, ctx, "cuda", kv_mode="int4")
            c1, c2 = clone(cache), clone(cache)
            want = separate(c1, bt, slot, qkv.clone(), cos, sin, seq, plan)
            got = one_kernel(c2, bt, slot, qkv, cos, sin, seq, plan)
            same_cache = all(torch.equal(getattr(c1, n).view(torch.uint8), getattr(c2, n).view(torch.uint8))
                             for n in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"))
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            ok = same_cache and err < 2e-3
            fails += not ok
            print(f"[{'ok' if ok else 'FAIL'}] batch {batch} ctx {ctx}: cache equal {same_cache}, out rel {err:.1e}",
                  flush=True)
            row = {"batch": batch, "ctx": ctx, "splits": plan.num_splits,
                   "separate": graph_us(lambda: separate(cache, bt, slot, qkv, cos, sin, seq, plan), ns.reps)}
            for pre in (True, False):
                fused.PRELOAD = pre
                row[f"fused{'' if pre else ', no preload'}"] = graph_us(
                    lambda: one_kernel(cache, bt, slot, qkv, cos, sin, seq, plan), ns.reps)
            fused.PRELOAD = True
            rows.append(row)
            print(row, flush=True)
    keys = [k for k in rows[0] if k not in ("batch", "ctx", "splits")]
    print("\nus per layer step (CUDA graph of back-to-back steps, median)")
    print("| batch | ctx | splits | " + " | ".join(keys) + " |")
    print("|---:|---:|---:|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['batch']} | {r['ctx']} | {r['splits']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print(f"failures: {fails}")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
