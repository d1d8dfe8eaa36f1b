"""Offline throughput of the serving engine, the issue-6 comparison of weight / KV formats.

A *run* is (model shape, configuration, memory budget, workload, max_num_seqs): every request of the
workload is submitted at t=0 with greedy sampling, ``ignore_eos`` and ``max_tokens`` = its output length,
and the engine steps until all have finished. Models are random weights of real shapes
(model/random_weights.py): time does not depend on the values.

Per model and configuration the weights are built once; each budget and max_num_seqs then gets a fresh
engine (a new KV pool), a warm-up (kernels compiled, decode CUDA graphs captured) and the measured run.
Whether a configuration fits a budget is predicted on the meta device before anything is allocated, and
checked again with the measured weight bytes (bench/memory.py); what does not fit gets a "does not fit" row.

Row fields (``run_config``'s dicts, the JSON the report reads; sizes in bytes, times in seconds):
  model, config, label, budget, cap_bytes, reserve_bytes, workload, num_requests, max_num_seqs,
  max_num_batched_tokens, max_model_len, device, dtype
  status: "ok" | "time limit" (unfinished requests aborted at time_limit_s) | "does not fit" |
      "out of memory" | "error" | "skipped" (total time limit);  reason: why, for any status but "ok"
  weight_bytes (the weights as they run: measured, or predicted on meta when the model was not built),
  weights_measured (bool), kv_budget_bytes (what the budget leaves for the KV cache),
  kv_budget_tokens (tokens that budget holds), kv_capacity_tokens / kv_cache_bytes (the pool of this run:
  at most max_num_seqs * max_model_len tokens), kv_bytes_per_token (K and V over all layers)
  elapsed_s (first submission to last step), num_steps, completed_requests, prompt_tokens (of requests
  that reached their first token), output_tokens (all generated tokens), output_tok_s, total_tok_s
  ((prompt + output tokens) / elapsed_s), requests_per_s
  ttft_s, tpot_s, e2e_s: {mean, p50, p90, p99, max} over completed requests (bench/metrics.py);
      ttft = first token - submission (queueing included), tpot = (finish - first token) / (outputs - 1)
  max_running: the largest number of sequences running in one step (admitted, holding KV blocks);
  mean_running: its average weighted by step time; preemptions: total over requests
  peak_memory_bytes, peak_memory_kind (bench/memory.peak_memory), within_budget (CUDA peak <= cap)
  build_s (engine construction), warmup_s
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..engine.warmup import warm_up
from ..model.random_weights import CONFIGS, Config, build_random  # noqa: F401 (the configurations compared here)
from .memory import (Budget, MemoryPlan, device_memory_bytes, format_bytes, peak_memory, plan_memory,
                     reset_peak, weight_bytes)
from .metrics import summarize
from .workloads import Workload

BLOCK_SIZE = 16


@dataclass(frozen=True)
class RunSettings:
    """Knobs shared by every run. device: "cuda" or "cpu"; dtype: the model dtype (None = float16 on CUDA,
    float32 on CPU); max_num_batched_tokens: token budget of one engine step; max_model_len: None = the
    workload's longest request rounded up to a 16-token block; gpu_memory_utilization: share of device
    memory the "full" budget may use; warmup: run ``warm_up`` on each fresh engine before measuring
    (kernels compiled, CUDA graphs captured: otherwise the first steps of a run pay for it); time_limit_s:
    abort a run's unfinished requests after this many seconds (None = no limit); total_time_limit_s: for
    run_comparison as a whole: runs cut short at the end, later ones skipped (None = no limit);
    prompt_seed: random prompt ids; model_seed: random weights; async_scheduling: the engine's (None = its
    default, on for CUDA)."""

    device: str = "cuda"
    dtype: torch.dtype | None = None
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    warmup: bool = True
    time_limit_s: float | None = None
    total_time_limit_s: float | None = None
    prompt_seed: int = 0
    model_seed: int = 0
    async_scheduling: bool | None = None

    @property
    def model_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if torch.device(self.device).type == "cuda" else torch.float32

    def model_len(self, workload: Workload) -> int:
        return self.max_model_len or -(-workload.max_total_len // BLOCK_SIZE) * BLOCK_SIZE


@dataclass(frozen=True)
class Footprint:
    """A model's sizes in bytes, predicted on the meta device. build_bytes: the peak while build_random makes
    it (the stored format; with a converting method, the converted model plus one layer in float);
    weight_bytes: as it runs (after the linear method); kv_bytes_per_token: K and V of
    one token over all layers in the configuration's KV dtype; vocab_size: tokens."""

    build_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    vocab_size: int


def footprint(shape: str, config: Config, dtype: torch.dtype) -> Footprint:
    """Predict the sizes of ``shape`` under ``config`` without allocating (the model is built on meta)."""
    from ..model.methods import apply_linear_method
    from ..model.random_weights import random_model

    lm = random_model(shape, config.weights, dtype, device="meta")
    layer_float = sum(t.numel() * t.element_size() for t in lm.model.model.layers[0].state_dict().values())
    build = weight_bytes(lm.model)
    if config.linear_method != "auto":  # a method converting float weights (fp8, int8): built layer by layer
        apply_linear_method(lm.model, config.linear_method, backend="ref")
        build = weight_bytes(lm.model) + layer_float  # the converted model + one layer still in float
    return Footprint(build, weight_bytes(lm.model), kv_bytes_per_token(lm, config), lm.model.args.vocab_size)


