"""Request state: SamplingParams (frozen, validated) and Sequence (tokens, KV blocks, progress).

A sequence's tokens are ``prompt + generated``. ``num_computed_tokens`` of them have their K/V in the
paged cache; the scheduler gives each step a chunk of the rest (a prefill chunk, or the one token
sampled last step). Preemption by recompute drops the blocks and sets ``num_computed_tokens`` back to 0:
the tokens stay, so nothing generated is lost.

When the engine runs steps ahead of the host (``async_scheduling``), the last ``num_pending``
token ids are PLACEHOLDER: sampled on the device by a step in flight, filled in when its tokens arrive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


MAX_LOGPROBS = 20  # most likely tokens reported per generated token
MIN_REPETITION_PENALTY = 1e-3  # and 1 / it at most: beyond, penalized logits can overflow to inf
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of one generated token: its own and ``top`` (token id, logprob) pairs, most
    likely first (natural log, fp32 softmax of the model's logits)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature: 0 = greedy (argmax), else softmax(logits / temperature); top_k: keep the k largest
    logits (0 = all); top_p: keep the smallest set of tokens whose probability reaches top_p (1 = all);
    min_p: keep the tokens at least min_p times as likely as the most likely one (0 = all);
    seed: per-request generator (None = the process RNG); max_tokens: tokens to generate (> 0);
    stop: strings that end the output (not included); stop_token_ids: token ids that end it
    (the id is kept in token_ids, its text is not added); ignore_eos: keep going past EOS; min_tokens: EOS
    and the stop token ids cannot be sampled before this many tokens (<= max_tokens); logprobs:
    return each generated token's log-probability and those of the ``logprobs`` most likely tokens
    (0..MAX_LOGPROBS; None = none), from the model's distribution before penalties, logit bias,
    temperature, top-k and top-p; prompt_logprobs: the same for every prompt token after the first (given
    the tokens before it; such a request computes its whole prompt: no prefix-cache hits); logit_bias:
    (token id, bias) pairs (a dict is accepted), each bias in [-100, 100] added to that token's logit after
    the penalties and before temperature / top-k / top-p (-100 all but bans a token, +100 all but forces
    it). Penalties (as in vLLM): repetition_penalty (1e-3..1e3, 1 = off) divides the positive logits and
    multiplies the negative ones of every token in the prompt or the output; presence_penalty and
    frequency_penalty (-2..2, 0 = off) subtract p and f * count from the logits of the output's tokens.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        # lists are accepted and frozen into tuples; a single stop string is one stop string
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must hold non-empty strings, got {stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        for t, b in self.logit_bias:
            if t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:  # also rejects NaN
                raise ValueError(f"logit_bias takes token ids >= 0 and biases in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {t}: {b}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if (not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool)
                or not 0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 1.0 / MIN_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                             f"{1 / MIN_REPETITION_PENALTY:g}] (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs; ValueError for anything but integer ids (each once)
    with real-number biases."""
    try:
        pairs = list(bias.items() if isinstance(bias, dict) else (bias or ()))
        if any(isinstance(t, bool) or int(t) != t or isinstance(b, bool) for t, b in pairs):
            raise TypeError
        out = tuple(sorted((int(t), float(b)) for t, b in pairs))
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must map integer token ids to numbers, got {bias!r}"[:200]) from None
    if len({t for t, _ in out}) != len(out):
        raise ValueError("logit_bias names a token id more than once")
    return out


PLACEHOLDER = -1  # a token id sampled on the device and not yet known to the host


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request inside the engine."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # KV page ids, in order. Only ever extended or replaced by a new list, never edited in place: the
    # decode staging (decode_staging.py) keeps a row while the list and its length are unchanged
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at the last admission
    num_hashed_blocks: int = 0  # leading full blocks registered in the prefix cache
    num_preemptions: int = 0
    finish_reason: str | None = None  # "stop" | "length"
    num_pending: int = 0  # trailing PLACEHOLDER tokens (sampled by a step in flight)
    final_pending: bool = False  # a step in flight samples the last token the length limits allow
    generator: Any = None  # torch.Generator when params.seed is set
    detok: Any = None  # IncrementalDetokenizer
    logits: list | None = None  # fp32 [V] rows, only when the engine records them
    logprobs: list[TokenLogprobs] | None = None  # one per generated token when params.logprobs is set
    # one per prompt token scored so far when params.prompt_logprobs is set; [0] is None (nothing predicts it)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    penalty: Any = None  # penalties.PenaltyState on the device, once a penalized step has run
    bias: Any = None  # params.logit_bias on the device, (ids int64 [K], biases fp32 [K]), once sampled
    # time.perf_counter() stamps: queued, first output token sampled, finished (None until then)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host knows (placeholders left out)."""
        return self.token_ids[self.num_prompt_tokens:self.num_tokens - self.num_pending]

    def drop_pending(self) -> None:
        """Forget the tokens still in flight (the sequence ended before they arrived)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0
        self.final_pending = False

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt (in prompt order)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    logits: list | None = None  # per generated token, fp32 [V], when the engine records logits
    metrics: "RequestMetrics | None" = None
    logprobs: list[TokenLogprobs] | None = None  # per generated token, when the request asked for them
    # per prompt token ([0] is None), when the request asked for prompt_logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True)
class RequestMetrics:
    """Latency of one request in seconds (time.perf_counter() stamps): ttft = first token - arrival;
    tpot = (finish - first token) / (output tokens - 1), None for a single output token."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_output_tokens: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.first_token_time is None or self.finish_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)
