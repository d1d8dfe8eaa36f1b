"""The paged KV cache's description, importable without Triton (layout: kv_cache.py's docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 16
KV_MODES = ("fp16", "fp8", "int4")
KV_LAYOUTS = ("HND", "NHD")


@dataclass
class PagedKVCache:
    """One layer's paged K and V pools (layout in kernels/kv_cache.py's docstring).

    mode: "int4" | "fp16" | "fp8"; layout: "HND" | "NHD"; block_size: slots per page (16).
    k, v: the pools; k_scale, v_scale: fp16 per slot (int4) or fp32 [H] (fp8) or None (fp16);
    k_zero, v_zero: uint8 per slot (int4) or None.
    """

    mode: str
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    block_size: int = BLOCK_SIZE
    layout: str = "HND"

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1] if self.layout == "HND" else self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * (2 if self.mode == "int4" else 1)

    def data_strides(self) -> tuple[int, int, int]:
        """(block, head, slot) strides of k and v in elements (the last dim is contiguous)."""
        s = self.k.stride()
        return (s[0], s[1], s[2]) if self.layout == "HND" else (s[0], s[2], s[1])

    def meta_strides(self) -> tuple[int, int, int]:
        """(block, head, slot) strides of the int4 scale/zero tensors (0, 0, 0 in other modes)."""
        if self.mode != "int4":
            return (0, 0, 0)
        s = self.k_scale.stride()
        return (s[0], s[1], s[2]) if self.layout == "HND" else (s[0], s[2], s[1])

    def fp8_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 [H] per-head scales of K and V (fp8 mode only)."""
        return self.k_scale, self.v_scale


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, mode: str) -> int:
    """Bytes one token takes in K plus V (scales and zeros included) -- for sizing the pool."""
    if mode == "int4":
        return 2 * num_kv_heads * (head_dim // 2 + 3)
    return 2 * num_kv_heads * head_dim * (2 if mode == "fp16" else 1)
