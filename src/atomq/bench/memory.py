"""Memory accounting of the throughput benchmark: weight bytes, whether a configuration fits a memory
budget and how much KV cache it gets there, and peak memory.

A budget is either the whole device (the engine's own sizing: KV = device memory * utilization - memory
in use after loading, so the unused share is the activation reserve) or a cap on weights + KV cache +
a stated activation reserve. The Atom paper's setting is a 24 GB GPU (an RTX 4090, 24 GiB): there
``KV budget = 24 GiB - weight bytes - reserve``. A configuration fits when its KV budget holds at least
one request of ``max_model_len`` tokens (what the engine needs to start); otherwise the benchmark
writes a "does not fit" row with the numbers instead of failing.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch

GiB = 2**30
DEFAULT_RESERVE_BYTES = 2 * GiB  # activations of a 2048-token step, cuBLAS / Triton workspaces, CUDA context


@dataclass(frozen=True)
class Budget:
    """name: the label in tables ("full", "24GB"); cap_bytes: bytes for weights + KV cache + reserve
    (None = the whole device, sized by the engine); reserve_bytes: bytes of the cap set aside for
    activations, workspaces and the CUDA context (unused when cap_bytes is None)."""

    name: str
    cap_bytes: int | None = None
    reserve_bytes: int = DEFAULT_RESERVE_BYTES

    def __post_init__(self) -> None:
        if self.cap_bytes is not None and self.cap_bytes <= 0:
            raise ValueError(f"budget {self.name!r}: cap_bytes must be > 0, got {self.cap_bytes}")
        if self.reserve_bytes < 0:
            raise ValueError(f"budget {self.name!r}: reserve_bytes must be >= 0, got {self.reserve_bytes}")

    def to_dict(self) -> dict:
        return {"budget": self.name, "cap_bytes": self.cap_bytes,
                "reserve_bytes": self.reserve_bytes if self.cap_bytes is not None else None}


FULL = Budget("full")


@dataclass(frozen=True)
class MemoryPlan:
    """How a model meets a budget. All sizes in bytes. weight_bytes: the weights as they run;
    kv_budget_bytes: what is left for the KV cache (may be negative); min_kv_bytes: one max_model_len
    request (rounded up to whole blocks); kv_tokens: tokens the KV budget holds (whole blocks, 0 when it
    does not fit); fits: kv_budget_bytes >= min_kv_bytes; reason: why not ("" when it fits)."""

    weight_bytes: int
    kv_budget_bytes: int
    min_kv_bytes: int
    kv_tokens: int
    fits: bool
    reason: str


def plan_memory(budget: Budget, weight_bytes: int, kv_bytes_per_token: int, max_model_len: int,
                available_kv_bytes: int, block_size: int = 16) -> MemoryPlan:
    """The KV budget of a model with ``weight_bytes`` under ``budget``.

    kv_bytes_per_token: K and V of one token over all layers (kv_pool.bytes_per_token * layers);
    available_kv_bytes: what the device itself offers the KV pool once the model is loaded (the engine's
    measurement, or a prediction before loading); a cap never gives more than that.
    """
    if kv_bytes_per_token <= 0 or max_model_len < 1:
        raise ValueError("kv_bytes_per_token and max_model_len must be positive")
    kv = available_kv_bytes
    if budget.cap_bytes is not None:
        kv = min(kv, budget.cap_bytes - weight_bytes - budget.reserve_bytes)
    block_bytes = kv_bytes_per_token * block_size
    min_kv = -(-max_model_len // block_size) * block_bytes
    fits = kv >= min_kv
    tokens = (kv // block_bytes) * block_size if fits else 0
    reason = ""
    if not fits:
        fb = format_bytes
        need = f"one {max_model_len}-token request needs {fb(min_kv)} of KV cache"
        if budget.cap_bytes is not None and kv < available_kv_bytes:
            reason = (f"{fb(weight_bytes)} of weights + {fb(budget.reserve_bytes)} reserve leave {fb(kv)} of the "
                      f"{fb(budget.cap_bytes)} budget for the KV cache; {need}")
        else:
            reason = f"{fb(weight_bytes)} of weights leave {fb(kv)} of device memory for the KV cache; {need}"
    return MemoryPlan(int(weight_bytes), int(kv), int(min_kv), int(tokens), fits, reason)


def format_bytes(n: int) -> str:
    """Bytes in the largest decimal unit that keeps them >= 1 (GB, MB, kB), two decimals."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds, prepared kernel operands included (model/methods.py)."""
    from ..model.methods import weight_nbytes

    return weight_nbytes(model)["total"]


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device: a CUDA GPU's, or the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def reset_peak(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): on CUDA the allocator's peak since ``reset_peak`` (tensors only: no CUDA
    context, no cached free blocks); on CPU the process's peak resident set since it started."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def parse_budget(text: str, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> Budget:
    """'full' (the whole device) or '<N>GB' (a cap of N GiB, e.g. '24GB') with the given reserve."""
    name = text.strip()
    if name.lower() == "full":
        return FULL
    number = name[:-2] if name.upper().endswith("GB") else ""
    try:
        cap = float(number)
    except ValueError:
        cap = 0.0
    if cap <= 0:
        raise ValueError(f"a memory budget is 'full' or '<N>GB' (N GiB, e.g. 24GB), got {text!r}")
    return Budget(name, int(cap * GiB), reserve_bytes)
