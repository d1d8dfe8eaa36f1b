"""Bad input gives clear errors while the engine keeps serving; sampler, stop rules, detokenizer, CLI."""

from __future__ import annotations

import pytest
import torch

from atomq import LLM, SamplingParams
from atomq.engine.detokenizer import IncrementalDetokenizer, find_stop
from atomq.engine.sampler import filter_logits, sample

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-3), "max_tokens must be a positive integer"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=-1), "top_k must be"),
    (dict(stop=[""]), "stop must hold non-empty strings"),
])
def test_sampling_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(load, prompts):
    lm = load("llama")
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, max_model_len=40)
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in (prompts[0], prompts[2])]
    eng = llm.engine
    good = [eng.add_request(prompts[0], GREEDY), eng.add_request(prompts[2], GREEDY)]
    eng.step()
    eng.step()
    with pytest.raises(ValueError, match="more than the model's context"):
        eng.add_request(prompts[1], GREEDY)  # 58 tokens > max_model_len 40
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        eng.add_request([5, 10_000], GREEDY)
    with pytest.raises(ValueError, match="the prompt is empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="must be a SamplingParams"):
        eng.add_request("hello", {"max_tokens": 3})
    while eng.has_unfinished():
        eng.step()
    assert [s.output_token_ids for s in good] == alone
    # a batch with one bad prompt is refused as a whole, before anything is queued
    with pytest.raises(ValueError, match="more than the model's context"):
        llm.generate([prompts[0], prompts[1]], GREEDY)
    assert not eng.has_unfinished()
    assert llm.generate([prompts[0]], GREEDY)[0].token_ids == alone[0]
    eng.block_manager.check([])


def test_bad_engine_settings(load):
    lm = load("llama")
    with pytest.raises(ValueError, match="unknown kv cache dtype 'int3'"):
        LLM(lm, kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        LLM(lm, max_model_len=1000, kv_cache_bytes=1 << 22)
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        LLM(lm, kv_cache_dtype="int4", kv_cache_bytes=10_000)  # 88 bytes a token: 113 < 256
    with pytest.raises(ValueError, match="holds no block"):
        LLM(lm, kv_cache_dtype="int4", kv_cache_bytes=100)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(lm, gpu_memory_utilization=1.5)


def test_stop_rules(load, prompts):
    lm = load("llama")
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22)
    free = llm.generate(prompts[0], GREEDY)[0]
    # stop token id: generation ends at it, the token is kept, its text is not
    stop_id = free.token_ids[3]
    out = llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                  stop_token_ids=[stop_id]))[0]
    first = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    # stop string: the text ends right before it
    text = free.text
    i = next(i for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].isprintable() and text[i:i + 2].strip())
    stop = text[i:i + 2]
    out = llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=stop))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    # EOS ends a request unless ignore_eos (pretend the fifth generated token is the tokenizer's EOS)
    eos = free.token_ids[4]
    llm.engine.eos_token_id = eos
    out = llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out.token_ids == free.token_ids[:free.token_ids.index(eos) + 1] and out.finish_reason == "stop"
    assert llm.generate(prompts[0], GREEDY)[0].token_ids == free.token_ids


def test_sampler_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [True, False, False, True, True]
    probs = torch.softmax(logits, -1)  # sorted: 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [False, True, True, False, False] and probs[[1, 2]].sum() >= 0.7
    assert (~torch.isinf(filter_logits(logits, 0, 0.01))).sum() == 1  # the top token always stays
    rows = torch.stack([logits, logits.flip(0)])
    greedy = SamplingParams(temperature=0.0)
    assert sample(rows, [greedy, greedy], [None, None]) == [1, 3]
    g = [torch.Generator().manual_seed(0)]
    topk1 = SamplingParams(temperature=5.0, top_k=1)
    assert {sample(logits[None], [topk1], g)[0] for _ in range(20)} == {1}


