"""Host overhead of one decode step of LLMEngine.step(), split into its parts (run with PYTHONPATH=src).

N greedy requests (ignore_eos, long max_tokens) fill the engine; after their prefill, many decode steps
are timed. Each part of a step is timed by a wrapper around it:

  schedule      Scheduler.schedule()
  build batch   ModelRunner.prepare(): the step metadata on the device (and, with CUDA graphs, in the
                graph's static input buffers)
  forward       ModelRunner.execute(): eager forward or graph replay; on CUDA followed by a
                torch.cuda.synchronize(), so it holds the GPU time and the parts after it are host only
  sample        engine/sampler.sample()
  post-process  the rest of step(): token appends, prefix-cache registration, stop checks, stats

host = total - forward. A second run of the same number of steps without the wrappers gives
"total (no probes)", the step time as the engine really runs it. Medians over the timed steps.

CPU (tiny model, reference ops):  PYTHONPATH=src python bench/engine_host_profile.py
H100 (Llama-2-7B shapes, Atom W4A4, CUDA graphs):
  PYTHONPATH=src python bench/engine_host_profile.py --device cuda --model llama-2-7b --method atom
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_engine_check import CONFIGS  # noqa: E402  (name -> random format, linear method, kv cache dtype)

from atomq import LLM, SamplingParams  # noqa: E402
from atomq.engine import llm as llm_module  # noqa: E402
from atomq.model.random_weights import random_model  # noqa: E402

PARTS = ("schedule", "build batch", "forward", "sample", "post-process")


class StepProbe:
    """Wrappers that add each call's wall time (seconds) to ``times[part]`` for the current step."""

    def __init__(self, engine: Any, sync: bool):
        self.engine, self.sync = engine, sync
        self.times: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, owner: Any, name: str, part: str, sync: bool = False) -> None:
        inner = getattr(owner, name)
        times = self.times

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            if sync:
                torch.cuda.synchronize()
            times[part] = times.get(part, 0.0) + time.perf_counter() - t
            return out

        had = name in vars(owner)
        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, inner) if had else delattr(owner, name))

    def __enter__(self) -> "StepProbe":
        eng = self.engine
        self._wrap(eng.scheduler, "schedule", "schedule")
        self._wrap(eng.runner, "prepare", "build batch")
        self._wrap(eng.runner, "execute", "forward", sync=self.sync)
        self._wrap(llm_module, "sample", "sample")  # step() looks ``sample`` up in the llm module
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self._undo):
            undo()

    def step(self) -> dict[str, float]:
        """One engine step; its parts in ms (post-process = the rest of step())."""
        self.times.clear()
        t = time.perf_counter()
        self.engine.step()
        total = time.perf_counter() - t
        ms = {p: self.times.get(p, 0.0) * 1e3 for p in PARTS[:-1]}
        ms["post-process"] = total * 1e3 - sum(ms.values())
        ms["total"] = total * 1e3
        return ms


def build_engine(ns: argparse.Namespace, bsz: int, max_len: int, budget: int) -> Any:
    """An LLMEngine over a random model of ``ns.model`` in the format of ``ns.method`` (CONFIGS)."""
    fmt, method, kv = CONFIGS[ns.method]
    cuda = ns.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32  # CPU half matmuls would dominate the forward
    lm = random_model(ns.model, fmt, dtype, ns.device, seed=0)
    # synchronous steps: the parts are timed one after the other (asynchronous scheduling overlaps the
    # host parts with the forward of the step after; bench/gpu_engine_check.py --variants async=0|1 times that)
    kw = dict(linear_method=method, kv_cache_dtype=kv, max_num_seqs=bsz, max_model_len=max_len,
              max_num_batched_tokens=max(budget, max_len), enforce_eager=ns.eager, async_scheduling=False)
    if cuda:
        kw["gpu_memory_utilization"] = 0.85
    else:
        kw["attention_backend"] = kw["linear_backend"] = "ref"
    return LLM(lm, **kw).engine


def fill(eng: Any, bsz: int, prompt_len: int, max_tokens: int, vocab: int) -> None:
    """Queue ``bsz`` greedy requests (prompt lengths prompt_len .. prompt_len + 15, so sequences cross page
    boundaries on different steps) and run their prefill."""
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(bsz):
        eng.add_request(torch.randint(0, vocab, (prompt_len + i % 16,), generator=gen).tolist(), params)
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()


