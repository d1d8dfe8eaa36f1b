"""--api-key guards every endpoint but /health; /metrics reports requests, tokens, queue, KV and latency."""

from __future__ import annotations

import httpx
import pytest

from live import MODEL_NAME, sample

KEY = "sk-test-0123456789"
GUARDED = [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL_NAME}"), ("GET", "/metrics"), ("GET", "/openapi.json"),
           ("GET", "/docs"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/no-such-path")]


@pytest.fixture(scope="module")
def secured(tiny_lm):
    from live import serving

    with serving(tiny_lm, api_key=KEY) as live:
        yield live


@pytest.mark.parametrize("method, path", GUARDED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", KEY])
def test_every_endpoint_but_health_needs_the_key(secured, method, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    res = httpx.request(method, secured.url + path, headers=headers, json={"prompt": "hi"})
    assert res.status_code == 401
    assert res.headers["www-authenticate"] == "Bearer"
    assert res.json()["error"]["code"] == "invalid_api_key"


def test_the_right_key_opens_everything_and_health_is_open(secured):
    assert httpx.get(secured.url + "/health").status_code == 200
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert httpx.get(secured.url + "/v1/models", headers=headers).status_code == 200
        assert httpx.get(secured.url + "/metrics", headers=headers).status_code == 200
        assert httpx.get(secured.url + "/openapi.json", headers=headers).status_code == 200


def test_openai_client_with_and_without_the_key(secured):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=secured.url + "/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    with openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0) as good:
        res = good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert res.usage.completion_tokens == 3


def test_metrics(live_server):
    from prometheus_client.parser import text_string_to_metric_families

    live = live_server()
    body = {"prompt": ["the quick brown fox", "a lazy dog"], "max_tokens": 5, "n": 2, "ignore_eos": True}
    usage = httpx.post(live.url + "/v1/completions", json=body).json()["usage"]
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 0}).status_code == 400

    text = httpx.get(live.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("atomq_http_requests", "atomq_prompt_tokens", "atomq_generation_tokens", "atomq_num_sequences_waiting",
                 "atomq_num_sequences_running", "atomq_kv_cache_usage_ratio", "atomq_time_to_first_token_seconds",
                 "atomq_time_per_output_token_seconds", "atomq_e2e_request_latency_seconds"):
        assert name in families, name
    assert sample(live, "atomq_http_requests_total", route="/v1/completions", status="200") == 1
    assert sample(live, "atomq_http_requests_total", route="/v1/completions", status="400") == 1
    assert sample(live, "atomq_prompt_tokens_total") == usage["prompt_tokens"]
    assert sample(live, "atomq_generation_tokens_total") == usage["completion_tokens"] == 4 * 5
    assert sample(live, "atomq_sequences_finished_total", finish_reason="length") == 4
    assert sample(live, "atomq_time_to_first_token_seconds_count") == 4
    assert sample(live, "atomq_time_per_output_token_seconds_count") == 4
    assert sample(live, "atomq_e2e_request_latency_seconds_count") == 4
    assert sample(live, "atomq_num_sequences_running") == 0 and sample(live, "atomq_kv_cache_usage_ratio") == 0