def test_incremental_detokenizer_matches_full_decode(load):
    tok = load("llama").tokenizer
    prompt = tok("the quick brown")["input_ids"]
    gen = tok(" fox jumps over a lazy dog \u00e9\u00e8 \u4f60\u597d")["input_ids"]
    d = IncrementalDetokenizer(tok, prompt)
    deltas = [d.step(t) for t in gen]
    d.flush()
    assert "".join(deltas) == d.text or d.text.startswith("".join(deltas))
    assert d.text == tok.decode(prompt + gen, skip_special_tokens=True)[len(tok.decode(prompt)):]
    assert find_stop("hello world", ("wor",), 3) == 6 and find_stop("hello world", ("hel",), 3) is None
    # lazy: push decodes nothing; reading .text catches up to the same text, mid-way and at the end
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    lazy = IncrementalDetokenizer(Counting(), prompt)
    for t in gen[:4]:
        lazy.push(t)
    assert calls == []
    mid = lazy.text
    for t in gen[4:]:
        lazy.push(t)
    lazy.flush()
    assert lazy.text == d.text and d.text.startswith(mid) and len(calls) <= 4


def test_cli_generate(tiny_model, capsys):
    from atomq.cli import main

    model = str(tiny_model("llama"))
    assert main(["generate", "--model", model, "--prompt", "the quick brown", "--max-tokens", "5",
                 "--dtype", "float32", "--kv-cache-dtype", "int4", "--kv-cache-bytes", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "peak memory" in out
    assert main(["generate", "--model", model, "--prompt", "x", "--max-tokens", "0"]) == 2
    assert "max_tokens must be a positive integer" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--prompt", "the quick brown", "--max-tokens", "3", "--dtype", "float32",
                 "--logprobs", "2", "--repetition-penalty", "1.3", "--min-tokens", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("    ")]
    assert len(lines) == 3 and all(ln.count("|") == 1 for ln in lines)  # each token: itself | two alternatives
    assert main(["generate", "--model", model, "--prompt", "the quick brown", "--max-tokens", "1", "--dtype", "float32",
                 "--prompt-logprobs", "0"]) == 0
    out = capsys.readouterr().out
    assert "prompt:" in out and "perplexity" in out


def test_abort_frees_blocks_and_the_others_finish_unchanged(load, prompts):
    lm = load("llama")
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, max_model_len=96)
    alone = llm.generate([prompts[0]], GREEDY)[0].token_ids
    eng = llm.engine
    keep, running, queued = (eng.add_request(p, GREEDY) for p in (prompts[0], prompts[1], prompts[2]))
    eng.step()
    assert eng.num_running == 3 and eng.kv_usage > 0
    assert eng.abort_request(running) and eng.abort_request(queued)
    assert not eng.abort_request(running)  # already finished
    assert running.is_finished and running.finish_reason == "abort" and running.block_table == []
    eng.block_manager.check([keep])
    while eng.has_unfinished():
        eng.step()
    assert keep.output_token_ids == alone
    eng.block_manager.check([])
    # a request aborted while still waiting never runs
    waiting = eng.add_request(prompts[1], GREEDY)
    assert eng.num_waiting == 1 and eng.abort_request(waiting) and eng.num_waiting == 0
    assert not eng.has_unfinished()


def test_request_metrics_are_ordered(load, prompts):
    llm = LLM(load("llama"), kv_cache_dtype="model", kv_cache_bytes=1 << 22, max_model_len=96)
    out = llm.generate(prompts, GREEDY)
    for o in out:
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
        assert m.num_output_tokens == len(o.token_ids) == 8
        assert m.ttft >= 0 and m.tpot >= 0


@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_are_the_models_log_softmax(load, prompts, overlap):
    llm = LLM(load("llama"), kv_cache_dtype="model", kv_cache_bytes=1 << 22, record_logits=True,
              async_scheduling=overlap)
    params = [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, seed=3, max_tokens=4, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)]
    greedy, seeded, plain = llm.generate(prompts, params)
    assert plain.logprobs is None and len(greedy.logprobs) == 5 and len(seeded.logprobs) == 4
    for out, k in ((greedy, 3), (seeded, 0)):
        for tok, entry, row in zip(out.token_ids, out.logprobs, out.logits):
            want = torch.log_softmax(row, -1)
            assert entry.token_id == tok and abs(entry.logprob - float(want[tok])) < 1e-5
            assert [i for i, _ in entry.top] == want.topk(k).indices.tolist()
            assert all(abs(lp - float(want[i])) < 1e-5 for i, lp in entry.top)
    assert all(e.top[0][0] == e.token_id for e in greedy.logprobs)  # greedy picks the most likely token
    for bad in (21, -1, True, 1.5):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)


