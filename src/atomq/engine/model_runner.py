"""Model runner: a scheduled step (sequences + token counts) -> StepBatch tensors -> paged forward -> logits.

The runner owns the model and the KV pool; it knows nothing about queues or sampling. Prefill and
chunked steps build their metadata in plain Python lists (``build_step_batch``, two host-to-device
copies); decode steps, where every sequence computes its last token, write it straight into the
staging buffers of ``decode_staging.py`` (one copy, no per-token lists).

On CUDA, decode steps replay CUDA graphs: one per batch bucket (1, 2, 4, 8, then multiples of 16 up to
max_num_seqs), captured on first use over the staging's device buffers. A batch of B sequences runs in the
smallest bucket >= B; the padding rows have slot -1 (nothing stored) and context length 0 (attention
returns zeros), and their logits are dropped. Prefill and chunked steps run eagerly, as do MoE models
(their expert routing reads token counts on the host).
"""

from __future__ import annotations

import torch

from ..model.llama import CausalLM
from ..model.paged import StepBatch, forward_paged, forward_paged_hidden
from .decode_staging import DecodeStaging
from .kv_pool import KVPool
from .sequence import Sequence
from .transfer import to_device


def prompt_logprob_spans(seqs: list[Sequence], num_new_tokens: list[int]) -> list[tuple[int, int, int]]:
    """(index in seqs, first position, count) of the prompt positions this step scores for requests with
    ``prompt_logprobs``: the logits at position p give the log-probabilities of prompt token p + 1, so
    positions below num_prompt_tokens - 1 that were not scored before (a recompute after preemption
    scores nothing twice). Call before the step advances num_computed_tokens."""
    spans = []
    for i, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
        if seq.params.prompt_logprobs is None:
            continue
        first = max(seq.num_computed_tokens, len(seq.prompt_logprobs) - 1)
        end = min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)
        if end > first:
            spans.append((i, first, end - first))
    return spans


def build_step_batch(seqs: list[Sequence], num_new_tokens: list[int], block_size: int,
                     device: torch.device, sampled: torch.Tensor | None = None,
                     sampled_rows: dict[int, int] | None = None,
                     prompt_spans: list[tuple[int, int, int]] = ()) -> StepBatch:
    """Tensors for one step. Sequence b computes tokens [num_computed, num_computed + n_b) and needs
    logits when that reaches the end of its tokens (a finished prefill or a decode step). The logit rows
    of ``prompt_spans`` (prompt_logprob_spans) follow those, in span order.

    A PLACEHOLDER token (sampled on the device by the step before, not yet known here) is taken from
    ``sampled`` int64 [R] (device), row ``sampled_rows[seq_id]``, on the device."""
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cached, context, cu, logit_rows = [], [], [0], []
    fill_at, fill_from = [], []  # rows of token_ids that take a sampled token, and its row of ``sampled``
    for seq, n in zip(seqs, num_new_tokens):
        start = seq.num_computed_tokens
        if n < 1 or start + n > seq.num_tokens or len(seq.block_table) * block_size < start + n:
            raise RuntimeError(f"sequence {seq.seq_id}: bad step ({n} tokens from {start}, "
                               f"{seq.num_tokens} tokens, {len(seq.block_table)} blocks)")
        if seq.num_pending and start + n == seq.num_tokens:  # its last token is still in flight
            if seq.num_pending > 1 or sampled_rows is None or seq.seq_id not in sampled_rows:
                raise RuntimeError(f"sequence {seq.seq_id}: its input token is not known and was not "
                                   f"sampled by the step ahead")
            fill_at.append(len(tokens) + n - 1)
            fill_from.append(sampled_rows[seq.seq_id])
        tokens += seq.token_ids[start:start + n]
        positions += range(start, start + n)
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, start + n)]
        cached.append(start)
        context.append(start + n)
        cu.append(cu[-1] + n)
        if start + n == seq.num_tokens:
            logit_rows.append(cu[-1] - 1)
    for i, first, count in prompt_spans:  # rows of the prompt positions scored for prompt_logprobs
        row = cu[i] + first - seqs[i].num_computed_tokens
        logit_rows += range(row, row + count)
    width = max(len(s.block_table) for s in seqs)
    tables = [x for s in seqs for x in s.block_table + [0] * (width - len(s.block_table))]  # [B * max_blocks]
    # two host-to-device copies per step (int64 and int32 fields), sliced on the device
    t, b, nl, nf = len(tokens), len(seqs), len(logit_rows), len(fill_at)
    wide = to_device(tokens + positions + logit_rows + fill_at + fill_from, torch.int64, device)
    narrow = to_device(slots + cached + context + cu + tables, torch.int32, device)
    cuts = [t, b, b, b + 1]
    slot_mapping, cached_lens, context_lens, cu_seqlens, flat_tables = narrow.split(cuts + [b * width])
    token_ids = wide[:t]
    if nf:  # the tokens sampled on the device by the step ahead
        at, src = wide[2 * t + nl:2 * t + nl + nf], wide[2 * t + nl + nf:]
        token_ids.index_copy_(0, at, sampled.index_select(0, src))
    return StepBatch(
        token_ids=token_ids,
        positions=wide[t:2 * t],
        slot_mapping=slot_mapping,
        block_tables=flat_tables.view(b, width),
        cached_lens=cached_lens,
        context_lens=context_lens,
        cu_seqlens_q=cu_seqlens,
        logits_indices=wide[2 * t:2 * t + nl],
        max_q_len=max(num_new_tokens),
        is_decode=all(n == 1 for n in num_new_tokens),
    )


