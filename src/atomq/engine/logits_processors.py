"""What the sampler draws from: the logits with each request's penalties, logit bias and min_tokens applied.

Penalties keep their state on the device per sequence. A penalized sequence (SamplingParams.penalized)
holds how often each token occurs in its output and, with a repetition penalty, which tokens its prompt
holds. Each step adds only the output tokens that are new since the last step, the one still in flight
under asynchronous scheduling read from the device (the staging's ``sampled``), so the host's work per
step does not grow with the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import apply_penalties
from .sequence import Sequence
from .transfer import to_device


@dataclass
class PenaltyState:
    """counts: fp32 [V] occurrences of each token in the output; prompt: bool [V] the prompt's tokens (only
    with a repetition penalty); counted: output positions already in ``counts`` (a token in flight too)."""

    counts: torch.Tensor
    prompt: torch.Tensor | None
    counted: int = 0


def penalized_logits(logits: torch.Tensor, seqs: list[Sequence], sampled: torch.Tensor,
                     sampled_rows: dict[int, int] | None) -> torch.Tensor:
    """logits [B, V] of ``seqs`` -> fp32 [B, V] with every penalized sequence's penalties applied.

    sampled: int64 [R], the tokens of the step in flight on the device; sampled_rows: seq_id -> its row
    there (None when no step is in flight). Updates each penalized sequence's PenaltyState."""
    dev, (b, v) = logits.device, logits.shape
    pen = [(i, s) for i, s in enumerate(seqs) if s.params.penalized]
    for _, s in pen:
        if s.penalty is None:
            prompt = None
            if s.params.repetition_penalty != 1.0:
                prompt = torch.zeros(v, dtype=torch.bool, device=dev)
                prompt[to_device(s.prompt_token_ids, torch.int64, dev)] = True
            s.penalty = PenaltyState(torch.zeros(v, dtype=torch.float32, device=dev), prompt)
    # output positions new since the last step: known here, or in flight (read from ``sampled``)
    rows, toks, pending_rows, pending_src = [], [], [], []
    for j, (_, s) in enumerate(pen):
        total = len(s.token_ids) - s.num_prompt_tokens
        known = total - s.num_pending
        for pos in range(s.penalty.counted, total):
            if pos < known:
                rows.append(j)
                toks.append(s.token_ids[s.num_prompt_tokens + pos])
            else:
                pending_rows.append(j)
                pending_src.append(sampled_rows[s.seq_id])
        s.penalty.counted = total
    n, k = len(rows), len(pending_rows)
    idx = to_device([i for i, _ in pen] + rows + toks + pending_rows + pending_src, torch.int64, dev)
    at, idx = idx[:len(pen)], idx[len(pen):]
    stacked = torch.stack([s.penalty.counts for _, s in pen])  # [P, V]
    one = torch.ones((), dtype=torch.float32, device=dev)
    stacked.index_put_((idx[:n], idx[n:2 * n]), one.expand(n), accumulate=True)
    if k:
        stacked.index_put_((idx[2 * n:2 * n + k], sampled.index_select(0, idx[2 * n + k:])), one.expand(k),
                           accumulate=True)
    for j, (_, s) in enumerate(pen):
        s.penalty.counts = stacked[j]
    counts = torch.zeros(b, v, dtype=torch.float32, device=dev).index_copy_(0, at, stacked)
    seen = counts > 0
    if any(s.penalty.prompt is not None for _, s in pen):
        none = torch.zeros(v, dtype=torch.bool, device=dev)
        prompts = torch.stack([none if s.penalty.prompt is None else s.penalty.prompt for _, s in pen])
        seen.index_copy_(0, at, seen.index_select(0, at) | prompts)
    return apply_penalties(logits, [s.params for s in seqs], counts, seen)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [B, V] -> fp32 [B, V] with each sequence's logit_bias added, as a new tensor (the raw logits
    stay as they are); ``logits`` itself when no sequence has a bias. Each sequence's bias goes to the
    device once (Sequence.bias), so a step costs O(biased sequences) on the host."""
    biased = [(i, s) for i, s in enumerate(seqs) if s.params.logit_bias]
    if not biased:
        return logits
    dev = logits.device
    for _, s in biased:
        if s.bias is None:
            ids, values = zip(*s.params.logit_bias)
            s.bias = (to_device(list(ids), torch.int64, dev), to_device(list(values), torch.float32, dev))
    meta = to_device([i for i, _ in biased] + [len(s.params.logit_bias) for _, s in biased], torch.int64, dev)
    total = sum(len(s.params.logit_bias) for _, s in biased)  # output_size: no wait for the device
    rows = torch.repeat_interleave(meta[:len(biased)], meta[len(biased):], output_size=total)
    cols = torch.cat([s.bias[0] for _, s in biased])
    out = logits.float().clone()
    out.index_put_((rows, cols), torch.cat([s.bias[1] for _, s in biased]), accumulate=True)
    return out


def suppress_stops(logits: torch.Tensor, seqs: list[Sequence], eos_token_id: int | None) -> torch.Tensor:
    """logits [B, V] -> the same with EOS and the stop token ids at -inf for every sequence short of its
    min_tokens (its placeholders count as output), as a new fp32 tensor; ``logits`` itself when none is."""
    rows, cols = [], []
    for i, s in enumerate(seqs):
        p = s.params
        if p.min_tokens and len(s.token_ids) - s.num_prompt_tokens < p.min_tokens:
            stops = list(p.stop_token_ids)
            if eos_token_id is not None and not p.ignore_eos:
                stops.append(eos_token_id)
            rows += [i] * len(stops)
            cols += stops
    if not rows:
        return logits
    idx = to_device(rows + cols, torch.int64, logits.device)
    logits = logits.float().clone()  # the raw logits stay as they are (logprobs, recorded logits)
    logits[idx[:len(rows)], idx[len(rows):]] = float("-inf")
    return logits


def sampling_scores(logits: torch.Tensor, seqs: list[Sequence], eos_token_id: int | None, sampled: torch.Tensor,
                    sampled_rows: dict[int, int] | None) -> torch.Tensor:
    """logits [B, V] of ``seqs`` -> what the sampler draws from (penalties, logit bias, then min_tokens);
    ``logits`` itself when no request asks for any. sampled / sampled_rows: as for penalized_logits."""
    if any(s.params.penalized for s in seqs):
        logits = penalized_logits(logits, seqs, sampled, sampled_rows)
    if any(s.params.logit_bias for s in seqs):
        logits = apply_logit_bias(logits, seqs)
    return suppress_stops(logits, seqs, eos_token_id)
