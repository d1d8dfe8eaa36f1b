"""GEMM and quantize kernel benchmark on Llama-2 linear shapes (GPU).

``run_gemm_bench`` times, in one process, for each (model, layer, M): our W4A4 GEMM (activation
operand from the quantize kernel, weights prepared once), cuBLAS FP16 (torch.matmul), FP8
torch._scaled_mm with per-token / per-channel scales, INT8 torch._int_mm and W4A16
torch._weight_int4pack_mm; then the fused RMSNorm+quantize and SiLU*up+quantize kernels' bandwidth
against a measured device-to-device copy. Times are medians of CUDA-graph replays
(triton.testing.do_bench_cudagraph). Weights are rotated among enough copies to exceed the L2 cache,
so decode shapes read from HBM as they would in a model.
"""

from __future__ import annotations

import datetime
import json
import platform

import torch

# (model, layer, N, K): qkv and gate_up are fused; Llama-2-70B uses 8 KV heads of 128.
LLAMA2_SHAPES: list[tuple[str, str, int, int]] = [
    ("llama2-7b", "qkv", 12288, 4096),
    ("llama2-7b", "o", 4096, 4096),
    ("llama2-7b", "gate_up", 22016, 4096),
    ("llama2-7b", "down", 4096, 11008),
    ("llama2-70b", "qkv", 10240, 8192),
    ("llama2-70b", "o", 8192, 8192),
    ("llama2-70b", "gate_up", 57344, 8192),
    ("llama2-70b", "down", 8192, 28672),
]
MS: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096, 16384)
L2_BYTES = 50 * 2**20
N_OUTLIERS, GROUP_SIZE = 128, 128


