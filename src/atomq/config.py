"""Frozen, validated configuration dataclasses and the named recipes (presets).

A ``QuantConfig`` says how every decoder linear and the KV cache are quantized; it is written into
``atomq_config.json`` and read back by the loader, so a checkpoint describes itself. CLI flags are
derived from the dataclass fields (see ``cli.py``), so defaults live here only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


def _check_bits(name: str, bits: int | None, allowed=range(2, 9)) -> None:
    if bits is not None and bits not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)} or None, got {bits}")


@dataclass(frozen=True)
class QuantConfig:
    """How weights, activations and the KV cache are quantized (ATOM.md section 1 by default).

    ``None`` bits mean "kept in 16 bit". Weights and activations of one linear share the group size
    (the integer dot product runs group by group). ``n_outliers`` input channels with the largest
    activation energy stay INT8 for both; the reorder moves them last.
    """

    w_bits: int | None = 4
    a_bits: int | None = 4
    group_size: int | None = 128
    n_outliers: int = 128
    w_clip: float = 0.85
    a_clip: float = 0.9
    w_sym: bool = True
    gptq: bool = True
    gptq_damp: float = 0.01
    gptq_block: int = 128
    kv_bits: int | None = 4
    kv_pre_rope: bool = False  # quantize K before RoPE (Atom's reference) or after (what a paged cache stores)
    kv_rotate: bool = False  # rotate queries and keys per head by a Hadamard matrix after RoPE (scores unchanged)
    # take a calibrated mean key per (layer, KV head) off the keys after RoPE (and kv_rotate), before the
    # cache: all scores of a query shift by one constant, which softmax ignores (docs/NUMERICS.md)
    kv_center: bool = False
    smooth_alpha: float | None = None  # SmoothQuant migration strength; None = no smoothing
    w_clip_search: bool = False  # per (row, group) MSE-optimal weight clip instead of the fixed w_clip
    calib_quantized_inputs: bool = False  # GPTQ calibrates each layer on fully quantized (W, A, KV) inputs
    v_rotate: bool = False  # Hadamard per head on the value path, folded into v_proj / o_proj (rotate does it too)
    down_rotate: bool = False  # randomized Hadamard on the down_proj input, online (rotate does it too)
    rotate: bool = False  # randomized Hadamard rotations before calibration (calib/rotation.py)
    rotate_seed: int = 0
    # group scales as integer multiples (1..levels) of one scale per weight row / per token: the GEMM can
    # then fold them into its 8-bit integer operands and accumulate all K in int32 (docs/NUMERICS.md)
    w_scale_levels: int | None = None
    a_scale_levels: int | None = None

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        _check_bits("kv_bits", self.kv_bits, allowed=(4, 8))
        if self.group_size is not None and (self.group_size < 32 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group_size must be a power of two >= 32 or None, got {self.group_size}")
        if self.n_outliers < 0:
            raise ValueError(f"n_outliers must be >= 0, got {self.n_outliers}")
        for name in ("w_clip", "a_clip"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ValueError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.gptq_block < 1:
            raise ValueError(f"gptq_block must be >= 1, got {self.gptq_block}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.kv_rotate and self.kv_pre_rope:
            raise ValueError("kv_rotate applies after RoPE; it cannot be combined with kv_pre_rope")
        if self.kv_center and self.kv_pre_rope:
            raise ValueError("kv_center applies after RoPE; it cannot be combined with kv_pre_rope")
        if self.gptq and self.w_bits is None:
            raise ValueError("gptq needs quantized weights (w_bits is None)")
        if self.rotate and self.v_rotate:
            raise ValueError("rotate already rotates the value path; v_rotate is for unrotated recipes")
        if self.rotate and self.down_rotate:
            raise ValueError("rotate already rotates the down_proj input; down_rotate is for unrotated recipes")
        for name, bits in (("w_scale_levels", self.w_bits), ("a_scale_levels", self.a_bits)):
            levels = getattr(self, name)
            if levels is None:
                continue
            if not 2 <= levels <= 15:
                raise ValueError(f"{name} must be in 2..15 (a 4-bit value times it must fit int8), got {levels}")
            if bits not in (4, None) or self.group_size is None:  # (no effect while kept in 16 bit)
                raise ValueError(f"{name} needs 4-bit groups (bits {bits}, group_size {self.group_size})")
        if self.w_scale_levels is not None and not self.w_sym:
            raise ValueError("w_scale_levels needs symmetric weights")
        if self.rotate and self.smooth_alpha is not None:
            raise ValueError("rotate and smooth_alpha both rescale the norm-produced inputs; choose one")

    @property
    def quantizes_linears(self) -> bool:
        return self.w_bits is not None or self.a_bits is not None

    @property
    def rotates_down(self) -> bool:
        """The down_proj input is rotated online (after SiLU(gate) * up), so down gathers its own input."""
        return self.rotate or self.down_rotate

    @property
    def reorder(self) -> bool:
        """Outlier channels exist only after the reorder moved them last."""
        return self.n_outliers > 0 and self.quantizes_linears

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown quantization settings: {sorted(unknown)}")
        return cls(**d)


FP16 = QuantConfig(w_bits=None, a_bits=None, group_size=None, n_outliers=0, gptq=False, kv_bits=None)
_RTN = QuantConfig(group_size=None, n_outliers=0, w_clip=1.0, a_clip=1.0, gptq=False, kv_bits=None)

# Named recipes. The "atom-*" ladder is the paper's ablation (ATOM.md section 4), each step adding one
# thing to the previous one; "atom" is the full recipe.
PRESETS: dict[str, QuantConfig] = {
    "fp16": FP16,
    "rtn-w4a4": _RTN,
    "atom-outliers": dataclasses.replace(_RTN, n_outliers=128),
    "atom-groups": dataclasses.replace(_RTN, n_outliers=128, group_size=128),
    "atom-clip": dataclasses.replace(_RTN, n_outliers=128, group_size=128, w_clip=0.85, a_clip=0.9),
    "atom-gptq": QuantConfig(kv_bits=None),
    "atom": QuantConfig(),
    # atomq's own recipe: Atom plus Hadamard-rotated queries/keys before KV4 (a run-time choice)
    "atomq": QuantConfig(kv_rotate=True),
    # atomq's most accurate recipe on SmolLM2 (BENCHMARKS.md, full protocol): groups of 32, SmoothQuant
    # migration (0.5), GPTQ on the quantized model's inputs, per-group weight clip search, centered keys.
    # Prefill with groups of 32 runs on the Triton tensor-core GEMM (the Gluon kernel takes groups of 128)
    "atomq-plus": QuantConfig(kv_rotate=True, kv_center=True, group_size=32, smooth_alpha=0.5,
                              calib_quantized_inputs=True, w_clip_search=True),
    # atomq-plus with 8-bit activations (no clip): W4A8 KV4 on the same int8-operand kernels at the same speed
    # (BENCHMARKS.md: SmolLM2 1.098x FP16 against atomq-plus's 1.214x, fp32 on the CPU)
    "atomq-a8": QuantConfig(a_bits=8, a_clip=1.0, kv_rotate=True, kv_center=True, group_size=32,
                            smooth_alpha=0.5, calib_quantized_inputs=True, w_clip_search=True),
    "atom-w-only": QuantConfig(a_bits=None, kv_bits=None),
    "atom-a-only": QuantConfig(w_bits=None, gptq=False, kv_bits=None),
    # rotation recipes (calib/rotation.py): rotated weights and activations, INT4 KV with rotated keys;
    # "rot-w4a4" and "rot-outliers" need no groups, the fast GEMM path on Hopper (docs/KERNELS.md)
    "rot-w4a4": QuantConfig(rotate=True, group_size=None, n_outliers=0, w_clip=1.0, w_clip_search=True,
                            kv_rotate=True),
    "rot-outliers": QuantConfig(rotate=True, group_size=None, w_clip=1.0, w_clip_search=True, kv_rotate=True),
    "rot-groups": QuantConfig(rotate=True, n_outliers=0, kv_rotate=True),
    "rot-atom": QuantConfig(rotate=True, kv_rotate=True),
    "w8a8": QuantConfig(w_bits=8, a_bits=8, group_size=None, n_outliers=0, w_clip=1.0, a_clip=1.0,
                        gptq=False, kv_bits=None, smooth_alpha=0.5),
    "w4a16": QuantConfig(w_bits=4, a_bits=None, group_size=128, n_outliers=0, w_clip=1.0, w_sym=False,
                         kv_bits=None),
    "rtn-w4a16": QuantConfig(w_bits=4, a_bits=None, group_size=128, n_outliers=0, w_clip=1.0, w_sym=False,
                             gptq=False, kv_bits=None),
}


def preset(name: str, **overrides: Any) -> QuantConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def check_device(device: str) -> None:
    """A clear error for a device this machine cannot run on (before any work starts)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and run settings."""

    dataset: str = "c4"  # "c4" (the bundled C4 sample), or a path to a .txt / .jsonl file
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype of the layer forwards during calibration
    device: str = "cpu"  # where layers, activations, statistics and GPTQ run ("cpu", "cuda", "cuda:1")

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 16:
            raise ValueError(f"seq_len must be >= 16, got {self.seq_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
