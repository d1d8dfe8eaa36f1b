"""Result files -> markdown tables and plots."""

from __future__ import annotations

import json

import pytest

from atomq.bench import report
from atomq.bench.results import ResultFile, load


def _lat(p50, p99):
    return {"mean": p50, "p50": p50, "p90": p99, "p99": p99, "max": p99}


def _row(config, budget, seqs, tok_s, status="ok", reason=""):
    row = {"model": "m", "config": config, "budget": budget, "max_num_seqs": seqs, "status": status,
           "reason": reason, "weight_bytes": 3.9e9, "kv_budget_tokens": 150000}
    if status == "ok":
        row.update(output_tok_s=tok_s, total_tok_s=tok_s * 1.5, ttft_s=_lat(0.5, 2.0), tpot_s=_lat(0.02, 0.05),
                   max_running=seqs, mean_running=seqs * 0.8, kv_capacity_tokens=seqs * 2048,
                   peak_memory_bytes=20e9)
    return row


ROWS = [_row("atom", "24GB", 16, 1000.0), _row("atom", "24GB", 64, 3000.0),
        _row("fp16", "24GB", None, None, "does not fit", "13.48 GB of weights + ... leave too little"),
        _row("fp16", "full", 16, 800.0), _row("fp16", "full", 64, 2000.0)]


def test_throughput_table():
    text = report.throughput_table(ROWS)
    lines = text.splitlines()
    assert lines[0].startswith("| model | config | budget |") and set(lines[1]) == {"|", "-"}
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert ("| m | atom | 24GB | 64 | ok | 3,000 | 4,500 | 0.500 / 2.000 | 20.0 / 50.0 | 64 | 150,000 / 131,072 |"
            in text)
    assert "| m | fp16 | 24GB | - | does not fit | - | - | - | - | - | 150,000 / - | 3.90 | - |" in text
    assert "- m fp16 24GB: does not fit: 13.48 GB of weights" in text  # the reason under the table


def test_render_and_describe(tmp_path):
    f = ResultFile(tmp_path / "r.json", "throughput", {"device": "H100", "torch": "2.11"}, {},
                   {"num_requests": 4, "description": "fixed: 5 prompt and 3 output tokens per request"})
    for r in ROWS:
        f.add(r)
    data = load(tmp_path / "r.json")
    assert len(data["rows"]) == len(ROWS)
    text = report.render(data)
    assert text.startswith("Measured on H100 (torch 2.11).") and "Workload: 4 requests, fixed: 5 prompt" in text
    assert report.describe_row(ROWS[1]) == ("[ok] m atom budget 24GB max seqs 64: 3,000 output tok/s, "
                                            "TPOT p50 / p99 20.0 / 50.0 ms, max batch 64")
    assert report.describe_row(ROWS[2]).startswith("[does not fit] m fp16 budget 24GB: 13.48 GB")


def test_load_refuses_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not an atomq benchmark result"):
        load(bad)
    with pytest.raises(ValueError, match="unknown result kind"):
        ResultFile(tmp_path / "y.json", "latency", {}, {})


def test_serving_table():
    rows = [{"model": "m", "config": "atom", "request_rate": None, "status": "ok", "completed": 8, "num_requests": 8,
             "duration_s": 3.0, "output_tok_s": 100.0, "ttft_s": _lat(0.1, 0.2), "tpot_s": _lat(0.01, 0.02),
             "e2e_s": _lat(1.0, 2.0)},
            {"model": "m", "config": "atom", "request_rate": 2.0, "status": "errors", "reason": "HTTP 429: busy",
             "completed": 7, "num_requests": 8, "duration_s": 4.0, "output_tok_s": 90.0, "ttft_s": None,
             "tpot_s": None, "e2e_s": None}]
    text = report.serving_table(rows)
    assert "| m | atom | inf | ok | 8 / 8 | 3.0 | 100 | 0.100 / 0.200 | 10.0 / 20.0 | 1.00 / 2.00 |" in text
    assert "| m | atom | 2 | errors | 7 / 8 |" in text and "- atom at 2 req/s: errors: HTTP 429: busy" in text


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    data = {"kind": "throughput", "rows": ROWS}
    made = report.write_plots(data, tmp_path, "r")
    assert [p.name for p in made] == ["r-throughput-vs-batch.png", "r-latency-vs-throughput.png"]
    assert all(p.stat().st_size > 10_000 for p in made)
    serving = {"kind": "serving", "rows": [{"model": "m", "config": "atom", "status": "ok", "request_rate": r,
                                            "ttft_s": _lat(0.1 * (r or 8), 0.3 * (r or 8)),
                                            "tpot_s": _lat(0.01, 0.02)}
                                           for r in (1.0, 2.0, 4.0, None)]}  # None: all at once
    [p] = report.write_plots(serving, tmp_path, "s")
    assert p.name == "s-latency-vs-rate.png" and p.stat().st_size > 10_000
    assert report.write_plots({"kind": "throughput", "rows": ROWS[2:3]}, tmp_path, "none") == []


def test_report_command(tmp_path, capsys):
    from atomq.cli import main

    f = ResultFile(tmp_path / "r.json", "throughput", {"device": "H100"}, {}, None)
    for r in ROWS:
        f.add(r)
    out = tmp_path / "t.md"
    assert main(["bench", "report", str(tmp_path / "r.json"), "--out", str(out)]) == 0
    assert "### r" in out.read_text() and "| m | fp16 | full | 64 | ok |" in capsys.readouterr().out
