"""The ``atomq`` command line: quantize | eval ppl | eval zeroshot | generate | serve | inspect |
bench kernels | throughput | serving | report.

Quantization flags are derived from the QuantConfig / CalibConfig fields, so defaults live in config.py:
a flag left unset takes the preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from typing import Any

from .config import PRESETS, CalibConfig, QuantConfig, check_device, preset

_HELP = {
    "w_bits": "weight bits (none = 16-bit)", "a_bits": "activation bits (none = 16-bit)",
    "group_size": "channels per scale group (none = one scale per row)",
    "n_outliers": "INT8 outlier input channels (adapted to the shape, see docs/NUMERICS.md)",
    "kv_bits": "KV-cache bits (none = 16-bit)",
    "kv_center": "take a calibrated mean key per layer and KV head off the keys before the cache",
    "w_scale_levels": "weight group scales as integer multiples 1..L of one scale per row (2..15; none = free)",
    "a_scale_levels": "activation group scales as integer multiples 1..L of one scale per token (2..15; none = free)",
    "device": "where calibration runs: cpu, or cuda[:N] (a GPU; what a 7B or larger model needs)",
}


_MODEL_HELP = ("atomq checkpoint, HF directory, .gguf file, 'smollm2', or random:SHAPE:CONFIG: random weights of a "
               "real shape (llama-2-7b, llama-2-13b, llama-2-70b, mixtral-8x7b; tiny-llama, tiny-mixtral) in a "
               "bench throughput configuration (fp16, fp8, w4a16, atom, rot-outliers, atomq-plus, atom-a8, atom-levels, atomq-plus-levels), e.g. random:llama-2-7b:atom "
               "(byte tokenizer; for speed measurements)")

_NONE = "none"  # what a user types for "kept in 16 bit" / "no groups"; becomes None in _overrides


def _parse_optional_int(text: str) -> int | str:
    return _NONE if text.lower() == _NONE else int(text)


def _parse_optional_float(text: str) -> float | str:
    return _NONE if text.lower() == _NONE else float(text)


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """One flag per field; default None so that an unset flag keeps the preset / dataclass default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint)
        help_text = _HELP.get(f.name, f.name.replace("_", " ")) + f" (default {f.default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif base is int:
            parser.add_argument(flag, dest=f.name, type=_parse_optional_int if optional else int, default=None,
                                help=help_text)
        elif base is float:
            parser.add_argument(flag, dest=f.name, type=_parse_optional_float if optional else float, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, help=help_text)


