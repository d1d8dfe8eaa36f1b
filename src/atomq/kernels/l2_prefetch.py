"""Warm the L2 cache with the next GEMM's weights while the small kernels between GEMMs run.

A batch-1 decode step streams every weight once, but memory sits idle between the GEMMs: while RoPE,
the KV store, attention and the activation quantization run (~10 us per layer), and in each GEMM's ramp
and tail. This kernel issues bulk L2 prefetches (``cp.async.bulk.prefetch.L2``, sm_90) of byte ranges, so
the next GEMM's first loads hit L2 (H100: 50 MB) instead of HBM. A prefetch writes nothing and returns
at once, so outputs never change; it is a hint the hardware may drop.

A CTA that issued bulk prefetches lives until they land, so the kernel runs as long as its bytes take to
arrive: on the step's own stream it would hold up the kernels behind it. ``WeightPrefetch`` therefore
launches it on a side stream, forked from the step's stream after the GEMM ahead (whose weight stream it
would otherwise compete with) and joined back at the end of the forward: inside a CUDA graph that is a
branch running beside RoPE, the KV store, attention and the quantize kernels.

No reference twin: it computes nothing. Off CUDA, before sm_90 or in the interpreter it launches nothing.
"""

from __future__ import annotations

import functools

import torch

try:  # guarded: atomq imports without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_RANGES = 4
CHUNK = 16384  # bytes per prefetch instruction (a multiple of 16)
CHUNKS_PER_PROGRAM = 32  # one warp, one chunk per thread: 512 KiB per program, spread over the SMs


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    import os

    if triton is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


class WeightPrefetch:
    """Scope of a forward whose GEMMs may prefetch: ``prefetch`` calls inside it fork to a side stream,
    and leaving it joins the side stream back (CUDA-graph safe; nothing happens off CUDA)."""

    active: "WeightPrefetch | None" = None
    _side: dict[int, torch.cuda.Stream] = {}

    def __init__(self, device: torch.device):
        self.on = device.type == "cuda" and _supported(device.index if device.index is not None
                                                        else torch.cuda.current_device())
        self.device, self.forked = device, False

    def __enter__(self) -> "WeightPrefetch":
        if self.on:
            self.main = torch.cuda.current_stream(self.device)
            index = self.main.device_index
            if index not in self._side:
                self._side[index] = torch.cuda.Stream(self.device)
            self.side = self._side[index]
            WeightPrefetch.active = self
        return self

    def issue(self, ranges: list[tuple[torch.Tensor, int]]) -> None:
        """Prefetch ``ranges`` once all work so far on the step's stream (the GEMM just launched) is done."""
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            l2_prefetch(ranges)
        self.forked = True

    def __exit__(self, *exc) -> None:
        if self.on:
            WeightPrefetch.active = None
            if self.forked:
                self.main.wait_stream(self.side)


def prefetch_weights(ranges: list[tuple[torch.Tensor, int]]) -> None:
    """``l2_prefetch`` on the side stream of the active ``WeightPrefetch`` scope; nothing outside one."""
    if WeightPrefetch.active is not None:
        WeightPrefetch.active.issue(ranges)


def l2_prefetch(ranges: list[tuple[torch.Tensor, int]]) -> None:
    """Prefetch into L2 the first ``nbytes`` bytes of each (tensor, nbytes) (at most MAX_RANGES; tensors
    contiguous, on one CUDA device), on the current stream. Asynchronous, no sync, CUDA-graph safe; a no-op
    where unsupported."""
    ranges = [(t, min(int(n), t.numel() * t.element_size())) for t, n in ranges if t is not None]
    ranges = [(t, n - n % 16) for t, n in ranges if n >= 16]
    if not ranges:
        return
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"at most {MAX_RANGES} ranges per launch, got {len(ranges)}")
    device = ranges[0][0].device
    if device.type != "cuda" or not _supported(device.index if device.index is not None else torch.cuda.current_device()):
        return
    for t, _ in ranges:
        if not t.is_contiguous() or t.device != device or t.data_ptr() % 16:
            raise ValueError("l2_prefetch takes contiguous, 16-byte aligned tensors on one device")
    per_program = CHUNK * CHUNKS_PER_PROGRAM
    programs = max(triton.cdiv(n, per_program) for _, n in ranges)
    padded = ranges + [(ranges[0][0], 0)] * (MAX_RANGES - len(ranges))
    args = []
    for t, n in padded:
        args += [t.view(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.view(-1), n]
    _l2_prefetch_kernel[(programs, len(ranges))](*args, CHUNK=CHUNK, BLOCK=CHUNKS_PER_PROGRAM, num_warps=1)


if triton is not None:

    @triton.jit
    def _prefetch_range(base, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK  # [BLOCK] byte offsets
        size = tl.where(offs < nbytes, tl.minimum(nbytes - offs, CHUNK), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _l2_prefetch_kernel(p0, n0, p1, n1, p2, n2, p3, n3, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(1)
        if r == 0:
            _prefetch_range(p0, n0, CHUNK, BLOCK)
        elif r == 1:
            _prefetch_range(p1, n1, CHUNK, BLOCK)
        elif r == 2:
            _prefetch_range(p2, n2, CHUNK, BLOCK)
        else:
            _prefetch_range(p3, n3, CHUNK, BLOCK)
