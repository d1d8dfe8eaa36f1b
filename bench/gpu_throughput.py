"""GPU throughput comparison of issue 6, in one process (run with PYTHONPATH=src; needs torch + triton only).

FP16, FP8 W8A8 + FP8 KV, W4A16 + FP16 KV and Atom W4A4 + INT4 KV on random weights of real shapes, with
the whole GPU and with the Atom paper's 24 GB budget, offline (every request at t=0). This is
``atomq bench throughput`` with GPU defaults; any of its flags may be given and win over the defaults
(see ``--help``). Rows are written to the JSON after every run, so a cut-off call keeps what it measured;
the markdown table is printed last. Budget the time with --total-time-limit (seconds for the whole call).

    PYTHONPATH=src python bench/gpu_throughput.py --models llama-2-7b --total-time-limit 450
"""

from __future__ import annotations

import argparse
import sys

DEFAULTS = ["--configs", "fp16,fp8,w4a16,atom", "--budgets", "full,24GB", "--max-num-seqs", "256",
            "--workload", "synthetic", "--num-requests", "256", "--time-limit", "60", "--device", "cuda"]


def main(argv: list[str]) -> int:
    from atomq.cli import main as cli_main

    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(f"defaults: {' '.join(DEFAULTS)} --models llama-2-7b\n"
              "--out runs/bench-throughput/<models>_<configs>_<budgets>_seqs<max-num-seqs>_<workload>.json\n")
        return cli_main(["bench", "throughput", "--help"])
    import torch

    if not torch.cuda.is_available():
        print("gpu_throughput.py needs a CUDA GPU (the harness's CPU tests run with pytest tests/bench)",
              file=sys.stderr)
        return 2
    pre = argparse.ArgumentParser(add_help=False)
    for flag, value in zip(DEFAULTS[::2], DEFAULTS[1::2]):
        pre.add_argument(flag, default=value)
    pre.add_argument("--models", default="llama-2-7b")
    ns, _ = pre.parse_known_args(argv)
    name = "_".join([ns.models, ns.configs, ns.budgets, f"seqs{ns.max_num_seqs}", ns.workload]).replace(",", "+")
    return cli_main(["bench", "throughput", *DEFAULTS, "--models", ns.models,
                     "--out", f"runs/bench-throughput/{name}.json", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
