"""The atomq checkpoint on disk (docs/FORMAT.md): write atomically, read with validation.

A checkpoint is a directory:
    config.json          the Hugging Face model config
    atomq_config.json    {"format": "atomq", "format_version", "quant": QuantConfig, "splits", "calibration"}
    model.safetensors    every tensor under its Hugging Face module name
    tokenizer files      as tokenizer.save_pretrained writes them
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "atomq"
FORMAT_VERSION = 1
QCONFIG_FILE = "atomq_config.json"
TENSORS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match what its config promises."""


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QCONFIG_FILE))


def check_writable(out_dir: str, overwrite: bool) -> None:
    """FileExistsError unless ``out_dir`` is absent or empty, or ``overwrite`` is set."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")


def write_checkpoint(
    out_dir: str, tensors: dict[str, torch.Tensor], hf_config: Any, atomq_meta: dict[str, Any],
    tokenizer: Any | None, overwrite: bool = False,
) -> None:
    """Write a checkpoint into ``out_dir`` atomically: a temporary sibling directory, renamed at the end."""
    check_writable(out_dir, overwrite)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        hf_config.to_json_file(str(tmp / "config.json"))
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **atomq_meta}
        (tmp / QCONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str) -> dict[str, Any]:
    """atomq_config.json, validated for format name and version."""
    f = Path(path) / QCONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not an atomq checkpoint: {QCONFIG_FILE} is missing")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{f}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: format_version {meta.get('format_version')} is not supported (this atomq reads {FORMAT_VERSION})"
        )
    for key in ("quant", "splits"):
        if key not in meta:
            raise CheckpointError(f"{f} lacks the {key!r} entry")
    return meta


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors; a missing or truncated file raises CheckpointError."""
    f = Path(path) / TENSORS_FILE
    if not f.is_file():
        raise CheckpointError(f"{f} is missing")
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{f} cannot be read (truncated or corrupt?): {e}") from None


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
    float_dtypes=(torch.float16, torch.bfloat16, torch.float32),
) -> None:
    """Every expected tensor present with its shape and dtype (None = any float dtype), nothing extra."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_short(extra)}")
    for name, (shape, dtype) in expected.items():
        t = tensors.get(name)
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        ok = t.dtype in float_dtypes if dtype is None else t.dtype == dtype
        if not ok:
            problems.append(f"{name}: dtype {t.dtype}, expected {dtype or 'a float dtype'}")
    if problems:
        raise CheckpointError("checkpoint does not match its config:\n  " + "\n  ".join(problems[:20]))


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
