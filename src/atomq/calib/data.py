"""Calibration windows: random non-overlapping token windows from a text corpus (never a test split)."""

from __future__ import annotations

import random

import torch

from ..data import read_text, resolve_dataset


def calibration_windows(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int = 0,
                        data_dir: str | None = None) -> torch.Tensor:
    """Tokenize the whole corpus once and draw ``n_samples`` distinct windows -> int64 [n_samples, seq_len]."""
    path = resolve_dataset(dataset, data_dir)
    if "wikitext2" in path.parts and "test" in path.name:
        raise ValueError(f"{path} is a test split; calibrating on it would leak the evaluation data")
    ids = tokenizer(read_text(path), return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seq_len
    if n_windows < n_samples:
        raise ValueError(
            f"{path} has {ids.numel()} tokens: only {n_windows} windows of {seq_len}, {n_samples} requested"
        )
    starts = sorted(random.Random(seed).sample(range(n_windows), n_samples))
    return torch.stack([ids[s * seq_len : (s + 1) * seq_len] for s in starts])
