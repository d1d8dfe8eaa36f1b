"""Kernels: Triton ops for Hopper and their plain-PyTorch twins in ``ref.py``.

Nothing here imports triton at import time. ``KERNELS`` maps an op name to (Triton module, function);
``get_op(name, backend)`` returns the Triton op or its ``ref`` twin.
"""

from __future__ import annotations

import importlib

KERNELS: dict[str, tuple[str, str]] = {
    "rmsnorm_quantize": ("quantize", "rmsnorm_quantize"),
    "quantize_act": ("quantize", "quantize_act"),
    "silu_mul_quantize": ("quantize", "silu_mul_quantize"),
    "w4a4_gemm": ("w4a4_gemm", "w4a4_gemm"),
    "rotate_online": ("hadamard", "rotate_online"),
}


def get_op(name: str, backend: str = "triton"):
    """The op ``name`` from the Triton kernels (backend 'triton') or from ref.py (backend 'ref')."""
    if backend == "ref":
        from . import ref

        return getattr(ref, name)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'ref', got {backend!r}")
    if name not in KERNELS:
        raise KeyError(f"no Triton kernel for {name!r}; known: {sorted(KERNELS)}")
    module, fn = KERNELS[name]
    return getattr(importlib.import_module(f".{module}", __name__), fn)


def interpreter_compat() -> None:
    """Make Triton's CPU interpreter work with numpy >= 2 (idempotent; a no-op outside the interpreter).

    The interpreter holds scalar kernel arguments as 1-element arrays and converts them with ``int()``
    when they bound a ``range`` loop, which numpy 2 rejects; this converts through ``.item()`` instead.
    """
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter

    scope_cls = interpreter._LangPatchScope
    if getattr(scope_cls, "_atomq_compat", False):
        return
    original = scope_cls.set_attr

    def set_attr(self, obj, name, value):
        if name == "__index__":
            value = lambda t: int(t.handle.data.reshape(-1)[0])  # noqa: E731
        original(self, obj, name, value)

    scope_cls.set_attr = set_attr
    scope_cls._atomq_compat = True
