"""The recipe table of BENCHMARKS.md ("Recipes at the full protocol on an H100"): calibrate each recipe
below (128 C4 windows) and measure WikiText-2 perplexity over the whole test split, FP16 included, in one
process, so every ratio compares numbers from the same device and software; each recipe is evaluated
under several run-time variants (KV precision, weights only, activation clip) from one calibration. A
table and JSON lines go to --out-dir as each row finishes. For presets alone, ``python -m
atomq.eval.compare --device cuda`` does the same with a process per command.

    PYTHONPATH=src python bench/recipe_check.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --device cuda --data-dir ../shared/data --out-dir runs/recipes
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

# name -> (quantize flags, None for the unquantized model; [(row suffix, eval flags), ...])
RECIPES: dict[str, tuple[str | None, list[tuple[str, str]]]] = {
    "fp16": (None, [("", "")]),
    "atom": ("--preset atom", [("", ""), (" + rotated keys (atomq)", "--kv-rotate"), (", KV16", "--kv-bits none")]),
    "atomq": ("--preset atomq", [("", "")]),
    "atomq-g32": ("--preset atomq --group-size 32", [("", "")]),
    "atomq-tuned": ("--preset atomq --smooth-alpha 0.5 --calib-quantized-inputs --w-clip-search", [("", "")]),
    "atomq-plus": ("--preset atomq-plus", [("", ""), (", KV16", "--kv-bits none"),
                                           (", weights only", "--weights-only --kv-bits none"),
                                           (", a-clip 0.95", "--a-clip 0.95"), (", a-clip 1.0", "--a-clip 1.0")]),
    "rot-atom-g32": ("--preset rot-atom --group-size 32", [("", "")]),
    "atomq-plus-v": ("--preset atomq-plus --v-rotate", [("", ""), (", KV16", "--kv-bits none")]),
    "atomq-plus-o256": ("--preset atomq-plus --n-outliers 256", [("", ""), (", KV16", "--kv-bits none")]),
    "atomq-plus-d": ("--preset atomq-plus --down-rotate", [("", "")]),
    # W4A8: 8-bit activations on the same int8-operand kernels (no activation clip at 8 bits)
    "atomq-plus-a8": ("--preset atomq-plus --a-bits 8 --a-clip 1.0", [("", ""), (", KV16", "--kv-bits none")]),
    "atomq-a8-g128": ("--preset atomq --a-bits 8 --a-clip 1.0 --smooth-alpha 0.5 --calib-quantized-inputs "
                      "--w-clip-search", [("", "")]),
    # group scales as integer multiples of one per row / token: the GEMM folds them into its int8 operands
    "atomq-plus-l15": ("--preset atomq-plus --w-scale-levels 15 --a-scale-levels 15",
                       [("", ""), (", KV16", "--kv-bits none"), (", weights only", "--weights-only --kv-bits none")]),
    "atomq-l15": ("--preset atomq --w-scale-levels 15 --a-scale-levels 15", [("", "")]),
    "atomq-a8-l15": ("--preset atomq-a8 --w-scale-levels 15", [("", "")]),
}


def main() -> int:
    from atomq.cli import main as atomq

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF directory or .gguf file")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all of RECIPES)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="evaluate only the first N windows (0: all)")
    ns = ap.parse_args()
    out = Path(ns.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = ["--data-dir", ns.data_dir] if ns.data_dir else []
    limit = ["--limit", str(ns.limit)] if ns.limit else []
    rows = []
    for name in [n for n in ns.only.split(",") if n] or list(RECIPES):
        qflags, evals = RECIPES[name]
        model, calib_s = ns.model, None
        if qflags is not None:
            model = str(out / name)
            t0 = time.time()
            rc = atomq(["quantize", "--model", ns.model, "--out", model, "--overwrite", "--device", ns.device,
                        "--n-samples", str(ns.n_samples), *data, *shlex.split(qflags)])
            calib_s = round(time.time() - t0, 1)
            if rc:
                print(f"{name}: quantize failed ({rc})", flush=True)
                continue
        for suffix, eflags in evals:
            t0 = time.time()
            result = out / "ppl.jsonl"
            before = result.read_text().count("\n") if result.exists() else 0
            rc = atomq(["eval", "ppl", "--model", model, "--device", ns.device, "--json", str(result), *data, *limit,
                        *shlex.split(eflags)])
            lines = result.read_text().splitlines() if result.exists() else []
            if rc or len(lines) == before:
                print(f"{name}{suffix}: eval failed ({rc})", flush=True)
                continue
            ppl = json.loads(lines[-1])
            rows.append({"recipe": name + suffix, "quantize": qflags, "eval": eflags, "ppl": ppl["ppl"],
                         "windows": ppl["windows"], "tokens": ppl["tokens"], "calib_s": calib_s,
                         "eval_s": round(time.time() - t0, 1)})
            calib_s = None
            print(json.dumps(rows[-1]), flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    fp16 = next((r["ppl"] for r in rows if r["recipe"] == "fp16"), None)
    print("\n| recipe | ppl | vs FP16 | calib s | eval s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['ppl'] / fp16:.3f}x" if fp16 else "-"
        print(f"| {r['recipe']} | {r['ppl']:.3f} | {ratio} | {r['calib_s'] or '-'} | {r['eval_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