def _time_ms(fn, n_inner: int = 1, rep: int = 50) -> float:
    """Median milliseconds of one call of fn (fn runs n_inner ops; CUDA-graph replays)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") / n_inner


def _copies(nbytes: int) -> int:
    """How many weight copies to rotate so that they exceed the L2 cache twice over."""
    return max(1, min(16, -(-2 * L2_BYTES // max(nbytes, 1))))


def env_info() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def make_problem(n: int, k: int, m: int, device: str = "cuda", n_out: int = N_OUTLIERS, gs: int = GROUP_SIZE):
    """Random activations x fp16 [M, K] and an RTN-quantized PackedWeight [N, K] with its Split."""
    from ..quant import plan_split, quantize_weight_rtn

    split = plan_split(k, n_out, gs)
    w = torch.randn(n, k, device=device, dtype=torch.float16)
    pw = quantize_weight_rtn(w, split, 4, 0.85)
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    return x, w, pw, split


def bench_gemm_shape(n: int, k: int, m: int, configs: dict | None = None, baselines: bool = True,
                     which: tuple[str, ...] = ("fp8", "int8", "w4a16"), gs: int | None = GROUP_SIZE,
                     n_out: int = N_OUTLIERS) -> dict:
    """Time every GEMM variant on one shape. configs: name -> (GemmConfig or None, operand 'int8'|'fp8'
    [, prepare_weight's row_tile]). baselines: also cuBLAS FP16 and the ``which`` others."""
    from ..kernels.quantize import quantize_act
    from ..kernels.w4a4_gemm import prepare_weight, w4a4_gemm

    dev = "cuda"
    x, w, pw, split = make_problem(n, k, m, gs=gs, n_out=n_out)
    row: dict = {"M": m, "N": n, "K": k, "flop": 2.0 * m * n * k}
    configs = configs or {"ours": (None, "int8")}
    pws_by_rt: dict = {}
    for name, (cfg, op, *rt) in configs.items():
        rt = rt[0] if rt else 16
        if rt not in pws_by_rt:
            pws_by_rt.clear()
            first = prepare_weight(pw, row_tile=rt)
            pws_by_rt[rt] = [first] + [prepare_weight(pw, row_tile=rt) for _ in range(_copies(first.w4.numel()) - 1)]
        pws = pws_by_rt[rt]
        a = quantize_act(x, None, split, out=op)
        try:
            row[name + "_ms"] = _time_ms(lambda: [w4a4_gemm(a, p, config=cfg) for p in pws], len(pws))
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if not baselines:
        return row
    pws_by_rt.clear()
    ws = [w] + [w.clone() for _ in range(_copies(w.numel() * 2) - 1)]
    row["fp16_ms"] = _time_ms(lambda: [torch.matmul(x, wi.t()) for wi in ws], len(ws))
    del ws
    xb = x.to(torch.bfloat16)

    def fp8() -> float:  # per-token x per-channel scales
        w8 = w.to(torch.float8_e4m3fn)
        w8s = [w8] + [w8.clone() for _ in range(_copies(w8.numel()) - 1)]
        x8 = x.to(torch.float8_e4m3fn)
        sa = torch.rand(m, 1, device=dev) + 0.5
        sb = torch.rand(1, n, device=dev) + 0.5
        return _time_ms(lambda: [torch._scaled_mm(x8, wi.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
                                 for wi in w8s], len(w8s))

    def int8() -> float:  # torch._int_mm needs M > 16; smaller M is padded to 32 (noted)
        mp = m if m > 16 else 32
        xi = torch.randint(-127, 127, (mp, k), device=dev, dtype=torch.int8)
        wi8 = torch.randint(-127, 127, (n, k), device=dev, dtype=torch.int8)
        wi8s = [wi8] + [wi8.clone() for _ in range(_copies(wi8.numel()) - 1)]
        row["int8_padded_m"] = mp
        return _time_ms(lambda: [torch._int_mm(xi, wj.t()) for wj in wi8s], len(wi8s))

    def w4a16() -> float:  # groups of 128, bf16 activations
        wq = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
        packed = torch._convert_weight_to_int4pack(wq, 8)
        sz = torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
        ps = [packed] + [packed.clone() for _ in range(_copies(wq.numel()) - 1)]
        return _time_ms(lambda: [torch._weight_int4pack_mm(xb, p, 128, sz) for p in ps], len(ps))

    for name, fn in (("fp8", fp8), ("int8", int8), ("w4a16", w4a16)):
        if name in which:
            try:  # a baseline this torch / GPU cannot run is reported, not fatal
                row[name + "_ms"] = fn()
            except Exception as e:
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    for key in [c for c in row if c.endswith("_ms")]:
        row[key.replace("_ms", "_tflops")] = row["flop"] / row[key] / 1e9
        if key != "fp16_ms" and "fp16_ms" in row:
            row[key.replace("_ms", "_vs_fp16")] = row["fp16_ms"] / row[key]
    return row


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def bench_quantize(m: int, k: int, kind: str, out: str = "int8", config=None, weight_gathered: bool = True) -> dict:
    """GB/s of one fused quantize kernel (kind 'rmsnorm' with residual, 'rmsnorm-noidx' the same without
    the reorder, 'silu', 'gather'; weight_gathered: the norm weight in output order, as served); bytes counted
    once: inputs read, residual written, quantized values and scales written."""
    from ..kernels import quantize as Q
    from ..quant import plan_split

    split = plan_split(k, N_OUTLIERS, GROUP_SIZE)
    g = torch.Generator(device="cuda").manual_seed(0)
    qbytes = m * split.k_normal // (2 if out == "packed" else 1) + m * (split.n_outliers + 2 * split.n_groups + 2)
    if kind in ("rmsnorm", "rmsnorm-noidx"):  # the second without the reorder gather (an upper bound)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        r = torch.randn_like(x)
        wn = torch.rand(k, device="cuda", dtype=torch.float16, generator=g) + 0.5
        idx = torch.randperm(k, device="cuda", generator=g).to(torch.int32) if kind == "rmsnorm" else None
        gathered = weight_gathered and idx is not None
        wn = wn[idx.long()] if gathered else wn
        fn = lambda: Q.rmsnorm_quantize(x, r, wn, 1e-5, idx, split, out=out, config=config,  # noqa: E731
                                        weight_gathered=gathered)
        nbytes = 3 * x.numel() * 2 + qbytes
    elif kind == "silu":
        x = torch.randn(m, 2 * k, device="cuda", dtype=torch.float16, generator=g)
        fn = lambda: Q.silu_mul_quantize(x, split, out=out, config=config)  # noqa: E731
        nbytes = x.numel() * 2 + qbytes
    else:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=g)
        idx = torch.randperm(k, device="cuda", generator=g).to(torch.int32)
        fn = lambda: Q.quantize_act(x, idx, split, out=out, config=config)  # noqa: E731
        nbytes = x.numel() * 2 + qbytes
    ms = _time_ms(fn)
    return {"kind": kind, "M": m, "K": k, "out": out, "ms": ms, "bytes": nbytes, "gbps": nbytes / ms / 1e6}


def run_gemm_bench(out_json: str | None, shapes=LLAMA2_SHAPES, ms=MS, quant_ms=(1, 16, 256, 4096, 16384),
                   progress: bool = True) -> list[dict]:
    """Run the whole benchmark; write {"env", "gemm", "quantize", "copy_gbps"} to out_json if given.

    Returns the GEMM rows (one dict per model, layer, M) followed by the quantize rows.
    """
    rows: list[dict] = []
    for model, layer, n, k in shapes:
        for m in ms:
            row = {"model": model, "layer": layer, **bench_gemm_shape(n, k, m)}
            rows.append(row)
            if progress:
                print(f"{model:10s} {layer:7s} M={m:5d} ours {row.get('ours_ms', float('nan')) * 1e3:9.1f} us "
                      f"fp16 x{row.get('ours_vs_fp16', float('nan')):.2f} fp8 {row.get('fp8_ms', float('nan')) * 1e3:8.1f} us",
                      flush=True)
            torch.cuda.empty_cache()
            if out_json:  # keep what is measured so far
                with open(out_json, "w") as f:
                    json.dump({"env": env_info(), "gemm": rows}, f, indent=1)
    cp = copy_gbps()
    qrows = []
    for kind, k in (("rmsnorm", 4096), ("rmsnorm", 8192), ("gather", 4096), ("silu", 11008), ("silu", 28672)):
        for m in quant_ms:
            r = bench_quantize(m, k, kind)
            r["vs_copy"] = r["gbps"] / cp
            qrows.append(r)
    if out_json:
        with open(out_json, "w") as f:
            json.dump({"env": env_info(), "copy_gbps": cp, "gemm": rows, "quantize": qrows}, f, indent=1)
    return rows + qrows
