"""Run-time linear methods: how each ``Linear`` of a loaded model computes, chosen once per model.

A checkpoint stores weights in one format (float, Atom W4A4, INT8 W8A8, W4A16); a method says how to run
them. ``apply_linear_method`` prepares every decoder linear once (repacked weights for the kernels, and
q/k/v and gate/up merged into one GEMM each) and drops the stored copies, so memory holds one format.

    method   weights                                   activations                       GEMM
    float    the model dtype                           the model dtype                   F.linear (cuBLAS)
    fp8      e4m3, one fp32 scale per output channel   e4m3, one scale per token (dyn.)  torch._scaled_mm
    int8     int8, one scale per output channel        int8, one scale per token (dyn.)  torch._int_mm
    w4a16    uint4 asymmetric, groups (<= 128)         the model dtype (bf16 on the GPU) torch._weight_int4pack_mm
    atom     Atom's INT4 groups + INT8 outliers        the same, by the quantize kernel  kernels/w4a4_gemm.py

fp8 / int8 / w4a16 can also be made from float weights at load (round to nearest, no calibration: the
benchmarks' baselines); Atom needs a calibrated checkpoint (``atomq quantize``). The LM head and the
MoE router stay in the model dtype. Without this step every linear runs ``Linear``'s reference numerics
(fake-quant), which the kernels here equal up to float rounding (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import PackedWeight, Split, plan_split, quantize_weight_rtn
from ..quant.intq import quantize_sym
from .layers import Linear

LINEAR_METHODS = ("auto", "float", "fp8", "int8", "w4a16", "atom")
FP8_MAX = 448.0


def stored_format(lin: Linear) -> str:
    """'float' | 'atom' | 'int8' | 'w4a16' | 'other' from the linear's spec."""
    s = lin.spec
    if s.w_bits is None and s.a_bits is None:
        return "float"
    if s.w_bits == 4 and s.w_sym and s.a_bits in (4, 8):  # 8-bit activations: W4A8 on the same kernels
        return "atom"
    if s.w_bits == 8 and s.w_sym and s.a_bits == 8 and s.split.group_size is None and not s.split.n_outliers:
        return "int8"
    if s.w_bits == 4 and not s.w_sym and s.a_bits is None and not s.split.n_outliers:
        return "w4a16"
    return "other"


def _cat_bias(lins: list[Linear]) -> torch.Tensor | None:
    biases = [getattr(lin, "bias", None) for lin in lins]
    return None if biases[0] is None else torch.cat(biases)