def _overrides(ns: argparse.Namespace, cls) -> dict[str, Any]:
    """Only the dataclass fields the user set, with the 'none' sentinel already parsed."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name, None)
        if v is not None:
            out[f.name] = None if v == _NONE else v
    return out


def _cmd_quantize(ns: argparse.Namespace) -> int:
    from .calib.pipeline import quantize_model

    qcfg = preset(ns.preset, **_overrides(ns, QuantConfig))
    ccfg = CalibConfig(**_overrides(ns, CalibConfig))
    print(f"quantizing {ns.model} with preset {ns.preset}: {json.dumps(qcfg.to_dict())}")
    meta = quantize_model(ns.model, ns.out, qcfg, ccfg, overwrite=ns.overwrite, data_dir=ns.data_dir)
    cal = meta["calibration"]
    gpu = f", peak GPU memory {cal['peak_gpu_mb']} MB on {cal['gpu']}" if "peak_gpu_mb" in cal else ""
    print(f"wrote {ns.out} in {cal['seconds']} s (peak RSS {cal['peak_rss_mb']} MB{gpu})")
    return 0


def _add_kv_overrides(p: argparse.ArgumentParser) -> None:
    """Run-time numerics that override the checkpoint's (evaluation commands): the KV cache's, 16-bit
    activations, the activation clip ratio."""
    p.add_argument("--kv-bits", type=_parse_optional_int, default=None,
                   help="KV-cache bits at run time (4, 8 or none = 16-bit); default: the checkpoint's")
    p.add_argument("--kv-rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate queries and keys per head (Hadamard) before KV quantization; default: the checkpoint's")
    p.add_argument("--weights-only", action="store_true",
                   help="keep activations 16-bit at run time (the weights-only accuracy of a W4A4 checkpoint)")
    p.add_argument("--a-clip", type=float, default=None,
                   help="activation clip ratio at run time, in (0, 1]; default: the checkpoint's")


def _cmd_eval_ppl(ns: argparse.Namespace) -> int:
    import torch

    from .eval.ppl import perplexity, token_windows
    from .model.loader import DTYPES, load_model

    if ns.threads:
        torch.set_num_threads(ns.threads)
    check_device(ns.device)
    lm = load_model(ns.model, DTYPES[ns.dtype], device=ns.device,
                    kv_bits="checkpoint" if ns.kv_bits is None else ns.kv_bits,
                    kv_rotate=ns.kv_rotate, weights_only=ns.weights_only, a_clip=ns.a_clip)
    windows = token_windows(lm.tokenizer, ns.dataset, ns.seq_len, ns.data_dir)
    res = perplexity(lm.model, windows, ns.limit)
    row = {"model": ns.model, "dataset": ns.dataset, "seq_len": ns.seq_len, "dtype": ns.dtype,
           "quant": lm.qcfg.to_dict(), **dataclasses.asdict(res)}
    print(f"{ns.dataset} perplexity {res.ppl:.4f} over {res.windows} windows of {ns.seq_len} ({res.seconds:.0f} s)")
    if ns.json:
        with open(ns.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def _cmd_eval_zeroshot(ns: argparse.Namespace) -> int:
    import torch

    from .eval.tasks import get_task
    from .eval.zeroshot import average, evaluate_tasks, format_table
    from .model.loader import DTYPES, load_model

    if ns.threads:
        torch.set_num_threads(ns.threads)
    tasks = [get_task(t.strip()).name for t in ns.tasks.split(",") if t.strip()]  # typos fail before the load
    if not tasks:
        raise ValueError("--tasks names no task")
    check_device(ns.device)
    lm = load_model(ns.model, DTYPES[ns.dtype], device=ns.device,
                    kv_bits="checkpoint" if ns.kv_bits is None else ns.kv_bits,
                    kv_rotate=ns.kv_rotate, weights_only=ns.weights_only, a_clip=ns.a_clip)
    results = evaluate_tasks(lm.model, lm.tokenizer, tasks, ns.data_dir, ns.limit, ns.batch_size)
    print(format_table(results))
    if ns.json:
        row = {"model": ns.model, "dtype": ns.dtype, "limit": ns.limit, "quant": lm.qcfg.to_dict(),
               "tasks": {r.task: {**dataclasses.asdict(r), "value": r.value, "stderr": r.stderr if r.n > 1 else None}
                         for r in results}, "average": average(results)}
        with open(ns.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from .model.inspect import describe

    print(describe(ns.checkpoint, ns.all))
    return 0


ASYNC_CHOICES = {"auto": None, "on": True, "off": False}


def _add_async_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--async-scheduling", default="auto", choices=list(ASYNC_CHOICES),
                        help="launch each engine step before the host has the tokens of the one ahead, so the host's "
                             "work overlaps the GPU's (auto: on CUDA, off on the CPU)")


def _cmd_generate(ns: argparse.Namespace) -> int:
    import resource
    import time

    import torch

    from .engine.llm import apply_chat_template
    from .engine.sequence import SamplingParams
    from .model_spec import open_llm

    if ns.threads:
        torch.set_num_threads(ns.threads)
    params = SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, min_p=ns.min_p, seed=ns.seed,
                            max_tokens=ns.max_tokens, min_tokens=ns.min_tokens, stop=tuple(ns.stop or ()),
                            ignore_eos=ns.ignore_eos, logprobs=ns.logprobs, presence_penalty=ns.presence_penalty,
                            frequency_penalty=ns.frequency_penalty, repetition_penalty=ns.repetition_penalty,
                            prompt_logprobs=ns.prompt_logprobs)
    t0 = time.perf_counter()
    llm = open_llm(ns.model, dtype=ns.dtype, device=ns.device, kv_cache_dtype=ns.kv_cache_dtype,
              kv_cache_bytes=ns.kv_cache_bytes, gpu_memory_utilization=ns.gpu_memory_utilization,
              max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
              max_num_batched_tokens=ns.max_num_batched_tokens, async_scheduling=ASYNC_CHOICES[ns.async_scheduling])
    load_s = time.perf_counter() - t0
    eng = llm.engine
    prompts = [apply_chat_template(llm.tokenizer, p) if ns.chat else p for p in ns.prompt]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    for prompt, out in zip(ns.prompt, outs):
        print(f"--- {prompt!r} -> ({len(out.token_ids)} tokens, {out.finish_reason})")
        if out.prompt_logprobs is not None:
            _print_prompt_logprobs(out.prompt_logprobs, llm.tokenizer)
        print(out.text)
        if out.logprobs is not None:
            _print_logprobs(out.logprobs, llm.tokenizer)
    st = eng.stats
    gen = sum(len(o.token_ids) for o in outs)
    model = eng.lm.model
    weight_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                       if not (model.args.tie_embeddings and n == "lm_head.weight"))
    steps_s = st["decode_steps"] / st["decode_s"] if st["decode_s"] else float("nan")
    decode_tok_s = st["decode_tokens"] / st["decode_s"] if st["decode_s"] else float("nan")
    print(f"--- {gen} tokens in {wall:.2f} s: {gen / wall:.1f} tok/s overall; prefill {st['prompt_tokens']} "
          f"tokens in {st['prefill_s']:.2f} s; decode {decode_tok_s:.1f} tok/s ({steps_s:.1f} steps/s, "
          f"{weight_bytes * steps_s / 1e9:.2f} GB/s of stored weights); load {load_s:.1f} s")
    kv = eng.kv_pool
    print(f"--- KV cache {kv.mode} ({kv.ops.backend} ops): {kv.num_blocks} blocks of {kv.block_size} tokens, "
          f"{kv.nbytes() / 2**20:.1f} MiB")
    if eng.device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(eng.device) / 2**30:.2f} GiB on the GPU"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    print(f"--- peak memory {peak}")
    return 0


def _print_logprobs(logprobs: list, tokenizer: typing.Any) -> None:
    """One line per generated token: its text and log-probability, then the most likely alternatives."""
    from .serve.token_text import TokenText

    text = TokenText(tokenizer)
    for i, e in enumerate(logprobs):
        top = ", ".join(f"{text(t)[0]!r} {lp:.3f}" for t, lp in e.top)
        print(f"  {i:3d} {text(e.token_id)[0]!r} {e.logprob:.3f}" + (f"  | {top}" if top else ""))


def _print_prompt_logprobs(prompt_logprobs: list, tokenizer: typing.Any) -> None:
    """The prompt tokens' lines (as _print_logprobs; the first token has none), then their perplexity."""
    scored = prompt_logprobs[1:]
    print("  prompt:")
    _print_logprobs(scored, tokenizer)
    if scored:
        nll = -sum(e.logprob for e in scored) / len(scored)
        ppl = math.exp(nll) if nll < 700 else math.inf
        print(f"  prompt: {len(scored)} tokens scored, mean NLL {nll:.4f}, perplexity {ppl:.3f}")


