"""Quantization numerics: no model, no I/O. See docs/NUMERICS.md."""

from .fp4 import dequantize_fp4, fake_quant_fp4, quantize_fp4
from .intq import QTensor, dequantize, fake_quant, quantize_asym, quantize_sym
from .layout import Split, plan_split
from .mixed import PackedWeight, dequantize_mixed, fake_quant_mixed, quantize_mixed, quantize_weight_rtn
from .pack import pack_int4, unpack_int4

__all__ = [
    "QTensor", "quantize_sym", "quantize_asym", "dequantize", "fake_quant",
    "quantize_fp4", "dequantize_fp4", "fake_quant_fp4", "pack_int4", "unpack_int4",
    "Split", "plan_split", "PackedWeight", "quantize_mixed", "dequantize_mixed", "fake_quant_mixed",
    "quantize_weight_rtn",
]
