"""Host lists to the device without waiting for it.

Under asynchronous scheduling the host prepares a step while the GPU runs the one before; a copy from
pageable memory may wait for the work already queued on the stream (the driver stages larger ones only
after a stream sync), so every host-to-device copy of a step goes through pinned memory.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device`` (pinned and copied asynchronously on CUDA; no copy on the CPU)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
