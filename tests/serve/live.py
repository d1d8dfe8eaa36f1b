"""Live servers on loopback for the serve tests: uvicorn in a background thread over a tiny model.

``serving(lm, **options)`` serves a LoadedModel on 127.0.0.1 (a free port) for the length of a ``with``
block and stops it like a real shutdown (SIGTERM does the same: uvicorn drains, then the engine).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

# A ChatML-style template: the tiny test tokenizer has none of its own
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
ENGINE = dict(kv_cache_bytes=1 << 22, max_model_len=128)  # fp32 pages: 512 blocks of 16 tokens
MODEL_NAME = "tiny-llama"
APP_OPTIONS = ("api_key", "max_waiting", "chat_template", "shutdown_timeout", "model_name")


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Any
    uvicorn: Any
    thread: threading.Thread

    @property
    def bridge(self):
        return self.app.state.atomq.bridge

    def call(self, fn, timeout: float = 30.0):
        """fn(engine), run in the engine thread between steps (safe while requests are in flight)."""
        return self.bridge.call_threadsafe(fn).result(timeout)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextlib.contextmanager
def serving(lm: Any, *, step_delay: float = 0.0, **options: Any) -> Iterator[LiveServer]:
    """Keywords: EngineConfig fields and create_app options (APP_OPTIONS); step_delay: seconds each
    engine step sleeps first, so that timing-dependent tests (disconnects, full queues) are deterministic."""
    import uvicorn

    from atomq import LLM
    from atomq.serve.app import create_app

    app_options = {"model_name": MODEL_NAME, **{k: options.pop(k) for k in list(options) if k in APP_OPTIONS}}
    engine = LLM(lm, **{**ENGINE, **options}).engine
    if step_delay:
        step = engine.step

        def slow_step():
            time.sleep(step_delay)
            return step()

        engine.step = slow_step
    app = create_app(engine, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=app_options.get("shutdown_timeout")))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(f"http://127.0.0.1:{port}", app, server, thread)
    try:
        yield live
    finally:
        live.stop()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def sample(live: LiveServer, name: str, **labels: str) -> float:
    """A metric's current value from the server's Prometheus registry (0 when not yet created)."""
    value = live.app.state.atomq.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def assert_no_leaks(live: LiveServer, timeout: float = 10.0) -> None:
    """Wait until the engine is idle, then check that every KV block is free and the invariants hold."""
    wait_until(lambda: not live.call(lambda e: e.has_unfinished()) and live.bridge.outstanding == 0, timeout,
               "the engine to go idle")
    free, total = live.call(lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks))
    assert free == total, f"{total - free} KV blocks leaked"
    live.call(lambda e: e.block_manager.check([]))
