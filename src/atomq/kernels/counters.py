"""Arrival counters for single-launch reductions (split-K GEMM and GEMV, split-sequence decode attention).

A kernel whose programs each write a partial result increments one counter per output tile; the program
that arrives last sums the partials in a fixed order, writes the output and sets the counter back to 0.
So the counters are zero between launches and one cached buffer per device serves every such kernel, as
long as they run one after another on one stream (each resets its counters before it completes; with
programmatic dependent launch, kernels/pdl.py, none touches them before the kernel ahead has completed).
"""

from __future__ import annotations

import torch

_COUNTERS: dict = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """Zeroed int32 counters [>= count] on ``device``, cached. None while a CUDA graph is being captured
    and the cache is too small (allocating then would not persist): the caller falls back to a path
    without them. Kernels running on several streams at once must not share them."""
    key = (device.type, device.index)
    t = _COUNTERS.get(key)
    if t is None or t.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        t = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = t
    return t