def _dense(lins: list[Linear], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([lin.dense_weight(dtype) for lin in lins])  # [sum N, K]


def _packed(lins: list[Linear]) -> PackedWeight:
    """The PackedWeights of linears sharing an input split, stacked along N."""
    parts = [lin.packed_weight() for lin in lins]
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return PackedWeight(cat([p.qweight for p in parts]), cat([p.scales for p in parts]),
                        cat([p.zeros for p in parts]), cat([p.qweight_outlier for p in parts]),
                        cat([p.scales_outlier for p in parts]), parts[0].bits)


class LinearKernel:
    """One prepared GEMM (possibly several linears merged along N).

    ``prepare_input(x [M, K] float) -> operand`` (what one quantization pass produces, shared by the
    linears of an input group) and ``matmul(operand) -> [M, N]`` in the model dtype."""

    name = "?"
    out_dtype: torch.dtype

    def prepare_input(self, x: torch.Tensor):
        return x

    def matmul(self, a) -> torch.Tensor:
        raise NotImplementedError


class FloatKernel(LinearKernel):
    name = "float"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias  # [N, K] model dtype

    def matmul(self, x):
        return F.linear(x, self.weight, self.bias)


# Atom decode GEMMs of at most this many tokens whose consumer asks for it add their K runs into an fp32
# accumulator that the quantize kernel ahead zeroes (no partials, arrival counter or last-run sum; 0: never).
# Measured 2026-12-07 (H100, 7B): alone at M = 16 o_proj 11.1 -> 8.3 us, q/k/v 17.9 -> 15.8; in the decode
# step (programmatic dependent launch hides the reduction's tail) batch 1 even, batch 16 -0.7%. Off by
# default: the order of the runs' fp32 adds, so a result's last bit, then varies from run to run.
ACCUMULATE_MAX_M = 0
ROW_QUANT_KERNEL = True  # FP8 / INT8 activations on CUDA: one fused kernel (False: the torch ops)


def _row_quantizer(x: torch.Tensor):
    """kernels/quantize.quantize_rows for CUDA inputs when Triton is there (a per-token quantization
    in one launch instead of ~8 torch ops), else None (the torch path, which it equals)."""
    if not x.is_cuda or not ROW_QUANT_KERNEL:
        return None
    try:
        from ..kernels.quantize import quantize_rows, triton
    except ImportError:
        return None
    return quantize_rows if triton is not None else None


class Fp8Kernel(LinearKernel):
    """W8A8 FP8: per-output-channel e4m3 weights, per-token dynamic e4m3 activations (fp32 scales)."""

    name = "fp8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        w = weight.float()  # [N, K]
        self.w_scale = (w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX).t().contiguous()  # [1, N]
        self.w8 = (w / self.w_scale.t()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [N, K]
        self.bias, self.out_dtype = bias, weight.dtype

    def prepare_input(self, x):
        """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]); on CUDA one fused kernel, the same bits."""
        rows = _row_quantizer(x)
        if rows is not None:
            return rows(x.contiguous(), "fp8")
        s = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s

    def matmul(self, a):
        x8, s = a
        # rowwise-scaled _scaled_mm wants bf16 output on some builds; cast once at the end
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=s, scale_b=self.w_scale, out_dtype=torch.bfloat16)
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


class Int8Kernel(LinearKernel):
    """W8A8 INT8 (SmoothQuant form): per-channel int8 weights, per-token dynamic int8 activations with
    the reference's fp16 scales (quant/intq.py), int32 accumulation by torch._int_mm on CUDA; on the CPU by
    fp32 products of K chunks summed in int32 (each chunk exact: |partial| <= 128^2 * 1024 = 2^24), since the
    CPU _int_mm is exact only with VNNI (without it, AVX2 / AVX-512 multiply-adds saturate in int16: errors
    of 1e5 measured)."""

    name = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 a_clip: float, out_dtype: torch.dtype):
        self.wt = qweight.t()  # int8 [K, N], column-major view: what _int_mm's fast path takes
        self.w_scale = scales.float().reshape(1, -1)  # [1, N]
        self.bias, self.a_clip, self.out_dtype = bias, a_clip, out_dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Kernel":
        qt = quantize_sym(weight.float(), 8, None, 1.0)
        return cls(qt.q, qt.scale, bias, 1.0, weight.dtype)

    def prepare_input(self, x):
        """x [M, K] -> (int8 [M, K], fp16 scale [M, 1]); on CUDA one fused kernel, the same bits."""
        rows = _row_quantizer(x)
        if rows is not None:
            return rows(x.contiguous(), "int8", self.a_clip)
        qt = quantize_sym(x, 8, None, self.a_clip)
        return qt.q, qt.scale

    def matmul(self, a):
        q, s = a
        m = q.shape[0]
        if q.is_cuda:
            if m <= 16:  # the CUDA _int_mm needs M > 16
                q = F.pad(q, (0, 0, 0, 32 - m))
            acc = torch._int_mm(q, self.wt)[:m]  # int32 [M, N], exact
        else:
            acc = torch.zeros(m, self.wt.shape[1], dtype=torch.int32)
            for k0 in range(0, q.shape[1], 1024):
                acc += (q[:, k0:k0 + 1024].float() @ self.wt[k0:k0 + 1024].float()).to(torch.int32)
        y = acc.float() * s.float() * self.w_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(self.out_dtype)


class W4A16Kernel(LinearKernel):
    """4-bit asymmetric weights in groups with 16-bit activations. CUDA: torch's int4pack kernel
    (bf16 activations; dequantization (q - 8) * scale + offset, offset = (8 - zero) * scale). Elsewhere:
    the dequantized weight (the reference numerics)."""

    name = "w4a16"

    def __init__(self, pw: PackedWeight, group_size: int, bias: torch.Tensor | None, out_dtype: torch.dtype):
        self.bias, self.out_dtype, self.group_size = bias, out_dtype, group_size
        self.cuda = pw.qweight.is_cuda
        if not self.cuda:
            self.weight = pw.dequantize(torch.float32).to(out_dtype)
            return
        from ..quant import unpack_int4

        q = unpack_int4(pw.qweight).to(torch.int32) & 0xF  # [N, K] values 0..15
        n, k = q.shape
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # torch's order: element 2i high
        self.qweight = torch._convert_weight_to_int4pack(packed, tiles)
        s = pw.scales.float()  # [N, G]
        offset = (8.0 - pw.zeros.float()) * s
        self.scales_zeros = torch.stack([s, offset], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int | None = 128):
        split = plan_split(weight.shape[1], 0, group_size)
        pw = quantize_weight_rtn(weight.float(), split, 4, 1.0, sym=False)
        return cls(pw, split.group_size or weight.shape[1], bias, weight.dtype)

    def matmul(self, x):
        if not self.cuda:
            return F.linear(x, self.weight, self.bias)
        y = torch._weight_int4pack_mm(x.to(torch.bfloat16), self.qweight, self.group_size, self.scales_zeros)
        y = y.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


