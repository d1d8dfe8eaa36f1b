"""The serving benchmark's client against a fake OpenAI-compatible server: Poisson send times, streamed
requests, the per-rate rows, a launched server process and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from atomq.bench.serving import ServerProcess, poisson_offsets, run_serving
from atomq.bench.workloads import Workload, fixed

FAKE = str(Path(__file__).parent / "fake_openai_server.py")


def test_poisson_offsets():
    t = poisson_offsets(20000, rate=4.0, seed=1)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() - 0.25) < 0.01  # exponential: std = mean
    assert np.array_equal(t, poisson_offsets(20000, 4.0, seed=1))
    assert not np.array_equal(t, poisson_offsets(20000, 4.0, seed=2))
    assert not poisson_offsets(5, None).any()
    with pytest.raises(ValueError, match="> 0"):
        poisson_offsets(3, 0.0)


def test_rates_against_a_server(fake_server):
    url, app = fake_server
    w = Workload("test", np.array([5, 3, 8, 2, 6, 4]), np.array([4, 2, 6, 3, 5, 2]), "test lengths")
    rows = run_serving(url, w, [None, 50.0], label="atom", vocab_size=100)
    assert [r["request_rate"] for r in rows] == [None, 50.0]
    for r in rows:
        assert (r["model"], r["config"], r["status"], r["completed"], r["failed"]) == ("fake-model", "atom", "ok", 6, 0)
        assert r["output_tokens"] == w.num_output_tokens and r["prompt_tokens"] == w.num_prompt_tokens
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
        for key in ("ttft_s", "tpot_s", "e2e_s"):
            assert 0 < r[key]["p50"] <= r[key]["p99"] <= r[key]["max"]
        assert r["ttft_s"]["max"] <= r["e2e_s"]["max"]
        json.dumps(r)
    # at 50 req/s the last request leaves after the last Poisson offset
    assert rows[1]["duration_s"] >= poisson_offsets(6, 50.0, seed=1)[-1]
    body = app.bodies[0]
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0.0 and body["model"] == "fake-model"
    assert body["stream_options"] == {"include_usage": True}
    assert sorted(len(b["prompt"]) for b in app.bodies[:6]) == sorted(w.prompt_lens.tolist())
    assert all(0 <= t < 100 for b in app.bodies for t in b["prompt"])
    first, second = ({tuple(b["prompt"]) for b in app.bodies[k:k + 6]} for k in (0, 6))
    assert not first & second  # each rate sends new prompts (no prefix-cache hits from the one before)


def test_failed_requests_are_counted(fake_server):
    url, _ = fake_server
    [row] = run_serving(url, fixed(4, 30, 2), [None], model="fake-model", vocab_size=5000)  # ids past VOCAB
    assert row["status"] == "errors" and row["failed"] > 0 and row["completed"] + row["failed"] == 4
    assert row["reason"].startswith("HTTP 400") and "out of range" in row["reason"]


def test_server_process_lifecycle(tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with ServerProcess([sys.executable, FAKE, "--port", str(port)], url, 30, str(log)) as server:
        [row] = run_serving(url, fixed(2, 3, 2), [None])
        assert row["completed"] == 2
    assert server.proc.poll() is not None  # terminated on exit
    with pytest.raises(RuntimeError, match="exited with code 3"):
        with ServerProcess([sys.executable, "-c", "import sys; sys.exit(3)"], url, 30):
            pass


def test_command_line(fake_server, tmp_path, capsys):
    from atomq.cli import main

    url, _ = fake_server
    out = tmp_path / "s.json"
    rc = main(["bench", "serving", "--url", url, "--label", "fp16", "--rates", "inf,100", "--workload", "fixed",
               "--num-requests", "3", "--input-len", "4", "--output-len", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "serving" and [r["request_rate"] for r in data["rows"]] == [None, 100.0]
    assert "| fake-model | fp16 | inf | ok | 3 / 3 |" in capsys.readouterr().out
    assert main(["bench", "serving", "--out", str(out)]) == 2  # neither --url nor --model


@pytest.mark.slow
def test_against_atomq_serve(tiny_model, tmp_path):
    """The whole path: ``atomq serve`` launched as a subprocess over a tiny model, the client's rows."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from atomq.bench.serving import serve_command

    port = free_port()
    cmd = serve_command(str(tiny_model("llama")), port, ["--device", "cpu", "--kv-cache-bytes", str(1 << 22),
                                                         "--max-model-len", "128", "--threads", "1"])
    url = f"http://127.0.0.1:{port}"
    w = fixed(4, 6, 5)
    with ServerProcess(cmd, url, 120, str(tmp_path / "server.log")):
        rows = run_serving(url, w, [None, 20.0], label="fp32", vocab_size=256)
    for r in rows:
        assert (r["status"], r["completed"]) == ("ok", 4), r["reason"]
        assert r["output_tokens"] == w.num_output_tokens and r["prompt_tokens"] == w.num_prompt_tokens
        assert r["ttft_s"]["p50"] <= r["e2e_s"]["p50"] and r["tpot_s"]["p50"] > 0
