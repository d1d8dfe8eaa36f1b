"""Offline throughput runs on tiny-llama with the CPU engine: the rows' fields, their consistency, the
memory-budget verdicts, the time limit, the command line and the import surface of the GPU script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from atomq.bench.memory import FULL, Budget
from atomq.bench.throughput import CONFIGS, RunSettings, footprint, run_comparison, run_config
from atomq.bench.workloads import fixed, synthetic

MEASURED = ("elapsed_s", "num_steps", "completed_requests", "prompt_tokens", "output_tokens", "output_tok_s",
            "total_tok_s", "requests_per_s", "ttft_s", "tpot_s", "e2e_s", "max_running", "mean_running",
            "preemptions", "kv_capacity_tokens", "kv_cache_bytes", "peak_memory_bytes", "peak_memory_kind",
            "within_budget", "build_s", "warmup_s")
IDENTITY = ("model", "config", "label", "budget", "cap_bytes", "reserve_bytes", "workload", "num_requests",
            "max_num_seqs", "max_num_batched_tokens", "max_model_len", "device", "dtype", "status", "reason",
            "weight_bytes", "weights_measured", "kv_budget_bytes", "kv_budget_tokens", "kv_bytes_per_token")
CPU = RunSettings(device="cpu")


def _check_measured_row(row, workload, max_num_seqs):
    assert row["status"] == "ok", row["reason"]
    assert set(IDENTITY + MEASURED) <= set(row)
    assert row["completed_requests"] == len(workload)
    assert row["output_tokens"] == workload.num_output_tokens  # ignore_eos: exactly the requested lengths
    assert row["prompt_tokens"] == workload.num_prompt_tokens
    assert 1 <= row["max_running"] <= max_num_seqs and 0 < row["mean_running"] <= row["max_running"]
    assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["elapsed_s"])
    assert row["total_tok_s"] == pytest.approx((row["prompt_tokens"] + row["output_tokens"]) / row["elapsed_s"])
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        s = row[key]
        assert 0 <= s["p50"] <= s["p99"] <= s["max"]
    assert row["ttft_s"]["max"] <= row["e2e_s"]["max"]
    assert row["kv_capacity_tokens"] == max_num_seqs * row["max_model_len"] <= row["kv_budget_tokens"]
    assert row["weights_measured"] and row["peak_memory_bytes"] > 0
    json.dumps(row)  # JSON-ready


def test_every_config_end_to_end():
    w = synthetic(10, max_len=48)
    rows = run_comparison(["tiny-llama"], list(CONFIGS), [FULL], w, [4], CPU)
    assert [r["config"] for r in rows] == list(CONFIGS)
    for r in rows:
        _check_measured_row(r, w, 4)
        assert r["max_model_len"] == 48 and r["max_running"] == 4  # 10 requests at t=0 fill the batch
    weights = {r["config"]: r["weight_bytes"] for r in rows}
    assert weights["fp8"] < weights["fp16"] and weights["w4a16"] < weights["fp16"]
    kv_per_token = {r["config"]: r["kv_bytes_per_token"] for r in rows}
    assert kv_per_token["atom"] < kv_per_token["fp8"] < kv_per_token["fp16"]  # int4 < fp8 < fp16 pages


def test_budget_verdicts_with_a_fake_cap():
    """A cap that holds the Atom model with room for KV but not the FP16 weights: FP16 gets a
    'does not fit' row without being built, Atom gets the KV the arithmetic promises."""
    w = fixed(4, 8, 4)
    fp16, atom = (footprint("tiny-llama", CONFIGS[c], torch.float32) for c in ("fp16", "atom"))
    reserve = 10_000
    cap = fp16.weight_bytes  # FP16: nothing left once the reserve is taken
    budget = Budget("fake", cap, reserve)
    [row] = run_config("tiny-llama", CONFIGS["fp16"], [budget], w, [2], CPU)
    assert row["status"] == "does not fit" and not row["weights_measured"] and row["max_num_seqs"] is None
    assert "reserve leave" in row["reason"] and row["kv_budget_tokens"] == 0
    assert row["kv_budget_bytes"] == cap - fp16.weight_bytes - reserve

    rows = run_config("tiny-llama", CONFIGS["atom"], [budget, FULL], w, [2], CPU)
    assert [(r["budget"], r["status"]) for r in rows] == [("fake", "ok"), ("full", "ok")]
    kv = cap - atom.weight_bytes - reserve
    block = 16 * atom.kv_bytes_per_token
    assert rows[0]["kv_budget_bytes"] == kv and rows[0]["kv_budget_tokens"] == kv // block * 16
    _check_measured_row(rows[0], w, 2)


def test_time_limit_aborts_and_says_so():
    w = fixed(6, 4, 40)
    [row] = run_config("tiny-llama", CONFIGS["fp16"], [FULL], w, [2],
                       RunSettings(device="cpu", time_limit_s=0.0, warmup=False))
    assert row["status"] == "time limit" and "requests aborted" in row["reason"]
    assert row["completed_requests"] < 6 and 0 < row["output_tokens"] < w.num_output_tokens
    assert row["warmup_s"] == 0.0


def test_a_failed_run_becomes_an_error_row():
    w = fixed(2, 30, 30)  # 60 tokens, more than max_model_len 32
    [row] = run_config("tiny-llama", CONFIGS["fp16"], [FULL], w, [2], RunSettings(device="cpu", max_model_len=32))
    assert row["status"] == "error" and "max_model_len 32" in row["reason"]


def test_bad_names():
    with pytest.raises(ValueError, match="unknown configuration"):
        run_comparison(["tiny-llama"], ["fp4"], [FULL], fixed(1, 1, 1), [1], CPU)
    with pytest.raises(ValueError, match="unknown model shape"):
        run_comparison(["llama-9"], ["fp16"], [FULL], fixed(1, 1, 1), [1], CPU)


def test_command_line(tmp_path, capsys):
    from atomq.cli import main

    out = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--models", "tiny-llama", "--configs", "w4a16", "--budgets", "full,0.004GB",
               "--reserve-gb", "0", "--max-num-seqs", "2,4", "--workload", "fixed", "--num-requests", "4",
               "--input-len", "5", "--output-len", "3", "--device", "cpu", "--no-warmup", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "throughput" and data["workload"]["num_requests"] == 4
    assert [(r["budget"], r["max_num_seqs"], r["status"]) for r in data["rows"]] == [
        ("full", 2, "ok"), ("full", 4, "ok"), ("0.004GB", 2, "ok"), ("0.004GB", 4, "ok")]
    printed = capsys.readouterr().out
    assert "| tiny-llama | w4a16 | full | 2 | ok |" in printed and str(out) in printed
    assert main(["bench", "throughput", "--budgets", "lots", "--out", str(out)]) == 2


def test_gpu_script_imports_without_optional_packages():
    """The GPU machine has torch, triton and numpy only: the harness must import and plan without
    transformers, pandas, scipy or matplotlib."""
    code = ("import sys\n"
            "for m in ('transformers', 'pandas', 'scipy', 'matplotlib'): sys.modules[m] = None\n"
            "import runpy, torch\n"
            "from atomq.bench import report, results, throughput, workloads\n"
            "fp = throughput.footprint('llama-2-70b', throughput.CONFIGS['atom'], torch.float16)\n"
            "assert 30e9 < fp.weight_bytes < 45e9, fp\n"
            "print(report.throughput_table([]))\n"
            "sys.argv = ['gpu_throughput.py', '--help']\n"
            "runpy.run_path('bench/gpu_throughput.py', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| model | config |" in res.stdout and "--models" in res.stdout


def test_total_time_limit_skips_without_building():
    [row] = run_comparison(["tiny-llama"], ["atom"], [FULL], fixed(2, 2, 2), [2],
                           RunSettings(device="cpu", total_time_limit_s=0.0))
    assert row["status"] == "skipped" and "total time limit" in row["reason"] and not row["weights_measured"]


def test_warm_up_prefills_each_length_alone_then_passes_every_decode_bucket():
    """One request per prefill length first (each alone: one prefill step of that many tokens, clipped to
    the model length), then max_num_seqs requests; nothing is left running."""
    from atomq import LLM
    from atomq.engine.warmup import warm_up
    from atomq.model.random_weights import random_model

    eng = LLM(random_model("tiny-llama", "float", torch.float32, "cpu"), max_num_seqs=4, max_model_len=64).engine
    seen, add = [], eng.add_request

    def spy(prompt, params, *args, **kwargs):
        seen.append((len(prompt), params.max_tokens, eng.num_running + eng.num_waiting))
        return add(prompt, params, *args, **kwargs)

    eng.add_request = spy
    assert warm_up(eng, 256, seed=0, prompt_len=8, prefill_lens=(100, 1, 9)) > 0
    assert seen[:3] == [(1, 1, 0), (9, 1, 0), (63, 1, 0)]  # sorted, clipped, each into an idle engine
    assert len(seen) == 3 + 4 and all(n == 8 for n, _, _ in seen[3:])
    assert not eng.has_unfinished()
