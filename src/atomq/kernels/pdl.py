"""Programmatic dependent launch (Hopper): a kernel starts while the one ahead of it finishes.

On sm_90 and later a kernel launched with ``launch_pdl=True`` may begin before the kernel ahead of it in
the stream has completed: its programs become resident and run up to ``gdc_wait``, which returns once
that kernel has completed and its writes are visible. At batch 1 a decode step is ~360 short kernels,
each paying a launch and a ramp-up; this hides them behind the tail of the kernel before (CUDA graphs
keep the dependency). Every kernel launched this way (``USE_GDC``) keeps one protocol:

- before ``gdc_wait`` it stores nothing and loads only what the kernel ahead does not write: weights,
  inputs made at the step's start (staged metadata, RoPE's cos / sin), and (decode attention) the pages
  of tokens older than the step's own, whose newest token the KV store ahead writes;
- right after it, ``gdc_launch_dependents`` lets the next kernel launch, which in turn waits for this
  one: the chain of waits still orders every kernel after all those before it.

``ATOMQ_PDL=0`` turns it off (read once per process).
"""

from __future__ import annotations

import functools
import os

import torch

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@functools.lru_cache(maxsize=None)
def _enabled(device_type: str, index: int) -> bool:
    if device_type != "cuda" or triton is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("ATOMQ_PDL", "1") == "0":
        return False
    if not hasattr(tl.extra.cuda, "gdc_wait"):  # Triton releases before grid dependency control
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


# RoPE and the KV store load their staged inputs (cos / sin, slots) before the wait (False: after it, for A/B)
PRELOAD_STAGED = True


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch on ``device``: ``USE_GDC`` (the kernel's constexpr) and,
    when programmatic dependent launch is on, ``launch_pdl``."""
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    if _enabled(device.type, index or 0):
        return {"USE_GDC": True, "launch_pdl": True}
    return {"USE_GDC": False}


if triton is not None:

    @triton.jit
    def gdc_enter(USE_GDC: tl.constexpr):
        """Wait until the kernel ahead has completed (its writes visible), then let the next one launch."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