def kv_bytes_per_token(lm: Any, config: Config) -> int:
    from ..engine.kv_pool import bytes_per_token, resolve_kv_dtype

    args = lm.model.args
    mode = resolve_kv_dtype(config.kv_cache_dtype, lm.qcfg.kv_bits)
    dtype = lm.model.model.embed_tokens.weight.dtype
    return bytes_per_token(args.n_kv_heads, args.head_dim, mode, dtype) * args.n_layers


# --------------------------------------------------------------------------------------- one run
def measure(engine: Any, workload: Workload, prompts: list[list[int]], time_limit_s: float | None = None) -> dict:
    """Submit every request at t=0, step the engine until all finish (or time_limit_s passes: the rest are
    aborted) and return the measurement fields of a row (see the module docstring)."""
    from ..engine.sequence import SamplingParams

    if workload.max_total_len > engine.max_model_len:
        raise ValueError(f"the workload's longest request has {workload.max_total_len} tokens, more than the "
                         f"engine's max_model_len {engine.max_model_len}")
    params = [SamplingParams(temperature=0.0, max_tokens=int(n), ignore_eos=True) for n in workload.output_lens]
    t0 = time.perf_counter()
    seqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    running, durations = [], []  # per step: sequences running, seconds
    aborted: list = []
    while engine.has_unfinished():
        t_step = time.perf_counter()
        finished = engine.step()
        t_end = time.perf_counter()
        running.append(engine.num_running + len(finished))
        durations.append(t_end - t_step)
        if time_limit_s is not None and t_end - t0 > time_limit_s:
            engine.drain()  # keep the tokens of a step still in flight
            aborted = [s for s in seqs if engine.abort_request(s)]
            break
    elapsed = time.perf_counter() - t0

    outs = [engine.output(s) for s in seqs]
    done = [o for o in outs if o.finish_reason == "length"]
    for o, sp in zip(outs, params):
        if o.finish_reason == "length" and len(o.token_ids) != sp.max_tokens:
            raise RuntimeError(f"request {o.request_id} finished with {len(o.token_ids)} tokens, asked {sp.max_tokens}")
    output_tokens = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs if o.metrics.first_token_time is not None)
    busy = sum(durations)
    return {
        "status": "time limit" if aborted else "ok",
        "reason": f"stopped after {time_limit_s:.0f} s; {len(aborted)} requests aborted" if aborted else "",
        "elapsed_s": elapsed, "num_steps": len(running), "completed_requests": len(done),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "output_tok_s": output_tokens / elapsed, "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
        "requests_per_s": len(done) / elapsed,
        "ttft_s": summarize(o.metrics.ttft for o in done),
        "tpot_s": summarize(o.metrics.tpot for o in done),
        "e2e_s": summarize(o.metrics.finish_time - o.metrics.arrival_time for o in done),
        "max_running": max(running, default=0),
        "mean_running": sum(r * d for r, d in zip(running, durations)) / busy if busy else 0.0,
        "preemptions": sum(o.num_preemptions for o in outs),
    }


