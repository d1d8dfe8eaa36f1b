"""Build a CausalLM on the meta device and load it from an atomq checkpoint or a Hugging Face model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config import FP16, QuantConfig
from ..quant import Split
from . import checkpoint as ckpt
from .args import ModelArgs
from .llama import CausalLM, KVSpec
from .source import WeightSource, resolve_model_path
from .specs import layer_specs, plan_splits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any
    qcfg: QuantConfig
    meta: dict[str, Any]  # atomq_config.json of a checkpoint; {} for a plain HF model


def build_model(hf_config: Any, qcfg: QuantConfig, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A CausalLM whose tensors live on the meta device, shaped for ``qcfg``."""
    args = ModelArgs.from_hf(hf_config)
    specs = layer_specs(args, qcfg)
    kv = KVSpec(qcfg.kv_bits, qcfg.kv_pre_rope, qcfg.kv_rotate, qcfg.kv_center)
    return CausalLM(args, hf_config, [specs] * args.n_layers, kv, qcfg.reorder, dtype, qcfg.rotates_down)


def expected_tensors(model: CausalLM) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """name -> (shape, dtype) the model needs; None dtype = any float dtype (cast on load)."""
    out = {}
    for name, t in model.state_dict().items():
        exact = not t.dtype.is_floating_point or name.endswith(("scales", "scales_outlier", "rotation.signs",
                                                                  "rotation.small", "k_center"))
        out[name] = (tuple(t.shape), t.dtype if exact else None)
    if model.args.tie_embeddings:
        out.pop("lm_head.weight")
    return out


def load_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device="cpu") -> CausalLM:
    """Validate ``tensors`` against the model and assign them (float ones cast to ``dtype``)."""
    expected = expected_tensors(model)
    tensors = dict(tensors)
    if model.args.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the embedding is the truth
    ckpt.check_tensors(tensors, expected)
    state = {}
    for name, t in tensors.items():
        if expected[name][1] is None:
            t = t.to(dtype)
        state[name] = t.to(device)
    if model.args.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)  # moves the non-persistent buffers too


def splits_from_meta(meta: dict[str, Any]) -> dict[str, Split]:
    return {name: Split(*v) for name, v in meta["splits"].items()}


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, device="cpu", kv_bits="checkpoint",
                    kv_rotate: bool | None = None, weights_only: bool = False,
                    a_clip: float | None = None) -> LoadedModel:
    """An atomq checkpoint. ``kv_bits`` (4, 8 or "none") and ``kv_rotate`` override the KV-cache numerics,
    ``weights_only`` switches the activation quantizers off and ``a_clip`` sets their clip ratio: run-time
    choices (nothing stored depends on them)."""
    from transformers import AutoConfig, AutoTokenizer

    meta = ckpt.read_meta(path)
    try:
        qcfg = QuantConfig.from_dict(meta["quant"])
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: invalid quant config: {e}") from None
    if kv_bits != "checkpoint":
        qcfg = dataclasses.replace(qcfg, kv_bits=None if kv_bits == "none" else kv_bits)
    if kv_rotate is not None:
        qcfg = dataclasses.replace(qcfg, kv_rotate=kv_rotate)
    if weights_only:
        qcfg = dataclasses.replace(qcfg, a_bits=None)
    if a_clip is not None:
        if qcfg.a_bits is None:
            why = "weights_only keeps them" if weights_only else f"{path} keeps them"
            raise ValueError(f"activations are 16-bit ({why}): there is no activation clip ratio to set")
        qcfg = dataclasses.replace(qcfg, a_clip=a_clip)  # validated by QuantConfig
    hf_config = AutoConfig.from_pretrained(path)
    model = build_model(hf_config, qcfg, dtype)
    planned = plan_splits(model.args, qcfg)
    if planned != splits_from_meta(meta):
        raise ckpt.CheckpointError(f"{path}: recorded splits do not match this atomq's rule for the config")
    load_tensors(model, ckpt.read_tensors(path), dtype, device)
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), qcfg, meta)


def load_hf(path: str, dtype: torch.dtype = torch.float32, device="cpu", kv_bits=None,
            kv_rotate: bool | None = None) -> LoadedModel:
    """An unquantized Hugging Face model (safetensors directory or GGUF file) as a CausalLM."""
    src = WeightSource(path)
    qcfg = FP16 if kv_bits in (None, "none", "checkpoint") else dataclasses.replace(FP16, kv_bits=kv_bits)
    qcfg = dataclasses.replace(qcfg, kv_rotate=bool(kv_rotate))
    model = build_model(src.config, qcfg, dtype)
    names = expected_tensors(model)
    tensors = {n: src.get(n) for n in names}
    load_tensors(model, tensors, dtype, device)
    return LoadedModel(model, src.load_tokenizer(), qcfg, {})


def load_model(path: str, dtype: torch.dtype = torch.float32, device="cpu", kv_bits="checkpoint",
               kv_rotate: bool | None = None, weights_only: bool = False, a_clip: float | None = None) -> LoadedModel:
    """An atomq checkpoint directory, a Hugging Face directory, a .gguf file, or 'smollm2'.

    ``kv_bits``: "checkpoint" keeps the stored choice; 4, 8 or "none" (16-bit) override it.
    ``kv_rotate``: None keeps the stored choice; True / False override it.
    ``weights_only``: a checkpoint's activations stay 16-bit (its weights-only accuracy).
    ``a_clip``: a checkpoint's activation clip ratio at run time (None: the stored one).
    """
    path = resolve_model_path(path)
    if ckpt.is_checkpoint(path):
        return load_checkpoint(path, dtype, device, kv_bits, kv_rotate, weights_only, a_clip)
    if a_clip is not None:
        raise ValueError(f"{path} is not an atomq checkpoint: --a-clip applies to quantized activations only")
    return load_hf(path, dtype, device, kv_bits, kv_rotate)
