"""GPU check + benchmark of the serving engine (run with PYTHONPATH=src; needs torch + triton only).

1. correctness on CUDA: every run-time linear method's kernels against the reference numerics (tiny
   random models), the int4pack W4A16 path, CUDA-graph decode against eager decode (same tokens);
2. decode speed at batch 1 with real shapes (random weights) for each method: engine time per token,
   graph replay time, and the floor = bytes read per token / measured copy bandwidth;
3. host overhead per decode step at batch 64: engine step wall time against the graph replay alone.
JSON to --out; a short table is printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

from atomq import LLM, SamplingParams
from atomq.bench.gemm import copy_gbps, env_info
from atomq.kernels import decode_attention as _dec
from atomq.kernels import hadamard as _Hd
from atomq.kernels import quantize as _Q
from atomq.kernels import w4a4_gemm as _W
from atomq.engine import model_runner as _runner
from atomq.model import methods as _methods
from atomq.model.methods import _input_groups, _kernel_for, weight_nbytes
from atomq.model import random_weights as RW
from atomq.model.random_weights import random_model

FAILS: list[str] = []
# name -> (random format, linear method, kv cache dtype)
CONFIGS = {c.name: (c.weights, c.linear_method, c.kv_cache_dtype) for c in RW.CONFIGS.values()}


def report(name: str, ok: bool, detail: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILS.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_kernels() -> None:
    torch.manual_seed(0)
    for shape in ("tiny-llama", "tiny-mixtral"):
        for fmt in ("atom", "int8", "w4a16"):
            lm = random_model(shape, fmt, torch.float16, "cuda", seed=1)
            worst = 0.0
            for lins in _input_groups(lm.model)[:4]:
                x = torch.randn(37, lins[0].spec.in_features, device="cuda", dtype=torch.float16)
                want = torch.cat([lin(x) for lin in lins], dim=-1)  # reference fake-quant numerics
                k = _kernel_for(lins, "auto", torch.float16, "auto")
                worst = max(worst, rel(k.matmul(k.prepare_input(x)), want))
            # w4a16 on CUDA: bf16 scales / offsets in torch's int4pack kernel (fp16 in the reference)
            report(f"{fmt} kernels = reference ({shape})", worst < (1e-2 if fmt == "w4a16" else 2e-3), f"rel {worst:.2e}")
    lm = random_model("tiny-llama", "float", torch.float16, "cuda")
    for lins in _input_groups(lm.model)[:2]:
        x = torch.randn(37, lins[0].spec.in_features, device="cuda", dtype=torch.float16)
        want = torch.cat([lin(x) for lin in lins], dim=-1)
        k = _kernel_for(lins, "fp8", torch.float16, "auto")
        report("fp8 kernel near float", rel(k.matmul(k.prepare_input(x)), want) < 0.08,
               f"rel {rel(k.matmul(k.prepare_input(x)), want):.2e}")


def check_graphs() -> None:
    """CUDA-graph decode against eager decode, and asynchronous scheduling (steps launched one ahead of
    the host) against synchronous steps: same tokens, logits equal up to rounding."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[(7 * i + j) % 500 for j in range(5 + 9 * i)] for i in range(5)]
    for name, (fmt, method, kv) in CONFIGS.items():
        runs = {}
        for eager, overlap in ((True, False), (False, False), (False, True)):
            lm = random_model("tiny-llama", fmt, torch.float16, "cuda", seed=3)
            llm = LLM(lm, linear_method=method, kv_cache_dtype=kv, kv_cache_bytes=1 << 24, enforce_eager=eager,
                      max_num_seqs=8, record_logits=True, async_scheduling=overlap)
            runs[eager, overlap] = llm.generate(prompts, params)
        for label, got in (("CUDA-graph decode = eager", runs[False, False]),
                           ("async CUDA-graph decode = eager", runs[False, True])):
            want = runs[True, False]
            same = all(a.token_ids == b.token_ids for a, b in zip(want, got))
            err = max(rel(torch.stack(b.logits), torch.stack(a.logits)) for a, b in zip(want, got))
            report(f"{name}: {label}", same and err < 1e-2, f"tokens equal {same}, logits rel {err:.1e}")