# ------------------------------------------------------------------------------- one model config
def run_config(shape: str, config: Config, budgets: list[Budget], workload: Workload, batch_sizes: list[int],
               settings: RunSettings, on_row: Callable[[dict], None] | None = None,
               stop_at: float | None = None) -> list[dict]:
    """Every (budget, max_num_seqs) run of one model shape in one configuration; returns the rows (and
    hands each to on_row as soon as it exists, e.g. to save progress). stop_at: a time.monotonic() after
    which no run starts (their rows say "skipped") and a running one is cut short."""
    s, rows = settings, []
    device, dtype = torch.device(s.device), s.model_dtype
    max_len = s.model_len(workload)

    def emit(budget: Budget, plan: MemoryPlan | None, fields: dict, max_num_seqs: int | None = None,
             measured: bool = False) -> None:
        row = {"model": shape, "config": config.name, "label": config.label, **budget.to_dict(),
               "workload": workload.name, "num_requests": len(workload), "max_num_seqs": max_num_seqs,
               "max_num_batched_tokens": s.max_num_batched_tokens, "max_model_len": max_len,
               "device": device.type, "dtype": str(dtype).removeprefix("torch."),
               "weight_bytes": plan.weight_bytes if plan else fp.weight_bytes, "weights_measured": measured,
               "kv_budget_bytes": plan.kv_budget_bytes if plan else None,
               "kv_budget_tokens": plan.kv_tokens if plan else None, "kv_bytes_per_token": fp.kv_bytes_per_token,
               **fields}
        rows.append(row)
        if on_row is not None:
            on_row(row)

    fp = footprint(shape, config, dtype)
    device_bytes = int(device_memory_bytes(device) * s.gpu_memory_utilization)
    too_big = ""
    if fp.build_bytes > device_bytes:
        method = config.linear_method
        converted = f" (as {method}, with one layer in float while it is built)" if method != "auto" else ""
        too_big = (f"the {config.weights} weights take {format_bytes(fp.build_bytes)}{converted}: more than the "
                   f"device's {format_bytes(device_bytes)}")
    lm, build_error, prompts = None, "", None
    out_of_time = lambda: stop_at is not None and time.monotonic() >= stop_at  # noqa: E731
    skipped = {"status": "skipped", "reason": "the benchmark's total time limit was reached"}
    for b in budgets:
        # predicted on meta: what cannot fit gets its row before anything is allocated
        plan = plan_memory(b, fp.weight_bytes, fp.kv_bytes_per_token, max_len, device_bytes - fp.weight_bytes)
        if too_big or not plan.fits:
            emit(b, plan, {"status": "does not fit", "reason": too_big or plan.reason})
            continue
        if lm is None and out_of_time():
            emit(b, plan, skipped)
            continue
        if lm is None and not build_error:
            lm, build_error = _build(shape, config, dtype, device, s.model_seed)
            prompts = workload.prompts(fp.vocab_size, s.prompt_seed)
        if build_error:
            emit(b, None, {"status": "out of memory", "reason": build_error})
            continue
        _free(device)
        plan = plan_memory(b, weight_bytes(lm.model), fp.kv_bytes_per_token, max_len,
                           _available_bytes(device, s.gpu_memory_utilization))
        if not plan.fits:
            emit(b, plan, {"status": "does not fit", "reason": plan.reason}, measured=True)
            continue
        for n in batch_sizes:
            if out_of_time():
                emit(b, plan, skipped, n, measured=True)
                continue
            limit = s.time_limit_s
            if stop_at is not None:
                left = stop_at - time.monotonic()
                limit = left if limit is None else min(limit, left)
            fields = _run_one(lm, config, plan, n, max_len, workload, prompts, fp.vocab_size, s, b, limit)
            emit(b, plan, fields, n, measured=True)
    del lm
    _free(device)
    return rows


def _build(shape: str, config: Config, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[Any, str]:
    """(the random model with its linears prepared for config's method, "") or (None, why it failed)."""
    try:
        return build_random(shape, config, dtype, device, seed), ""
    except torch.cuda.OutOfMemoryError as e:
        _free(device)
        return None, f"building the model: {_first_line(e)}"


def _available_bytes(device: torch.device, utilization: float) -> int:
    from ..engine.kv_pool import available_bytes

    return available_bytes(device, utilization)


def _run_one(lm: Any, config: Config, plan: MemoryPlan, max_num_seqs: int, max_len: int, workload: Workload,
             prompts: list[list[int]], vocab_size: int, s: RunSettings, budget: Budget,
             time_limit_s: float | None) -> dict:
    """Build an engine over lm, warm it up, measure; failures become a row status instead of an exception."""
    from ..engine.llm import LLM

    device = torch.device(s.device)
    llm = None
    try:
        _free(device)
        reset_peak(device)
        t0 = time.perf_counter()
        llm = LLM(lm, **config.engine_kwargs, kv_cache_bytes=plan.kv_budget_bytes, max_model_len=max_len,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                  async_scheduling=s.async_scheduling)
        build_s = time.perf_counter() - t0
        eng = llm.engine
        warmup_s = warm_up(eng, vocab_size, s.prompt_seed + 1) if s.warmup else 0.0
        fields = measure(eng, workload, prompts, time_limit_s)
        peak, kind = peak_memory(device)
        within = peak <= budget.cap_bytes if device.type == "cuda" and budget.cap_bytes is not None else None
        fields.update(kv_capacity_tokens=eng.kv_pool.num_tokens, kv_cache_bytes=eng.kv_pool.nbytes(),
                      peak_memory_bytes=peak, peak_memory_kind=kind, within_budget=within,
                      build_s=build_s, warmup_s=warmup_s)
        return fields
    except torch.cuda.OutOfMemoryError as e:
        return {"status": "out of memory", "reason": _first_line(e)}
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others; the row says why
        traceback.print_exc()
        return {"status": "error", "reason": f"{type(e).__name__}: {_first_line(e)}"}
    finally:
        del llm
        _free(device)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_comparison(shapes: list[str], configs: list[str], budgets: list[Budget], workload: Workload,
                   batch_sizes: list[int], settings: RunSettings,
                   on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """run_config for every shape and configuration name (``CONFIGS``), in that order."""
    from ..model.random_weights import SHAPES

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}")
    unknown = [m for m in shapes if m not in SHAPES]
    if unknown:
        raise ValueError(f"unknown model shape(s) {unknown}; choose from {sorted(SHAPES)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"max_num_seqs values must be >= 1, got {batch_sizes}")
    stop_at = None if settings.total_time_limit_s is None else time.monotonic() + settings.total_time_limit_s
    rows = []
    for shape in shapes:
        for name in configs:
            rows += run_config(shape, CONFIGS[name], budgets, workload, batch_sizes, settings, on_row, stop_at)
    return rows
