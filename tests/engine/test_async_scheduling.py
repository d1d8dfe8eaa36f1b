"""Asynchronous scheduling: decode steps launched before the step ahead has landed give exactly the
outputs of the synchronous engine (tokens, text, finish reasons, logits), and no placeholder leaks into
outputs, the prefix cache or the block bookkeeping. On the CPU the device work is synchronous, so these
tests check the bookkeeping; the overlap itself is measured on a GPU (bench/gpu_engine_check.py)."""

from __future__ import annotations

import pytest
import torch

from atomq import LLM, SamplingParams
from atomq.engine.decode_staging import DecodeStaging
from atomq.engine.sequence import PLACEHOLDER, Sequence

KW = dict(kv_cache_dtype="model", kv_cache_bytes=1 << 22, record_logits=True)


def _same_outputs(a, b, tol: float = 1e-4) -> None:
    """Same tokens, text and finish reasons; logits equal up to float rounding (the steps' batches differ:
    a sequence that stops on a token rides one extra step, arrivals join other steps)."""
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        assert PLACEHOLDER not in x.token_ids
        torch.testing.assert_close(torch.stack(x.logits), torch.stack(y.logits), rtol=tol, atol=tol)


def _both(lm, prompts, params, **kw):
    outs = []
    for overlap in (False, True):
        llm = LLM(lm, async_scheduling=overlap, **{**KW, **kw})
        assert llm.engine.async_scheduling is overlap
        outs.append(llm.generate(prompts, params))
        bm = llm.engine.block_manager
        bm.check([])
        assert bm.num_free_blocks == bm.num_blocks
        assert all(PLACEHOLDER not in blk.token_ids for blk in bm.blocks)
    return outs


def test_greedy_lengths_and_stops_match_the_synchronous_engine(load, prompts):
    lm = load("llama")
    free = LLM(lm, **KW).generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[free.token_ids[4]])]
    sync, overlap = _both(lm, [prompts[0], prompts[1], prompts[0]], params)
    _same_outputs(overlap, sync)
    stopped = free.token_ids.index(free.token_ids[4]) + 1
    assert [len(o.token_ids) for o in overlap] == [12, 1, stopped] and overlap[2].finish_reason == "stop"


def test_stop_strings_eos_and_seeded_sampling_match(load, prompts):
    lm = load("llama")
    free = LLM(lm, **KW).generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=stop),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10)]
    outs = []
    for overlap in (False, True):  # a pretend EOS: the fourth generated token of the free run
        llm = LLM(lm, async_scheduling=overlap, **KW)
        llm.engine.eos_token_id = free.token_ids[3]
        outs.append(llm.generate([prompts[0], prompts[1], prompts[0]], params))
    _same_outputs(outs[1], outs[0])
    assert outs[1][0].finish_reason == "stop" and stop not in outs[1][0].text
    eos_at = free.token_ids.index(free.token_ids[3]) + 1
    assert outs[1][2].token_ids == free.token_ids[:eos_at] and outs[1][2].finish_reason == "stop"


@pytest.mark.parametrize("kv", ["model", "int4"])
def test_preemption_and_prefix_cache_under_async_steps(load, prompts, kv):
    lm = load("llama", kv_bits=4)
    prompts = [prompts[0], prompts[2], "seven wizards quietly", prompts[0]]  # the last one shares a prefix
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    per_block = LLM(lm, kv_cache_dtype=kv, kv_cache_bytes=1 << 22).engine.kv_pool.bytes_per_token * 16
    sync, overlap = _both(lm, prompts, params, kv_cache_dtype=kv, kv_cache_bytes=4 * per_block, max_model_len=64,
                          max_num_batched_tokens=16)
    # INT4 pages: prefix-cache hits and recomputed chunks fall on other steps, and a K/V computed in a batch
    # of another size can round to another 4-bit value
    _same_outputs(overlap, sync, 1e-4 if kv == "model" else 2e-2)
    assert sum(o.num_preemptions for o in overlap) > 0


def test_length_limits_cost_no_extra_step(load, prompts):
    """A request stopped by max_tokens is not computed past it: the same steps, tokens and KV blocks as
    the synchronous engine."""
    lm = load("llama")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 6, 17)]
    stats, peak_blocks = [], []
    for overlap in (False, True):
        llm = LLM(lm, async_scheduling=overlap, **KW)
        eng, used = llm.engine, []
        for p, sp in zip(prompts, params):
            eng.add_request(p, sp)
        while eng.has_unfinished():
            eng.step()
            used.append(eng.block_manager.num_blocks - eng.block_manager.num_free_blocks)
        stats.append({k: eng.stats[k] for k in ("steps", "decode_steps", "decode_tokens", "generated_tokens")})
        peak_blocks.append(max(used))
    assert stats[0] == stats[1] and peak_blocks[0] == peak_blocks[1]


