"""atomq: Atom W4A4 + INT4 KV quantization of LLMs, with Triton kernels for Hopper and a serving engine."""

__version__ = "0.1.0"
