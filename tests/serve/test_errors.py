"""Client mistakes get 4xx answers with OpenAI error bodies, and the server keeps serving everyone."""

from __future__ import annotations

import json

import httpx
import pytest

from live import MODEL_NAME, assert_no_leaks, serving

LONG = " ".join(["wizards"] * 200)  # far more than max_model_len 128 tokens

# (method, path, JSON body or raw bytes, status, a piece of the message, param)
CASES = [
    ("POST", "/v1/completions", b'{"prompt": "hi", ', 400, "the body is not valid JSON", None),
    ("POST", "/v1/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt", "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "valid integer", "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens: 0 is only allowed with echo",
     None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "greater than or equal to 0", "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True, "min_tokens": 1}, 400,
     "min_tokens 1 is more than the 0 tokens", None),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "valid number", "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 7}, 400, "less than or equal to 2", "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "greater than 0", "top_p"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "greater than or equal to 1", "n"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "valid boolean", "stream"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "at least 1 character", "stop"),
    ("POST", "/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "less than or equal to", "seed"),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "more than the model's context", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 128}, 400, "exceed the model's context", None),
    ("POST", "/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "prompt token ids must be in", None),
    ("POST", "/v1/completions", {"prompt": []}, 400, "should have at least 1 item", "prompt"),
    ("POST", "/v1/completions", {"prompt": [[1], []]}, 400, "should have at least 1 item", "prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "at least 1 character", "prompt"),
    ("POST", "/v1/completions", {"prompt": [3, -1]}, 400, "greater than or equal to 0", "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 2.5}, 400, "valid integer", "n"),
    ("POST", "/v1/completions", {"prompt": "\ud800x"}, 400, "valid string", "prompt"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udfff"}]}, 400,
     "lone surrogate", None),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "less than or equal to 20", "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs: true", None),
    ("POST", "/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "valid boolean", "echo"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "is not a token id", "logit_bias"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"007": 1}}, 400, "is not a token id", "logit_bias"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "less than or equal to 100",
     "logit_bias"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"1000000": 1}}, 400, "logit_bias token ids must be in",
     None),
    ("POST", "/v1/completions", {"prompt": "hi", "stream_options": {}}, 400, "only allowed with stream", None),
    ("POST", "/v1/completions", {"prompt": ["a"] * 200, "n": 2}, 400, "at most 320", "n"),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-17"}, 404, "does not exist", "model"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "at least 1 item", "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "pirate", "content": "arr"}]}, 400, "role", "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "Input should be 'text'", "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}, 400,
     "tools: not supported by this server", "tools"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400,
     "min_tokens 5 is more than the 4 tokens", None),
    ("POST", "/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "less than or equal to 1", "min_p"),
    ("POST", "/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "less than or equal to 2",
     "presence_penalty"),
    ("POST", "/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "greater than or equal to 0.001",
     "repetition_penalty"),
    ("POST", "/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "not supported", "best_of"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "more than the model's context", None),
    ("GET", "/v1/completions", None, 405, "Method Not Allowed", None),
    ("GET", "/v1/nothing-here", None, 404, "Not Found", None),
    ("GET", "/v1/models/gpt-17", None, 404, "does not exist", "model"),
]


@pytest.mark.parametrize("method, path, body, status, message, param", CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request_gets_an_openai_error(server, method, path, body, status, message, param):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body)
    res = httpx.request(method, server.url + path, content=content, headers={"content-type": "application/json"})
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_wrong_content_type_is_a_400(server):
    res = httpx.post(server.url + "/v1/completions", content=b"prompt=hi",
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"


def test_no_chat_template_is_a_400(tiny_dir):
    from atomq.model.loader import load_model

    plain = load_model(str(tiny_dir))  # its tokenizer has no chat template
    with serving(plain) as live:
        res = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert res.status_code == 400
        assert "no chat template" in res.json()["error"]["message"]
    with serving(plain, chat_template="{{ messages[0]['content'] }}!") as live:  # --chat-template
        res = httpx.post(live.url + "/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        want = len(plain.tokenizer("hi!", add_special_tokens=False)["input_ids"])
        assert res.status_code == 200 and res.json()["usage"]["prompt_tokens"] == want


def test_a_template_that_refuses_the_messages_is_a_400(live_server):
    live = live_server(chat_template="{{ raise_exception('only one message, please') }}")
    res = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert res.status_code == 400 and "only one message, please" in res.json()["error"]["message"]


def test_bad_requests_do_not_disturb_running_ones(server):
    """Stream a long answer while a burst of bad requests arrives; it finishes as if alone."""
    good = {"model": MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    alone = httpx.post(server.url + "/v1/completions", json=good).json()["choices"][0]["text"]
    with httpx.Client(base_url=server.url, headers={"content-type": "application/json"}) as client:
        with client.stream("POST", "/v1/completions", json={**good, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            for _, path, body, status, _, _ in CASES:
                if isinstance(body, dict):
                    assert client.post(path, content=json.dumps(body)).status_code == status
            rest = [first, *lines]
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in rest
                   if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert text == alone
    assert_no_leaks(server)
