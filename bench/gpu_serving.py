"""Online serving comparison over HTTP: one ``atomq serve`` per configuration, Poisson request rates.

For each configuration (model/random_weights.CONFIGS: fp16, fp8, w4a16, atom, rot-outliers) an
``atomq serve --model random:SHAPE:CONFIG --warmup`` subprocess serves random weights of a real shape
exactly as the offline throughput benchmark runs them (stored format, linear method, KV-cache dtype); the
client of ``atomq bench serving`` (atomq/bench/serving.py) then sends the workload at each rate (streamed
/v1/completions, token-id prompts, ignore_eos). Each server start builds the model and captures the decode
CUDA graphs (warm-up), so its timings are printed. JSON per configuration: OUT/serving-CONFIG.json (the
``atomq bench report`` format; rewritten after every rate), the server's log next to it; a table last.

--total-time-limit (seconds, whole call) is respected: a configuration or rate that would not fit in what
is left is not started (its row says "skipped"); a running rate is cut at the limit ("time limit").

    PYTHONPATH=src python bench/gpu_serving.py --configs fp16,atom --rates 2,8,32,inf --num-requests 128 \\
        --out runs/bench-serving/7b
    PYTHONPATH=src python bench/gpu_serving.py --shape tiny-llama --device cpu --configs fp16 --rates inf \\
        --num-requests 8 --max-len 128 --out /tmp/serving      # the same on a CPU, in seconds

Needs torch, the package and its serve extras (fastapi, uvicorn, pydantic, prometheus_client) and httpx.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BLOCK_SIZE = 16  # the engine's KV block: max_model_len is the workload's longest request rounded up to it
SHUTDOWN_RESERVE_S = 15.0  # kept from a rate's time for stopping its server (drain, process exit)


@dataclass(frozen=True)
class Options:
    """Knobs of one comparison. device / dtype / max_num_seqs / max_num_batched_tokens /
    gpu_memory_utilization: the launched servers' engine flags (max_model_len: the workload's longest
    request rounded up to 16); vocab_size: prompt ids in [0, N) (256: bytes of the random models'
    tokenizer); seed: prompts and Poisson arrivals (rate i uses seed + i, the same for every
    configuration); port: 0 = a free one; serve_args: more ``atomq serve`` flags; total_time_limit_s:
    None = no limit."""

    shape: str = "llama-2-7b"
    device: str = "cuda"
    dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.9
    vocab_size: int = 256
    seed: int = 0
    port: int = 0
    warmup: bool = True
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    total_time_limit_s: float | None = 540.0
    serve_args: tuple[str, ...] = field(default_factory=tuple)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(opts: Options, max_model_len: int) -> list[str]:
    """The ``atomq serve`` flags after --model / --port."""
    args = ["--device", opts.device, "--dtype", opts.dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(opts.max_num_seqs), "--max-num-batched-tokens", str(opts.max_num_batched_tokens),
            "--gpu-memory-utilization", str(opts.gpu_memory_utilization), "--log-level", "warning"]
    return args + (["--warmup"] if opts.warmup else []) + list(opts.serve_args)


def _server_timings(log_path: Path) -> list[str]:
    """The server's own startup timings (its 'atomq serve:' lines: load, warm-up)."""
    try:
        return [line.strip() for line in log_path.read_text(errors="replace").splitlines()
                if line.startswith("atomq serve:")]
    except OSError:
        return []


def _skipped(rate: float | None, reason: str) -> dict:
    return {"request_rate": rate, "status": "skipped", "reason": reason, "completed": 0}


def rate_would_overrun(rate: float | None, num_requests: int, left_s: float) -> bool:
    """True when the rate's arrivals alone (num_requests / rate seconds on average) outlast left_s."""
    return left_s <= 0 or (rate is not None and num_requests / rate > left_s)


