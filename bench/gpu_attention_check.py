"""Full-size GPU check of the paged KV cache kernels against their ref twins, then timings.

Run from the repo root:  PYTHONPATH=src python bench/gpu_attention_check.py [--out DIR] [--quick]
1. store (int4 / fp16 / fp8, both layouts): pages equal ref.kv_store_ref byte for byte;
2. decode and prefill (int4 / fp16 / fp8; Llama-2-7B, Llama-2-70B GQA and a head_dim-64 shape;
   contexts up to 32K): |out - ref| <= 4e-3 + 1e-2 |ref| against the ref that dequantizes the pages;
3. a sweep of decode variants at batch 64 x 4096 (each variant checked first), the layout comparison,
   then atomq.bench.attention.run_attention_bench with the best variant; a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from atomq.bench import attention as B
from atomq.kernels import ref
from atomq.kernels.decode_attention import paged_decode_attention, plan_decode
from atomq.kernels.kv_cache import allocate_kv_cache, kv_store
from atomq.kernels.prefill_attention import paged_prefill_attention, plan_prefill

ATOL, RTOL = 4e-3, 1e-2
FAILS: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def close(out, want) -> tuple[bool, str]:
    err = (out.float() - want.float()).abs()
    bound = ATOL + RTOL * want.float().abs()
    ok = bool(torch.all(err <= bound)) and not bool(torch.isnan(out).any())
    return ok, f"max|err| {err.max().item():.2e} rel-l2 {(err.norm() / want.float().norm()).item():.2e}"


def batch_cache(lens, hkv, d, mode, layout="HND"):
    bs = 16
    mb = max(1, max(-(-n // bs) for n in lens))
    nb = len(lens) * mb + 3
    cache = allocate_kv_cache(nb, hkv, d, mode, "cuda", layout=layout, fp8_k_scale=0.02,
                              fp8_v_scale=torch.linspace(0.01, 0.02, hkv))
    bt = torch.randperm(nb, device="cuda")[: len(lens) * mb].view(len(lens), mb)
    k = (torch.randn(sum(lens), hkv, d, device="cuda") * 1.5 + 0.2).half()
    v = torch.randn(sum(lens), hkv, d, device="cuda").half()
    slots = torch.cat([bt[b, torch.arange(n, device="cuda") // bs] * bs + torch.arange(n, device="cuda") % bs
                       for b, n in enumerate(lens)]).to(torch.int32)
    kv_store(cache, k, v, slots)
    return cache, bt.to(torch.int32), torch.tensor(lens, dtype=torch.int32, device="cuda")


def check_store() -> None:
    for mode in ("int4", "fp16", "fp8"):
        for layout in ("HND", "NHD"):
            t, h, d, nb = 4096, 32, 128, 300
            a = allocate_kv_cache(nb, h, d, mode, "cuda", layout=layout, fp8_k_scale=0.03, fp8_v_scale=0.05)
            b = allocate_kv_cache(nb, h, d, mode, "cuda", layout=layout, fp8_k_scale=0.03, fp8_v_scale=0.05)
            for n in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
                x, y = getattr(a, n), getattr(b, n)
                if x is not None and x.dtype != torch.float32:
                    r = torch.randint(0, 120, x.view(torch.uint8).shape, dtype=torch.uint8, device="cuda")
                    x.view(torch.uint8).copy_(r)
                    y.view(torch.uint8).copy_(r)
            k = (torch.randn(t, h, d, device="cuda") * 3).half()
            v = torch.randn(t, h, d, device="cuda").half()
            slots = torch.randperm(nb * 16, device="cuda")[:t].to(torch.int32)
            slots[::7] = -1
            kv_store(a, k, v, slots)
            ref.kv_store_ref(b, k, v, slots)
            torch.cuda.synchronize()
            ok = all(torch.equal(getattr(a, n).view(torch.uint8), getattr(b, n).view(torch.uint8))
                     for n in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero") if getattr(a, n) is not None
                     and getattr(a, n).dtype != torch.float32)
            report(f"store {mode} {layout} T={t} H={h} D={d}", ok, "(bytes equal)")


def check_decode(variants: list[dict]) -> None:
    lens = [1, 513, 4096, 32768 - 5, 2000, 16, 0]
    for mode in ("int4", "fp16", "fp8"):
        for hq, hkv, d in ((32, 32, 128), (64, 8, 128), (16, 4, 64)):
            cache, bt, sl = batch_cache(lens, hkv, d, mode)
            q = torch.randn(len(lens), hq, d, device="cuda").half()
            want = ref.paged_decode_attention_ref(q, cache, bt, sl, d**-0.5)
            mha = [{"dot": 4}, {"dot": 4, "prefetch": False, "block_n": 32}] if hq == hkv else []
            for kw in variants + mha if mode == "int4" else [{}]:
                out = torch.full_like(q, float("nan"))
                paged_decode_attention(q, cache, bt, sl, d**-0.5, out=out,
                                       plan=plan_decode(len(lens), hq, hkv, d, 32768, "cuda", kv_mode=mode, **kw))
                report(f"decode {mode} hq={hq} hkv={hkv} d={d} {kw}", *close(out, want))
            del cache


def check_prefill() -> None:
    for mode in ("int4", "fp16", "fp8"):
        for hq, hkv, d in ((32, 8, 128), (8, 8, 64)):
            cached, new = [0, 1000, 4093, 0], [2048, 333, 7, 1]
            cache, bt, _ = batch_cache([c + n for c, n in zip(cached, new)], hkv, d, mode)
            q = torch.randn(sum(new), hq, d, device="cuda").half()
            cu = torch.tensor([0] + new, device="cuda").cumsum(0).to(torch.int32)
            cl = torch.tensor(cached, dtype=torch.int32, device="cuda")
            want = ref.paged_prefill_attention_ref(q, cache, cu, cl, bt, d**-0.5)
            for deq in (1, 2) if mode == "int4" else (1,):
                out = paged_prefill_attention(q, cache, cu, cl, bt, d**-0.5, plan=plan_prefill(max(new), d, deq=deq))
                report(f"prefill {mode} hq={hq} hkv={hkv} d={d} deq={deq}", *close(out, want))
            del cache


def sweep(shape: str, mode: str, variants: list[dict], batch=64, ctx=4096, rep_ms=40) -> list[dict]:
    hq, hkv, d = B.SHAPES[shape]
    rows = []
    cache, bt, sl = batch_cache([700, 1500], hkv, d, mode)  # a small correctness probe per variant
    q = torch.randn(2, hq, d, device="cuda").half()
    want = ref.paged_decode_attention_ref(q, cache, bt, sl, d**-0.5)
    for kw in variants:
        t0 = time.time()
        layout = kw.pop("layout", "HND")
        try:
            out = paged_decode_attention(q, cache, bt, sl, d**-0.5, plan=plan_decode(2, hq, hkv, d, 1500, "cuda", **kw))
            ok, _ = close(out, want)
            ms = B.bench_paged_decode(mode, batch, ctx, hq, hkv, d, rep_ms, layout, **kw) if ok else float("nan")
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            ok, ms = False, float("nan")
            print(f"  variant {kw} failed: {type(e).__name__}: {str(e)[:200]}")
        gb = B.kv_bytes(mode, batch, ctx, hkv, d) / 1e9
        if layout != "HND":
            kw["layout"] = layout
        rows.append({"shape": shape, "mode": mode, **kw, "ok": ok, "ms": ms, "gbps": gb / (ms * 1e-3)})
        print(f"  sweep {shape} {mode} {kw} ok={ok} {ms:.4f} ms {gb / (ms * 1e-3):.0f} GB/s "
              f"({time.time() - t0:.1f}s)", flush=True)
    return rows


def grid(**axes) -> list[dict]:
    out = [{}]
    for k, vals in axes.items():
        out = [{**o, k: v} for o in out for v in vals]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="checks and a small sweep only")
    ap.add_argument("--defaults", action="store_true", help="no sweep: time the default plans (what the engine runs)")
    ap.add_argument("--shapes", default=",".join(B.SHAPES), help="comma-separated, from " + ",".join(B.SHAPES))
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--contexts", default="512,2048,4096,8192")
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    print(json.dumps(B.device_info()), flush=True)
    torch.manual_seed(0)
    dec_variants = [{}, {"num_splits": 1}] + grid(dot=[1, 2, 3], deq=[1, 2], block_n=[64])
    for fn, a in ((check_store, ()), (check_decode, (dec_variants,)), (check_prefill, ())):
        try:
            fn(*a)
        except Exception as e:  # keep going: the timings are still wanted
            report(f"{fn.__name__} crashed: {type(e).__name__}: {str(e)[:300]}", False)
    best = {}
    all_sweeps = []
    for shape in shapes if not args.defaults else ():
        # earlier sweeps (dot 0-3, deq 0-2, block_n 32-128, warps 4/8, stages 1-3; docs/KERNELS.md): with GQA
        # tensor-core dots, deq 1, block_n 64 won. Without GQA: the tensor-core variant that won then
        # (dot 2) against the CUDA-core words kernel (dot 4; acc_rows = block_n: no row folding)
        if B.SHAPES[shape][0] == B.SHAPES[shape][1]:  # one q head per kv head
            v4 = [dict(dot=2, deq=1, block_n=64, num_stages=3), dict(dot=4, block_n=128, acc_rows=128)] + [
                dict(dot=4, block_n=bn, num_warps=w, prefetch=pf)
                for bn, w, pf in ((64, 4, True), (128, 4, True), (128, 4, False), (128, 8, True), (256, 8, True),
                                  (256, 4, True))]
            vf = grid(dot=[1], block_n=[64, 128], num_stages=[2, 3])
        else:
            v4 = grid(dot=[2, 3], deq=[1, 2], block_n=[64], num_stages=[2, 3])
            vf = grid(dot=[1], block_n=[32, 64], num_stages=[2, 3])
        if args.quick:
            v4, vf = v4[:4], vf[:2]
        for mode, variants in (("int4", v4), ("fp16", vf)):
            rows = sweep(shape, mode, [dict(v) for v in variants])
            all_sweeps += rows
            good = [r for r in rows if r["ok"]]
            if good:
                r = min(good, key=lambda r: r["ms"])
                best[(shape, mode)] = {k: r[k] for k in ("dot", "deq", "block_n", "num_stages", "num_warps",
                                                         "prefetch", "acc_rows") if k in r}
        b4 = best.get((shape, "int4"), {})
        all_sweeps += sweep(shape, "int4", [{**b4, "layout": "NHD"}])
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(all_sweeps, f, indent=1)
    print("best:", best, flush=True)
    rows = []
    for shape in shapes:
        try:
            rows += B.run_attention_bench(
                None, batches=ints(args.batches) if not args.quick else (64,),
                contexts=ints(args.contexts) if not args.quick else (4096,), shapes=(shape,),
                int4_plan=best.get((shape, "int4")), fp16_plan=best.get((shape, "fp16")), progress=False,
                store_tokens=(64, 256, 16384) if shape == "llama2-7b" else ())
        except Exception as e:  # report and keep the other shape's numbers
            report(f"bench {shape} crashed: {type(e).__name__}: {str(e)[:300]}", False)
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
        json.dump({"device": B.device_info(), "best": {f"{k[0]}/{k[1]}": v for k, v in best.items()},
                   "rows": rows}, f, indent=1)
    print("FAILED CHECKS:", FAILS if FAILS else "none")
    print(B.format_table(rows))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