@pytest.mark.parametrize("overlap", [False, True])
def test_penalties_steer_greedy_choices_as_specified(load, prompts, overlap):
    """Each greedy token is the argmax of the raw logits with the penalties of the history before it:
    repetition (prompt and output tokens), presence and frequency (output tokens)."""
    llm = LLM(load("llama"), kv_cache_dtype="model", kv_cache_bytes=1 << 22, record_logits=True,
              async_scheduling=overlap)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=0.5,
                             frequency_penalty=0.3),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    for out, p in zip(outs, params):
        for j, (tok, row) in enumerate(zip(out.token_ids, out.logits)):
            history = out.token_ids[:j]
            want = row.clone()
            seen = sorted(set(out.prompt_token_ids + history)) if p.repetition_penalty != 1.0 else []
            want[seen] = torch.where(want[seen] > 0, want[seen] / p.repetition_penalty, want[seen] * p.repetition_penalty)
            for t in set(history):
                want[t] -= p.presence_penalty + p.frequency_penalty * history.count(t)
            assert tok == int(want.argmax())
    plain = [llm.generate(q, params[2])[0].token_ids for q in prompts[:2]]
    assert plain != [o.token_ids for o in outs[:2]]  # the penalties did change something
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(repetition_penalty=0.0), dict(repetition_penalty=1e4),
                dict(presence_penalty=float("nan"))):
        with pytest.raises(ValueError, match="penalty"):
            SamplingParams(**bad)


@pytest.mark.parametrize("overlap", [False, True])
def test_min_tokens_hold_back_eos_and_stop_ids(load, prompts, overlap):
    llm = LLM(load("llama"), kv_cache_dtype="model", kv_cache_bytes=1 << 22, async_scheduling=overlap)
    free = llm.generate(prompts[0], GREEDY)[0].token_ids
    llm.engine.eos_token_id = free[0]  # pretend the first greedy token is EOS, the second a stop id
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=4, stop_token_ids=[free[1]])
    out = llm.generate(prompts[0], params)[0]
    assert len(out.token_ids) >= 4 and not {free[0], free[1]} & set(out.token_ids[:4])
    assert llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=8))[0].token_ids == free[:1]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (~torch.isinf(filter_logits(logits, 0, 1.0, 0.25))).tolist() == [True, True, True, False]
    assert (~torch.isinf(filter_logits(logits, 0, 1.0, 1.0))).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)


def test_min_tokens_hold_back_stop_strings_and_bad_stop_ids_are_refused(load, prompts):
    llm = LLM(load("llama"), kv_cache_dtype="model", kv_cache_bytes=1 << 22)
    free = llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    stop = free.text[:2]  # would end the output after its first token or two
    out = llm.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=stop,
                                                  min_tokens=6))[0]
    assert len(out.token_ids) >= 6
    with pytest.raises(ValueError, match="stop_token_ids must be in"):
        llm.engine.add_request(prompts[0], SamplingParams(stop_token_ids=[10**6], min_tokens=1))


