"""Warm-up before serving or measuring: compile every kernel variant and capture the decode CUDA graphs."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# a token count in each tile range of the GEMMs' pick_config, and its multiple of 16 (Triton specializes
# integer arguments on divisibility by 16: another compiled kernel)
WARMUP_PREFILL_LENS = (1, 9, 16, 24, 32, 48, 64, 100, 112, 300, 304, 1000, 1024)


def warm_up(engine: Any, vocab_size: int, seed: int, prompt_len: int = 16,
            prefill_lens: tuple[int, ...] = WARMUP_PREFILL_LENS) -> float:
    """Compile the kernels and capture the decode CUDA graphs before a measurement. First one request per
    length in prefill_lens, alone (a prefill step of that many tokens: the kernels specialize on the
    token count's range, and a server's first requests would otherwise pay for compiling them); then
    max_num_seqs requests of prompt_len random tokens whose output lengths make the decode batch pass
    through every graph bucket (request i gets 1 + the number of buckets larger than i tokens; lengths
    shrink to fit a short max_model_len). Returns the seconds it took."""
    from .model_runner import graph_buckets
    from .sequence import SamplingParams

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for n_tok in sorted({min(n, engine.max_model_len - 1) for n in prefill_lens}):
        engine.add_request(rng.integers(0, vocab_size, size=n_tok).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
    n = engine.scheduler.config.max_num_seqs
    buckets = graph_buckets(n)
    prompt_len = max(1, min(prompt_len, engine.max_model_len // 2))
    for i in range(n):
        out = min(1 + sum(b > i for b in buckets), engine.max_model_len - prompt_len)
        engine.add_request(rng.integers(0, vocab_size, size=prompt_len).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0