def _cmd_serve(ns: argparse.Namespace) -> int:
    import os

    from .serve.server import run_server

    run_server(ns.model, host=ns.host, port=ns.port, api_key=ns.api_key or os.environ.get("ATOMQ_API_KEY"),
               served_model_name=ns.served_model_name, max_waiting=ns.max_waiting, chat_template=ns.chat_template,
               shutdown_timeout=ns.shutdown_timeout, log_level=ns.log_level, threads=ns.threads, warmup=ns.warmup,
               dtype=ns.dtype,
               device=ns.device, kv_cache_dtype=ns.kv_cache_dtype, kv_cache_bytes=ns.kv_cache_bytes,
               gpu_memory_utilization=ns.gpu_memory_utilization, max_model_len=ns.max_model_len,
               max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
               async_scheduling=ASYNC_CHOICES[ns.async_scheduling])
    return 0


def _cmd_bench_kernels(ns: argparse.Namespace) -> int:
    import os

    import torch

    if not torch.cuda.is_available():
        raise ValueError("atomq bench kernels needs a CUDA GPU (the kernels' CPU tests run with pytest)")
    from .bench.attention import run_attention_bench
    from .bench.gemm import run_gemm_bench

    os.makedirs(ns.out, exist_ok=True)
    if ns.what in ("all", "gemm"):
        run_gemm_bench(os.path.join(ns.out, "gemm.json"))
    if ns.what in ("all", "attention"):
        run_attention_bench(os.path.join(ns.out, "attention.json"))
    print(f"results in {ns.out}/*.json")
    return 0


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _workload_from_flags(ns: argparse.Namespace):
    from .bench.workloads import make_workload

    return make_workload(ns.workload, ns.num_requests, max_len=ns.max_len, seed=ns.seed, input_len=ns.input_len,
                         output_len=ns.output_len, sharegpt_path=ns.sharegpt_path,
                         sharegpt_max_prompt=ns.sharegpt_max_prompt or None,
                         sharegpt_max_total=ns.sharegpt_max_total or None)


