"""Decode attention benchmark: INT4 paged vs FP16 paged (ours) vs torch SDPA on contiguous FP16 KV.

All times are medians of ``triton.testing.do_bench`` on random data, measured in one process, so
ratios (FP16-paged time / other time) compare like with like. Achieved GB/s counts the bytes a
kernel must read or write once: K and V of every attended token (INT4: packed data + fp16 scale +
uint8 zero per token and head), q and the output. Also times the KV store kernel (quantize + write
one token per sequence, and a prefill-sized batch of tokens).
"""

from __future__ import annotations

import json
import math
import platform

import torch

SHAPES = {  # name: (q heads, kv heads, head_dim)
    "llama2-7b": (32, 32, 128),
    "llama2-70b-gqa": (64, 8, 128),
}


def device_info() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def random_cache(mode: str, num_blocks: int, hkv: int, d: int, layout: str = "HND"):
    """A cache filled with random but valid contents (no zeros: they can hide wrong indexing)."""
    from ..kernels.kv_cache import allocate_kv_cache

    c = allocate_kv_cache(num_blocks, hkv, d, mode, "cuda", layout=layout, fp8_k_scale=0.02, fp8_v_scale=0.02)
    if mode == "int4":
        for t in (c.k, c.v):
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device="cuda"))
        for t in (c.k_zero, c.v_zero):
            t.copy_(torch.randint(0, 16, t.shape, dtype=torch.uint8, device="cuda"))
        for t in (c.k_scale, c.v_scale):
            t.copy_(torch.rand(t.shape, device="cuda").mul_(0.05).add_(0.01).half())
    else:
        for t in (c.k, c.v):
            for i in range(0, t.shape[0], 4096):  # in chunks: no pool-sized temporaries
                x = t[i : i + 4096]
                x.copy_(torch.randn(x.shape, device="cuda", dtype=torch.float16) * (20.0 if mode == "fp8" else 1.0))
    return c


def kv_bytes(mode: str, batch: int, ctx: int, hkv: int, d: int) -> int:
    """Bytes of K and V for batch * ctx tokens."""
    per = {"int4": d // 2 + 3, "fp16": 2 * d, "fp8": d}[mode]
    return 2 * batch * ctx * hkv * per


def _time(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))


def bench_paged_decode(mode: str, batch: int, ctx: int, hq: int, hkv: int, d: int, rep_ms: int = 100,
                       layout: str = "HND", **plan_kw) -> float:
    """Median ms of paged_decode_attention over batch sequences of ctx tokens (pages shuffled)."""
    from ..kernels.decode_attention import paged_decode_attention, plan_decode

    bs = 16
    per_seq = -(-ctx // bs)
    cache = random_cache(mode, batch * per_seq, hkv, d, layout)
    bt = torch.randperm(batch * per_seq, device="cuda").to(torch.int32).view(batch, per_seq)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    plan = plan_decode(batch, hq, hkv, d, ctx, "cuda", kv_mode=mode, **plan_kw)
    ms = _time(lambda: paged_decode_attention(q, cache, bt, sl, d**-0.5, out=out, plan=plan), rep_ms)
    del cache
    return ms


def bench_sdpa_decode(batch: int, ctx: int, hq: int, hkv: int, d: int, rep_ms: int = 100) -> float:
    """Median ms of torch SDPA, one query token, contiguous fp16 K/V [B, Hkv, ctx, D]."""
    import torch.nn.functional as F

    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.float16)
    v = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.float16)
    gqa = hq != hkv
    ms = _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), rep_ms)
    del k, v
    return ms


def bench_store(mode: str, tokens: int, hkv: int, d: int, rep_ms: int = 100) -> float:
    """Median ms of kv_store for ``tokens`` new tokens (K and V) into shuffled slots."""
    from ..kernels.kv_cache import kv_store

    nb = -(-tokens // 16) + 1
    cache = random_cache(mode, nb, hkv, d)
    k = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.float16)
    slots = torch.randperm(nb * 16, device="cuda")[:tokens].to(torch.int32)
    return _time(lambda: kv_store(cache, k, v, slots), rep_ms)