class AtomKernel(LinearKernel):
    """Atom W4A4: the fused quantize kernel (gather + INT4 groups + INT8 outliers) and the mixed GEMM.
    With ``a_bits`` 8 the groups' activations are 8-bit: W4A8 through the same int8-operand kernels.
    ``a_levels`` / ``w_levels``: group scales that are integer multiples of one per token / weight row;
    with both, the tensor-core GEMM accumulates all of K in int32 (kernels/w4a4_gemm.py)."""

    name = "atom"

    def __init__(self, pw: PackedWeight, split: Split, a_clip: float, index: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, a_bits: int = 4, a_levels: int | None = None,
                 w_levels: int | None = None):
        from ..kernels.w4a4_gemm import prepare_weight

        self.weight = prepare_weight(pw, levels=w_levels)
        self.split, self.a_clip, self.index, self.bias, self.out_dtype = split, a_clip, index, bias, out_dtype
        self.a_bits, self.a_levels = a_bits, a_levels

    def acc_cols(self, m: int) -> int:
        """Width of the fp32 accumulator that the quantize kernel making this GEMM's operand should zero at
        m tokens (ACCUMULATE_MAX_M), 0 for none. With one, ``matmul`` returns the unrounded fp32 sums:
        only for a consumer that rounds them to the model dtype itself (model/paged.py)."""
        wide = self.out_dtype in (torch.float16, torch.bfloat16)
        return self.weight.n if wide and 0 < m <= ACCUMULATE_MAX_M else 0

    def prepare_input(self, x, accumulate: bool = False):
        from ..kernels.quantize import quantize_act

        return quantize_act(x.contiguous(), self.index, self.split, self.a_bits, self.a_clip, out="int8",
                            levels=self.a_levels, acc_cols=self.acc_cols(x.shape[0]) if accumulate else 0)

    def matmul(self, a):
        from ..kernels.w4a4_gemm import w4a4_gemm

        out_dtype = self.out_dtype if self.out_dtype != torch.float32 else torch.float16
        y = w4a4_gemm(a, self.weight, self.bias, out_dtype, uniform_act_scales=self.a_levels is not None)
        return y if y is getattr(a, "acc", None) else y.to(self.out_dtype)


def _kernel_for(lins: list[Linear], method: str, dtype: torch.dtype, backend: str) -> LinearKernel | None:
    """The kernel that runs ``lins`` (one input group) under ``method``; None = keep the reference path."""
    fmt = stored_format(lins[0])
    spec = lins[0].spec
    device = next(iter(lins[0].buffers())).device
    use_kernels = backend == "triton" or (backend == "auto" and device.type == "cuda")
    want = fmt if method == "auto" else method
    if fmt not in ("float", want):
        raise ValueError(f"these weights are stored as {fmt!r}; they run with linear method {fmt!r} or 'auto', "
                         f"not {method!r}")
    bias = _cat_bias(lins)
    if want == "float":
        return FloatKernel(_dense(lins, dtype), bias) if len(lins) > 1 else None
    if want == "fp8":
        return Fp8Kernel(_dense(lins, dtype), bias)
    if want == "int8":
        if fmt == "float":
            return Int8Kernel.from_float(_dense(lins, dtype), bias)
        pw = _packed(lins)
        return Int8Kernel(pw.qweight, pw.scales, bias, spec.a_clip, dtype) if use_kernels else None
    if want == "w4a16":
        if fmt == "float":
            return W4A16Kernel.from_float(_dense(lins, dtype), bias)
        return W4A16Kernel(_packed(lins), spec.split.group_size or spec.in_features, bias, dtype) if use_kernels else None
    if want == "atom":
        if fmt == "float":
            raise ValueError("the 'atom' method needs an Atom checkpoint (atomq quantize --preset atom); "
                             "float weights run as float, fp8, int8 or w4a16")
        if not use_kernels:
            return None
        index = lins[0].reorder_index if spec.own_index else None
        return AtomKernel(_packed(lins), spec.split, spec.a_clip, index, bias, dtype, spec.a_bits, spec.a_levels,
                          spec.w_levels)
    raise ValueError(f"weights stored as {fmt!r} have no run-time method")


def _input_groups(model, layers=None) -> list[list[Linear]]:
    """Decoder linears grouped by shared input: [q, k, v], [o], [gate, up] (per expert), [down] ...
    (of ``layers``, default every decoder layer)."""
    groups = []
    for layer in model.model.layers if layers is None else layers:
        a = layer.self_attn
        groups += [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj]]
        mlps = layer.block_sparse_moe.experts if hasattr(layer, "block_sparse_moe") else [layer.mlp]
        for mlp in mlps:
            gate, up, down = (getattr(mlp, n) for n in mlp.names)
            groups += [[gate, up], [down]]
    return groups


