"""Building blocks with Hugging Face parameter names: RMSNorm with an optional reorder, and Linear.

``Linear`` covers every method through one spec: float weights, quantized weights (PackedWeight tensors
under the linear's own name: qweight, scales, zeros, qweight_outlier, scales_outlier) and/or
dynamically quantized activations. On CPU it runs the reference numerics as fake-quant: dequantized
weights (cached once) times fake-quantized activations, which equals ref.w4a4_gemm up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ref
from ..quant import PackedWeight, Split, fake_quant_mixed


@dataclass(frozen=True)
class LinearSpec:
    """How one linear is stored and run. ``split`` is None for a plain float linear."""

    in_features: int
    out_features: int
    bias: bool = False
    split: Split | None = None
    w_bits: int | None = None
    w_sym: bool = True
    a_bits: int | None = None
    a_clip: float = 1.0
    own_index: bool = False  # the linear gathers its input itself (o_proj); otherwise the norm does

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """name -> (shape, dtype or None for "the model's float dtype") of every stored tensor."""
        n, k = self.out_features, self.in_features
        out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        if self.w_bits is None:
            out["weight"] = ((n, k), None)
        else:
            s = self.split
            cols = s.k_normal // 2 if self.w_bits == 4 else s.k_normal
            qdtype = torch.uint8 if (self.w_bits == 4 or not self.w_sym) else torch.int8
            out["qweight"] = ((n, cols), qdtype)
            out["scales"] = ((n, s.n_groups), torch.float16)
            if not self.w_sym:
                out["zeros"] = ((n, s.n_groups), torch.uint8)
            if s.n_outliers:
                out["qweight_outlier"] = ((n, s.n_outliers), torch.int8)
                out["scales_outlier"] = ((n, 1), torch.float16)
        if self.bias:
            out["bias"] = ((n,), None)
        if self.own_index:
            out["reorder_index"] = ((k,), torch.int32)
        return out


class Linear(nn.Module):
    def __init__(self, spec: LinearSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        for name, (shape, tdtype) in spec.tensor_shapes().items():
            self.register_buffer(name, torch.empty(shape, dtype=tdtype or dtype, device="meta"))
        self._w_cache: torch.Tensor | None = None

    def packed_weight(self) -> PackedWeight:
        names = ("qweight", "scales", "zeros", "qweight_outlier", "scales_outlier")
        sd = {n: getattr(self, n) for n in names if hasattr(self, n)}
        return PackedWeight.from_state_dict(sd, self.spec.w_bits)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] float weight in the order the linear's (reordered) input arrives; cached."""
        if self._w_cache is None or self._w_cache.dtype != dtype:
            w = self.weight if self.spec.w_bits is None else self.packed_weight().dequantize(torch.float32)
            self._w_cache = w.to(dtype)
        return self._w_cache

    def _apply(self, fn, recurse=True):  # .to() / .cuda() invalidate the cached dense weight
        self._w_cache = None
        return super()._apply(fn, recurse)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Gather (own_index) and fake-quantize x [..., K]: what the quantize kernel hands the GEMM.

        Linears that share an input and a spec (q/k/v, gate/up) prepare it once (``shared_forward``).
        """
        s = self.spec
        if s.own_index:
            x = x.index_select(-1, self.reorder_index.long())
        if s.a_bits is not None:
            x = fake_quant_mixed(x, s.split, s.a_bits, s.a_clip)
        return x

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared x [..., K] -> [..., N] in x's dtype."""
        return F.linear(x, self.dense_weight(x.dtype), getattr(self, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        return self.matmul(self.prepare_input(x))


def shared_forward(x: torch.Tensor, *linears: Linear) -> list[torch.Tensor]:
    """Several linears on one input: the input is gathered and quantized once when their input
    handling is identical (always so for q/k/v and gate/up), else each prepares its own."""
    input_spec = lambda lin: (lin.spec.split, lin.spec.a_bits, lin.spec.a_clip, lin.spec.own_index)  # noqa: E731
    hooked = any(lin._forward_pre_hooks or lin._forward_hooks for lin in linears)  # calibration observers
    same = all(input_spec(lin) == input_spec(linears[0]) for lin in linears)
    if same and not hooked and not linears[0].spec.own_index:
        xq = linears[0].prepare_input(x)
        return [lin.matmul(xq) for lin in linears]
    return [lin(x) for lin in linears]


class RMSNorm(nn.Module):
    """RMSNorm (fp32 math); when ``reorder`` is set its output is gathered by ``reorder_index`` [K]."""

    def __init__(self, dim: int, eps: float, reorder: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=dtype, device="meta"))
        if reorder:
            self.register_buffer("reorder_index", torch.empty(dim, dtype=torch.int32, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = ref.rmsnorm(x, self.weight, self.eps)
        if hasattr(self, "reorder_index"):
            y = y.index_select(-1, self.reorder_index.long())
        return y
