"""Per-layer paged K/V pools (int4 / fp8 / fp16, or the model's own float dtype) and their sizing.

The page layout is the one of ``kernels/kv_cache.py`` (HND, 16-token pages; docs/KERNELS.md). The pool
also carries the ops that read and write it: on CUDA the Triton store / decode / prefill kernels, on
CPU their plain-PyTorch twins in ``kernels/ref.py``. ``model/paged.py`` calls them through ``ops``.

Sizing: ``num_blocks = budget // (block_size * bytes_per_token * n_layers)`` where bytes per token count
K and V with their INT4 scales and zeros. The budget is explicit (``kv_cache_bytes``) or measured:
on CUDA ``total * gpu_memory_utilization - used`` after the model is loaded, on CPU the same fraction
of the memory the OS reports available, at most ``CPU_KV_CAP`` (4 GiB). CPU pools are allocated
uninitialized, so only the pages actually written cost resident memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..kernels import ref
from ..kernels.kv_layout import PagedKVCache

BLOCK_SIZE = 16
CPU_KV_CAP = 4 << 30
KV_CACHE_DTYPES = ("auto", "int4", "fp8", "fp16", "model")


@dataclass(frozen=True)
class PagedOps:
    """The ops of the serving forward, Triton kernels or their ref.py twins (same signatures):
    store(cache, k, v, slot_mapping); decode(q, cache, block_table, seq_lens, sm_scale);
    prefill(q, cache, cu_seqlens_q, cached_lens, block_table, sm_scale); rmsnorm(x, weight, eps, residual);
    rope_(x, cos, sin) in place; silu_mul(gate_up)."""

    store: Callable[..., Any]
    decode: Callable[..., Any]
    prefill: Callable[..., Any]
    backend: str
    rmsnorm: Callable[..., Any] = ref.rmsnorm
    rope_: Callable[..., Any] = ref.rope_
    silu_mul: Callable[..., Any] = ref.silu_mul


ATTENTION_BACKENDS = ("auto", "triton", "ref")


MIN_KERNEL_HEAD_DIM = 32  # the prefill kernel's tl.dot runs over head_dim / 2 channels: 16 at least


def kernels_take_head_dim(head_dim: int) -> bool:
    """The attention kernels take heads of a power of two >= MIN_KERNEL_HEAD_DIM (64 and 128 in practice)."""
    return head_dim >= MIN_KERNEL_HEAD_DIM and not head_dim & (head_dim - 1)


def paged_ops(device: torch.device, backend: str = "auto", head_dim: int = MIN_KERNEL_HEAD_DIM) -> PagedOps:
    """'auto': the Triton kernels on CUDA (when Triton imports and they take the head size), the reference
    ops elsewhere; 'triton' forces the kernels (on CPU they need TRITON_INTERPRET=1); 'ref' forces the
    reference ops."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    kernels_fit = kernels_take_head_dim(head_dim)
    if backend == "triton" and not kernels_fit:
        raise ValueError(f"the attention kernels need head_dim a power of two >= {MIN_KERNEL_HEAD_DIM} "
                         f"(tensor-core dots over half a head), got {head_dim}; use attention_backend='ref'")
    if backend == "triton" or (backend == "auto" and torch.device(device).type == "cuda" and kernels_fit):
        try:
            from ..kernels import elementwise as E
            from ..kernels.decode_attention import paged_decode_attention
            from ..kernels.kv_cache import kv_store
            from ..kernels.prefill_attention import paged_prefill_attention

            return PagedOps(kv_store, paged_decode_attention, paged_prefill_attention, "triton",
                            E.rmsnorm, E.rope_, E.silu_mul)
        except ImportError:
            if backend == "triton":
                raise ValueError("attention backend 'triton' needs the triton package") from None
    return PagedOps(ref.kv_store_ref, ref.paged_decode_attention_ref, ref.paged_prefill_attention_ref, "ref")