def stub_forward(eng: Any) -> None:
    """Replace the model by fixed random logits (after the prefill): what is left of a step is host
    work, measured with warm caches, as on a GPU host whose forward runs on the device. On the CPU the
    real forward evicts the host code's data, so its host parts read slower than they would there.
    One intra-op thread: waking an idle OpenMP worker for a parallel argmax costs milliseconds on
    small VMs, which is no host cost of the engine (on a GPU the argmax runs on the device)."""
    torch.set_num_threads(1)
    vocab = eng.lm.model.args.vocab_size
    table = torch.randn(eng.config.max_num_seqs, vocab, generator=torch.Generator().manual_seed(1)).to(eng.device)
    eng.runner.execute = lambda batch, bucket: table[:batch.logits_indices.shape[0]]


def profile_batch(ns: argparse.Namespace, bsz: int) -> dict:
    """Warm-up, ``ns.steps`` probed decode steps, ``ns.steps`` plain ones; medians in ms."""
    budget = 2048  # max_num_batched_tokens: early requests decode while later ones still prefill
    prefill_steps = -(-bsz * (ns.prompt_len + 16) // budget) + 2
    max_tokens = prefill_steps + ns.warmup + 2 * ns.steps + 2  # nobody finishes inside the timed steps
    max_len = ns.prompt_len + 16 + max_tokens
    eng = build_engine(ns, bsz, max_len, budget)
    fill(eng, bsz, ns.prompt_len, max_tokens, eng.lm.model.args.vocab_size)
    cuda = ns.device == "cuda"
    for _ in range(ns.warmup):  # CUDA-graph capture, allocator, caches
        eng.step()
    assert len(eng.scheduler.running) == bsz, "every request must be decoding"
    if ns.stub_forward:
        stub_forward(eng)
    with StepProbe(eng, sync=cuda) as probe:
        rows = [probe.step() for _ in range(ns.steps)]
    plain = []
    prof = cProfile.Profile() if ns.cprofile else None
    for _ in range(ns.steps):
        t = time.perf_counter()
        if prof is not None:
            prof.runcall(eng.step)
        else:
            eng.step()
        plain.append((time.perf_counter() - t) * 1e3)
    assert len(eng.scheduler.running) == bsz, "a request finished inside the timed steps"
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(r"engine[/\\]|sampler|builtins|list", 24)
        print(out.getvalue()[-4000:], flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in (*PARTS, "total")}
    host = med["total"] - med["forward"]
    return {"batch": bsz, "steps": ns.steps, **med, "host": host, "host_share": host / med["total"],
            "total_no_probes": statistics.median(plain), "graphs": eng.runner.graphs is not None}


def env() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_properties(0).name
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default="tiny-llama", help="a random_weights.SHAPES name, e.g. llama-2-7b")
    ap.add_argument("--method", default="fp16", choices=sorted(CONFIGS), help="gpu_engine_check.CONFIGS name")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps (each, probed and plain)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--stub-forward", action="store_true",
                    help="fixed logits instead of the model after the prefill: host parts only, caches warm")
    ap.add_argument("--cprofile", action="store_true", help="print a cProfile of the plain steps (engine functions)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ns = ap.parse_args()
    if ns.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU")
    info = env()
    print(json.dumps(info), flush=True)
    rows = [profile_batch(ns, int(b)) for b in ns.batches.split(",")]
    stub = ", forward stubbed (fixed logits)" if ns.stub_forward else ""
    print(f"\n{ns.model} / {ns.method} on {ns.device}{stub}; medians over {ns.steps} decode steps, ms per step")
    print("| batch | total | forward | host | host share | schedule | build batch | sample | post-process "
          "| total (no probes) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['total']:.3f} | {r['forward']:.3f} | {r['host']:.3f} | {r['host_share']:.1%} "
              f"| {r['schedule']:.3f} | {r['build batch']:.3f} | {r['sample']:.3f} | {r['post-process']:.3f} "
              f"| {r['total_no_probes']:.3f} |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"env": info, "args": vars(ns), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