def run_attention_bench(
    out_json: str | None, batches=(1, 16, 64, 256), contexts=(512, 2048, 8192), shapes=tuple(SHAPES),
    rep_ms: int = 100, int4_plan: dict | None = None, fp16_plan: dict | None = None, layout: str = "HND",
    store_tokens=(64, 256, 16384), progress: bool = True,
) -> list[dict]:
    """Time INT4 paged, FP16 paged and SDPA decode for every (shape, batch, context); then the store.

    Returns rows of dicts (also written to out_json with device info): shape, batch, context, kernel,
    ms, gbps, speedup_vs_fp16_paged. Configurations that do not fit in free GPU memory are skipped.
    """
    rows: list[dict] = []
    configs = [(s, b, c) for s in shapes for b in batches for c in contexts]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(configs), desc="decode attention")
    for shape, b, c in configs:
        hq, hkv, d = SHAPES[shape]
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        need = 1.2 * kv_bytes("fp16", b, c, hkv, d)
        entry = {}
        if need < free:
            entry["fp16_paged"] = bench_paged_decode("fp16", b, c, hq, hkv, d, rep_ms, layout, **(fp16_plan or {}))
            entry["sdpa_fp16"] = bench_sdpa_decode(b, c, hq, hkv, d, rep_ms)
        entry["int4_paged"] = bench_paged_decode("int4", b, c, hq, hkv, d, rep_ms, layout, **(int4_plan or {}))
        qo_bytes = 2 * 2 * b * hq * d
        for kernel, ms in entry.items():
            mode = "int4" if kernel.startswith("int4") else "fp16"
            gb = (kv_bytes(mode, b, c, hkv, d) + qo_bytes) / 1e9
            ref = entry.get("fp16_paged")
            rows.append({"shape": shape, "batch": b, "context": c, "kernel": kernel, "ms": ms,
                         "gbps": gb / (ms * 1e-3),
                         "speedup_vs_fp16_paged": (ref / ms) if ref else math.nan})
        torch.cuda.empty_cache()
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    for mode in ("int4", "fp16", "fp8"):
        for t in store_tokens:
            hq, hkv, d = SHAPES["llama2-7b"]
            ms = bench_store(mode, t, hkv, d, rep_ms)
            out_b = {"int4": d // 2 + 3, "fp16": 2 * d, "fp8": d}[mode]
            gb = 2 * t * hkv * (2 * d + out_b) / 1e9
            rows.append({"shape": "llama2-7b", "batch": t, "context": 0, "kernel": f"store_{mode}", "ms": ms,
                         "gbps": gb / (ms * 1e-3), "speedup_vs_fp16_paged": math.nan})
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"device": device_info(), "layout": layout, "int4_plan": int4_plan, "fp16_plan": fp16_plan,
                       "rows": rows}, f, indent=1)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (shape, batch, context) with the three decode kernels side by side."""
    by = {}
    for r in rows:
        if r["kernel"].startswith("store"):
            continue
        by.setdefault((r["shape"], r["batch"], r["context"]), {})[r["kernel"]] = r
    lines = ["| shape | batch | ctx | FP16 paged ms | SDPA FP16 ms | INT4 paged ms | INT4 GB/s | INT4 vs FP16 paged "
             "| INT4 vs SDPA |", "|---|---|---|---|---|---|---|---|---|"]
    for (s, b, c), e in by.items():
        f16, sd, i4 = (e.get(k, {}).get("ms", math.nan) for k in ("fp16_paged", "sdpa_fp16", "int4_paged"))
        gbps = e.get("int4_paged", {}).get("gbps", math.nan)
        lines.append(f"| {s} | {b} | {c} | {f16:.3f} | {sd:.3f} | {i4:.3f} | {gbps:.0f} | {f16 / i4:.2f}x "
                     f"| {sd / i4:.2f}x |")
    stores = [r for r in rows if r["kernel"].startswith("store")]
    if stores:
        lines += ["", "| store | tokens | ms | GB/s |", "|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['batch']} | {r['ms']:.4f} | {r['gbps']:.0f} |" for r in stores]
    return "\n".join(lines)
