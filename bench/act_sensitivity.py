"""Where a W4A4 checkpoint loses accuracy: WikiText-2 perplexity with one part of its run-time
quantization switched off (or to 8 bits, or the KV cache to finer groups) at a time (the activations
of one kind of linear, or the KV cache), from one loaded checkpoint. The weights stay as stored in every
row, so a row's gain over "all quantized" is what that part's quantization costs. Dense models (Llama /
Mistral / Qwen2 linear names).

    PYTHONPATH=src python bench/act_sensitivity.py --model runs/ckpt --limit 40 --dtype float32 \\
        --out runs/sensitivity.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from contextlib import ExitStack

import torch

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# row name -> (the linears, by name suffix inside a layer, whose activations get ``bits``; "kv": the KV
# cache, 16-bit; "kv/N": the KV cache with one scale per N channels of a head; "kblock/N": keys with one
# scale per channel over N tokens; "norotate": keys without the Hadamard rotation; "kmean": keys less a mean
# calibrated on C4, see key_means; "nocenter": without a kv_center checkpoint's stored mean key; "k16" /
# "v16": keys / values alone 16-bit), bits (None: 16-bit)
PARTS: dict[str, tuple[tuple[str, ...], int | None]] = {
    "all quantized": ((), None),
    "q/k/v input 16-bit": (("q_proj", "k_proj", "v_proj"), None),
    "o_proj input 16-bit": (("o_proj",), None),
    "gate/up input 16-bit": (("gate_proj", "up_proj"), None),
    "down_proj input 16-bit": (("down_proj",), None),
    "KV cache 16-bit": (("kv",), None),
    "activations 16-bit (KV4)": (ALL, None),
    "down_proj input 8-bit (no clip)": (("down_proj",), 8),
    "activations 8-bit, no clip (KV4)": (ALL, 8),
    "KV cache groups of 32": (("kv/32",), None),
    "KV cache groups of 16": (("kv/16",), None),
    "keys per channel over 16 tokens": (("kblock/16",), None),
    "keys per channel over 64 tokens": (("kblock/64",), None),
    "keys not rotated": (("norotate",), None),
    "keys per channel over 16 tokens, not rotated": (("kblock/16", "norotate"), None),
    "keys less their calibrated mean": (("kmean",), None),
    "keys less their calibrated mean, not rotated": (("kmean", "norotate"), None),
    "keys not centered": (("nocenter",), None),
    "activations 8-bit, no clip, keys less their calibrated mean": (ALL + ("kmean",), 8),
    "keys 16-bit": (("k16",), None),
    "keys less their calibrated mean, values 16-bit": (("kmean", "v16"), None),
    "keys less their calibrated mean, per channel over 16 tokens": (("kmean", "kblock/16"), None),
    # the same function as "KV cache 16-bit" (softmax ignores the shift): how far 4-bit rounding alone moves it
    "KV cache 16-bit, keys less their calibrated mean": (("kv", "kmean"), None),
}


def key_means(model, windows: torch.Tensor) -> dict[str, dict[bool, torch.Tensor]]:
    """Mean key fp32 [H, D] of each attention module as its cache would quantize it, with and without the
    key rotation, over calibration windows int64 [N, T]: {module name: {rotated: mean}}."""
    from atomq.calib.stats import observe_mean_key

    attns = {n: m for n, m in model.named_modules() if hasattr(m, "kv_bits")}
    saved = {n: (m.kv_hadamard, m.k_center, m.k_block_tokens, m.kv_group) for n, m in attns.items()}
    means: dict[str, dict[bool, torch.Tensor]] = {n: {} for n in attns}
    for rotated in (True, False):
        with ExitStack() as stack:
            getters = {}
            for n, m in attns.items():
                m.kv_hadamard = saved[n][0] if rotated else None
                m.k_center = m.k_block_tokens = m.kv_group = None
                getters[n] = stack.enter_context(observe_mean_key(m))
            with torch.no_grad():
                for w in windows:
                    model(w[None].to(next(model.parameters()).device))
            for n in attns:
                means[n][rotated] = getters[n]()
    for n, m in attns.items():
        m.kv_hadamard, m.k_center, m.k_block_tokens, m.kv_group = saved[n]
    return means


def _set_part(model, keep: tuple[str, ...], bits: int | None, saved: dict, means: dict | None = None) -> None:
    """Give the activations of the linears in ``keep`` ``bits`` (the KV cache, if named, 16 bits, groups
    of N channels, per-channel key scales, unrotated or centered keys, keys or values alone
    16-bit); restore every other part from ``saved``."""
    kv_group = next((int(k.split("/")[1]) for k in keep if k.startswith("kv/")), None)
    k_block = next((int(k.split("/")[1]) for k in keep if k.startswith("kblock/")), None)
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name in saved or (hasattr(mod, "spec") and mod.spec.a_bits is not None):
            saved.setdefault(name, mod.spec)
            # 8 bits: no clip (a 0.9 clip trades 4-bit rounding error for clipping error)
            changed = dataclasses.replace(saved[name], a_bits=bits, a_clip=1.0 if bits == 8 else saved[name].a_clip)
            mod.spec = changed if leaf in keep else saved[name]
        if hasattr(mod, "kv_bits"):
            saved.setdefault(name + ".kv", mod.kv_bits)
            mod.kv_bits = None if "kv" in keep else saved[name + ".kv"]
            mod.kv_group, mod.k_block_tokens = kv_group, k_block
            saved.setdefault(name + ".rotate", mod.kv_hadamard)
            mod.kv_hadamard = None if "norotate" in keep else saved[name + ".rotate"]
            k_mean = means[name][mod.kv_hadamard is not None] if means else None
            saved.setdefault(name + ".center", mod.k_center)  # a kv_center checkpoint's stored mean key
            mod.k_center = k_mean if "kmean" in keep else None if "nocenter" in keep else saved[name + ".center"]
            # an instance attribute shadows the method; deleting it restores the cache's quantization
            for part, method in (("k16", "_fake_quant_keys"), ("v16", "_fake_quant_values")):
                if part in keep:
                    setattr(mod, method, lambda x: x)
                else:
                    mod.__dict__.pop(method, None)


def main() -> int:
    from atomq.calib.data import calibration_windows
    from atomq.eval.ppl import perplexity, token_windows
    from atomq.model.loader import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="atomq checkpoint directory")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--key-mean-windows", type=int, default=8, help="C4 windows of 2048 tokens for key_means")
    ap.add_argument("--only", default="", help="row names separated by ';' (default: all)")
    ap.add_argument("--out", default=None, help="append each row as a JSON line to this file")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    names = [n for n in ns.only.split(";") if n] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(PARTS)}")
    lm = load_model(ns.model, getattr(torch, ns.dtype), ns.device)
    if lm.qcfg.a_bits is None and lm.qcfg.kv_bits is None:
        ap.error(f"{ns.model} quantizes neither activations nor the KV cache: nothing to switch off")
    windows = token_windows(lm.tokenizer, ns.dataset, 2048, ns.data_dir)
    means = None
    if any("kmean" in PARTS[n][0] for n in names):
        calib = calibration_windows(lm.tokenizer, "c4", ns.key_mean_windows, 2048, seed=0, data_dir=ns.data_dir)
        means = key_means(lm.model, calib)
    rows, saved = [], {}
    for name in names:
        _set_part(lm.model, *PARTS[name], saved, means)
        t0 = time.time()
        r = perplexity(lm.model, windows, ns.limit, progress=False)
        rows.append({"row": name, "ppl": r.ppl, "windows": r.windows, "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if ns.out:
            with open(ns.out, "a") as f:
                f.write(json.dumps({"model": ns.model, **rows[-1]}) + "\n")
    base = rows[0]["ppl"] if names[0] == "all quantized" else None
    print("\n| run-time quantization | ppl | vs all quantized |\n|---|---:|---:|")
    for r in rows:
        ratio = f"{r['ppl'] / base:.3f}x" if base else "-"
        print(f"| {r['row']} | {r['ppl']:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
