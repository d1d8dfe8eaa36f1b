"""Online serving benchmark: a Poisson stream of streamed /v1/completions requests against an HTTP server.

Only the server's OpenAI-compatible HTTP API is used (``atomq serve``, or any server with the same API and
vLLM's extensions): POST /v1/completions with token-id prompts, ``max_tokens`` = the workload's output
length, ``ignore_eos``, greedy, ``stream`` with ``stream_options.include_usage``; GET /health and
/v1/models. The server either runs already (a URL) or is launched as a subprocess (``ServerProcess``).

Per request rate, request i is sent at ``offset[i]``: cumulative exponential gaps of mean 1/rate (a Poisson
process, seeded); rate None sends every request at t=0. The client measures, per request (seconds, from
its send time): ttft = the first streamed chunk, e2e = the end of the stream, tpot = (e2e - ttft) /
(completion tokens - 1), the completion tokens being the server's usage count.

Row fields (one per rate; times in seconds):
  model, config (a label for the server's configuration), url, request_rate (req/s; None = all at t=0),
  num_requests, completed, failed, status ("ok" | "errors" | "time limit": requests cut at the rate's
  time limit), reason (the first error),
  duration_s (first send to last response), prompt_tokens, output_tokens (completed requests, server's usage),
  output_tok_s, total_tok_s, requests_per_s, ttft_s / tpot_s / e2e_s: bench/metrics.summarize dicts.

httpx is imported when a benchmark runs, so this module imports without it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .metrics import summarize
from .workloads import Workload


def poisson_offsets(n: int, rate: float | None, seed: int = 0) -> np.ndarray:
    """Send times in seconds of n requests: 0 for the first, then exponential gaps of mean 1 / rate
    (rate in requests per second; None = all at 0)."""
    if rate is None:
        return np.zeros(n)
    if not rate > 0:
        raise ValueError(f"a request rate must be > 0 requests per second, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclass
class RequestResult:
    """One request as the client saw it. send_offset: scheduled send time after the run's start; ttft /
    e2e: seconds from the actual send to the first streamed chunk / the end of the stream (None when it
    failed); prompt_tokens / output_tokens: the server's usage counts; error: why it failed ("" if not)."""

    send_offset: float
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.error or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def stream_completion(client: Any, url: str, model: str, prompt: list[int], max_tokens: int,
                            result: RequestResult) -> RequestResult:
    """POST one streamed completion and fill ``result`` (errors are recorded, not raised)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error']}"
                    return result
                if event.get("choices"):
                    chunks += 1
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - t0
                if event.get("usage"):
                    result.prompt_tokens = int(event["usage"].get("prompt_tokens", 0))
                    result.output_tokens = int(event["usage"].get("completion_tokens", 0))
    except Exception as e:  # noqa: BLE001 - a failed request is a data point of the run
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - t0
    if result.ttft is None:
        result.error = "the stream carried no completion chunk"
    elif result.output_tokens == 0:
        result.error = f"the stream had no usage chunk ({chunks} chunks)"
    return result


TIME_LIMIT_ERROR = "not finished within the rate's time limit"


async def run_rate(url: str, model: str, workload: Workload, prompts: list[list[int]], rate: float | None,
                   seed: int = 0, headers: dict[str, str] | None = None, timeout_s: float = 600.0,
                   time_limit_s: float | None = None) -> dict:
    """Send the workload at ``rate`` (Poisson, seeded) and summarize it into a row (without model/config).
    time_limit_s: requests not finished this many seconds after the start are cancelled (their streams
    closed, which aborts them on the server) and count as failed with TIME_LIMIT_ERROR."""
    import httpx

    offsets = poisson_offsets(len(workload), rate, seed)
    results = [RequestResult(float(t)) for t in offsets]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            return await stream_completion(client, url, model, prompts[i], int(workload.output_lens[i]), results[i])

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(results))]
        _, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    for r in results:
        if r.e2e is None and not r.error:  # cancelled before its stream ended (or before it was sent)
            r.error = TIME_LIMIT_ERROR
    return summarize_rate(results, workload, rate, duration)


def summarize_rate(results: list[RequestResult], workload: Workload, rate: float | None, duration: float) -> dict:
    """The row fields of one rate from its request results (see the module docstring)."""
    done = [r for r in results if not r.error]
    failed = [r for r in results if r.error]
    out = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    return {
        "request_rate": rate, "num_requests": len(results), "completed": len(done), "failed": len(failed),
        "status": _status(failed), "reason": failed[0].error if failed else "",
        "duration_s": duration, "prompt_tokens": prompt, "output_tokens": out,
        "output_tok_s": out / duration, "total_tok_s": (prompt + out) / duration,
        "requests_per_s": len(done) / duration,
        "ttft_s": summarize(r.ttft for r in done), "tpot_s": summarize(r.tpot for r in done),
        "e2e_s": summarize(r.e2e for r in done),
    }


def _status(failed: list[RequestResult]) -> str:
    if any(r.error == TIME_LIMIT_ERROR for r in failed):
        return "time limit"
    return "errors" if failed else "ok"


def served_model(url: str, headers: dict[str, str] | None = None) -> str:
    """The id of the first model GET /v1/models lists."""
    import httpx

    resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=30.0)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{url}/v1/models lists no model")
    return models[0]["id"]


def run_serving(url: str, workload: Workload, rates: list[float | None], *, model: str | None = None,
                label: str = "server", vocab_size: int = 256, seed: int = 0, api_key: str | None = None,
                timeout_s: float = 600.0, on_row: Callable[[dict], None] | None = None,
                time_limit_s: float | None = None) -> list[dict]:
    """One row per rate against the server at ``url``. Prompts are random token ids in [0, vocab_size)
    (256: valid for every model's vocabulary), drawn anew for each rate (seed + its index, also the
    Poisson seed); model: the id to send (None = the server's first); time_limit_s: per rate (run_rate)."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    model = model or served_model(url, headers)
    rows = []
    for i, rate in enumerate(rates):
        prompts = workload.prompts(vocab_size, seed + i)  # new ids per rate: no prefix-cache hits across rates
        row = {"model": model, "config": label, "url": url, "workload": workload.name,
               **asyncio.run(run_rate(url, model, workload, prompts, rate, seed + i, headers, timeout_s,
                                      time_limit_s))}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


class ServerProcess:
    """A server launched as a subprocess for the benchmark's duration: ``with ServerProcess(cmd, url):``
    starts ``cmd``, waits until GET url/health answers 200 (or the process exits, or startup_timeout_s
    passes: RuntimeError), and terminates the process (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], url: str, startup_timeout_s: float = 600.0, log_path: str | None = None):
        self.cmd, self.url, self.timeout, self.log_path = cmd, url.rstrip("/"), startup_timeout_s, log_path
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self._log = open(self.log_path, "w") if self.log_path else None
        self.proc = subprocess.Popen(self.cmd, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before answering "
                                   f"{self.url}/health" + (f" (log: {self.log_path})" if self.log_path else ""))
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer {self.url}/health within {self.timeout} s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def serve_command(model: str, port: int, extra_args: list[str] = ()) -> list[str]:
    """The ``atomq serve`` command line for a model (as the current Python runs it)."""
    return [sys.executable, "-m", "atomq.cli", "serve", "--model", model, "--port", str(port), *extra_args]
