"""``atomq serve``: load a model, build the app, run uvicorn (SIGINT / SIGTERM drain in-flight requests)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("atomq.serve")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def model_id(model: str) -> str:
    """The id clients name the model by: the last part of its path ('smollm2' stays 'smollm2')."""
    return os.path.basename(os.path.normpath(model)) or model


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, max_waiting: int = 256, chat_template: str | None = None,
               shutdown_timeout: float | None = None, log_level: str = "info", threads: int | None = None,
               warmup: bool = False, **llm_kwargs: Any) -> None:
    """Serve ``model`` (anything model_spec.open_llm takes: a path, 'smollm2', ``random:SHAPE:CONFIG``)
    until interrupted. llm_kwargs go to ``atomq.LLM`` (dtype, device, EngineConfig fields); chat_template
    is a path to a Jinja file; warmup: before listening, run requests through every decode batch bucket
    (kernels compiled, CUDA graphs captured), as the throughput benchmark does, so the first clients do
    not pay for it."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ValueError(f"atomq serve needs the serve extras ({exc.name} is missing): "
                         f"pip install 'atomq[serve]'") from None
    import torch

    from ..model_spec import open_llm

    if threads:
        torch.set_num_threads(threads)
    template = None
    if chat_template is not None:
        with open(chat_template) as f:
            template = f.read()
    if host not in LOOPBACK and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it", host)
    t0 = time.perf_counter()
    llm = open_llm(model, **llm_kwargs)
    _say(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    if warmup:
        from ..engine.warmup import warm_up

        _say(f"warm-up took {warm_up(llm.engine, llm.engine.lm.model.args.vocab_size, seed=0):.1f} s")
    app = create_app(llm.engine, model_name=served_model_name or model_id(model), api_key=api_key,
                     max_waiting=max_waiting, chat_template=template, shutdown_timeout=shutdown_timeout)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)


def _say(text: str) -> None:
    """A startup timing on stderr (uvicorn's own log lines follow it)."""
    print(f"atomq serve: {text}", file=sys.stderr, flush=True)
