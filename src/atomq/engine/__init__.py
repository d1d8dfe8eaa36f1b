"""Serving engine: sequences, paged KV blocks, scheduler, KV pool, model runner, sampler, offline API.

Pure-Python parts (sequence, block_manager, scheduler) import no torch; ``LLM`` pulls in the model.
"""

from __future__ import annotations

_LAZY = {"LLM": "llm", "LLMEngine": "llm", "EngineConfig": "llm", "SamplingParams": "sequence",
         "RequestOutput": "sequence"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
