"""Bounded load: 64 concurrent streaming clients for a fixed time, over a KV pool too small for all of
them (requests wait, running ones get preempted and recomputed). Zero errors, greedy outputs identical
to offline generation, and every KV block free at the end."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from atomq import LLM, SamplingParams
from live import ENGINE, MODEL_NAME, assert_no_leaks, sample

CLIENTS = 64
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
PROMPTS = [" ".join(WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)])[: 12 + 9 * i] for i in range(8)]
MAX_TOKENS = (1, 9, 30)
POOL = dict(ENGINE, kv_cache_bytes=64 * 16 * 512)  # 64 blocks of 16 tokens (fp32 pages: 512 bytes a token)


def _jobs(tokenizer) -> list[dict]:
    """Every (endpoint, prompt, max_tokens) a client may ask for, with its offline greedy answer."""
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for max_tokens in MAX_TOKENS:
            if i % 3 == 0:  # some as chat
                messages = [{"role": "user", "content": prompt}]
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                jobs.append({"path": "/v1/chat/completions", "body": {"messages": messages, "max_tokens": max_tokens},
                             "ids": tokenizer(rendered, add_special_tokens=False)["input_ids"]})
            jobs.append({"path": "/v1/completions", "body": {"prompt": prompt, "max_tokens": max_tokens},
                         "ids": tokenizer(prompt)["input_ids"]})
    return jobs


def _text_of(event: dict) -> tuple[str, str | None]:
    choice = event["choices"][0]
    text = choice["delta"].get("content", "") if "delta" in choice else choice["text"]
    return text, choice["finish_reason"]


async def _client(http: httpx.AsyncClient, jobs: list[dict], start: int, deadline: float, done: list, errors: list):
    k = start
    while time.monotonic() < deadline:
        job = jobs[k % len(jobs)]
        k += 1
        body = {**job["body"], "model": MODEL_NAME, "temperature": 0, "stream": True}
        try:
            async with http.stream("POST", job["path"], json=body) as res:
                if res.status_code != 200:
                    errors.append(f"{job['path']}: HTTP {res.status_code} {await res.aread()!r}")
                    continue
                text, reason, usage, finished = "", None, None, False
                async for line in res.aiter_lines():
                    if line == "data: [DONE]":
                        finished = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            usage = event["usage"]
                        elif event["choices"]:
                            piece, reason = _text_of(event)
                            text += piece
        except httpx.HTTPError as exc:
            errors.append(f"{job['path']}: {type(exc).__name__}: {exc}")
            continue
        want = job["want"]
        got = (text, reason, usage and usage["completion_tokens"], finished)
        expected = (want.text, want.finish_reason, len(want.token_ids), True)
        if got != expected:
            errors.append(f"{job['path']} {job['body']}: got {got}, want {expected}")
        done.append(job)


async def _load(url: str, jobs: list[dict], seconds: float) -> tuple[list, list]:
    done, errors = [], []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*[_client(http, jobs, 5 * i, deadline, done, errors) for i in range(CLIENTS)])
    return done, errors


@pytest.mark.parametrize("seconds", [3, pytest.param(60, marks=pytest.mark.slow)])
def test_concurrent_streaming_clients(tiny_lm, live_server, seconds):
    jobs = _jobs(tiny_lm.tokenizer)
    offline = LLM(tiny_lm, **POOL).generate([j["ids"] for j in jobs],
                                            [SamplingParams(temperature=0, max_tokens=j["body"]["max_tokens"])
                                             for j in jobs])
    for job, out in zip(jobs, offline):
        job["want"] = out

    live = live_server(**POOL)
    done, errors = asyncio.run(_load(live.url, jobs, seconds))
    assert errors == []
    assert sample(live, "atomq_preemptions_total") > 0  # the pool was too small: sequences were recomputed
    assert len(done) >= CLIENTS  # every client finished at least one request
    assert {j["path"] for j in done} == {"/v1/completions", "/v1/chat/completions"}
    assert sample(live, "atomq_http_requests_total", route="/v1/completions", status="200") + \
        sample(live, "atomq_http_requests_total", route="/v1/chat/completions", status="200") == len(done)
    assert_no_leaks(live)