def check_prompt_logprobs() -> None:
    """prompt_logprobs on CUDA (chunked prefill, asynchronous steps) against the full-sequence forward."""
    lm = random_model("tiny-llama", "float", torch.float16, "cuda", seed=5)
    prompt = [(13 * j) % 500 for j in range(70)]
    llm = LLM(lm, kv_cache_dtype="fp16", kv_cache_bytes=1 << 24, max_num_batched_tokens=32, max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    out = llm.generate([prompt, prompt[:20]], params)[0]
    with torch.no_grad():
        want = torch.log_softmax(lm.model(torch.tensor([prompt], device="cuda"))[0].float(), -1)
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
    ref = want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].cpu()
    err = (got - ref).abs().max().item()
    ok = len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None and err < 0.05
    report("prompt logprobs = full forward", ok, f"max |diff| {err:.1e} over {len(prompt) - 1} tokens")


def _replay_ms(engine, bsz: int, reps: int = 30) -> float:
    graphs = engine.runner.graphs
    graph, _ = graphs.graphs[graphs.bucket(bsz)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernel_profile(eng, prompts, config: str, bsz: int) -> None:
    """GPU time per kernel name over 5 eager decode steps (graphs off: each kernel shows), a short table."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    graphs, eng.runner.graphs = eng.runner.graphs, None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eng.step()
    eng.runner.graphs = graphs
    while eng.has_unfinished():
        eng.step()
    if graphs is not None:  # kernels inside a graph replay (where CUPTI reports them): sum vs wall
        graph, _ = graphs.graphs[graphs.bucket(bsz)]
        with profile(activities=[ProfilerActivity.CUDA]) as gprof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        busy = sum(ev.device_time for ev in gprof.events() if ev.device_type.name == "CUDA") / 5e3
        n = sum(1 for ev in gprof.events() if ev.device_type.name == "CUDA") // 5
        print(f"graph replay, {config} batch {bsz}: {n} kernels, busy {busy:.3f} ms, replay {_replay_ms(eng, bsz):.3f} ms",
              flush=True)
        _kernel_table(gprof, f"kernels per decode graph replay, {config} batch {bsz}")
    _kernel_table(prof, f"kernels per eager decode step, {config} batch {bsz}")


def _kernel_table(prof, title: str, steps: int = 5) -> None:
    """Print GPU ms per step by kernel name. Under programmatic dependent launch a kernel's time includes
    what it spends resident before its wait, so the column sums to more than the step."""
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            totals.setdefault(ev.name[:60], []).append(ev.device_time / 1e3)
    rows = sorted(((sum(v) / steps, len(v) // steps, k) for k, v in totals.items()), reverse=True)
    print(f"{title}: total {sum(r[0] for r in rows):.3f} ms", flush=True)
    for ms, n, name in rows[:24]:
        print(f"  {ms:7.3f} ms  x{n:<4d} {name}", flush=True)


def decode_run(shape: str, config: str, bsz: int, prompt_len: int, steps: int, bandwidth: float,
               profile: bool = False, kernel_profile: bool = False, max_model_len: int = 0) -> dict:
    """Decode ``steps`` tokens for ``bsz`` requests; per-step wall times of engine.step() after the prefill."""
    fmt, method, kv = CONFIGS[config]
    t0 = time.perf_counter()
    lm = random_model(shape, fmt, torch.float16, "cuda", seed=0)
    llm = LLM(lm, linear_method=method, kv_cache_dtype=kv, gpu_memory_utilization=0.85, max_num_seqs=max(bsz, 1),
              max_model_len=max_model_len or prompt_len + steps + 8, async_scheduling=ASYNC)
    build_s = time.perf_counter() - t0
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 32000, (prompt_len,), generator=gen).tolist() for _ in range(bsz)]
    llm.generate(prompts[:bsz], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up + capture
    for p in prompts:
        eng.add_request(p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()  # prefill
    walls = []
    prof = cProfile.Profile() if profile else None
    while eng.has_unfinished():
        t = time.perf_counter()
        if prof is not None and 10 <= len(walls) < 30:
            prof.runcall(eng.step)
        else:
            eng.step()
        walls.append((time.perf_counter() - t) * 1e3)
    if prof is not None:  # where the host time of 20 decode steps goes
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        print(out.getvalue()[-3500:], flush=True)
    walls = walls[:-1] or walls  # the last step also frees everything
    if kernel_profile:
        _kernel_profile(eng, prompts, config, bsz)
    step_ms = statistics.median(walls)
    replay_ms = _replay_ms(eng, bsz)
    nb = weight_nbytes(lm.model)
    floor_ms = nb["per_token_read"] / bandwidth / 1e6
    row = {"shape": shape, "config": config, "batch": bsz, "prompt_len": prompt_len, "steps": len(walls),
           "step_ms": step_ms, "replay_ms": replay_ms, "host_overhead": (step_ms - replay_ms) / step_ms,
           "weight_bytes": nb["total"], "read_bytes": nb["per_token_read"], "floor_ms": floor_ms,
           "vs_floor": step_ms / floor_ms, "kernels": eng.linear_kernels, "kv_tokens": eng.kv_pool.num_tokens,
           "build_s": build_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    print(json.dumps(row), flush=True)
    del llm, eng, lm
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


ASYNC: bool | None = None  # the engines' async_scheduling (None: the default, on for CUDA)


def _skipping(skip: set[str]) -> None:
    """Upper bounds for fusions (timing only, the outputs are wrong): the named decode kernels are not run.
    rope: RoPE of q and k; oquant: o_proj's input quantization (its first result reused); dquant: SiLU * up
    + quantization of down_proj's input (likewise); store: the KV-cache write; attn: decode attention (q
    passes through); norm: residual + RMSNorm + quantization of the q/k/v and gate/up inputs (first result
    reused)."""
    from atomq.kernels import decode_attention, kv_cache
    from atomq.model import methods, paged

    def cached(fn):
        memo = {}

        def run(*args, **kw):
            key = (tuple(a.shape for a in args if isinstance(a, torch.Tensor)),
                   tuple(sorted((k, v) for k, v in kw.items() if not isinstance(v, torch.Tensor))))
            if key not in memo:
                memo[key] = fn(*args, **kw)
            return memo[key]
        return run

    paged._rope_q_k = (lambda *a: None) if "rope" in skip else _ORIGINAL["rope"]
    methods.AtomKernel.prepare_input = cached(_ORIGINAL["oquant"]) if "oquant" in skip else _ORIGINAL["oquant"]
    _Q.silu_mul_quantize = cached(_ORIGINAL["dquant"]) if "dquant" in skip else _ORIGINAL["dquant"]
    kv_cache.kv_store = (lambda *a: None) if "store" in skip else _ORIGINAL["store"]
    decode_attention.paged_decode_attention = ((lambda q, *a, **k: q) if "attn" in skip
                                               else _ORIGINAL["attn"])
    _Q.rmsnorm_quantize = cached(_ORIGINAL["norm"]) if "norm" in skip else _ORIGINAL["norm"]


def _originals() -> dict:
    from atomq.kernels import decode_attention, kv_cache
    from atomq.model import methods, paged

    return {"rope": paged._rope_q_k, "oquant": methods.AtomKernel.prepare_input, "dquant": _Q.silu_mul_quantize,
            "store": kv_cache.kv_store, "attn": decode_attention.paged_decode_attention,
            "norm": _Q.rmsnorm_quantize}


_ORIGINAL = _originals()
_GEMV_DEFAULT, _GEMV_MAX_N, _GEMV_MAX_N_G32 = _W.GEMV_CONFIG, _W.GEMV_MAX_N, _W.GEMV_MAX_N_G32
_ACCUMULATE_MAX_M = _methods.ACCUMULATE_MAX_M
_OUTLIERS_FIRST, _DECODE_L2_PREFETCH = _W.OUTLIERS_FIRST, _W.DECODE_L2_PREFETCH
_WORDS_FEW_PROGRAM_WARPS = _dec.WORDS_FEW_PROGRAM_WARPS
_GEMV_RULES, _GEMV_SPANS = _W.GEMV_RULES, _W.GEMV_SPANS
_PDL_DEFAULT = os.environ.get("ATOMQ_PDL", "1")  # what the caller asked for: a variant without "pdl" keeps it


def _apply_variant(spec: str) -> None:
    """Decode settings for the next engines: programmatic dependent launch, the one-token GEMV, the decode
    quantize's preloads, the graphs' copy node, the split attention merge, the W8A8 row quantizer and
    asynchronous scheduling."""
    import dataclasses

    from atomq.kernels import pdl

    kv = dict(item.split("=") for item in spec.split(",") if item)
    os.environ["ATOMQ_PDL"] = kv.get("pdl", _PDL_DEFAULT)
    pdl._enabled.cache_clear()
    _W.GEMV_CONFIG = dataclasses.replace(_GEMV_DEFAULT, k_blocks=int(kv.get("kb", _GEMV_DEFAULT.k_blocks)),
                                        ahead=int(kv.get("ahead", _GEMV_DEFAULT.ahead)),
                                        waves=float(kv.get("waves", _GEMV_DEFAULT.waves)))
    _W.GEMV_MAX_N = int(kv.get("maxn", _GEMV_MAX_N))
    _W.GEMV_MAX_N_G32 = int(kv.get("maxn32", _GEMV_MAX_N_G32))
    _W.GEMV_SPANS = _GEMV_SPANS if "spans" not in kv else tuple(int(v) for v in kv["spans"].split("+"))
    _W.GEMV_RULES = _GEMV_RULES if "gemv" not in kv else tuple(
        (int(most), dataclasses.replace(_W.GEMV_CONFIG, k_blocks=int(kb), ahead=int(ahead)))
        for most, kb, ahead in (rule.split(":") for rule in kv["gemv"].split("+") if rule))
    _runner.GRAPH_COPIES = kv.get("gcopy", "1") == "1"
    _dec.FUSED_MERGE = kv.get("merge", "1") == "1"
    _dec.ADAPTIVE_SPLITS = kv.get("asplit", "1") == "1"
    _dec.MIN_TOKENS_PER_SPLIT = int(kv.get("minsplit", 256))
    _dec.WORDS_BLOCK_N = int(kv.get("ablock", 128))
    _dec.WORDS_FEW_PROGRAM_WARPS = int(kv.get("awarps", _WORDS_FEW_PROGRAM_WARPS))
    _dec.PRELOAD_PAGES = kv.get("apre", "1") == "1"
    pdl.PRELOAD_STAGED = kv.get("spre", "1") == "1"
    _methods.ROW_QUANT_KERNEL = kv.get("rowq", "1") == "1"
    _methods.ACCUMULATE_MAX_M = int(kv.get("acc", _ACCUMULATE_MAX_M))
    _W.OUTLIERS_FIRST = kv.get("ofirst", str(int(_OUTLIERS_FIRST))) == "1"
    _W.DECODE_L2_PREFETCH = int(kv.get("l2pf", _DECODE_L2_PREFETCH))
    _Q.DEFAULT_LAUNCH = _Q.QuantizeLaunch(preload=kv.get("preload", "1") == "1")
    from atomq.model import paged

    paged.FUSED_SILU_ROTATE = kv.get("rotfuse", "1") == "1"
    _Hd.DOT_MIX = kv.get("rotdot", "1") == "1"
    global ASYNC
    ASYNC = None if "async" not in kv else kv["async"] == "1"
    _skipping(set(kv.get("skip", "").split("+")) - {""})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engine_check.json")
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--configs", default="fp16,fp8,w4a16,atom")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a host profile of decode steps at batch >= 64")
    ap.add_argument("--kernel-profile", action="store_true", help="print GPU time per kernel of decode steps")
    ap.add_argument("--variants", default="", help=(
        "A/B of decode settings, ';'-separated, each a ','-separated list of key=value: pdl=0|1, kb=K, ahead=1|2, "
        "gemv=MOST:KB:AHEAD+..., "
        "waves=W, maxn=N, maxn32=N, spans=64+32, preload=0|1, gcopy=0|1, merge=0|1, rowq=0|1, async=0|1, asplit=0|1, minsplit=N, ablock=N, apre=0|1, spre=0|1, "
        "rotfuse=0|1, rotdot=0|1, ofirst=0|1, l2pf=N, "
        "skip=rope+oquant+dquant+store+attn+norm (unset keys: defaults). async: steps launched one ahead of the "
        "host; asplit: decode attention splits sized by each sequence's length; minsplit: fewest tokens per "
        "planned split; ablock: tokens per tile of the INT4 words attention kernel; apre: decode attention "
        "loads its first tile of older tokens before the wait; spre: RoPE and the KV store "
        "load their staged inputs before the wait; skip: named decode kernels not run, an upper bound for fusing them away (outputs "
        "wrong); waves: GEMV programs per SM the K split aims at; spans: weight spans the one-token GEMV takes (32: groups of 32); maxn32: most weight rows it takes with groups of 32; gemv: one-token products of at most MOST weights take KB K blocks a step and AHEAD steps ahead (first rule that fits; none: kb / ahead); preload: the decode quantize's constants "
        "before the wait; gcopy: the decode graphs copy the staged metadata themselves; merge: split attention "
        "merged in the kernel; rowq: the FP8 / INT8 activations quantized by one kernel; rotfuse: rotated models' SiLU * up and "
        "online rotation in one kernel; rotdot: the rotation's block mix on tensor cores; awarps: warps of the INT4 words attention kernel when its programs do not fill the GPU; acc: Atom decode GEMMs of at most N tokens add their K runs into the "
        "fp32 accumulator their quantize kernel zeroed; ofirst: decode GEMMs load their INT8 outlier operands "
        "ahead of the first K run's loop; l2pf: the Triton decode kernel (M <= 16) prefetches its first N K blocks "
        "of weights into L2 before its wait. Every config and "
        "batch runs under each, the list --repeat times"))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=0,
                    help="the engine's max_model_len (0: just the run's tokens); it sizes the decode split plan")
    ns = ap.parse_args()
    info = env_info()
    print(info, flush=True)
    if not ns.no_checks:
        check_kernels()
        check_graphs()
        check_prompt_logprobs()
    bw = copy_gbps()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    variants = [v for v in ns.variants.split(";") if v] or [""]
    for _ in range(ns.repeat):
        for variant in variants:
            _apply_variant(variant)
            for config in ns.configs.split(","):
                for bsz in (int(b) for b in ns.batches.split(",")):
                    try:
                        row = decode_run(ns.shape, config, bsz, 128, ns.steps, bw, ns.profile and bsz >= 64,
                                         ns.kernel_profile, ns.max_model_len)
                        rows.append({**row, "variant": variant})
                    except Exception as e:  # one failing configuration is reported, the others still run
                        report(f"decode {config} batch {bsz}", False, f"{type(e).__name__}: {str(e)[:300]}")
                        torch.cuda.empty_cache()
    with open(ns.out, "w") as f:
        json.dump({"env": info, "copy_gbps": bw, "fails": FAILS, "rows": rows}, f, indent=1)
    print(f"\n{ns.shape}, copy {bw:.0f} GB/s; step = engine.step() wall, replay = decode graph alone (ms)")
    print("| config | batch | step ms | replay ms | host overhead | floor ms | step / floor | tok/s |"
          + (" variant |" if ns.variants else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if ns.variants else ""))
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['step_ms']:.3f} | {r['replay_ms']:.3f} | {r['host_overhead']:.0%} "
              f"| {r['floor_ms']:.3f} | {r['vs_floor']:.2f} | {r['batch'] / r['step_ms'] * 1e3:.0f} |"
              + (f" {r['variant'] or 'default'} |" if ns.variants else ""))
    print(f"failures: {FAILS or 'none'}")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