def test_a_failing_step_still_lands_the_one_ahead(load, prompts, monkeypatch):
    llm = LLM(load("llama"), async_scheduling=True, **KW)
    eng = llm.engine
    seq = eng.add_request(prompts[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    eng.step()
    eng.step()
    assert seq.num_pending == 1
    monkeypatch.setattr(eng.runner, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        eng.step()
    assert seq.num_pending == 0 and PLACEHOLDER not in seq.token_ids and len(seq.output_token_ids) == 2
    monkeypatch.undo()
    while eng.has_unfinished():
        eng.step()
    assert len(seq.output_token_ids) == 8


def test_arrivals_and_aborts_between_async_steps(load, prompts):
    lm = load("llama")
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = LLM(lm, **KW).generate(prompts, params)
    llm = LLM(lm, async_scheduling=True, **KW)
    eng = llm.engine
    first = eng.add_request(prompts[0], params)
    doomed = eng.add_request(prompts[2], params)
    for _ in range(4):  # prefill, then decode steps in flight
        eng.step()
    assert eng._in_flight is not None and first.num_pending == 1 and PLACEHOLDER not in first.output_token_ids
    late = eng.add_request(prompts[1], params)  # joins while a step is in flight: its prefill runs ahead too
    assert eng.abort_request(doomed) and doomed.num_pending == 0 and PLACEHOLDER not in doomed.token_ids
    while eng.has_unfinished():
        eng.step()
    assert [first.output_token_ids, late.output_token_ids] == [alone[0].token_ids, alone[1].token_ids]
    assert doomed.finish_reason == "abort" and doomed.output_token_ids == alone[2].token_ids[:len(doomed.output_token_ids)]
    eng.block_manager.check([])
    assert eng.stats["generated_tokens"] == 20 + len(doomed.output_token_ids)


def test_staging_gathers_tokens_sampled_on_the_device():
    staging = DecodeStaging(4, 2, 16, torch.device("cpu"), separate=True, gather=True)
    seqs = [Sequence(i, [5, 6, 7], SamplingParams()) for i in range(3)]
    for i, s in enumerate(seqs):
        s.block_table, s.num_computed_tokens = [i], 2
    seqs[1].token_ids[-1] = PLACEHOLDER
    seqs[2].token_ids[-1] = PLACEHOLDER
    staging.sampled[:3] = torch.tensor([101, 102, 103])
    batch = staging.load(seqs, sampled_rows={1: 2, 2: 0})
    assert batch.token_ids.tolist() == [7, 103, 101]
    with pytest.raises(RuntimeError, match="not known"):
        staging.load(seqs, sampled_rows={1: 2})


def test_general_step_batch_takes_placeholders_from_the_device():
    from atomq.engine.model_runner import build_step_batch

    sampled = torch.tensor([0, 201, 202, 0])
    decode = Sequence(0, [5, 6, PLACEHOLDER], SamplingParams())
    decode.block_table, decode.num_computed_tokens, decode.num_pending = [0], 2, 1
    prefill = Sequence(1, [7, 8, 9], SamplingParams())
    prefill.block_table = [1]
    batch = build_step_batch([prefill, decode], [3, 1], 16, torch.device("cpu"), sampled, {0: 2})
    assert batch.token_ids.tolist() == [7, 8, 9, 202] and batch.logits_indices.tolist() == [2, 3]
    with pytest.raises(RuntimeError, match="not known"):
        build_step_batch([decode], [1], 16, torch.device("cpu"), sampled, {})


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, kv", [("atom", "int4"), ("float", "fp16")])
def test_async_steps_on_cuda_equal_synchronous_steps(fmt, kv):
    """On the GPU (CUDA graphs, pinned copies, the device-side gather): tokens, logits and logprobs of
    greedy and seeded requests (one with penalties and min_tokens, one with a logit bias) equal the
    synchronous engine's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from atomq.model.random_weights import random_model

    prompts = [[(7 * i + j) % 500 for j in range(5 + 9 * i)] for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=10 + i, ignore_eos=True, logprobs=2) for i in range(3)]
    params.append(SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True, logprobs=2,
                                 logit_bias={11: 100.0, 12: -100.0}))
    params.append(SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=9, ignore_eos=True, logprobs=0,
                                 presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.3, min_tokens=3))
    outs = []
    for overlap in (False, True):
        lm = random_model("tiny-llama", fmt, torch.float16, "cuda", seed=3)
        llm = LLM(lm, kv_cache_dtype=kv, kv_cache_bytes=1 << 24, max_num_seqs=8, record_logits=True,
                  async_scheduling=overlap)
        outs.append(llm.generate(prompts, params))
    assert outs[1][3].token_ids == [11] * 13
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids and PLACEHOLDER not in b.token_ids
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), rtol=1e-3, atol=1e-3)
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-3
            assert [i for i, _ in x.top] == [i for i, _ in y.top]
