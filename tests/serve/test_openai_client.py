"""The official openai client against a live server: completions and chat, streamed and not, equal to
offline generation; models; usage; seeds; stop strings."""

from __future__ import annotations

import httpx
import pytest

from atomq import LLM, SamplingParams

from live import ENGINE, MODEL_NAME

openai = pytest.importorskip("openai")

PROMPTS = ["the quick brown fox jumps", "seven wizards quietly judge boxing matches under silver moons", "a"]


@pytest.fixture(scope="module")
def offline(tiny_lm):
    """Greedy offline outputs: offline(prompts, max_tokens, chat=False) -> list[RequestOutput]."""
    llm = LLM(tiny_lm, **ENGINE)

    def generate(prompts, max_tokens, **params):
        return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, **params))

    return generate


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_model_ids_may_hold_slashes(live_server):
    live = live_server(model_name="org/tiny")
    assert httpx.get(live.url + "/v1/models/org/tiny").json()["id"] == "org/tiny"
    assert httpx.get(live.url + "/v1/models/org/other").status_code == 404


def test_completion_equals_offline_generation(client, offline):
    want = offline(PROMPTS, 12)
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert [c.text for c in res.choices] == [o.text for o in want]
    assert [c.finish_reason for c in res.choices] == [o.finish_reason for o in want]
    assert res.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    assert res.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert res.object == "text_completion" and res.model == MODEL_NAME and res.id.startswith("cmpl-")


def test_streamed_completion_equals_offline_generation(client, offline):
    want = offline(PROMPTS[:2], 20)
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], max_tokens=20, temperature=0,
                                           stream=True):
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [o.text for o in want]
    assert reasons == [o.finish_reason for o in want]
    assert usage.completion_tokens == sum(len(o.token_ids) for o in want)
    assert usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)


def test_a_tiny_temperature_samples_greedily(client, offline):
    """1e-300 would overflow the logits to inf; below 1e-5 the server samples greedily."""
    want = offline(PROMPTS[:1], 8)[0]
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=1e-300)
    assert res.choices[0].text == want.text


def test_token_id_prompts(client, offline):
    ids = offline(PROMPTS[:1], 1)[0].prompt_token_ids
    want = offline([ids], 6)[0]
    res = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert res.choices[0].text == want.text


def test_chat_uses_the_template_and_matches_offline(client, offline, tiny_lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]
    rendered = tiny_lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tiny_lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    want = offline([ids], 10)[0]
    res = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == want.text
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(want.token_ids)

    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason


def test_seeded_sampling_is_reproducible_and_n_choices_differ(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.95, n=3, seed=1234,
              extra_body={"ignore_eos": True})
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b
    assert len(set(a)) > 1  # choice i samples with seed + i


def test_stop_strings_cut_the_text_and_never_stream_part_of_it(client, offline):
    free = offline(PROMPTS[1:2], 24, ignore_eos=True)[0].text
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert stop.strip(), "pick a stop string that is not blank"
    want = free[:free.index(stop)]
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    res = client.completions.create(**kw)
    assert res.choices[0].text == want and res.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == want  # streamed text is never taken back, so no piece of the stop string left


def test_completion_logprobs_whole_and_streamed(client, offline):
    want = offline(PROMPTS[:2], 6, logprobs=2)
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], max_tokens=6, temperature=0, logprobs=2)
    for choice, o in zip(res.choices, want):
        lp = choice.logprobs
        assert lp.token_logprobs == pytest.approx([e.logprob for e in o.logprobs], abs=1e-4)
        assert len(lp.tokens) == len(lp.top_logprobs) == len(o.token_ids) and all(len(t) <= 2 for t in lp.top_logprobs)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = {0: [], 1: []}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], max_tokens=6, temperature=0,
                                           logprobs=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.logprobs.token_logprobs if c.logprobs else []
    assert [len(v) for v in streamed.values()] == [len(o.token_ids) for o in want]
    assert streamed[0] == pytest.approx(res.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_whole_and_streamed(client):
    messages = [{"role": "user", "content": "name a color"}]
    res = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = res.choices[0].logprobs.content
    assert len(content) == res.usage.completion_tokens
    # the tokens' bytes add up to the answer exactly, also where one token holds part of a character
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == res.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the most likely token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                                logprobs=True, stream=True):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs else []
    assert [e.token for e in streamed] == [e.token for e in content] and all(not e.top_logprobs for e in streamed)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_logit_bias_equals_offline_and_steers_chat(client, offline):
    bias = {"7": 100, "9": -100}
    want = offline(PROMPTS[:1], 5, logit_bias={7: 100.0, 9: -100.0})[0]
    assert want.token_ids == [7] * 5
    res = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0, logit_bias=bias)
    assert res.choices[0].text == want.text
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0.5, seed=2, logit_bias={"7": 100})
    assert chat.choices[0].message.content == offline(PROMPTS[:1], 3, logit_bias={7: 100.0})[0].text  # 7, 7, 7
