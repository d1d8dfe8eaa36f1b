"""Disconnects abort and free their KV blocks; a full queue answers 429; shutdown drains; an engine
failure is a 500 for the requests in flight only."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from live import MODEL_NAME, assert_no_leaks, sample, wait_until

BODY = {"model": MODEL_NAME, "prompt": "seven wizards quietly judge", "temperature": 0, "ignore_eos": True}


def _aborted(live) -> float:
    return sample(live, "atomq_sequences_finished_total", finish_reason="abort")


def _data(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_a_client_that_disconnects_mid_stream_aborts_its_request(live_server):
    live = live_server(step_delay=0.02)
    with httpx.Client(base_url=live.url) as client:
        with client.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 100, "stream": True}) as res:
            lines = res.iter_lines()
            got = [next(lines) for _ in range(6)]  # three events (each is a data line and a blank line)
    assert len(_data(got)) == 3
    wait_until(lambda: _aborted(live) == 1, what="the abort")
    assert_no_leaks(live)
    assert sample(live, "atomq_generation_tokens_total") < 100  # stopped early, not run to max_tokens


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_aborts_it(live_server):
    live = live_server(step_delay=0.02)
    body = json.dumps({**BODY, "max_tokens": 100}).encode()
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: sample(live, "atomq_generation_tokens_total") >= 3, what="generation to start")
    wait_until(lambda: _aborted(live) == 1, what="the abort")
    assert_no_leaks(live)
    assert sample(live, "atomq_generation_tokens_total") < 100


def test_a_full_queue_answers_429_and_recovers(live_server):
    live = live_server(step_delay=0.02, max_num_seqs=1, max_waiting=1)  # one running + one waiting
    body = {**BODY, "max_tokens": 30, "stream": True}
    with httpx.Client(base_url=live.url) as a, httpx.Client(base_url=live.url) as b:
        with a.stream("POST", "/v1/completions", json=body) as first, \
                b.stream("POST", "/v1/completions", json=body) as second:
            assert first.status_code == second.status_code == 200
            wait_until(lambda: sample(live, "atomq_num_sequences_waiting") == 1, what="a waiting sequence")
            full = httpx.post(live.url + "/v1/completions", json={**BODY, "max_tokens": 2})
            assert full.status_code == 429
            assert full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
            finished = [_data(res.iter_lines())[-1]["usage"]["completion_tokens"] for res in (first, second)]
    assert finished == [30, 30]
    assert httpx.post(live.url + "/v1/completions", json={**BODY, "max_tokens": 2}).status_code == 200
    assert sample(live, "atomq_http_requests_total", route="/v1/completions", status="429") == 1
    assert_no_leaks(live)


def test_shutdown_drains_in_flight_requests(live_server):
    live = live_server(step_delay=0.02)
    port = int(live.url.rsplit(":", 1)[1])
    with httpx.Client(base_url=live.url) as client:
        with client.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 60, "stream": True}) as res:
            lines = res.iter_lines()
            head = [next(lines), next(lines)]
            live.uvicorn.should_exit = True  # what SIGINT / SIGTERM do

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return False
                except OSError:
                    return True

            wait_until(refused, what="the listener to close")
            events = _data(head + list(lines))
    assert events[-1]["usage"]["completion_tokens"] == 60
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    live.thread.join(30)
    assert not live.bridge.is_alive  # the engine thread stopped after the drain
    assert _aborted(live) == 0


def test_shutdown_timeout_aborts_what_is_left(live_server):
    live = live_server(step_delay=0.02, shutdown_timeout=0.3)
    with httpx.Client(base_url=live.url) as client:
        with client.stream("POST", "/v1/completions", json={**BODY, "max_tokens": 120, "stream": True}) as res:
            lines = res.iter_lines()
            next(lines)
            live.uvicorn.should_exit = True
            with pytest.raises(httpx.HTTPError):
                list(lines)  # the server ends the stream early
    live.thread.join(30)
    assert not live.thread.is_alive() and not live.bridge.is_alive
    assert _aborted(live) == 1


def test_an_engine_failure_is_a_500_for_requests_in_flight_only(live_server):
    live = live_server()

    def break_next_step(engine):
        healthy = engine.step

        def failing_step():
            engine.step = healthy
            raise RuntimeError("simulated fault")

        engine.step = failing_step

    live.call(break_next_step)
    res = httpx.post(live.url + "/v1/completions", json={**BODY, "max_tokens": 4})
    assert res.status_code == 500
    assert res.json()["error"]["type"] == "server_error" and "simulated fault" in res.json()["error"]["message"]
    assert httpx.post(live.url + "/v1/completions", json={**BODY, "max_tokens": 4}).status_code == 200
    assert_no_leaks(live)
