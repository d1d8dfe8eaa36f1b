"""bench/gpu_serving.py on a CPU: one ``atomq serve --model random:tiny-llama:CONFIG`` subprocess, the
serving client's rows, the JSON and the table; the time budget; a rate cut at its time limit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from atomq.bench.serving import TIME_LIMIT_ERROR, run_serving
from atomq.bench.workloads import Workload, fixed

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def _gpu_serving():
    path = Path(__file__).parents[2] / "bench" / "gpu_serving.py"
    spec = importlib.util.spec_from_file_location("gpu_serving", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_serving"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_one_configuration_end_to_end(tmp_path):
    gs = _gpu_serving()
    opts = gs.Options(shape="tiny-llama", device="cpu", max_num_seqs=4, serve_args=("--threads", "1"),
                      total_time_limit_s=None)
    w = Workload("test", np.array([5, 12, 3, 7]), np.array([6, 3, 9, 4]), "test lengths")
    lines: list[str] = []
    [row] = gs.run_comparison(["atom"], [None], w, tmp_path, opts, lines.append)
    assert (row["status"], row["completed"], row["failed"]) == ("ok", 4, 0), row["reason"]
    assert (row["model"], row["config"]) == ("random:tiny-llama:atom", "atom")
    assert row["output_tokens"] == w.num_output_tokens and row["prompt_tokens"] == w.num_prompt_tokens
    assert row["output_tok_s"] > 0 and row["server_start_s"] > 0
    assert 0 < row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] <= row["e2e_s"]["max"]
    assert 0 < row["tpot_s"]["p50"] < row["e2e_s"]["p50"]
    data = json.loads((tmp_path / "serving-atom.json").read_text())
    assert data["kind"] == "serving" and data["rows"] == [json.loads(json.dumps(row))]
    assert data["settings"]["model"] == "random:tiny-llama:atom" and data["settings"]["max_model_len"] == 16
    assert any("warm-up took" in line for line in lines) and any("server up in" in line for line in lines)
    table = gs.table([row])
    assert "TTFT p50 ms" in table and " atom " in table and "4/4" in table


def test_nothing_starts_past_the_time_limit(tmp_path):
    gs = _gpu_serving()
    opts = gs.Options(shape="tiny-llama", device="cpu", total_time_limit_s=1.0)
    rows = gs.run_comparison(["fp16", "atom"], [2.0, None], fixed(3, 4, 2), tmp_path, opts, lambda _: None)
    assert [(r["config"], r["request_rate"], r["status"]) for r in rows] == [
        ("fp16", 2.0, "skipped"), ("fp16", None, "skipped"), ("atom", 2.0, "skipped"), ("atom", None, "skipped")]
    assert "time limit" in rows[0]["reason"]
    assert gs.rate_would_overrun(2.0, 100, 49.0) and not gs.rate_would_overrun(2.0, 100, 51.0)
    assert not gs.rate_would_overrun(None, 100, 1.0) and gs.rate_would_overrun(None, 100, 0.0)
    with pytest.raises(ValueError, match="unknown configuration"):
        gs.run_comparison(["fp4"], [None], fixed(1, 2, 2), tmp_path, opts)


def test_a_rate_is_cut_at_its_time_limit(fake_server):
    url, app = fake_server
    app.token_delay = 0.05  # 40 tokens: 2 s per request
    [row] = run_serving(url, fixed(3, 4, 40), [None], time_limit_s=0.5)
    assert (row["status"], row["completed"], row["failed"]) == ("time limit", 0, 3)
    assert row["reason"] == TIME_LIMIT_ERROR and row["duration_s"] < 1.5
