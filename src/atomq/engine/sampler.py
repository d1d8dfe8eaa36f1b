"""Next-token sampling: greedy, temperature, top-k, top-p, with a per-request torch.Generator for seeds."""

from __future__ import annotations

from operator import attrgetter

import torch

from .sequence import SamplingParams

_temperature = attrgetter("temperature")


def all_greedy(params: list[SamplingParams]) -> bool:
    """Every request greedy (temperature 0). One C-level pass: a validated temperature is 0.0 (falsy)
    or > 0, so this is ``not any(temperatures)``."""
    return not any(map(_temperature, params))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits fp32 [V] (already divided by the temperature) -> the same with dropped tokens at -inf.

    top_k keeps the k largest (0 = all); top_p keeps the smallest set of most likely tokens whose
    probability sum reaches top_p (the most likely token always stays).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        drop = before >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits [B, V] (any float dtype) -> one token id per row.

    Greedy rows take the argmax (the first maximal id on ties). Others draw from
    softmax(filtered logits / temperature) with their generator (None = the global RNG).
    """
    if all_greedy(params):  # the common serving case: one kernel, one copy to the host
        return logits.argmax(dim=-1).tolist()
    logits = logits.float()
    out = [0] * logits.shape[0]
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        ids = logits[greedy].argmax(dim=-1).tolist()
        for i, t in zip(greedy, ids):
            out[i] = t
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
