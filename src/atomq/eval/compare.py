"""Run several recipes end to end (quantize, then perplexity) and tabulate them.

Each step runs in its own process so that calibration time and peak memory are per recipe. Results are
appended as JSON lines; the markdown table is printed at the end (and can be rebuilt from the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

from ..config import PRESETS, QuantConfig, check_device


def _run(cmd: list[str]) -> float:
    """Run an atomq command in a child process; -> wall seconds."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "atomq.cli", *cmd], check=True)
    return time.time() - t0


def compare(model: str, presets: list[str], out_dir: str, limit: int | None, extra: list[str],
            device: str = "cpu") -> list[dict]:
    os.makedirs(out_dir, exist_ok=True)
    results_file = os.path.join(out_dir, "results.jsonl")
    rows = []
    done: dict[QuantConfig, str] = {}  # quantized configs (KV bits aside) -> checkpoint
    for name in presets:
        row = {"preset": name, "model": model}
        target, kv_override = model, []
        qcfg = PRESETS[name]
        same = done.get(dataclasses.replace(qcfg, kv_bits=None))
        if name != "fp16" and same:  # calibration does not depend on the KV precision: reuse
            target = same
            kv_override = ["--kv-bits", "none" if qcfg.kv_bits is None else str(qcfg.kv_bits)]
        elif name != "fp16":
            target = os.path.join(out_dir, name)
            cmd = ["quantize", "--model", model, "--out", target, "--preset", name, "--overwrite", "--device", device,
                   *extra]
            row["quantize_cmd"] = "atomq " + " ".join(cmd)
            row["calib_seconds"] = _run(cmd)
            with open(os.path.join(target, "atomq_config.json")) as f:
                row["calib_peak_rss_mb"] = json.load(f)["calibration"]["peak_rss_mb"]
            done[dataclasses.replace(qcfg, kv_bits=None)] = target
        ppl_json = os.path.join(out_dir, f"{name}.ppl.json")
        if os.path.exists(ppl_json):
            os.remove(ppl_json)
        cmd = ["eval", "ppl", "--model", target, "--json", ppl_json, "--device", device, *kv_override]
        cmd += ["--limit", str(limit)] if limit else []
        row["eval_cmd"] = "atomq " + " ".join(cmd)
        row["eval_seconds"] = _run(cmd)
        with open(ppl_json) as f:
            row.update({k: v for k, v in json.loads(f.readline()).items() if k in ("ppl", "windows", "tokens")})
        rows.append(row)
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    base = next((r["ppl"] for r in rows if r["preset"] == "fp16"), None)
    lines = ["| recipe | WikiText-2 ppl | vs FP16 | windows | calib time (s) | calib peak RSS (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / base:.3f}x" if base else "-"
        calib = f"{r['calib_seconds']:.0f}" if "calib_seconds" in r else "-"
        rss = f"{r['calib_peak_rss_mb']:.0f}" if "calib_peak_rss_mb" in r else "-"
        lines.append(f"| {r['preset']} | {r['ppl']:.3f} | {ratio} | {r['windows']} | {calib} | {rss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--presets", default="fp16,atom,atom-gptq,rtn-w4a4,atom-clip,atom-groups,atom-outliers,w8a8,w4a16")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where calibration and evaluation run (cpu or cuda[:N])")
    p.add_argument("--table", nargs="+", metavar="RESULTS_JSONL",
                   help="only print the table of earlier runs' results.jsonl files, in the order given")
    ns, extra = p.parse_known_args(argv)
    if ns.table:
        rows = [json.loads(line) for path in ns.table for line in open(path) if line.strip()]
        print(table(rows))
        return 0
    check_device(ns.device)  # a clear error before any subprocess
    compare(ns.model, ns.presets.split(","), ns.out, ns.limit, extra, ns.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
