"""The engine loop and the offline API: ``LLM(model).generate(prompts, SamplingParams(...))``.

LLMEngine wires the parts: Scheduler (+ BlockManager) decides a step, ModelRunner computes it over the
KVPool, the sampler picks tokens, the detokenizer grows the text and stop rules finish requests.
A bad request is refused by ``add_request`` with a ValueError before it touches any state, so the
requests already in the engine keep running.

Asynchronous scheduling (``async_scheduling``, on by default on CUDA): each step is launched before
the host has seen the tokens of the step ahead of it. The runner takes those tokens from the device
(decode steps: the staging's gather, decode_staging.py; other steps: build_step_batch), each sequence
holds a PLACEHOLDER for its token in flight, and the host lands the step ahead (its tokens, stop rules,
text) while the GPU computes the new one, so the host's time per step hides behind the GPU's. A sequence
that stops on a token (EOS, a stop string) is known to stop one step late: the one token computed for it
meanwhile is dropped; the length limits are known ahead and cost nothing. On the CPU the device work is
synchronous anyway, so steps run one at a time there by default.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, find_stop
from .kv_pool import (ATTENTION_BACKENDS, KV_CACHE_DTYPES, KVPool, available_bytes, bytes_per_token, num_blocks_for,
                      resolve_kv_dtype)
from ..model.methods import LINEAR_METHODS, prepare_linears
from .logits_processors import sampling_scores
from .model_runner import ModelRunner, prompt_logprob_spans
from .sampler import (all_greedy, logprob_entries, output_tops, sample, sample_tokens, token_logprobs,
                      top_logprobs_wanted)
from .scheduler import Scheduler, SchedulerConfig
from .sequence import PLACEHOLDER, RequestMetrics, RequestOutput, SamplingParams, Sequence, TokenLogprobs
from .transfer import to_device


@dataclass(frozen=True)
class EngineConfig:
    """Serving knobs. kv_cache_bytes: explicit KV budget in bytes (else measured free memory times
    gpu_memory_utilization); max_model_len: None = the model's max_position (and sliding window);
    record_logits: keep each generated token's logits in RequestOutput.logits (tests, debugging);
    linear_method / linear_backend: how the linears run (model/methods.py: "auto" = the stored format,
    or float / fp8 / int8 / w4a16 / atom; backend "auto" = kernels on CUDA, reference ops on CPU);
    enforce_eager: no CUDA graphs for decode steps; async_scheduling: launch each step before the host
    has the tokens of the one ahead (module docstring; None = on CUDA only)."""

    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    record_logits: bool = False
    linear_method: str = "auto"
    linear_backend: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv cache dtype {self.kv_cache_dtype!r}; choose one of {KV_CACHE_DTYPES}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
        if self.linear_method not in LINEAR_METHODS:
            raise ValueError(f"unknown linear method {self.linear_method!r}; choose one of {LINEAR_METHODS}")
        if self.linear_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown linear backend {self.linear_backend!r}; choose one of {ATTENTION_BACKENDS}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


# prompt positions projected and scored at once (their logits and an fp32 [rows, vocab] log-softmax)
PROMPT_LOGPROB_ROWS = 1024


@dataclass
class InFlightStep:
    """A step launched ahead of the host: its sampled tokens are on their way to ``host``."""

    seqs: list[Sequence]  # the sequences it samples a token for, in row order
    host: torch.Tensor  # int64 [>= len(seqs)]: the tokens, once ``copied`` has completed
    copied: Any  # torch.cuda.Event (None on the CPU: the copy has run)
    logits: torch.Tensor | None  # fp32 [len(seqs), V] copies when the engine records logits
    decode: bool = True  # a plain decode step (for the engine's statistics)
    logprobs: tuple | None = None  # token_logprobs' three tensors on their way to the host, when asked for
    sampled_rows: dict[int, int] = field(init=False)  # seq_id -> row of the staging's ``sampled``

    def __post_init__(self) -> None:
        self.sampled_rows = {s.seq_id: i for i, s in enumerate(self.seqs)}


class LLMEngine:
    def __init__(self, lm: Any, config: EngineConfig = EngineConfig()):
        """lm: a model/loader.LoadedModel (model, tokenizer, qcfg)."""
        self.lm, self.config = lm, config
        model, args, qcfg = lm.model, lm.model.args, lm.qcfg
        self.device = model.inv_freq.device
        if qcfg.kv_bits is not None and qcfg.kv_pre_rope:
            raise ValueError("the paged cache stores keys after RoPE; this model quantizes K before RoPE "
                             "(kv_pre_rope); load it with kv_bits=4 and kv_pre_rope off to serve it")
        mode = resolve_kv_dtype(config.kv_cache_dtype, qcfg.kv_bits)
        limit = min(args.max_position, args.sliding_window or args.max_position)
        max_len = config.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context of {limit} tokens")
        self.linear_kernels = prepare_linears(model, config.linear_method, config.linear_backend)
        dtype = model.model.embed_tokens.weight.dtype
        per_token = bytes_per_token(args.n_kv_heads, args.head_dim, mode, dtype) * args.n_layers
        budget = config.kv_cache_bytes or available_bytes(self.device, config.gpu_memory_utilization)
        bs = 16
        per_seq = -(-max_len // bs)
        num_blocks = min(num_blocks_for(budget, per_token, bs), per_seq * config.max_num_seqs)
        if num_blocks < per_seq:
            raise ValueError(f"the KV pool holds {num_blocks * bs} tokens, fewer than max_model_len {max_len}: "
                             f"raise the KV budget or lower max_model_len")
        self.max_model_len = max_len
        self.kv_pool = KVPool(args.n_layers, args.n_kv_heads, args.head_dim, num_blocks, mode, self.device, dtype, bs,
                              config.attention_backend)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_len),
                                   self.block_manager)
        overlap = config.async_scheduling
        self.async_scheduling = self.device.type == "cuda" if overlap is None else overlap
        self.runner = ModelRunner(model, self.kv_pool, config.max_num_seqs, max_len, not config.enforce_eager,
                                  gather_tokens=self.async_scheduling)
        self._in_flight: InFlightStep | None = None
        rows, pin = self.runner.staging.rows, self.device.type == "cuda"
        self._token_buffers = [torch.zeros(rows, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._next_buffer = 0
        self.tokenizer = lm.tokenizer
        self.eos_token_id = getattr(lm.tokenizer, "eos_token_id", None)
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0,
                      "decode_steps": 0, "decode_tokens": 0, "steps": 0, "max_batch_tokens": 0}

    # ----------------------------------------------------------------------------------- requests
    def make_sequence(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Validate one request and build its Sequence (no engine state changes)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            ids, text = self.tokenizer(prompt)["input_ids"], prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.lm.model.args.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {list(params.stop_token_ids)}")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {[t for t, _ in params.logit_bias]}")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context "
                             f"(max_model_len {self.max_model_len})")
        if len(ids) == self.max_model_len and params.max_tokens > 1:  # one token needs no room: never fed back
            raise ValueError(f"the prompt fills the whole context ({self.max_model_len} tokens): "
                             f"no room to generate more than one token")
        sid = next(self._ids)
        seq = Sequence(sid, ids, params, text, request_id if request_id is not None else str(sid))
        seq.arrival_time = time.perf_counter()
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.detok = IncrementalDetokenizer(self.tokenizer, ids)
        if self.config.record_logits:
            seq.logits = []
        if params.logprobs is not None:
            seq.logprobs = []
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # nothing predicts the first prompt token
        return seq

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        seq = self.make_sequence(prompt, params, request_id)
        self.scheduler.add(seq)
        self.stats["prompt_tokens"] += seq.num_prompt_tokens
        return seq

    def abort_request(self, seq: Sequence) -> bool:
        """Stop a queued or running request now (finish_reason "abort"); its KV blocks are freed.
        Returns False when it had already finished. Call between steps (the engine is single-threaded)."""
        if seq.is_finished:
            return False
        seq.drop_pending()  # a step in flight may still compute its token: it is dropped when it lands
        self.scheduler.finish(seq, "abort")
        seq.finish_time = time.perf_counter()
        return True

    def drain(self) -> list[Sequence]:
        """Land the step in flight (asynchronous scheduling) so that every computed token is on the host;
        returns the sequences that finished with it. Nothing to do after a synchronous step."""
        step, self._in_flight = self._in_flight, None
        return self._land(step) if step is not None else []

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV pool's blocks in use (held by running sequences or the prefix cache's
        live references; cached-but-free blocks count as free)."""
        bm = self.block_manager
        return 1.0 - bm.num_free_blocks / bm.num_blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --------------------------------------------------------------------------------------- step
    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        """All stop rules for ``token`` (already appended to seq.token_ids); the finish reason or None."""
        p = seq.params
        if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
            seq.detok.flush()  # the stop token's own text is not added
            return "stop"
        if p.stop:  # stop strings need the text now; otherwise it is decoded when read
            delta = seq.detok.step(token)
            cut = find_stop(seq.detok.text, p.stop, len(delta)) if delta else None
            if cut is not None:
                seq.detok.text = seq.detok.text[:cut]
                return "stop"
        else:
            seq.detok.push(token)
        return self._check_length(seq)

    def _length_reached(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """The length limits allow no token after the first ``num_tokens`` of seq (default: all of them,
        placeholders included)."""
        n = len(seq.token_ids) if num_tokens is None else num_tokens
        return n - len(seq.prompt_token_ids) >= seq.params.max_tokens or n >= self.max_model_len

    @staticmethod
    def _before_min_tokens(seq: Sequence) -> bool:
        """Fewer than min_tokens output tokens up to the one just accepted: no stop token or stop string
        may end it yet (the length limits still do)."""
        return len(seq.token_ids) - seq.num_pending - seq.num_prompt_tokens < seq.params.min_tokens

    def _check_length(self, seq: Sequence) -> str | None:
        if self._length_reached(seq, len(seq.token_ids) - seq.num_pending):  # up to the token just accepted
            seq.detok.flush()
            return "length"
        return None

    def _advance(self, seqs: list[Sequence], num_new_tokens: list[int]) -> None:
        """Count the step's tokens as computed; register blocks that just became full in the prefix cache."""
        bm = self.block_manager
        bs, caching = bm.block_size, bm.enable_prefix_caching
        for seq, n in zip(seqs, num_new_tokens):
            seq.num_computed_tokens += n
            if caching and seq.num_computed_tokens // bs > seq.num_hashed_blocks:  # once per block, not per token
                bm.register_computed(seq)

    def _accept(self, seq: Sequence, tok: int, logits: torch.Tensor | None, now: float,
                logprobs: TokenLogprobs | None = None) -> Sequence | None:
        """Apply the stop rules to ``tok``, already in seq.token_ids (logits: its fp32 [V] row when the
        engine records them; logprobs: when the request asked for them). Returns seq when it finished."""
        if seq.first_token_time is None:
            seq.first_token_time = now
        if seq.logits is not None:
            seq.logits.append(logits)
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        if (p.stop_token_ids or p.stop or tok == self.eos_token_id) and not self._before_min_tokens(seq):
            reason = self._check_stop(seq, tok)
        else:  # the common case: only the length limits can stop it
            seq.detok.push(tok)
            reason = self._check_length(seq)
        if reason is None:
            return None
        seq.drop_pending()  # what a step in flight computes for it is not wanted any more
        self.scheduler.finish(seq, reason)
        seq.finish_time = now
        return seq

    def _append_tokens(self, wanting: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        """Sample a token for each sequence of ``wanting`` (logits [len(wanting), V]), append it and apply
        the stop rules. Returns the sequences that finished."""
        params = [s.params for s in wanting]
        generators = [] if all_greedy(params) else [s.generator for s in wanting]
        lp, raw = None, logits
        logits = self._scores(wanting, logits, None)
        if any(p.logprobs is not None for p in params):
            ids = sample_tokens(logits, params, generators)
            raw_lp = token_logprobs(raw, ids, top_logprobs_wanted(params))
            lp = logprob_entries(output_tops(wanting), ids.tolist(), raw_lp)
            tokens = [e.token_id for e in lp]
        else:
            tokens = sample(logits, params, generators)
        now, finished, record = time.perf_counter(), [], self.config.record_logits
        for i, (seq, tok) in enumerate(zip(wanting, tokens)):
            seq.token_ids.append(tok)
            row = raw[i].to(torch.float32, copy=True) if record else None
            if self._accept(seq, tok, row, now, lp[i] if lp is not None else None) is not None:
                finished.append(seq)
        return finished

    def _score_prompts(self, seqs: list[Sequence], spans: list[tuple[int, int, int]],
                       hidden: torch.Tensor | None) -> None:
        """Append the prompt logprobs of ``spans`` (prompt_logprob_spans) from the final hidden states of their
        rows, hidden [P, D] in span order, projected PROMPT_LOGPROB_ROWS rows at a time. Waits for the step
        (prompt logprobs are read on the host at once, even with asynchronous steps)."""
        if not spans:
            return
        owners = [seqs[i] for i, _, count in spans for _ in range(count)]
        targets = [seqs[i].prompt_token_ids[p + 1] for i, first, count in spans for p in range(first, first + count)]
        k = max(s.params.prompt_logprobs for s in owners)
        ids = to_device(targets, torch.int64, hidden.device)
        tops = [s.params.prompt_logprobs for s in owners]
        lm_head = self.runner.model.lm_head
        with torch.no_grad():
            for lo in range(0, len(owners), PROMPT_LOGPROB_ROWS):  # bounded [rows, vocab] memory
                hi = lo + PROMPT_LOGPROB_ROWS
                raw = token_logprobs(lm_head(hidden[lo:hi]), ids[lo:hi], k)
                for seq, entry in zip(owners[lo:hi], logprob_entries(tops[lo:hi], targets[lo:hi], raw)):
                    seq.prompt_logprobs.append(entry)

    def _scores(self, seqs: list[Sequence], logits: torch.Tensor, ahead: InFlightStep | None) -> torch.Tensor:
        return sampling_scores(logits, seqs, self.eos_token_id, self.runner.staging.sampled,
                               ahead.sampled_rows if ahead is not None else None)

    # ------------------------------------------------------------------------ one step ahead
    def _launch(self, seqs: list[Sequence], counts: list[int], ahead: InFlightStep | None) -> InFlightStep:
        """Run a step and sample on the device without waiting for either; each sequence that gets a token
        holds a PLACEHOLDER for it. ``ahead``: the step still in flight, whose tokens feed this one."""
        spans = prompt_logprob_spans(seqs, counts)
        sampled_rows = ahead.sampled_rows if ahead is not None else None
        wanting, logits, prompt_hidden = self.runner.run(seqs, counts, sampled_rows, spans)
        self._score_prompts(seqs, spans, prompt_hidden)
        self._advance(seqs, counts)
        decode = sum(counts) == len(seqs)
        n = len(wanting)
        if not n:  # prefill chunks only: nothing to sample
            return InFlightStep([], torch.empty(0, dtype=torch.int64), None, None, decode)
        params = [s.params for s in wanting]
        scores = self._scores(wanting, logits, ahead)
        tokens = sample_tokens(scores, params, [] if all_greedy(params) else [s.generator for s in wanting])
        lp = None
        if any(p.logprobs is not None for p in params):  # copied to (pinned) host memory with the tokens
            raw = token_logprobs(logits, tokens, top_logprobs_wanted(params))
            lp = tuple(t.to("cpu", non_blocking=True) for t in raw)
        staging = self.runner.staging
        staging.sampled[:n].copy_(tokens)  # where the next step's inputs are gathered from
        host = self._token_buffers[self._next_buffer]  # two: the other one may still be read by ``_land``
        self._next_buffer ^= 1
        host[:n].copy_(staging.sampled[:n], non_blocking=True)
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        recorded = logits.to(torch.float32, copy=True) if self.config.record_logits else None
        for seq in wanting:
            seq.token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.final_pending = self._length_reached(seq)
        return InFlightStep(wanting, host, copied, recorded, decode, lp)

    def _land(self, step: InFlightStep) -> list[Sequence]:
        """Wait for the tokens of a step in flight, put them in place of their placeholders and apply the
        stop rules. Returns the sequences that finished."""
        if step.copied is not None:
            step.copied.synchronize()
        tokens = step.host[:len(step.seqs)].tolist()
        lp = logprob_entries(output_tops(step.seqs), tokens, step.logprobs) if step.logprobs is not None else None
        now, finished, bm, landed = time.perf_counter(), [], self.block_manager, 0
        for i, (seq, tok) in enumerate(zip(step.seqs, tokens)):
            if seq.is_finished:  # stopped (or aborted) while this token was computed: dropped
                continue
            landed += 1
            seq.token_ids[len(seq.token_ids) - seq.num_pending] = tok  # the oldest placeholder
            seq.num_pending -= 1
            if not seq.num_pending:  # (else the newer placeholder's flag stands)
                seq.final_pending = False
            if seq.block_table and seq.num_computed_tokens // bm.block_size > seq.num_hashed_blocks:
                bm.register_computed(seq)  # blocks whose last token was a placeholder until now
            row = step.logits[i].clone() if step.logits is not None else None
            if self._accept(seq, tok, row, now, lp[i] if lp is not None else None) is not None:
                finished.append(seq)
        self.stats["generated_tokens"] += landed
        self.stats["decode_tokens"] += landed if step.decode else 0
        return finished

    def _step_ahead(self, seqs: list[Sequence], counts: list[int], ahead: InFlightStep | None) -> list[Sequence]:
        """Launch this step, then land the one ahead while the GPU computes it. The call's time counts
        for the kind (prefill / decode) of the step that landed in it: that step's GPU time is what the
        call waited for."""
        t0 = time.perf_counter()
        try:
            if seqs:
                self._in_flight = self._launch(seqs, counts, ahead)
        except BaseException:
            if ahead is not None:  # this step failed; the one ahead still lands (its tokens are not lost)
                self._land(ahead)
            raise
        finished = self._land(ahead) if ahead is not None else []
        if not seqs and ahead is None and self.has_unfinished():
            raise RuntimeError("nothing could be scheduled although requests are waiting")
        st = self.stats
        num_tokens = sum(counts)
        decode = ahead.decode if ahead is not None else num_tokens == len(seqs)
        st["decode_s" if decode else "prefill_s"] += time.perf_counter() - t0
        if seqs:
            st["decode_steps"] += num_tokens == len(seqs)
            st["steps"] += 1
            st["max_batch_tokens"] = max(st["max_batch_tokens"], num_tokens)
        return finished

    def step(self) -> list[Sequence]:
        """Schedule and run one step; returns the sequences that finished in it (with asynchronous
        scheduling: those whose last token arrived with the step before)."""
        sched = self.scheduler.schedule()
        seqs, counts = sched.seqs, sched.num_new_tokens
        if self.async_scheduling:
            ahead, self._in_flight = self._in_flight, None
            return self._step_ahead(seqs, counts, ahead)
        if not seqs:
            if self.has_unfinished():
                raise RuntimeError("nothing could be scheduled although requests are waiting")
            return []
        t0 = time.perf_counter()
        spans = prompt_logprob_spans(seqs, counts)
        wanting, logits, prompt_hidden = self.runner.run(seqs, counts, None, spans)
        self._score_prompts(seqs, spans, prompt_hidden)
        self._advance(seqs, counts)
        finished = self._append_tokens(wanting, logits) if wanting else []
        dt = time.perf_counter() - t0
        num_tokens = sum(counts)
        decode = num_tokens == len(seqs)  # one token each
        st = self.stats
        st["decode_s" if decode else "prefill_s"] += dt
        st["decode_steps"] += decode
        st["decode_tokens"] += len(wanting) if decode else 0
        st["steps"] += 1
        st["generated_tokens"] += len(wanting)
        st["max_batch_tokens"] = max(st["max_batch_tokens"], num_tokens)
        return finished

    @staticmethod
    def output(seq: Sequence) -> RequestOutput:
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, len(seq.output_token_ids))
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), seq.detok.text,
                             list(seq.output_token_ids), seq.finish_reason, seq.num_cached_tokens,
                             seq.num_preemptions, seq.logits, metrics, seq.logprobs, seq.prompt_logprobs)


