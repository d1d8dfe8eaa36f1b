"""Human-readable summary of an atomq checkpoint: its configs and a tensor table."""

from __future__ import annotations

import json
import os
from collections import Counter

from . import checkpoint as ckpt


def describe(path: str, all_tensors: bool = False) -> str:
    """Config, calibration provenance and a table of tensors (layer 0 and the non-layer ones by default)."""
    meta = ckpt.read_meta(path)
    from safetensors import safe_open

    f = os.path.join(path, ckpt.TENSORS_FILE)
    if not os.path.isfile(f):
        raise ckpt.CheckpointError(f"{f} is missing")
    lines = [f"atomq checkpoint {path} (format version {meta['format_version']})", "", "quantization:"]
    lines += [f"  {k} = {v}" for k, v in sorted(meta["quant"].items())]
    lines += ["", "calibration:"]
    lines += [f"  {k} = {v}" for k, v in sorted(meta.get("calibration", {}).items())]
    lines += ["", "splits (k, outliers, group) per linear:"]
    lines += [f"  {k}: {v}" for k, v in sorted(meta["splits"].items())]
    total, by_dtype = 0, Counter()
    rows = []
    try:
        with safe_open(f, "pt") as h:
            for name in sorted(h.keys()):
                sl = h.get_slice(name)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                n = 1
                for d in shape:
                    n *= d
                nbytes = n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}.get(dtype, 4)
                total += nbytes
                by_dtype[dtype] += nbytes
                if all_tensors or ".layers." not in name or ".layers.0." in name:
                    rows.append(f"  {name:<60} {dtype:<5} {str(list(shape)):<16} {nbytes / 1024:10.1f} KiB")
    except Exception as e:
        raise ckpt.CheckpointError(f"{f} cannot be read (truncated or corrupt?): {e}") from None
    lines += ["", f"tensors ({'all' if all_tensors else 'layer 0 and non-layer; --all for every one'}):"] + rows
    lines += ["", f"total {total / 2**20:.1f} MiB: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in by_dtype.items())]
    hf = json.loads(open(os.path.join(path, "config.json")).read())
    lines.insert(1, f"model: {hf.get('architectures')} hidden {hf.get('hidden_size')} layers {hf.get('num_hidden_layers')}")
    return "\n".join(lines)