def _release(lin: Linear) -> None:
    """Drop a linear's stored tensors (its kernel holds the prepared copy); keep reorder_index / bias."""
    for name in ("weight", "qweight", "scales", "zeros", "qweight_outlier", "scales_outlier"):
        if name in lin._buffers:
            lin._buffers[name] = None
    lin._w_cache = None


@torch.no_grad()
def apply_linear_method(model, method: str = "auto", backend: str = "auto", layers=None) -> dict[str, int]:
    """Prepare every decoder linear of ``model`` (a loaded CausalLM) for ``method`` (``LINEAR_METHODS``);
    ``layers``: only those decoder layers (a model built layer by layer converts each as it comes). Linears
    that already have a kernel are counted, not prepared again.

    backend: "auto" = the Triton / torch kernels on CUDA and the reference path of stored quantized
    formats elsewhere; "triton" = the kernels on any device (CPU needs TRITON_INTERPRET=1); "ref" =
    reference numerics for stored formats (fp8 / int8 / w4a16 made from float weights always use their
    kernel, which runs on CPU too). Returns {kernel name: number of GEMMs}.
    """
    if method not in LINEAR_METHODS:
        raise ValueError(f"unknown linear method {method!r}; choose one of {LINEAR_METHODS}")
    if backend not in ("auto", "triton", "ref"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'ref', got {backend!r}")
    dtype = model.model.embed_tokens.weight.dtype
    counts: dict[str, int] = {}
    for lins in _input_groups(model, layers):
        kernel = lins[0].kernel or _kernel_for(lins, method, dtype, backend)
        if kernel is None:
            continue
        if lins[0].kernel is not None:
            counts[kernel.name] = counts.get(kernel.name, 0) + 1
            continue
        lins[0].kernel = kernel
        lins[0].kernel_outputs = [lin.spec.out_features for lin in lins]
        for lin in lins:
            _release(lin)
        for lin in lins[1:]:
            lin.kernel_merged_into = lins[0]
        counts[kernel.name] = counts.get(kernel.name, 0) + 1
    return counts


def prepare_linears(model, method: str = "auto", backend: str = "auto") -> dict[str, int]:
    """``apply_linear_method`` once per model: engines built again over the same loaded model reuse the
    prepared linears; asking for another method or backend then is an error (load the model again)."""
    done = getattr(model, "linear_method", None)
    if done is not None:
        if done["method"] != method or done["backend"] != backend:
            raise ValueError(f"this model's linears were prepared for method {done['method']!r} / backend "
                             f"{done['backend']!r}; load it again to run {method!r} / {backend!r}")
        return done["kernels"]
    counts = apply_linear_method(model, method, backend)
    if model.model.embed_tokens.weight.is_cuda:
        torch.cuda.empty_cache()  # the released stored tensors go back before the KV pool is sized
    model.linear_method = {"method": method, "backend": backend, "kernels": counts}
    return counts


def _tensors_of(obj) -> list[torch.Tensor]:
    """Tensors held by a kernel (directly or in a PreparedWeight-like dataclass)."""
    out = []
    for v in vars(obj).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif hasattr(v, "__dataclass_fields__"):
            out += [t for t in vars(v).values() if isinstance(t, torch.Tensor)]
    return out


def weight_nbytes(model) -> dict[str, int]:
    """Bytes of the model's weights as they sit in memory: {"total", "embedding", "per_token_read"}.

    Parameters, buffers and the prepared tensors of every kernel count; tensors sharing storage count once;
    meta tensors (a model not yet materialised) count by shape and dtype. per_token_read = what one decode
    step reads at least once (everything but the embedding table, of which only the batch's rows are
    read): the floor for batch-1 decode is per_token_read / bandwidth."""
    seen: set = set()
    total = 0
    kernel_tensors = [t for m in model.modules() if getattr(m, "kernel", None) is not None for t in _tensors_of(m.kernel)]
    for t in list(model.parameters()) + list(model.buffers()) + kernel_tensors:
        if t is None:
            continue
        if t.device.type == "meta":
            key, size = id(t), t.numel() * t.element_size()
        else:
            key, size = (t.device, t.untyped_storage().data_ptr()), t.untyped_storage().nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    emb = getattr(getattr(getattr(model, "model", None), "embed_tokens", None), "weight", None)
    emb_bytes = 0 if emb is None else emb.numel() * emb.element_size()
    return {"total": total, "embedding": emb_bytes, "per_token_read": total - emb_bytes}