def apply_chat_template(tokenizer: Any, prompt: str) -> str:
    """Wrap a prompt in the tokenizer's chat template (one user turn) when it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


class LLM:
    """Offline generation. ``model``: a path understood by model/loader.load_model ('smollm2', an HF
    directory, a .gguf file, an atomq checkpoint) or an already loaded LoadedModel.

    dtype: "auto" (float32 on CPU, float16 on CUDA) or a loader dtype name; device: default CUDA when
    available; kv_bits / kv_rotate: the loader's run-time KV overrides; other keyword arguments are
    EngineConfig fields.
    """

    def __init__(self, model: Any, *, dtype: str = "auto", device: str | None = None,
                 kv_bits: Any = "checkpoint", kv_rotate: bool | None = None, **engine_kwargs: Any):
        from ..model.loader import DTYPES, LoadedModel, load_model

        config = EngineConfig(**engine_kwargs)  # bad knobs fail before the (slow) load
        if isinstance(model, LoadedModel):
            lm = model
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if dtype == "auto":
                dtype = "float16" if torch.device(device).type == "cuda" else "float32"
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
            lm = load_model(model, DTYPES[dtype], device, kv_bits=kv_bits, kv_rotate=kv_rotate)
        self.engine = LLMEngine(lm, config)
        self.tokenizer = lm.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (all validated before any is queued); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        eng = self.engine
        seqs = [eng.make_sequence(p, sp) for p, sp in zip(prompts, params)]
        for seq in seqs:
            eng.scheduler.add(seq)
            eng.stats["prompt_tokens"] += seq.num_prompt_tokens
        while not all(s.is_finished for s in seqs):
            eng.step()
        return [eng.output(s) for s in seqs]


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput"]