GRAPH_COPIES = True  # the decode graphs copy the staged rows themselves (False: the host copies before replay)
# (a staging that gathers tokens from the device is always copied by the host: its engine writes the next
# step while a replay runs, so the copy must not wait for the whole replay; decode_staging.py)


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, 16, 32, 48, ... (the last >= max_num_seqs)."""
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 16, 16))
    return [b for b in sizes if b < max_num_seqs] + [next(b for b in sizes if b >= max_num_seqs)]


class DecodeGraphs:
    """CUDA graphs of the decode forward, one per batch bucket, sharing one memory pool. Their static
    inputs are the device buffers of the runner's DecodeStaging; each graph begins with the copy of the
    bucket's rows from the staging's pinned host buffer (unless the staging gathers tokens from the
    device: then the host copies) and the token gather, so a decode step is the host's write and one
    replay."""

    def __init__(self, model: CausalLM, kv_pool: KVPool, staging: DecodeStaging, max_num_seqs: int):
        self.model, self.kv_pool, self.staging = model, kv_pool, staging
        self.buckets = graph_buckets(max_num_seqs)
        if self.buckets[-1] > staging.rows:
            raise ValueError(f"the staging buffers hold {staging.rows} rows, the largest bucket is {self.buckets[-1]}")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.copies = GRAPH_COPIES and not staging.gather  # fixed for every graph of this set

    def bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def ensure(self, b: int) -> None:
        """Capture the graph of bucket ``b`` unless it exists (before the step's inputs are written:
        capturing overwrites the static buffers)."""
        if b in self.graphs:
            return
        st = self.staging
        st.slot_mapping[:b] = -1  # capture and warm-up write nothing into the cache
        st.context_lens[:b] = 0
        batch = st.batch(b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, allocates split-K counters
            forward_paged(self.model, batch, self.kv_pool)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            if self.copies:
                st.copy(b, record=False)  # recorded, not run: every replay copies the host rows first
            st.gather_tokens(b)
            out = forward_paged(self.model, batch, self.kv_pool)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)

    def replay(self, bucket: int, bsz: int) -> torch.Tensor:
        """Replay the graph of ``bucket`` on the staged inputs; logits [bsz, vocab]."""
        graph, out = self.graphs[bucket]
        graph.replay()
        if self.copies:  # the replay read the host buffer (else the host's copy was recorded already)
            self.staging.record_read()
        return out[:bsz]


class ModelRunner:
    def __init__(self, model: CausalLM, kv_pool: KVPool, max_num_seqs: int = 64, max_model_len: int = 2048,
                 cuda_graphs: bool = True, gather_tokens: bool = False):
        """gather_tokens: decode steps may take input tokens sampled on the device by the step before
        (the engine's ``async_scheduling``; decode_staging.py)."""
        self.model = model
        self.kv_pool = kv_pool
        self.device = kv_pool.device
        bs = kv_pool.block_size
        self.staging = DecodeStaging(graph_buckets(max_num_seqs)[-1], -(-max_model_len // bs), bs, self.device,
                                     gather=gather_tokens)
        use = (cuda_graphs and self.device.type == "cuda" and kv_pool.ops.backend == "triton"
               and not model.args.is_moe)
        self.graphs = DecodeGraphs(model, kv_pool, self.staging, max_num_seqs) if use else None

    def _prepare_decode(self, seqs: list[Sequence], sampled_rows: dict[int, int] | None
                        ) -> tuple[StepBatch, int | None] | None:
        """A plain decode step through the staging buffers (padded to the graph bucket when one runs it);
        None when some sequence is not at its last token."""
        graphs = self.graphs
        bucket = graphs.bucket(len(seqs)) if graphs is not None else None
        if bucket is not None:
            graphs.ensure(bucket)
        batch = self.staging.load(seqs, bucket, copy=bucket is None or not graphs.copies,  # a graph copies itself
                                  sampled_rows=sampled_rows)
        return None if batch is None else (batch, bucket)

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int], sampled_rows: dict[int, int] | None = None,
                prompt_spans: list[tuple[int, int, int]] = ()) -> tuple[StepBatch, int | None]:
        """The host half of a step: the StepBatch on the device and, for a CUDA-graph decode step, the
        bucket whose static buffers hold it padded (None = run eagerly). sampled_rows: seq_id -> row of
        the staging's ``sampled`` for inputs sampled by the step before; prompt_spans: prompt_logprob_spans."""
        if not prompt_spans and sum(num_new_tokens) == len(seqs) <= self.staging.rows:  # maybe a decode step
            out = self._prepare_decode(seqs, sampled_rows)
            if out is not None:
                return out
        return build_step_batch(seqs, num_new_tokens, self.kv_pool.block_size, self.device, self.staging.sampled,
                                sampled_rows, prompt_spans), None

    def execute(self, batch: StepBatch, bucket: int | None) -> torch.Tensor:
        """The model half: logits [L, vocab] in the model dtype (graph replay or eager forward)."""
        if bucket is not None:
            return self.graphs.replay(bucket, batch.num_seqs)
        return forward_paged(self.model, batch, self.kv_pool)

    def run(self, seqs: list[Sequence], num_new_tokens: list[int], sampled_rows: dict[int, int] | None = None,
            prompt_spans: list[tuple[int, int, int]] = ()
            ) -> tuple[list[Sequence], torch.Tensor, torch.Tensor | None]:
        """Compute one step. Returns (the sequences that get a next token, their logits [L, vocab] in the
        model dtype, and for ``prompt_spans`` (prompt_logprob_spans of this step, computed before it) the
        final hidden states [P, hidden] of their rows in span order, else None: the caller projects them
        in slices, so a long prompt chunk never holds [P, vocab] logits at once)."""
        batch, bucket = self.prepare(seqs, num_new_tokens, sampled_rows, prompt_spans)
        num_prompt_rows = sum(count for _, _, count in prompt_spans)
        if batch.logits_indices.shape[0] - num_prompt_rows == len(seqs):  # all reached their end (decode)
            wanting = seqs
        else:
            wanting = [s for s, n in zip(seqs, num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]
        if not num_prompt_rows:
            return wanting, self.execute(batch, bucket), None
        h = forward_paged_hidden(self.model, batch, self.kv_pool)  # eager: prepare never stages prompt rows
        n = len(wanting)
        return wanting, self.model.lm_head(h[:n]), h[n:]
