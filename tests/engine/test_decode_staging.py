"""Decode steps through the staging buffers: the same StepBatch as the general path, padding rows,
fallbacks, and the engine's host fast paths (scheduler, sampler) keeping outputs unchanged."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from atomq import LLM, SamplingParams
from atomq.engine import model_runner
from atomq.engine.block_manager import BlockManager
from atomq.engine.decode_staging import DecodeStaging
from atomq.engine.model_runner import build_step_batch
from atomq.engine.sampler import all_greedy, sample
from atomq.engine.scheduler import Scheduler, SchedulerConfig
from atomq.engine.sequence import Sequence

BS, WIDTH = 16, 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
CPU = torch.device("cpu")


def _decode_seq(rng: random.Random, seq_id: int, num_tokens: int, free: list[int]) -> Sequence:
    """A sequence about to compute its last token (position num_tokens - 1), holding exactly the blocks
    that position needs, taken from ``free``."""
    seq = Sequence(seq_id, [rng.randrange(512) for _ in range(num_tokens)], GREEDY)
    seq.num_computed_tokens = num_tokens - 1
    seq.block_table = [free.pop() for _ in range((num_tokens - 1) // BS + 1)]
    return seq


def _random_batch(rng: random.Random, n: int, free: list[int], first_id: int = 0) -> list[Sequence]:
    """n decode sequences; about a third have their next token at a page start (position % 16 == 0)."""
    seqs = []
    for i in range(n):
        if rng.random() < 0.35:
            num_tokens = BS * rng.randint(0, WIDTH - 1) + 1  # the new token opens a page
        else:
            num_tokens = rng.randint(1, BS * WIDTH)
        seqs.append(_decode_seq(rng, first_id + i, num_tokens, free))
    return seqs


def _assert_same_batch(staged, general) -> None:
    for name in ("token_ids", "positions", "slot_mapping", "cached_lens", "context_lens", "cu_seqlens_q",
                 "logits_indices"):
        a, b = getattr(staged, name), getattr(general, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert staged.block_tables.dtype == general.block_tables.dtype
    assert torch.equal(staged.block_tables, general.block_tables)  # same width: same attention split plan
    assert staged.max_q_len == general.max_q_len == 1 and staged.is_decode and general.is_decode


@pytest.mark.parametrize("seed", range(6))
def test_staged_decode_batch_equals_the_general_path(seed):
    rng = random.Random(seed)
    free = rng.sample(range(5000), 5000)
    seqs = _random_batch(rng, rng.randint(1, 40), free)
    assert any(s.num_computed_tokens % BS == 0 for s in seqs)
    staging = DecodeStaging(40, WIDTH, BS, CPU)
    staged = staging.load(seqs)
    _assert_same_batch(staged, build_step_batch(seqs, [1] * len(seqs), BS, CPU))
    assert staged.num_seqs == len(seqs)


@pytest.mark.parametrize("separate", [False, True])
def test_staging_stays_exact_across_steps(separate):
    """One staging buffer over many steps: tokens appended, pages opened, rows reordered, sequences
    leaving and arriving, a table replaced by a same-length new one (preempted and re-admitted) or by a
    shorter one: every step equals a fresh general-path batch. separate: the device buffer is apart
    from the host one and filled by the step's one copy, as on CUDA; graph-bucket padding on odd steps."""
    rng = random.Random(7)
    free = rng.sample(range(20000), 20000)
    seqs = _random_batch(rng, 24, free)
    next_id = len(seqs)
    staging = DecodeStaging(32, WIDTH, BS, CPU, separate=separate)
    assert (staging.dev is staging.host) != separate
    rewrites = 0
    for step in range(60):
        before = list(staging._row_table)
        if step % 2:
            rows = 32 if len(seqs) > 16 else 16
            batch = staging.load(seqs, rows)
            assert staging.slot_mapping[len(seqs):rows].eq(-1).all()
            assert not staging.context_lens[len(seqs):rows].any()
            w = max(len(s.block_table) for s in seqs)
            staged = dataclasses.replace(batch, block_tables=batch.block_tables[:, :w])
        else:
            staged = staging.load(seqs)
        rewrites += sum(a is not b for a, b in zip(before, staging._row_table))
        _assert_same_batch(staged, build_step_batch(seqs, [1] * len(seqs), BS, CPU))
        for s in seqs:  # the step ran: one more token, a new page when the next position opens one
            s.num_computed_tokens += 1
            s.token_ids.append(rng.randrange(512))
            if s.num_computed_tokens % BS == 0:
                s.block_table.append(free.pop())
        seqs = [s for s in seqs if s.num_tokens < BS * WIDTH - 1]
        event = rng.random()
        if event < 0.2 and seqs:  # preempted and recomputed: a new list, same length, other blocks
            s = rng.choice(seqs)
            s.block_table = [free.pop() for _ in s.block_table]
        elif event < 0.4 and seqs:  # a finished request leaves: rows after it move up
            seqs.pop(rng.randrange(len(seqs)))
        elif event < 0.6:  # a new short request joins (its row held a longer table before)
            seqs.insert(rng.randrange(len(seqs) + 1), _decode_seq(rng, next_id, rng.randint(1, 20), free))
            next_id += 1
        elif event < 0.7:
            rng.shuffle(seqs)
        seqs = seqs[:32]
    assert 0 < rewrites < 60 * 24 / 2  # rows are rewritten, but far from every row every step