def _cmd_bench_throughput(ns: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .bench.memory import GiB, parse_budget
    from .bench.report import describe_row, render
    from .bench.results import ResultFile, env_info
    from .bench.throughput import RunSettings, run_comparison

    workload = _workload_from_flags(ns)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if ns.dtype == "auto" else getattr(torch, ns.dtype)
    settings = RunSettings(device=device, dtype=dtype, max_num_batched_tokens=ns.max_num_batched_tokens,
                           max_model_len=ns.max_model_len, gpu_memory_utilization=ns.gpu_memory_utilization,
                           warmup=not ns.no_warmup, time_limit_s=ns.time_limit,
                           total_time_limit_s=ns.total_time_limit, prompt_seed=ns.seed or 0,
                           async_scheduling=ASYNC_CHOICES[ns.async_scheduling])
    budgets = [parse_budget(b, int(ns.reserve_gb * GiB)) for b in _csv(ns.budgets)]
    batch_sizes = [int(b) for b in _csv(ns.max_num_seqs)]
    out = ResultFile(ns.out, "throughput", env_info(device), dataclasses.asdict(settings), workload.summary())
    print(f"workload: {workload.summary()}", flush=True)

    def on_row(row: dict) -> None:
        out.add(row)
        print(describe_row(row), flush=True)

    run_comparison(_csv(ns.models), _csv(ns.configs), budgets, workload, batch_sizes, settings, on_row)
    print("\n" + render(out.data))
    print(f"\nresults in {ns.out}")
    return 0


def _cmd_bench_serving(ns: argparse.Namespace) -> int:
    import contextlib
    import os

    from .bench.report import describe_row, render
    from .bench.results import ResultFile, env_info
    from .bench.serving import ServerProcess, run_serving, serve_command

    if (ns.url is None) == (ns.model is None):
        raise ValueError("give either --url (a running server) or --model (launch atomq serve)")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ValueError("atomq bench serving needs httpx (pip install httpx)") from None
    workload = _workload_from_flags(ns)
    rates = [None if r.lower() == "inf" else float(r) for r in _csv(ns.rates)]
    if ns.model is not None:
        url = f"http://127.0.0.1:{ns.port}"
        extra = (ns.serve_arg or []) + ([] if ns.no_server_warmup else ["--warmup"])
        server = ServerProcess(serve_command(ns.model, ns.port, extra), url, ns.startup_timeout,
                               log_path=os.path.splitext(ns.out)[0] + ".server.log")
    else:
        url, server = ns.url, contextlib.nullcontext()
    settings = {"url": url, "rates": rates, "seed": ns.seed or 0, "vocab_size": ns.vocab_size,
                "serve_args": ns.serve_arg, "launched_model": ns.model,
                "server_warmup": None if ns.model is None else not ns.no_server_warmup}
    out = ResultFile(ns.out, "serving", env_info("cpu"), settings, workload.summary())
    print(f"workload: {workload.summary()}", flush=True)

    def on_row(row: dict) -> None:
        out.add(row)
        print(describe_row(row), flush=True)

    label = ns.label or _random_config_name(ns.model) or "server"
    with server:
        run_serving(url, workload, rates, model=ns.served_model, label=label, vocab_size=ns.vocab_size,
                    seed=ns.seed or 0, api_key=ns.api_key or os.environ.get("ATOMQ_API_KEY"),
                    timeout_s=ns.request_timeout, on_row=on_row)
    print("\n" + render(out.data))
    print(f"\nresults in {ns.out}")
    return 0


def _random_config_name(model: str | None) -> str | None:
    """The configuration of a ``random:SHAPE:CONFIG`` model (ValueError for a bad one), else None."""
    from .model_spec import parse_random_spec

    spec = parse_random_spec(model) if model else None
    return spec.config.name if spec else None


def _cmd_bench_report(ns: argparse.Namespace) -> int:
    from .bench.report import main as report_main

    return report_main(ns.results + (["--plots", ns.plots] if ns.plots else []) + (["--out", ns.out] if ns.out else []))


def _add_workload_flags(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload (bench/workloads.py)")
    w.add_argument("--workload", default="synthetic", choices=["synthetic", "sharegpt", "fixed"],
                   help="synthetic: the Atom paper's lognormal prompts / uniform totals; sharegpt: ShareGPT lengths; "
                        "fixed: --input-len / --output-len (default synthetic)")
    w.add_argument("--num-requests", type=int, default=256)
    w.add_argument("--max-len", type=int, default=2048, help="synthetic: the longest request, prompt + output")
    w.add_argument("--input-len", type=int, default=512, help="fixed: prompt tokens per request")
    w.add_argument("--output-len", type=int, default=128, help="fixed: output tokens per request")
    w.add_argument("--sharegpt-path", default=None, help="the ShareGPT length CSV (default: in the offline data)")
    w.add_argument("--sharegpt-max-prompt", type=int, default=1024,
                   help="keep rows with at most this many prompt tokens (0 = no limit; default 1024, vLLM's)")
    w.add_argument("--sharegpt-max-total", type=int, default=2048,
                   help="keep rows with prompt + output at most this (0 = no limit; default 2048, vLLM's)")
    w.add_argument("--seed", type=int, default=None,
                   help="workload seed (default: the paper's PCG64 seed for synthetic, 0 otherwise); also the "
                        "prompt ids' seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atomq", description="Atom W4A4 quantization, evaluation and serving")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a Hugging Face model and write an atomq checkpoint")
    q.add_argument("--model", required=True, help="HF directory, .gguf file, or 'smollm2' (the bundled model)")
    q.add_argument("--out", required=True, help="checkpoint directory to write")
    q.add_argument("--preset", default="atom", choices=sorted(PRESETS), help="recipe (default atom)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")
    q.add_argument("--data-dir", default=None, help="offline data directory (default: ../shared/data)")
    _add_dataclass_flags(q.add_argument_group("quantization (override the preset)"), QuantConfig)
    _add_dataclass_flags(q.add_argument_group("calibration"), CalibConfig)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="accuracy evaluation").add_subparsers(dest="eval_command", required=True)
    pp = e.add_parser("ppl", help="perplexity (ATOM.md protocol: non-overlapping windows of the joined text)")
    pp.add_argument("--model", required=True, help="atomq checkpoint, HF directory, .gguf file or 'smollm2'")
    pp.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, or a .txt / .jsonl path")
    pp.add_argument("--seq-len", type=int, default=2048)
    pp.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    pp.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (bfloat16 default: fast on CPU; float16 on GPU)")
    pp.add_argument("--data-dir", default=None)
    pp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pp.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model runs")
    _add_kv_overrides(pp)
    pp.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    pp.set_defaults(func=_cmd_eval_ppl)

    zs = e.add_parser("zeroshot", help="zero-shot accuracy, lm-eval style log-likelihood of each choice")
    zs.add_argument("--model", required=True, help="atomq checkpoint, HF directory, .gguf file or 'smollm2'")
    zs.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande",
                    help="comma-separated (default: Atom's six)")
    zs.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    zs.add_argument("--batch-size", type=int, default=16, help="requests per forward")
    zs.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (bfloat16 default: fast on CPU; float16 on GPU)")
    zs.add_argument("--data-dir", default=None)
    zs.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    zs.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the model runs")
    _add_kv_overrides(zs)
    zs.add_argument("--json", default=None, help="append the results as one JSON line to this file")
    zs.set_defaults(func=_cmd_eval_zeroshot)


    g = sub.add_parser("generate", help="generate text with the serving engine (paged KV cache, continuous batching)")
    g.add_argument("--model", required=True, help=_MODEL_HELP)
    g.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for a batch)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least this times as likely as the top one")
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS / stop before this many tokens")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--logprobs", type=int, default=None,
                   help="print each token's log-probability and this many most likely alternatives (0-20)")
    g.add_argument("--prompt-logprobs", type=int, default=None,
                   help="print each prompt token's log-probability (given the tokens before it), this many "
                        "alternatives (0-20), and the prompt's perplexity")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto | int4 | fp8 | fp16 | model (auto: int4 when the model quantizes its KV to 4 bits, "
                        "else the model's dtype; a random spec sets its own)")
    g.add_argument("--kv-cache-bytes", type=int, default=None, help="KV budget in bytes (default: measured)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of device memory (CPU: of available RAM) the model and KV pool may use")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    _add_async_flag(g)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, float16 on CUDA)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.set_defaults(func=_cmd_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, models, health, metrics)")
    sv.add_argument("--model", required=True, help=_MODEL_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $ATOMQ_API_KEY)")
    sv.add_argument("--served-model-name", default=None,
                    help="the model id clients send (default: the path's name; a random spec's whole string)")
    sv.add_argument("--warmup", action="store_true",
                    help="before listening, run requests through every decode batch size (kernels compiled, "
                         "CUDA graphs captured) so that the first clients do not pay for it")
    sv.add_argument("--max-waiting", type=int, default=256,
                    help="sequences that may wait beyond --max-num-seqs; more get 429 (default 256)")
    sv.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's)")
    sv.add_argument("--shutdown-timeout", type=float, default=None,
                    help="on SIGINT / SIGTERM, abort requests still running after this many seconds (default: wait)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument("--kv-cache-dtype", default="auto",
                    help="auto | int4 | fp8 | fp16 | model (as for generate; a random spec sets its own)")
    sv.add_argument("--kv-cache-bytes", type=int, default=None, help="KV budget in bytes (default: measured)")
    sv.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    sv.add_argument("--max-model-len", type=int, default=None)
    sv.add_argument("--max-num-seqs", type=int, default=64)
    sv.add_argument("--max-num-batched-tokens", type=int, default=2048)
    _add_async_flag(sv)
    sv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    sv.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sv.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sv.set_defaults(func=_cmd_serve)

    i = sub.add_parser("inspect", help="print a checkpoint's config and tensor table")
    i.add_argument("checkpoint")
    i.add_argument("--all", action="store_true", help="list every tensor, not only layer 0")
    i.set_defaults(func=_cmd_inspect)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bk = b.add_parser("kernels", help="W4A4 GEMM, quantize and paged attention against baselines (CUDA)")
    bk.add_argument("--what", default="all", choices=["all", "gemm", "attention"])
    bk.add_argument("--out", default="runs/bench-kernels", help="directory for the JSON results")
    bk.set_defaults(func=_cmd_bench_kernels)

    bt = b.add_parser("throughput", help="offline engine throughput: FP16 / FP8 / W4A16 / Atom, whole device and a "
                                         "24 GB budget (random weights of real shapes)")
    bt.add_argument("--models", default="llama-2-7b",
                    help="comma-separated random-weight shapes: llama-2-7b, llama-2-13b, llama-2-70b, mixtral-8x7b "
                         "(tiny-llama, tiny-mixtral for tests)")
    bt.add_argument("--configs", default="fp16,fp8,w4a16,atom", help="comma-separated: fp16, fp8, w4a16, atom (the default), rot-outliers, atomq-plus, atom-a8, atom-levels and atomq-plus-levels")
    bt.add_argument("--budgets", default="full,24GB",
                    help="comma-separated: full (the whole device) and/or <N>GB (weights + KV + reserve <= N GiB)")
    bt.add_argument("--reserve-gb", type=float, default=2.0,
                    help="GiB of a capped budget kept for activations, workspaces, CUDA context (default 2)")
    bt.add_argument("--max-num-seqs", default="256", help="comma-separated sweep of the engine's batch limit")
    bt.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    _add_async_flag(bt)
    bt.add_argument("--max-model-len", type=int, default=None,
                    help="default: the workload's longest request rounded up to 16")
    bt.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of the device for 'full'")
    bt.add_argument("--time-limit", type=float, default=None,
                    help="seconds per run; unfinished requests are then aborted and the row says 'time limit'")
    bt.add_argument("--total-time-limit", type=float, default=None,
                    help="seconds for the whole comparison: the run going at the end is cut short, later runs are "
                         "'skipped' (their rows still written)")
    bt.add_argument("--no-warmup", action="store_true", help="measure cold engines (kernel compiles included)")
    bt.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bt.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                    help="model dtype (auto: float16 on CUDA, float32 on CPU)")
    bt.add_argument("--out", default="runs/bench-throughput/results.json", help="JSON results, rewritten per run")
    _add_workload_flags(bt)
    bt.set_defaults(func=_cmd_bench_throughput)

    bs = b.add_parser("serving", help="online serving: Poisson arrivals against the HTTP server, latency percentiles")
    bs.add_argument("--url", default=None, help="an already running server, e.g. http://127.0.0.1:8000")
    bs.add_argument("--model", default=None,
                    help="launch 'atomq serve --model MODEL' for the benchmark instead (a checkpoint, or "
                         "random:SHAPE:CONFIG, e.g. random:llama-2-7b:atom: random weights served as bench "
                         "throughput's configuration)")
    bs.add_argument("--no-server-warmup", action="store_true",
                    help="launch the server without --warmup (its first requests then compile kernels and "
                         "capture CUDA graphs)")
    bs.add_argument("--port", type=int, default=8321, help="port of the launched server")
    bs.add_argument("--serve-arg", action="append", default=None,
                    help="extra argument for the launched atomq serve (repeatable), "
                         "e.g. --serve-arg=--kv-cache-dtype=int4")
    bs.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server's /health")
    bs.add_argument("--served-model", default=None, help="model id to send (default: the server's first)")
    bs.add_argument("--label", default=None,
                    help="the configuration's name in the results (default: a random spec's configuration, "
                         "else 'server')")
    bs.add_argument("--api-key", default=None, help="bearer token (default: $ATOMQ_API_KEY)")
    bs.add_argument("--rates", default="1,2,4,8,inf",
                    help="comma-separated request rates in requests/s; inf = every request at t=0")
    bs.add_argument("--vocab-size", type=int, default=256,
                    help="prompt token ids are drawn from [0, N) (256: valid for every model, and the bytes of "
                         "random models' byte tokenizer)")
    bs.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    bs.add_argument("--out", default="runs/bench-serving/results.json", help="JSON results, rewritten per rate")
    _add_workload_flags(bs)
    bs.set_defaults(func=_cmd_bench_serving)

    br = b.add_parser("report", help="markdown tables and plots from bench throughput / serving JSON")
    br.add_argument("results", nargs="+", help="result JSON files")
    br.add_argument("--plots", default=None, help="directory for PNG plots (needs matplotlib)")
    br.add_argument("--out", default=None, help="also write the markdown here")
    br.set_defaults(func=_cmd_bench_report)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"atomq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