def resolve_kv_dtype(kv_cache_dtype: str, model_kv_bits: int | None) -> str:
    """'auto' follows the model's QuantConfig: int4 when kv_bits == 4, else the model's float dtype."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv cache dtype {kv_cache_dtype!r}; choose one of {KV_CACHE_DTYPES}")
    if kv_cache_dtype != "auto":
        return kv_cache_dtype
    if model_kv_bits == 4:
        return "int4"
    if model_kv_bits is not None:
        raise ValueError(f"the model's kv_bits={model_kv_bits} has no paged cache; pass kv_cache_dtype "
                         f"int4, fp8, fp16 or model")
    return "model"


def bytes_per_token(num_kv_heads: int, head_dim: int, mode: str, model_dtype: torch.dtype) -> int:
    """Bytes of K plus V for one token of one layer, INT4 scales (fp16) and zeros (uint8) included."""
    if mode == "int4":
        return 2 * num_kv_heads * (head_dim // 2 + 3)
    elem = {"fp16": 2, "fp8": 1}.get(mode) or torch.empty((), dtype=model_dtype).element_size()
    return 2 * num_kv_heads * head_dim * elem


def available_bytes(device: torch.device, utilization: float) -> int:
    """Measured budget for the KV pool: on CUDA ``total * utilization - in use``; on CPU a fraction of the
    available RAM, capped at CPU_KV_CAP."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total * utilization - (total - free))
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = CPU_KV_CAP
    return min(int(avail * utilization), CPU_KV_CAP)


class KVPool:
    """K/V pools of every layer: ``caches[layer]`` (a PagedKVCache) and the ``ops`` that use them."""

    def __init__(self, n_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, mode: str,
                 device: torch.device, model_dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE,
                 backend: str = "auto"):
        if mode not in KV_CACHE_DTYPES or mode == "auto":
            raise ValueError(f"unknown kv cache mode {mode!r}; choose one of {KV_CACHE_DTYPES[1:]}")
        if mode == "int4" and head_dim % 2:
            raise ValueError(f"an INT4 cache needs an even head_dim, got {head_dim}")
        self.mode, self.num_blocks, self.block_size = mode, num_blocks, block_size
        self.device = torch.device(device)
        self.ops = paged_ops(self.device, backend, head_dim)
        if self.ops.backend == "triton" and mode == "model":
            raise ValueError("kv cache dtype 'model' runs on the reference ops only; use fp16, fp8 or int4 "
                             "with the Triton kernels")
        self.bytes_per_token = bytes_per_token(num_kv_heads, head_dim, mode, model_dtype) * n_layers
        self.caches = [self._allocate(num_blocks, num_kv_heads, head_dim, mode, model_dtype) for _ in range(n_layers)]

    def _allocate(self, nb: int, h: int, d: int, mode: str, model_dtype: torch.dtype):
        dev, bs = self.device, self.block_size
        if self.ops.backend == "triton":
            from ..kernels.kv_cache import allocate_kv_cache

            return allocate_kv_cache(nb, h, d, mode, dev, bs)
        if mode == "int4":
            meta = lambda dt: torch.empty(nb, h, bs, dtype=dt, device=dev)  # noqa: E731
            pool = lambda: torch.empty(nb, h, bs, d // 2, dtype=torch.uint8, device=dev)  # noqa: E731
            return PagedKVCache(mode, pool(), pool(), meta(torch.float16), meta(torch.float16),
                         meta(torch.uint8), meta(torch.uint8), bs)
        dt = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}.get(mode, model_dtype)
        k, v = (torch.empty(nb, h, bs, d, dtype=dt, device=dev) for _ in range(2))  # slots valid once written
        if mode == "fp8":  # per-head scale 1.0: e4m3 covers |x| <= 448 at 3 mantissa bits
            ones = lambda: torch.ones(h, dtype=torch.float32, device=dev)  # noqa: E731
            return PagedKVCache(mode, k, v, ones(), ones(), block_size=bs)
        return PagedKVCache("fp16", k, v, block_size=bs)  # "fp16" mode of the ref ops: a plain float pool

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.caches
                   for t in (c.k, c.v, c.k_scale, c.v_scale, c.k_zero, c.v_zero) if t is not None)


def num_blocks_for(budget_bytes: int, bytes_per_token_all_layers: int, block_size: int = BLOCK_SIZE) -> int:
    """How many pages fit in budget_bytes (raises when not even one does)."""
    n = int(budget_bytes) // (bytes_per_token_all_layers * block_size)
    if n < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {block_size} tokens "
                         f"({bytes_per_token_all_layers} bytes per token over all layers)")
    return n
