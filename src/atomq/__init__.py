"""atomq: Atom W4A4 + INT4 KV quantization of LLMs, with Triton kernels for Hopper and a serving engine."""

__version__ = "0.1.0"

_LAZY = {"LLM": "atomq.engine.llm", "SamplingParams": "atomq.engine.sequence",
         "RequestOutput": "atomq.engine.sequence"}


def __getattr__(name: str):
    """``atomq.LLM`` / ``atomq.SamplingParams`` import the engine on first use, so ``import atomq`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'atomq' has no attribute {name!r}")
