"""Perplexity with the protocol of ATOM.md section 4: the joined test text tokenized once, cut into
numel // seq_len non-overlapping windows, mean next-token NLL over all windows, exp."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import read_text, resolve_dataset
from . import model_device


@dataclass(frozen=True)
class PplResult:
    ppl: float
    windows: int
    tokens: int  # predicted tokens
    seconds: float


def token_windows(tokenizer, dataset: str, seq_len: int, data_dir: str | None = None) -> torch.Tensor:
    """-> int64 [numel // seq_len, seq_len] of the whole dataset tokenized once."""
    ids = tokenizer(read_text(resolve_dataset(dataset, data_dir)), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{dataset} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, limit: int | None = None, progress: bool = True) -> PplResult:
    """model: input_ids [1, T] -> logits [1, T, V]; windows int64 [n, T] (moved to the model's device).
    Evaluates the first ``limit``."""
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        windows = windows[:limit]
    t0 = time.time()
    nll, count = 0.0, 0
    device = model_device(model)
    for w in tqdm(windows, desc="perplexity", disable=not progress):
        w = w.to(device)
        logits = model(w[None])[0, :-1].float()  # [T-1, V]
        nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return PplResult(math.exp(nll / count), len(windows), count, time.time() - t0)
