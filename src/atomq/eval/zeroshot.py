"""Zero-shot accuracy scored as lm-evaluation-harness scores multiple-choice tasks.

Each choice is a log-likelihood request (context, continuation): the sum over the continuation's tokens
of log p(token | everything before it). The predicted choice is the argmax (acc), or the argmax of the
log-likelihood divided by the choice's length in characters (acc_norm).

Tokenization follows lm-eval's Hugging Face model: trailing spaces of the context move to the front of
the continuation, context + continuation is encoded whole (with the tokenizer's default special tokens,
e.g. Llama's BOS) and the continuation is what follows the encoded context. Requests run in batches
sorted by length, right-padded: with causal attention no real position attends to a pad, and only real
positions are read, so no attention mask is needed (batched scores equal unbatched ones; tested).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import model_device
from .tasks import Example, get_task, load_examples


class LogLik(NamedTuple):
    """What lm-eval's ``LM.loglikelihood`` returns for one request."""

    logprob: float  # sum of log p(continuation token | prefix) over the continuation
    is_greedy: bool  # every continuation token is the argmax of its predicted distribution


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context, continuation) text -> (context ids, continuation ids), lm-eval's causal-LM rule.

    An empty context becomes the tokenizer's BOS token (EOS when it has none).
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def model_max_length(model) -> int | None:
    """The longest input an atomq CausalLM accepts (its positions, or Mistral's sliding window); None if unknown."""
    args = getattr(model, "args", None)
    if args is None:
        return None
    limits = [n for n in (args.max_position, args.sliding_window) if n]
    return min(limits) if limits else None


@torch.inference_mode()
def loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   max_length: int | None = None, progress: bool = True, desc: str = "loglikelihood") -> list[LogLik]:
    """Score token-id requests: one LogLik per (context ids, continuation ids), in the input order.

    model: input_ids int64 [B, T] -> logits [B, T, V]. The input is context + continuation minus its last
    token, cut from the left to ``max_length`` tokens when longer (the continuation is always kept whole).
    Batches of up to ``batch_size`` requests, longest first, one forward each.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("a request needs at least one context token and one continuation token")
        if max_length is not None and len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's {max_length}")
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[LogLik | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs = []
        for i in idx:
            ctx, cont = requests[i]
            seq = ctx + cont
            if max_length is not None:
                seq = seq[-(max_length + 1):]
            inputs.append(seq[:-1])  # the last token is only predicted
        ids = torch.zeros(len(idx), max(map(len, inputs)), dtype=torch.long)  # [B, T], right-padded with 0
        for row, inp in enumerate(inputs):
            ids[row, :len(inp)] = torch.tensor(inp)
        logits = model(ids.to(device))  # [B, T, V]
        for row, i in enumerate(idx):
            cont = torch.tensor(requests[i][1], device=logits.device)  # [n]
            end = len(inputs[row])
            logp = torch.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)  # [n, V]
            out[i] = LogLik(logp.gather(-1, cont[:, None]).sum().item(), bool((logp.argmax(-1) == cont).all()))
        bar.update(len(idx))
    bar.close()
    return out


def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_length: int | None = None,
                   progress: bool = True, desc: str = "loglikelihood") -> list[list[float]]:
    """-> log-likelihood of every choice: [n_examples][n_choices of that example]."""
    requests = [encode_pair(tokenizer, ctx, cont)
                for ex in examples for ctx, cont in zip(ex.contexts, ex.continuations)]
    flat = loglikelihoods(model, requests, batch_size, max_length, progress, desc)
    out, k = [], 0
    for ex in examples:
        out.append([r.logprob for r in flat[k:k + len(ex.choices)]])
        k += len(ex.choices)
    return out


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def accuracy(examples: Sequence[Example], lls: Sequence[Sequence[float]]) -> tuple[float, float]:
    """-> (acc, acc_norm) in [0, 1]; acc_norm ranks ll / len(choice) (characters; an empty choice counts 1)."""
    if not examples:
        raise ValueError("no examples to score")
    hits = hits_norm = 0
    for ex, ll in zip(examples, lls, strict=True):
        hits += _argmax(ll) == ex.gold
        hits_norm += _argmax([v / max(len(c), 1) for v, c in zip(ll, ex.choices)]) == ex.gold
    return hits / len(examples), hits_norm / len(examples)


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str  # the reported one: "acc" or "acc_norm"
    acc: float
    acc_norm: float
    n: int
    seconds: float

    @property
    def value(self) -> float:
        return self.acc if self.metric == "acc" else self.acc_norm

    @property
    def stderr(self) -> float:
        """Standard error of the reported metric (sample standard deviation / sqrt(n), as lm-eval)."""
        p = self.value
        return math.sqrt(p * (1 - p) / (self.n - 1)) if self.n > 1 else float("nan")


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], data_dir=None, limit: int | None = None,
                   batch_size: int = 16, max_length: int | None = None, progress: bool = True) -> list[TaskResult]:
    """Load, score and measure each task (first ``limit`` examples); ``max_length`` defaults to the model's."""
    for name in tasks:
        get_task(name)  # fail on a typo before any work
    if max_length is None:
        max_length = model_max_length(model)
    results = []
    for name in tasks:
        t0 = time.time()
        examples = load_examples(name, data_dir, limit)
        lls = score_examples(model, tokenizer, examples, batch_size, max_length, progress, desc=name)
        acc, acc_norm = accuracy(examples, lls)
        results.append(TaskResult(name, get_task(name).metric, acc, acc_norm, len(examples), time.time() - t0))
    return results


def average(results: Sequence[TaskResult]) -> float:
    """Mean of the reported metrics (Atom's six-task average)."""
    return sum(r.value for r in results) / len(results)


def format_table(results: Sequence[TaskResult]) -> str:
    """A markdown table: one row per task (reported metric in %, +- stderr) and the average."""
    lines = ["| task | metric | value (%) | stderr | acc | acc_norm | n |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.task} | {r.metric} | {100 * r.value:.2f} | {100 * r.stderr:.2f} | "
                     f"{100 * r.acc:.2f} | {100 * r.acc_norm:.2f} | {r.n} |")
    lines.append(f"| average | | {100 * average(results):.2f} | | | | |")
    return "\n".join(lines)
