"""Next-token sampling: greedy, temperature, top-k, top-p, with a per-request torch.Generator for seeds."""

from __future__ import annotations

import math
from operator import attrgetter

import torch

from .sequence import SamplingParams, Sequence, TokenLogprobs
from .transfer import to_device

_temperature = attrgetter("temperature")


def all_greedy(params: list[SamplingParams]) -> bool:
    """Every request greedy (temperature 0). One C-level pass: a validated temperature is 0.0 (falsy)
    or > 0, so this is ``not any(temperatures)``."""
    return not any(map(_temperature, params))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """logits fp32 [V] (already divided by the temperature) -> the same with dropped tokens at -inf.

    top_k keeps the k largest (0 = all); top_p keeps the smallest set of most likely tokens whose
    probability sum reaches top_p (the most likely token always stays); min_p keeps the tokens at least
    min_p times as likely as the most likely one (0 = all).
    """
    if min_p > 0.0:  # p >= min_p * p_max  <=>  logit >= max logit + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        drop = before >= top_p
        drop[0] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))  # no host sync
    return logits


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], output_counts: torch.Tensor,
                    seen: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> fp32 [B, V] with each row's penalties (SamplingParams) applied. output_counts fp32
    [B, V]: how often each token occurs in the row's output so far; seen bool [B, V]: in its prompt or
    output. Rows without penalties are unchanged. No host sync."""
    values = [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params]
    rep, pres, freq = to_device(values, torch.float32, logits.device).unbind(1)
    rep, pres, freq = rep[:, None], pres[:, None], freq[:, None]
    logits = logits.float()
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - pres * (output_counts > 0) - freq * output_counts


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> token ids int64 [B] on the logits' device, without waiting for
    the device (the engine may copy them to the host later).

    Greedy rows take the argmax (the first maximal id on ties). Others draw from
    softmax(filtered logits / temperature) with their generator (None = the global RNG).
    """
    if all_greedy(params):  # the common serving case: one kernel
        return logits.argmax(dim=-1)
    logits = logits.float()
    out = logits.argmax(dim=-1)  # the greedy rows' tokens; the others are drawn below
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(row, dim=-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype), tokens int64 [B] -> (their logprobs fp32 [B], the k largest
    logprobs fp32 [B, k] and their ids int64 [B, k], most likely first), on the logits' device, no sync."""
    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # fp32 without a separate cast copy
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top = torch.topk(lp, k, dim=-1)  # k = 0 gives empty [B, 0] tensors
    return chosen, top.values, top.indices


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """``sample_tokens`` on the host: one token id per row."""
    return sample_tokens(logits, params, generators).tolist()


def top_logprobs_wanted(params: list[SamplingParams]) -> int:
    """The most top tokens any of the requests asks for (0 when none asks for logprobs)."""
    return max(p.logprobs or 0 for p in params)


def logprob_entries(tops: list[int], tokens: list[int], logprobs: tuple) -> list[TokenLogprobs]:
    """One TokenLogprobs per row from token_logprobs' three tensors (fp32 [B], fp32 [B, k], int64 [B, k]),
    row i cut to its request's own number of top tokens ``tops[i]``."""
    chosen, values, ids = (t.tolist() for t in logprobs)
    return [TokenLogprobs(tok, lp, tuple(zip(top_ids[:k], top_lp[:k])))
            for k, tok, lp, top_lp, top_ids in zip(tops, tokens, chosen, values, ids)]


def output_tops(seqs: list[Sequence]) -> list[int]:
    """Top tokens each sequence's generated-token logprobs report (0 when it asked for none)."""
    return [s.params.logprobs or 0 for s in seqs]
