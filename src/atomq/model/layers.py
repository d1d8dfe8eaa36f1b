"""Building blocks with Hugging Face parameter names: RMSNorm with an optional reorder, and Linear.

``Linear`` covers every method through one spec: float weights, quantized weights (PackedWeight tensors
under the linear's own name: qweight, scales, zeros, qweight_outlier, scales_outlier) and/or
dynamically quantized activations. By default it runs the reference numerics as fake-quant: dequantized
weights (cached once) times fake-quantized activations, which equals ref.w4a4_gemm up to float rounding.
``model/methods.py`` can give it a prepared ``kernel`` instead (Triton / torch GEMMs, q/k/v and gate/up
merged into one); then the stored tensors are released and every call goes through the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import get_op, ref
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
    a_levels: int | None = None  # activation group scales as integer multiples of one per token (quant.intq)
    w_levels: int | None = None  # the same for the stored weight's group scales (one unit per row)
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
        # set by model/methods.apply_linear_method (plain attributes, not part of the state dict)
        self.kernel = None  # LinearKernel computing this linear (and the ones merged into it)
        self.kernel_outputs: list[int] = []  # output widths of the merged linears, in order
        self.kernel_merged_into: "Linear | None" = None  # the linear whose kernel computes this one

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

    def prepare_input(self, x: torch.Tensor):
        """Gather (own_index) and fake-quantize x [M, K]: what the quantize kernel hands the GEMM
        (with a kernel: its operand, e.g. INT4 values and scales).

        Linears that share an input and a spec (q/k/v, gate/up) prepare it once (``shared_forward``).
        """
        if self.kernel is not None:
            return self.kernel.prepare_input(x)
        s = self.spec
        if s.own_index:
            x = x.index_select(-1, self.reorder_index.long())
        if s.a_bits is not None:
            x = fake_quant_mixed(x, s.split, s.a_bits, s.a_clip, levels=s.a_levels)
        return x

    def matmul(self, x) -> torch.Tensor:
        """Prepared x [M, K] -> [M, N] in the model dtype ([M, sum N] for a merged kernel)."""
        if self.kernel is not None:
            return self.kernel.matmul(x)
        if self.kernel_merged_into is not None:
            raise RuntimeError("this linear is computed by a merged kernel: call it through shared_forward")
        return F.linear(x, self.dense_weight(x.dtype), getattr(self, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        lead = x.shape[:-1]
        y = self.matmul(self.prepare_input(x.reshape(-1, x.shape[-1])))
        return y.reshape(*lead, y.shape[-1])


def shared_forward(x: torch.Tensor, *linears: Linear) -> list[torch.Tensor]:
    """Several linears on one input x [..., K] -> their outputs [..., N_i]. A merged kernel computes them
    in one GEMM; otherwise the input is gathered and quantized once when their input handling is
    identical (always so for q/k/v and gate/up), else each prepares its own."""
    first = linears[0]
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # [M, K]
    if first.kernel is not None and len(first.kernel_outputs) == len(linears) > 1:
        outs = first.matmul(first.prepare_input(x2)).split(first.kernel_outputs, dim=-1)
    else:
        input_spec = lambda lin: (lin.spec.split, lin.spec.a_bits, lin.spec.a_clip, lin.spec.a_levels,  # noqa: E731
                                  lin.spec.own_index)
        hooked = any(lin._forward_pre_hooks or lin._forward_hooks for lin in linears)  # calibration observers
        same = all(input_spec(lin) == input_spec(first) for lin in linears)
        if same and not hooked and not first.spec.own_index and first.kernel is None:
            xq = first.prepare_input(x2)
            return [lin.matmul(xq).reshape(*lead, lin.spec.out_features) for lin in linears]
        return [lin(x) for lin in linears]
    return [y.reshape(*lead, y.shape[-1]) for y in outs]


class OnlineRotation(nn.Module):
    """x [..., n] -> x @ R at run time, R orthogonal [n, n] given by its factors (``ref.rotate_online``):
    signs fp32 [n] and small fp32 [m, m]. The matching R is folded into the next linear offline."""

    def __init__(self, n: int):
        super().__init__()
        m, _ = ref.hadamard_split(n)
        self.register_buffer("signs", torch.empty(n, dtype=torch.float32, device="meta"))
        self.register_buffer("small", torch.empty(m, m, dtype=torch.float32, device="meta"))

    def forward(self, x: torch.Tensor, backend: str = "ref") -> torch.Tensor:
        return get_op("rotate_online", backend)(x, self.signs, self.small)

    def silu_mul_rotate(self, gate_up: torch.Tensor, backend: str = "ref") -> torch.Tensor:
        """gate_up [..., 2n] (gate | up) -> SiLU(gate) * up rotated [..., n], one kernel on 'triton'."""
        return get_op("silu_mul_rotate", backend)(gate_up, self.signs, self.small)


class RMSNorm(nn.Module):
    """RMSNorm (fp32 math); when ``reorder`` is set its output is gathered by ``reorder_index`` [K]."""

    def __init__(self, dim: int, eps: float, reorder: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(dim, dtype=dtype, device="meta"))
        if reorder:
            self.register_buffer("reorder_index", torch.empty(dim, dtype=torch.int32, device="meta"))

    def gathered_weight(self) -> torch.Tensor:
        """weight[reorder_index]: each output channel's norm weight, for kernels that read it in output
        order. Made on first use and kept (weights do not change while serving)."""
        g = getattr(self, "_gathered_weight", None)
        if g is None or g.device != self.weight.device or g.dtype != self.weight.dtype:
            g = self._gathered_weight = self.weight.index_select(0, self.reorder_index.long())
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = ref.rmsnorm(x, self.weight, self.eps)
        if hasattr(self, "reorder_index"):
            y = y.index_select(-1, self.reorder_index.long())
        return y
