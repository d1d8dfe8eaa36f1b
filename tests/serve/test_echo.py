"""echo on /v1/completions: the prompt before each choice's text and, with logprobs, the prompt tokens'
log-probabilities (the model's full-sequence forward's) before the completion's; max_tokens 0 for the
prompt alone (legacy log-likelihood requests; lm-eval-harness's local-completions sends max_tokens 1 and
reads the prompt's entries). Whole, streamed, batched."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from live import MODEL_NAME

PROMPTS = ["the quick brown fox jumps", "seven wizards quietly judge boxing matches under silver moons"]
GREEDY = {"model": MODEL_NAME, "temperature": 0}


def _post(server, **body) -> dict:
    res = httpx.post(server.url + "/v1/completions", json={**GREEDY, **body})
    assert res.status_code == 200, res.text
    return res.json()


def _events(server, **body) -> list[dict]:
    """The JSON chunks of a stream (``[DONE]`` checked, not returned)."""
    with httpx.stream("POST", server.url + "/v1/completions", json={**GREEDY, **body, "stream": True}) as res:
        lines = [line for line in res.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _full_forward_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """log_softmax of the full-sequence forward's logits, fp32 [len(ids), V]: row i - 1 scores token i."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids]))[0].float(), -1)


def _offsets(tokens: list[str]) -> list[int]:
    return [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_puts_the_prompt_before_the_completion(server):
    kw = dict(prompt=PROMPTS[0], max_tokens=8, stop=["quick", " o"])  # a stop string in the prompt cuts nothing
    plain, echoed = _post(server, **kw), _post(server, echo=True, **kw)
    assert echoed["choices"][0]["text"] == PROMPTS[0] + plain["choices"][0]["text"]
    assert echoed["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert echoed["usage"] == plain["usage"]
    assert _post(server, echo=None, **kw)["choices"][0]["text"] == plain["choices"][0]["text"]  # null: no echo


def test_echo_of_token_ids_is_their_exact_text(server, tiny_lm):
    text = "caf\u00e9 \u4f60\u597d over"  # characters split over tokens decode whole
    ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = _post(server, prompt=ids, max_tokens=5)["choices"][0]["text"]
    assert _post(server, prompt=ids, max_tokens=5, echo=True)["choices"][0]["text"] == text + plain
    assert _post(server, prompt=ids, max_tokens=0, echo=True)["choices"][0]["text"] == text


def test_echo_logprobs_score_the_prompt_like_the_full_forward(server, tiny_lm):
    ids = tiny_lm.tokenizer(PROMPTS[1])["input_ids"]
    plain = _post(server, prompt=PROMPTS[1], max_tokens=6, logprobs=2)["choices"][0]
    res = _post(server, prompt=PROMPTS[1], max_tokens=6, logprobs=2, echo=True)
    choice, usage = res["choices"][0], res["usage"]
    lp, n = choice["logprobs"], len(ids)
    assert usage["prompt_tokens"] == n and usage["completion_tokens"] == len(plain["logprobs"]["tokens"])
    assert all(len(v) == n + usage["completion_tokens"] for v in lp.values())
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = _full_forward_logprobs(tiny_lm, ids)
    assert lp["token_logprobs"][1:n] == pytest.approx([float(want[i - 1, ids[i]]) for i in range(1, n)], abs=1e-3)
    for token, top, chosen in zip(lp["tokens"][1:], lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
        assert len(top) <= 3 and top[token] >= chosen - 1e-6  # the two most likely tokens and the actual one
    assert "".join(lp["tokens"][:n]) == PROMPTS[1]
    # the completion's part is as without echo
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)
    assert [list(t) for t in lp["top_logprobs"][n:]] == [list(t) for t in plain["logprobs"]["top_logprobs"]]
    # offsets into the echoed text, continuing over the completion
    assert lp["text_offset"] == _offsets(lp["tokens"]) and lp["text_offset"][n] == len(PROMPTS[1])
    assert choice["text"] == PROMPTS[1] + plain["text"]


def test_max_tokens_0_with_echo_returns_the_prompt_alone(server, tiny_lm):
    """A log-likelihood request: token-id prompts, echo, max_tokens 0, logprobs 1."""
    ids = [tiny_lm.tokenizer(p)["input_ids"] for p in PROMPTS]
    res = _post(server, prompt=ids, echo=True, max_tokens=0, logprobs=1)
    assert res["usage"] == {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 0,
                            "total_tokens": sum(map(len, ids))}
    for choice, p, prompt_ids in zip(res["choices"], PROMPTS, ids):
        lp = choice["logprobs"]
        assert choice["text"] == p and choice["finish_reason"] == "length"
        assert [len(v) for v in lp.values()] == [len(prompt_ids)] * 4
        want = _full_forward_logprobs(tiny_lm, prompt_ids)
        ref = [float(want[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(ref, abs=1e-3)
        greedy = [max(top.values()) == chosen for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:])]
        assert greedy == [bool(want[i - 1].argmax() == prompt_ids[i]) for i in range(1, len(prompt_ids))]
    text_only = _post(server, prompt=PROMPTS[0], echo=True, max_tokens=0)["choices"][0]
    assert text_only == {"index": 0, "text": PROMPTS[0], "logprobs": None, "finish_reason": "length"}


def test_streamed_echo_opens_each_choice_with_its_prompt(server):
    kw = dict(prompt=PROMPTS, max_tokens=6, logprobs=1, echo=True, n=2, seed=7, temperature=0.8)
    whole = _post(server, **kw)
    chunks = _events(server, **kw)
    assert chunks[-1]["usage"] == whole["usage"] and not chunks[-1]["choices"]
    streamed = {i: [c for chunk in chunks[:-1] for c in chunk["choices"] if c["index"] == i] for i in range(4)}
    for i, choice in enumerate(whole["choices"]):
        parts = streamed[i]
        assert parts[0]["text"].startswith(PROMPTS[i // 2]) and parts[0]["logprobs"]["token_logprobs"][0] is None
        assert "".join(c["text"] for c in parts) == choice["text"]
        assert [c["finish_reason"] for c in parts][-1] == choice["finish_reason"]
        lp = {key: [x for c in parts for x in c["logprobs"][key]] for key in choice["logprobs"]}
        assert lp["tokens"] == choice["logprobs"]["tokens"]
        assert lp["text_offset"] == choice["logprobs"]["text_offset"]
        assert lp["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=1e-4)


def test_streamed_max_tokens_0_sends_the_prompt_then_the_usage(server):
    chunks = _events(server, prompt=PROMPTS[1], max_tokens=0, echo=True)
    assert [c["choices"] for c in chunks] == [[{"index": 0, "text": PROMPTS[1], "logprobs": None,
                                                "finish_reason": "length"}], []]
    assert chunks[-1]["usage"]["completion_tokens"] == 0


def test_a_batch_of_prompts_with_echo_through_the_openai_client(client):
    prompts = [*PROMPTS, "a"]
    plain = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=4, temperature=0, n=2)
    res = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=4, temperature=0, n=2, echo=True,
                                    logprobs=0)
    assert [c.index for c in res.choices] == list(range(6))
    assert [c.text for c in res.choices] == [prompts[i // 2] + c.text for i, c in enumerate(plain.choices)]
    assert res.usage == plain.usage
    for choice in res.choices:
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: the actual token alone


def test_echo_with_chunked_prefill_and_asynchronous_steps(server, live_server):
    """The prompt is scored over several prefill chunks and the echo waits for the first token, which
    lands a step late: the same answers as the default server's."""
    live = live_server(async_scheduling=True, max_num_batched_tokens=8)
    for kw in (dict(max_tokens=0), dict(max_tokens=5, ignore_eos=True)):
        body = dict(prompt=PROMPTS, echo=True, logprobs=2, **kw)
        got, want = _post(live, **body), _post(server, **body)
        assert got["usage"] == want["usage"]
        for a, b in zip(got["choices"], want["choices"]):
            assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
            assert a["logprobs"]["token_logprobs"][1:] == pytest.approx(b["logprobs"]["token_logprobs"][1:], abs=1e-4)
        chunks = _events(live, **body)
        for i, choice in enumerate(got["choices"]):
            assert "".join(c["text"] for chunk in chunks for c in chunk["choices"] if c["index"] == i) == choice["text"]


def test_echo_offsets_index_the_prompt_as_sent_when_the_tokenizer_adds_a_bos(tiny_dir):
    """A tokenizer that prepends <s> to string prompts: the echoed text is the prompt as sent, so <s> covers
    no characters; every other token's text starts at its offset, and the completion's offsets follow
    the prompt. A prompt that fills the whole context is still scored with max_tokens 0."""
    from tokenizers.processors import TemplateProcessing

    from atomq.model.loader import load_model

    from live import serving

    lm = load_model(str(tiny_dir))
    bos = lm.tokenizer.convert_tokens_to_ids("<s>")
    lm.tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert lm.tokenizer(PROMPTS[0])["input_ids"][0] == bos
    with serving(lm, max_model_len=64) as live:
        choice = _post(live, prompt=PROMPTS[0], max_tokens=3, echo=True, logprobs=0)["choices"][0]
        lp, text = choice["logprobs"], choice["text"]
        assert lp["tokens"][0] == "<s>" and lp["text_offset"][:2] == [0, 0]
        n = len(lm.tokenizer(PROMPTS[0])["input_ids"])
        for token, offset in zip(lp["tokens"][1:], lp["text_offset"][1:]):
            assert text[offset:].startswith(token)
        assert lp["text_offset"][n] == len(PROMPTS[0])  # the first completion token
        full = [5 + i % 200 for i in range(64)]
        whole = _post(live, prompt=full, max_tokens=0, echo=True, logprobs=0)
        assert len(whole["choices"][0]["logprobs"]["token_logprobs"]) == 64
        res = httpx.post(live.url + "/v1/completions", json={**GREEDY, "prompt": full, "max_tokens": 1})
        assert res.status_code == 400 and "context" in res.text


@pytest.mark.parametrize("prompt, mapping, want_starts", [
    ("the fox", [(0, 0), (0, 3), (3, 7)], [0, 0, 3]),  # an added BOS covers nothing
    ("  the fox", [(2, 5), (6, 9)], [0, 6]),  # leading spaces the offsets leave out: the first token's
    ("the fox", [(0, 0), (0, 3), (4, 7), (0, 0)], [0, 0, 4, 7]),  # an added EOS starts where the text ends
])
def test_prompt_char_spans_index_the_prompt_as_sent(prompt, mapping, want_starts):
    from atomq.serve.engine_loop import prompt_char_spans

    spans = prompt_char_spans(prompt, mapping)
    assert [sum(spans[:i]) for i in range(len(spans))] == want_starts and sum(spans) == len(prompt)