def serve_config(config: str, rates: list[float | None], workload, out_dir: str | os.PathLike, opts: Options,
                 stop_at: float | None = None, say: Callable[[str], None] = print,
                 start_estimate_s: float = 0.0) -> list[dict]:
    """Every rate of one configuration against a freshly launched server; returns the rows (also in
    OUT/serving-CONFIG.json). stop_at: a time.monotonic() no rate may run past; start_estimate_s: how long
    a server start is expected to take (the server is not started unless more time than that is left)."""
    from atomq.bench.results import ResultFile, env_info
    from atomq.bench.serving import ServerProcess, run_serving, serve_command
    from atomq.model_spec import parse_random_spec

    spec = parse_random_spec(f"random:{opts.shape}:{config}")  # bad names fail before a server starts
    max_len = -(-workload.max_total_len // BLOCK_SIZE) * BLOCK_SIZE
    out_dir = Path(out_dir)
    port = opts.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"serving-{config}.server.log"
    cmd = serve_command(spec.name, port, server_args(opts, max_len))
    settings = {**dataclasses.asdict(opts), "config": config, "model": spec.name, "label": spec.config.label,
                "rates": rates, "max_model_len": max_len, "command": cmd}
    out = ResultFile(out_dir / f"serving-{config}.json", "serving", env_info(opts.device), settings,
                     workload.summary())
    left = lambda: float("inf") if stop_at is None else stop_at - time.monotonic() - SHUTDOWN_RESERVE_S  # noqa: E731

    def emit(row: dict) -> None:
        row = {"model": spec.name, "config": config, "workload": workload.name, **row, **extra}
        out.add(row)
        from atomq.bench.report import describe_row

        say(f"[{config}] {describe_row(row)}")

    extra = {"server_start_s": None}
    if left() <= start_estimate_s:
        for rate in rates:
            emit(_skipped(rate, f"a server start ({start_estimate_s:.0f} s last time) would not fit in the "
                                f"total time limit ({max(left(), 0):.0f} s left)"))
        return out.data["rows"]
    t0 = time.monotonic()
    say(f"[{config}] starting {' '.join(cmd[1:])}")
    try:
        server = ServerProcess(cmd, url, min(opts.startup_timeout_s, max(1.0, left())), str(log_path))
        server.__enter__()
    except RuntimeError as e:
        for rate in rates:
            emit({"request_rate": rate, "status": "error", "reason": f"server start: {e}", "completed": 0})
        return out.data["rows"]
    extra["server_start_s"] = time.monotonic() - t0
    out.data["settings"]["server_start_s"] = extra["server_start_s"]
    say(f"[{config}] server up in {extra['server_start_s']:.1f} s (log {log_path})")
    for line in _server_timings(log_path):
        say(f"[{config}]   {line}")
    try:
        for i, rate in enumerate(rates):
            if rate_would_overrun(rate, len(workload), left()):
                emit(_skipped(rate, f"would not finish within the total time limit ({max(left(), 0):.0f} s left)"))
                continue
            t_rate = time.monotonic()
            limit = None if stop_at is None else left()
            run_serving(url, workload, [rate], label=config, vocab_size=opts.vocab_size, seed=opts.seed + i,
                        timeout_s=opts.request_timeout_s, on_row=emit, time_limit_s=limit)
            say(f"[{config}] rate {'inf' if rate is None else f'{rate:g}'} took {time.monotonic() - t_rate:.1f} s")
    finally:
        t_stop = time.monotonic()
        server.__exit__(None, None, None)
        say(f"[{config}] server stopped in {time.monotonic() - t_stop:.1f} s")
    return out.data["rows"]


def run_comparison(configs: list[str], rates: list[float | None], workload, out_dir: str | os.PathLike,
                   opts: Options, say: Callable[[str], None] = print) -> list[dict]:
    """serve_config for each configuration in order, under opts.total_time_limit_s; all rows."""
    from atomq.model_spec import parse_random_spec

    for c in configs:
        parse_random_spec(f"random:{opts.shape}:{c}")
    limit = opts.total_time_limit_s
    stop_at = None if limit is None else time.monotonic() + limit
    rows, last_start = [], 0.0
    for c in configs:
        got = serve_config(c, rates, workload, out_dir, opts, stop_at, say, start_estimate_s=last_start)
        last_start = max([last_start] + [r["server_start_s"] or 0.0 for r in got])
        rows += got
    return rows


def _ms(summary: dict | None, key: str, fmt: str = ".0f") -> str:
    return "-" if not summary else f"{summary[key] * 1e3:{fmt}}"


def table(rows: list[dict]) -> str:
    """Plain-text table: config, rate, status, completed, output tok/s, TTFT / TPOT p50 and p99, E2E p50."""
    head = ("config", "rate", "status", "completed", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
            "TPOT p99 ms", "E2E p50 s")
    lines = []
    for r in rows:
        rate = r.get("request_rate")
        e2e = r.get("e2e_s")
        lines.append((r["config"], "inf" if rate is None else f"{rate:g}", r["status"],
                      f"{r.get('completed', 0)}/{r.get('num_requests', '-')}",
                      "-" if r.get("output_tok_s") is None else f"{r['output_tok_s']:,.0f}",
                      _ms(r.get("ttft_s"), "p50"), _ms(r.get("ttft_s"), "p99"), _ms(r.get("tpot_s"), "p50", ".1f"),
                      _ms(r.get("tpot_s"), "p99", ".1f"), "-" if not e2e else f"{e2e['p50']:.2f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="fp16,atom", help="comma-separated: fp16, fp8, w4a16, atom, rot-outliers")
    p.add_argument("--rates", default="2,8,32,inf", help="comma-separated requests/s; inf = all at t=0")
    p.add_argument("--shape", default="llama-2-7b", help="random-weight shape (tiny-llama, tiny-mixtral on a CPU)")
    p.add_argument("--workload", default="synthetic", choices=["synthetic", "sharegpt", "fixed"])
    p.add_argument("--num-requests", type=int, default=128, help="requests per rate")
    p.add_argument("--max-len", type=int, default=2048, help="synthetic: the longest request, prompt + output")
    p.add_argument("--input-len", type=int, default=512, help="fixed: prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="fixed: output tokens")
    p.add_argument("--out", default="runs/bench-serving/gpu", help="directory for serving-CONFIG.json and logs")
    p.add_argument("--total-time-limit", type=float, default=540.0, help="seconds for everything (0 = no limit)")
    p.add_argument("--device", default="cuda", help="the servers' device (cpu for tiny shapes)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--vocab-size", type=int, default=256, help="prompt ids in [0, N)")
    p.add_argument("--seed", type=int, default=0, help="prompt ids and arrivals (the workload keeps its own)")
    p.add_argument("--port", type=int, default=0, help="server port (0 = a free one)")
    p.add_argument("--no-warmup", action="store_true", help="start servers without --warmup")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra atomq serve flag (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    from atomq.bench.workloads import make_workload

    if ns.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU here: try --shape tiny-llama --device cpu", file=sys.stderr)
            return 2
    workload = make_workload(ns.workload, ns.num_requests, max_len=ns.max_len, input_len=ns.input_len,
                             output_len=ns.output_len)
    rates = [None if r.lower() == "inf" else float(r) for r in _csv(ns.rates)]
    opts = Options(shape=ns.shape, device=ns.device, dtype=ns.dtype, max_num_seqs=ns.max_num_seqs,
                   max_num_batched_tokens=ns.max_num_batched_tokens, gpu_memory_utilization=ns.gpu_memory_utilization,
                   vocab_size=ns.vocab_size, seed=ns.seed, port=ns.port, warmup=not ns.no_warmup,
                   startup_timeout_s=ns.startup_timeout, request_timeout_s=ns.request_timeout,
                   total_time_limit_s=ns.total_time_limit or None, serve_args=tuple(ns.serve_arg))
    say = lambda text: print(text, flush=True)  # noqa: E731
    say(f"workload: {workload.summary()}")
    t0 = time.monotonic()
    rows = run_comparison(_csv(ns.configs), rates, workload, ns.out, opts, say)
    say(f"\n{opts.shape}, {ns.workload} workload, {ns.num_requests} requests per rate; "
        f"{time.monotonic() - t0:.0f} s in all; JSON in {ns.out}/serving-*.json\n")
    say(table(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"gpu_serving.py: error: {e}", file=sys.stderr)
        sys.exit(2)
