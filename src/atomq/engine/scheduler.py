"""Continuous batching: FCFS admission, chunked prefill under a token budget, preemption by recompute.

Each ``schedule()`` builds one step. Running sequences come first, oldest first: each gets the rest of
its tokens to compute (1 when decoding, a chunk when a long prompt is still being prefilled) within
``max_num_batched_tokens``. When a running sequence needs a new KV block and none is free, the newest
running sequence is preempted: its blocks are freed and it goes back to the *front* of the waiting
queue with all its tokens, to be recomputed later (the prefix cache usually makes that cheap).
A sequence whose last allowed token is being sampled by a step still in flight (``final_pending``,
asynchronous scheduling in llm.py) gets nothing more. Then waiting sequences are admitted in arrival
order while the token budget, ``max_num_seqs`` and free blocks allow; admission allocates blocks for all
of a sequence's tokens at once, and stops at the first sequence that does not fit, so no request
overtakes an older one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledBatch:
    """One step: sequences and how many new tokens each computes (same order)."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Give seq the blocks for n more tokens, preempting the newest running sequences while none are
        free; False when seq itself had to go."""
        while not self.bm.can_append(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.bm.append(seq, n)
        return True

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []

        # 1. running sequences, oldest first
        running, bs = self.running, self.bm.block_size
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.final_pending:  # its last token is being sampled by the step in flight
                i += 1
                continue
            done = seq.num_computed_tokens
            n = len(seq.token_ids) - done
            if n > budget:
                n = budget
            # a block is needed only when the chunk crosses into a new page (1 decode step in block_size)
            if done + n > len(seq.block_table) * bs and not self._make_room(seq, n, preempted):
                break  # seq preempted itself: everything after it is gone too
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1

        # 2. admit waiting sequences in arrival order (not in a step that had to preempt)
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)  # sets num_computed_tokens to the prefix-cache hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts, preempted)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running or waiting sequence (reason "stop" | "length" | "abort") and free its blocks."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
