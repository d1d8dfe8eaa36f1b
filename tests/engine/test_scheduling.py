"""Block manager and scheduler invariants, batching, chunked prefill budgets and preemption by recompute."""

from __future__ import annotations

import pytest

from atomq import LLM, SamplingParams
from atomq.engine.block_manager import BlockManager
from atomq.engine.scheduler import Scheduler, SchedulerConfig
from atomq.engine.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _seq(i, n, params=GREEDY, start=0):
    return Sequence(i, list(range(start, start + n)), params)


def test_block_manager_refcounts_and_prefix_sharing():
    bm = BlockManager(num_blocks=8, block_size=16)
    a = _seq(0, 40)  # 3 blocks
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_computed_tokens == 0 and bm.num_free_blocks == 5
    a.num_computed_tokens = 40
    bm.register_computed(a)  # two full blocks get hashes; the partial third does not
    assert a.num_hashed_blocks == 2
    b = Sequence(1, list(range(40)) + [99, 98], GREEDY)  # same first 32 tokens
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 32
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 1]
    bm.check([a, b])
    bm.free_seq(a)
    bm.check([b])
    bm.free_seq(b)
    bm.check([])
    assert bm.num_free_blocks == 8
    # a freed prefix stays reusable until its blocks are handed out again
    c = _seq(2, 33)
    bm.allocate(c)
    assert c.num_computed_tokens == 32 and c.num_cached_tokens == 32
    bm.free_seq(c)
    # a prompt that is exactly the cached blocks still computes its last token (needs its logits)
    d = _seq(3, 32)
    bm.allocate(d)
    assert d.num_computed_tokens == 16
    bm.free_seq(d)
    bm.check([])


def test_block_manager_evicts_cached_blocks_and_never_shares_partial_ones():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = _seq(0, 32)
    bm.allocate(a)
    a.num_computed_tokens = 32
    bm.register_computed(a)
    bm.free_seq(a)
    big = _seq(1, 64, start=1000)  # needs all 4 blocks: the cached ones are evicted
    assert bm.can_allocate(big)
    bm.allocate(big)
    assert bm.hash_to_block == {} and bm.num_free_blocks == 0
    assert not bm.can_allocate(_seq(2, 1))
    bm.free_seq(big)
    bm.check([])
    # partial blocks are never registered, so two equal 20-token prompts share only the first block
    x, y = _seq(3, 20), _seq(4, 20)
    bm.allocate(x)
    x.num_computed_tokens = 20
    bm.register_computed(x)
    bm.allocate(y)
    assert y.block_table[0] == x.block_table[0] and y.block_table[1] != x.block_table[1]
    bm.check([x, y])


def _drive(sched: Scheduler, budget: int) -> list[int]:
    """Run the scheduler with a fake model (each computed sequence end appends token 7); returns the
    batch sizes in tokens and checks the invariants after every step."""
    sizes = []
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch.seqs, "a step with unfinished requests scheduled nothing"
        assert batch.num_tokens <= budget
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs)
        sizes.append(batch.num_tokens)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status == SequenceStatus.RUNNING
            assert seq.num_computed_tokens + n <= len(seq.block_table) * 16
            seq.num_computed_tokens += n
            sched.bm.register_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.finish(seq, "length")
        sched.bm.check(sched.running)
    return sizes


def test_scheduler_budget_fcfs_and_preemption_without_a_model():
    bm = BlockManager(num_blocks=6, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24, max_model_len=96), bm)
    seqs = [_seq(i, n, SamplingParams(max_tokens=20), start=100 * i) for i, n in enumerate([50, 30, 5, 17])]
    for s in seqs:
        sched.add(s)
    sizes = _drive(sched, 24)
    assert max(sizes) == 24  # the 50-token prompt was chunked to the budget
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 20 for s in seqs)
    assert sum(s.num_preemptions for s in seqs) > 0  # 6 blocks cannot hold all four at full length
    assert bm.num_free_blocks == 6
    bm.check([])


def test_batch_equals_each_request_alone(load, prompts):
    lm = load("qwen2")
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (12, 5, 9)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params)
    assert [o.token_ids for o in together] == alone
    assert [len(t) for t in alone] == [12, 5, 9]
    eng = llm.engine
    eng.block_manager.check([])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


@pytest.mark.parametrize("kv", ["model", "int4"])
def test_preempted_requests_finish_with_the_same_output(load, prompts, kv):
    lm = load("llama", kv_bits=4)
    prompts = [prompts[0], prompts[2], "seven wizards quietly"]  # short: they fit alone, then grow
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(lm, kv_cache_dtype=kv, kv_cache_bytes=1 << 22).generate(prompts, params)
    # 4 blocks of 16 tokens: one request at full length fits, all three together do not
    per_block = LLM(lm, kv_cache_dtype=kv, kv_cache_bytes=1 << 22).engine.kv_pool.bytes_per_token * 16
    tight = LLM(lm, kv_cache_dtype=kv, kv_cache_bytes=4 * per_block, max_model_len=64, max_num_batched_tokens=16)
    outs = tight.generate(prompts, params)
    assert sum(o.num_preemptions for o in outs) > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    bm = tight.engine.block_manager
    bm.check([])
    assert bm.num_free_blocks == bm.num_blocks == 4
    assert tight.engine.stats["max_batch_tokens"] <= 16


def test_sampling_is_reproducible_per_seed(load, prompts):
    lm = load("llama")
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22)
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    a = llm.generate(prompts, p)
    b = llm.generate(prompts[::-1], p)[::-1]  # other order and batch mates: same tokens per seed
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = llm.generate(prompts, SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in c] != [o.token_ids for o in a]
