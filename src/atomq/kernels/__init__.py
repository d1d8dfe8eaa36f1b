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
    "silu_mul_rotate": ("hadamard", "silu_mul_rotate"),
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
    """Make Triton's CPU interpreter work with numpy >= 2 and Triton 3.9 (idempotent; a no-op outside the
    interpreter).

    - The interpreter holds scalar kernel arguments as 1-element arrays and converts them with ``int()``
      when they bound a ``range`` loop, which numpy 2 rejects; this converts through ``.item()`` instead.
    - Triton 3.9's interpreter can carry an int1 mask as an int32 array (a row mask ``&`` a scalar flag),
      which its load / store then refuse; masks are handed to them as numpy bools.
    """
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    import numpy as np
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

    builder = interpreter.InterpreterBuilder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    def as_bool(mask):
        if mask.data.dtype == np.bool_:
            return mask
        return interpreter.TensorHandle(mask.data.astype(np.bool_), mask.dtype)

    builder.create_masked_load = lambda self, ptrs, mask, *a, **kw: masked_load(self, ptrs, as_bool(mask), *a, **kw)
    builder.create_masked_store = lambda self, ptrs, value, mask, *a, **kw: masked_store(
        self, ptrs, value, as_bool(mask), *a, **kw)
