"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

HTTP requests by route and status come from an ASGI middleware; tokens, queue length, KV usage,
preemptions and per-sequence latencies (time to first token, time per output token, end to end) from
the engine thread.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.sequence import RequestMetrics

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The server's counters, gauges and histograms; the ``on_*`` hooks are the engine bridge's."""

    def __init__(self, routes: tuple[str, ...] = ()):
        self.registry = CollectorRegistry()
        self.routes = frozenset(routes)
        r = self.registry
        self.http_requests = Counter("atomq_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=r)
        self.prompt_tokens = Counter("atomq_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("atomq_generation_tokens", "tokens generated", registry=r)
        self.sequences_finished = Counter("atomq_sequences_finished", "sequences (choices) finished, by reason",
                                          ["finish_reason"], registry=r)
        self.preemptions = Counter("atomq_preemptions", "times a running sequence was preempted (recomputed later)",
                                   registry=r)
        self.waiting = Gauge("atomq_num_sequences_waiting", "sequences in the waiting queue", registry=r)
        self.running = Gauge("atomq_num_sequences_running", "sequences being generated", registry=r)
        self.kv_usage = Gauge("atomq_kv_cache_usage_ratio", "fraction of the KV cache's blocks in use", registry=r)
        self.ttft = Histogram("atomq_time_to_first_token_seconds", "arrival to first output token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("atomq_time_per_output_token_seconds", "mean time between output tokens",
                              buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("atomq_e2e_request_latency_seconds", "arrival to finish", buckets=_LATENCY,
                             registry=r)

    def render(self) -> tuple[bytes, str]:
        """(exposition text, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # engine-thread hooks -------------------------------------------------------------------------
    def on_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def on_tokens(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)

    def on_finished(self, seq: Any) -> None:
        """A sequence finished (or was aborted): count it; time the ones that ran to the end."""
        self.sequences_finished.labels(seq.finish_reason).inc()
        self.preemptions.inc(seq.num_preemptions)
        if seq.finish_reason == "abort":
            return
        m = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, len(seq.output_token_ids))
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        if m.finish_time is not None:
            self.e2e.observe(m.finish_time - m.arrival_time)

    def on_step(self, engine: Any) -> None:
        self.waiting.set(engine.num_waiting)
        self.running.set(engine.num_running)
        self.kv_usage.set(engine.kv_usage)


class HTTPMetricsMiddleware:
    """ASGI middleware: count every HTTP response by route (unknown paths as "other") and status."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.metrics.routes else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