def _full_forward_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """log_softmax of the full-sequence forward's logits, fp32 [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), -1)


@pytest.mark.parametrize("overlap", [False, True])
def test_prompt_logprobs_score_every_prompt_token(load, prompts, overlap, monkeypatch):
    """Chunked prefill (8-token budget, scored 3 rows at a time) and a request without prompt logprobs in the
    same steps: each prompt token after the first gets the full forward's log-probability and top tokens;
    the first gets None."""
    monkeypatch.setattr("atomq.engine.llm.PROMPT_LOGPROB_ROWS", 3)
    lm = load("llama")
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, max_num_batched_tokens=8, async_scheduling=overlap)
    params = [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=0, logprobs=1)]
    scored, plain, short = llm.generate([prompts[1], prompts[0], prompts[0]], params)
    assert plain.prompt_logprobs is None
    assert plain.token_ids[:2] == short.token_ids and len(short.logprobs) == 2
    for out, k in ((scored, 2), (short, 0)):
        ids = out.prompt_token_ids
        want = _full_forward_logprobs(lm, ids)
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for p, entry in enumerate(out.prompt_logprobs[1:]):
            assert entry.token_id == ids[p + 1]
            assert abs(entry.logprob - float(want[p, ids[p + 1]])) < 1e-4
            assert [i for i, _ in entry.top] == want[p].topk(k).indices.tolist()
    for bad in (21, -1, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_prompt_logprobs_skip_the_prefix_cache_and_survive_preemption(load, prompts):
    """A prompt whose prefix is cached is still computed (and scored) whole; a request preempted and
    recomputed scores each prompt token once."""
    lm = load("llama")
    long_prompt = prompts[1]
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22)
    first = llm.generate(long_prompt, GREEDY)[0]
    again = llm.generate(long_prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                     prompt_logprobs=1))[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 0
    assert again.token_ids == first.token_ids
    assert len(again.prompt_logprobs) == len(again.prompt_token_ids)
    cached = llm.generate(long_prompt, GREEDY)[0]
    assert cached.num_cached_tokens > 0  # the cache itself still serves requests without prompt logprobs

    # 4 blocks of 16 tokens: the three requests together preempt each other
    per_block = llm.engine.kv_pool.bytes_per_token * 16
    tight = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=4 * per_block, max_model_len=64, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    outs = tight.generate([prompts[0], prompts[2], "seven wizards quietly"], params)
    assert sum(o.num_preemptions for o in outs) > 0
    for out in outs:
        ids = out.prompt_token_ids
        want = _full_forward_logprobs(lm, ids)
        assert len(out.prompt_logprobs) == len(ids)
        assert all(abs(e.logprob - float(want[p, ids[p + 1]])) < 1e-4 for p, e in enumerate(out.prompt_logprobs[1:]))


@pytest.mark.parametrize("overlap", [False, True])
def test_logit_bias_steers_sampling_not_logprobs(load, prompts, overlap):
    """+100 forces a token, -100 bans the greedy choice; logprobs stay the model's own distribution."""
    llm = LLM(load("llama"), kv_cache_dtype="model", kv_cache_bytes=1 << 22, record_logits=True,
              async_scheduling=overlap)
    free = llm.generate(prompts[0], GREEDY)[0]
    forced, banned, sampled = llm.generate(
        [prompts[0]] * 3,
        [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={7: 100.0}, logprobs=1),
         SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={free.token_ids[0]: -100.0}),
         SamplingParams(temperature=0.7, seed=1, max_tokens=6, ignore_eos=True, logit_bias={9: 100.0})])
    assert forced.token_ids == [7] * 4 and sampled.token_ids == [9] * 6
    assert banned.token_ids[0] != free.token_ids[0]
    for entry, row in zip(forced.logprobs, forced.logits):
        assert abs(entry.logprob - float(torch.log_softmax(row, -1)[7])) < 1e-5
    with pytest.raises(ValueError, match="logit_bias token ids"):
        llm.generate(prompts[0], SamplingParams(logit_bias={10**6: 1.0}))
    # +100 on EOS cannot end a request before min_tokens; biased, penalized and plain rows in one batch
    eos = llm.engine.eos_token_id
    held, penalized, plain = llm.generate(
        [prompts[0], prompts[1], prompts[2]],
        [SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, logit_bias={eos: 100.0}),
         SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={7: 100.0}, presence_penalty=2.0),
         SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)])
    assert len(held.token_ids) == 4 and held.token_ids[-1] == eos and eos not in held.token_ids[:3]
    assert penalized.token_ids == [7] * 4 and plain.token_ids == llm.generate(prompts[2], plain_params(3))[0].token_ids
    for bad in ({1: 101.0}, {-2: 1.0}, {1: float("nan")}, 5, [1, 2], {7.5: 1.0}, {True: 1.0}, [(7, 60.0)] * 2):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def plain_params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