def test_padding_rows_store_nothing_and_read_nothing():
    rng = random.Random(3)
    free = rng.sample(range(1000), 1000)
    staging = DecodeStaging(16, WIDTH, BS, CPU)
    staging.load(_random_batch(rng, 16, free))  # every row holds a real sequence first
    seqs = _random_batch(rng, 5, free)
    batch = staging.load(seqs, rows=8)  # a graph bucket of 8 for 5 sequences
    assert batch.num_seqs == 5 and batch.logits_indices.tolist() == [0, 1, 2, 3, 4]
    assert staging.slot_mapping[5:8].tolist() == [-1, -1, -1]
    assert staging.context_lens[5:8].tolist() == [0, 0, 0]
    assert torch.equal(staging.batch(8).slot_mapping[:5], batch.slot_mapping)
    assert staging.batch(8) is staging.batch(8)  # views made once per row count
    assert batch.block_tables.shape == (5, WIDTH)  # graphs read full-width rows: zero past each table
    for row, s in zip(batch.block_tables.tolist(), seqs):
        assert row == s.block_table + [0] * (WIDTH - len(s.block_table))


def test_non_decode_steps_fall_back_and_missing_blocks_are_refused():
    rng = random.Random(5)
    free = rng.sample(range(1000), 1000)
    staging = DecodeStaging(8, WIDTH, BS, CPU)
    seqs = _random_batch(rng, 3, free)
    chunk = _decode_seq(rng, 99, 40, free)
    chunk.num_computed_tokens = 20  # one token of a prefill, not its last: no logits, general path
    assert staging.load(seqs + [chunk]) is None
    _assert_same_batch(staging.load(seqs), build_step_batch(seqs, [1] * 3, BS, CPU))
    short = _decode_seq(rng, 100, 33, free)
    short.block_table.pop()  # position 32 needs a third block
    with pytest.raises(RuntimeError, match="no KV block for position 32"):
        staging.load([short])
    with pytest.raises(RuntimeError, match="does not fit the staging width"):
        staging.load([_decode_seq(rng, 101, BS * WIDTH + 1, free)])


def test_engine_decodes_through_the_staging_and_falls_back_for_one_token_chunks(load, monkeypatch):
    """Budget 2: a 1-token prefill chunk of a new request lands in a step of one-token rows; that step
    takes the general path (its logits rows skip the chunk) and the tokens equal each request alone."""
    lm = load("llama")
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5], [11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = [LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22).generate([p], params)[0].token_ids
             for p in prompts]
    general_one_token_steps = []
    build = model_runner.build_step_batch

    def counting(seqs, counts, *args):
        if all(n == 1 for n in counts):
            general_one_token_steps.append([s.num_computed_tokens + 1 == s.num_tokens for s in seqs])
        return build(seqs, counts, *args)

    monkeypatch.setattr(model_runner, "build_step_batch", counting)
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, max_num_batched_tokens=2)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert general_one_token_steps, "no step mixed a 1-token chunk with decodes"
    assert all(not all(flags) for flags in general_one_token_steps)  # plain decode steps never build lists
    assert llm.engine.stats["decode_steps"] > len(general_one_token_steps)


def test_scheduler_gives_decodes_exactly_the_blocks_they_need():
    bm = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256), bm)
    seqs = [Sequence(i, list(range(100 * i, 100 * i + n)), GREEDY) for i, n in enumerate([15, 16, 17, 31])]
    for s in seqs:
        sched.add(s)
    for _ in range(40):
        batch = sched.schedule()
        assert batch.seqs == seqs
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(s.block_table) == -(-(s.num_computed_tokens + n) // BS)  # no block early, none missing
            s.num_computed_tokens += n
            bm.register_computed(s)
            s.token_ids.append(3)
        bm.check(seqs)
    assert [s.num_hashed_blocks for s in seqs] == [(s.num_tokens - 1) // BS for s in seqs]


def test_all_greedy_and_sample():
    g, t = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1)
    assert all_greedy([g, g]) and all_greedy([]) and not all_greedy([g, t])
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 2.0, -1.0]])
    assert sample(logits, [g, g], []) == [1, 0]  # first maximal id on ties
    gen = torch.Generator().manual_seed(0)
    out = sample(logits, [g, t], [None, gen])
    assert out[0] == 1 and 0 <= out[1] < 3


def test_load_without_copy_leaves_the_device_rows_to_the_graph():
    """copy=False (a CUDA graph copies the rows itself): the host rows are written, the device rows only by
    the later copy of the bucket's rows, and then they equal the general path's batch."""
    rng = random.Random(5)
    free = rng.sample(range(1000), 1000)
    staging = DecodeStaging(8, WIDTH, BS, CPU, separate=True)
    seqs = _random_batch(rng, 3, free)
    before = staging.dev.clone()
    batch = staging.load(seqs, rows=4, copy=False)
    assert torch.equal(staging.dev, before)
    staging.copy(4)
    w = max(len(s.block_table) for s in seqs)
    _assert_same_batch(dataclasses.replace(batch, block_tables=batch.block_tables[:, :w]),
                       build_step_batch(seqs, [1] * 3, BS, CPU))
