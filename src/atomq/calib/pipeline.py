"""Calibrate a Hugging Face model with Atom's recipe, one decoder layer at a time, and write a checkpoint.

For each layer: rotate the float tensors (optional, ``rotation.py``); run the float layer on the
calibration activations while hooks collect input statistics; smooth (optional) and reorder the float
tensors; quantize every linear (GPTQ or RTN); then run the weight-quantized layer to produce the next
layer's inputs (GPTQ's convention: activations stay unquantized while calibrating). Memory stays near
one layer plus one copy of the windows' activations. ``CalibConfig.device`` says where that work runs (an
H100 calibrates four layers of Llama-2-7B's shapes in 40 s, BENCHMARKS.md); weights are read and the
checkpoint assembled on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import resource
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import FP16, CalibConfig, QuantConfig
from ..model.args import ModelArgs, rope_cos_sin
from ..model.checkpoint import check_writable, write_checkpoint
from ..model.llama import CausalLM, DecoderLayer
from ..model.loader import DTYPES, build_model
from ..model.source import WeightSource
from ..model.specs import input_groups, layer_specs, plan_splits
from ..quant import quantize_weight_rtn
from .data import calibration_windows
from .gptq import gptq_quantize
from .rotation import (check_rotatable, down_rotation_factors, residual_rotation, rotate_down_input, rotate_globals,
                       rotate_layer, rotate_value_path)
from .stats import hessian_key, observe_inputs, observe_mean_key
from .transforms import reorder_group, smooth_group

BATCH_TOKENS = 8192  # tokens per forward chunk during calibration


def _layer_names(model: CausalLM) -> list[str]:
    """Tensor names of one layer in the source model (the rotation factors are made, not read)."""
    return [n for n in model.model.layers[0].state_dict() if ".down_rotation." not in n]


def _materialize(layer: DecoderLayer, tensors: dict[str, torch.Tensor]) -> DecoderLayer:
    """Fill a meta-device layer with ``tensors`` (relative names, all on one device), cast to the layer's
    buffer dtypes; its non-persistent buffers (the keys' Hadamard matrix) follow to that device."""
    state = {name: tensors[name].to(t.dtype) for name, t in layer.state_dict().items()}
    layer.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    return layer.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def _run_layer(layer: DecoderLayer, x: torch.Tensor, cos, sin, batch: int, keep: bool = True) -> None:
    """x [n, T, hidden] <- layer(x) in place, in chunks of ``batch`` windows (windows are independent), so
    the activations are held once. keep=False only runs the layer (for its hooks) and leaves x as it is."""
    for i in range(0, x.shape[0], batch):
        y = layer(x[i : i + batch], cos, sin)
        if keep:
            x[i : i + batch] = y


def quantize_layer_tensors(
    tensors: dict[str, torch.Tensor], stats: dict, args: ModelArgs, qcfg: QuantConfig
) -> dict[str, torch.Tensor]:
    """Float layer tensors (relative names) + input statistics -> the quantized layer's tensors."""
    tensors = {k: v.float() for k, v in tensors.items()}
    groups = input_groups(args, qcfg.rotates_down)
    if qcfg.smooth_alpha is not None:
        for g in groups:
            smooth_group(tensors, g, stats, qcfg.smooth_alpha)
    if qcfg.reorder:
        for g in groups:
            reorder_group(tensors, g, stats)
    if qcfg.w_bits is None:
        return tensors
    # linears that read one input (q/k/v, gate/up) share its Hessian and split; GPTQ and RTN treat output
    # rows independently, so they are quantized as one stacked matrix (one column pass) and cut apart
    shared: dict[tuple, list[str]] = {}
    for name, split in plan_splits(args, qcfg).items():
        shared.setdefault((hessian_key(name), split), []).append(name)
    for (key, split), names in shared.items():
        ws = [tensors.pop(f"{name}.weight") for name in names]
        w = torch.cat(ws) if len(ws) > 1 else ws[0]
        if qcfg.gptq:
            pw = gptq_quantize(w, stats[key].h, split, qcfg.w_bits, qcfg.w_clip, qcfg.w_sym,
                               qcfg.gptq_damp, qcfg.gptq_block, qcfg.w_clip_search, qcfg.w_scale_levels)
        else:
            pw = quantize_weight_rtn(w, split, qcfg.w_bits, qcfg.w_clip, qcfg.w_sym, qcfg.w_clip_search,
                                     qcfg.w_scale_levels)
        start = 0
        for name, wi in zip(names, ws):
            part = pw.rows(start, start + wi.shape[0])
            start += wi.shape[0]
            tensors.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
    return tensors


def quantize_model(
    model_path: str, out_dir: str, qcfg: QuantConfig, ccfg: CalibConfig, overwrite: bool = False,
    data_dir: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Calibrate ``model_path`` (HF directory, .gguf or 'smollm2') and write an atomq checkpoint to ``out_dir``.

    Returns the provenance dict written into atomq_config.json.
    """
    t0 = time.time()
    check_writable(out_dir, overwrite)  # before the calibration, not after it
    src = WeightSource(model_path)
    config = src.config
    if qcfg.rotate and getattr(config, "tie_word_embeddings", False):
        config = copy.deepcopy(config)  # lm_head absorbs the final norm: it is no longer the embedding
        config.tie_word_embeddings = False
    args = ModelArgs.from_hf(config)
    if qcfg.rotate or qcfg.v_rotate:
        check_rotatable(args)
    tokenizer = src.load_tokenizer()
    dtype = DTYPES[ccfg.dtype]
    device = torch.device(ccfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    float_model = build_model(config, dataclasses.replace(FP16, rotate=qcfg.rotate, down_rotate=qcfg.down_rotate), dtype)
    # GPTQ's convention: the next layer sees weight-quantized outputs; optionally fully quantized ones
    prop_cfg = qcfg if qcfg.calib_quantized_inputs else dataclasses.replace(qcfg, a_bits=None, kv_bits=None)
    prop_cfg = dataclasses.replace(prop_cfg, kv_center=False)  # its keys give the mean key
    prop_model = build_model(config, prop_cfg, dtype)
    # 16-bit storage for float tensors: bf16 where the source is bf16, fp16 otherwise
    store = torch.bfloat16 if src.get("model.embed_tokens.weight").dtype == torch.bfloat16 else torch.float16
    tied = bool(getattr(src.config, "tie_word_embeddings", False))
    glob = {name: src.get(name) for name in ("model.embed_tokens.weight", "model.norm.weight")}
    glob["lm_head.weight"] = src.get("model.embed_tokens.weight" if tied else "lm_head.weight")
    if qcfg.rotates_down:  # the layers rotate where they calibrate
        down = tuple(f.to(device) for f in down_rotation_factors(args, qcfg.rotate_seed))
    if qcfg.rotate:
        q = residual_rotation(args, qcfg.rotate_seed)
        glob = rotate_globals(glob["model.embed_tokens.weight"], glob["model.norm.weight"], glob["lm_head.weight"], q)
        q = q.to(device)
    elif tied:
        del glob["lm_head.weight"]
    out: dict[str, torch.Tensor] = {name: t.to(store) for name, t in glob.items()}

    calibrate = (qcfg.quantizes_linears and (qcfg.gptq or qcfg.reorder or qcfg.smooth_alpha is not None)
                 or qcfg.kv_center)
    x = None
    if calibrate:
        windows = calibration_windows(tokenizer, ccfg.dataset, ccfg.n_samples, ccfg.seq_len, ccfg.seed, data_dir)
        embed = glob["model.embed_tokens.weight"].to(device, dtype)
        x = torch.nn.functional.embedding(windows.to(device), embed)  # [n, T, hidden] on device
        del embed
    cos, sin = rope_cos_sin(float_model.inv_freq, float_model.rope_scaling, torch.arange(ccfg.seq_len))
    cos, sin = cos.to(device), sin.to(device)
    batch = max(1, BATCH_TOKENS // ccfg.seq_len)
    names = _layer_names(float_model)
    linears = list(layer_specs(args, qcfg))

    for i in tqdm(range(args.n_layers), desc="calibrating layers", disable=not progress):
        prefix = f"model.layers.{i}."
        raw = {n: src.get(prefix + n).to(device) for n in names}
        if qcfg.rotate:
            raw = rotate_layer(raw, args, q, down)
        else:  # the unrotated recipes' optional partial rotations
            raw = rotate_value_path(raw, args) if qcfg.v_rotate else raw
            raw = rotate_down_input(raw, args, down) if qcfg.down_rotate else raw
        stats = {}
        last = i + 1 == args.n_layers
        # without GPTQ the float outputs are the next inputs, once the mean key (if any) has been taken
        float_next = calibrate and not qcfg.gptq and not last
        if calibrate:
            layer = _materialize(float_model.model.layers[i], raw)
            with observe_inputs(layer, linears, full=qcfg.gptq) as stats:
                _run_layer(layer, x, cos, sin, batch, keep=float_next and not qcfg.kv_center)
            layer.to("meta")  # free it: memory stays near one layer
        qt = quantize_layer_tensors(raw, stats, args, qcfg)
        gptq_next = calibrate and qcfg.gptq and not last  # GPTQ sees the quantized model's inputs
        if gptq_next or calibrate and qcfg.kv_center:
            layer = _materialize(prop_model.model.layers[i], qt)
            with observe_mean_key(layer.self_attn) as mean_key:
                _run_layer(layer, x, cos, sin, batch, keep=gptq_next)
            layer.to("meta")
            if qcfg.kv_center:
                qt["self_attn.k_center"] = mean_key()
            if float_next and qcfg.kv_center:
                _run_layer(_materialize(float_model.model.layers[i], raw), x, cos, sin, batch)
                float_model.model.layers[i].to("meta")
        for k, v in qt.items():  # the online rotation's factors and the mean key stay fp32 (kernel operands)
            v = v.to("cpu")
            keep32 = ".down_rotation." in k or k.endswith("k_center")
            out[prefix + k] = v.to(store) if v.dtype == torch.float32 and not keep32 else v
        del raw, stats

    meta = {
        "quant": qcfg.to_dict(),
        "splits": {k: [s.k, s.n_outliers, s.group_size] for k, s in plan_splits(args, qcfg).items()},
        "calibration": {
            **dataclasses.asdict(ccfg),
            "source_model": str(src.path),
            "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **({"peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20),
                "gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
            "atomq_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
        },
    }
    write_checkpoint(out_dir, out, config, meta, tokenizer, overwrite=overwrite)
    return meta
