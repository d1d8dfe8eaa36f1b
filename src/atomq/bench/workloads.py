"""Request-length workloads for the throughput and serving benchmarks (numpy only, deterministic by seed).

A workload is a list of (prompt length, output length) pairs in tokens; prompts are random token ids,
so no tokenizer runs during a benchmark. Three kinds:

- ``synthetic``: the Atom paper's generator (its e2e code, punica's ``bench_textgen.py``): prompt length
  ~ lognormal(s=0.8, loc=-1, scale=18) in scipy's parametrization, i.e. ``loc + scale * exp(s * N(0, 1))``,
  truncated to an integer and clipped to [1, max_len - 2]; total length ~ uniform integer in [0, max_len),
  raised to at least prompt + 2; output = total - prompt. The draws (all normals, then all totals, from
  one ``PCG64(0xabcdabcd987)`` generator) equal scipy's ``lognorm(0.8, -1, 18).rvs`` and
  ``randint(0, max_len).rvs`` on that generator; the only change is the lower clip at 1 (the original
  truncates values below 1 to a 0-token prompt).
- ``sharegpt``: rows of ``sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv`` (Llama-2 token
  counts, see its NOTES.md). By default only rows of vLLM's benchmark convention are kept (prompt <= 1024
  and prompt + output <= 2048 tokens, 11,129 of 30,731 rows); a random subset (seeded) is drawn without
  replacement. Pass ``max_prompt_len=None, max_total_len=None`` to keep every row (prompts up to ~8k
  tokens, which counts multi-turn history as the prompt).
- ``fixed``: every request has the same input and output length.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAPER_SEED = 0xABCDABCD987
SHAREGPT_FILE = "sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
WORKLOADS = ("synthetic", "sharegpt", "fixed")


@dataclass(frozen=True)
class Workload:
    """name: 'synthetic' | 'sharegpt' | 'fixed'; prompt_lens / output_lens: tokens per request (int64
    arrays of equal length, every entry >= 1); description: how the lengths were made (for the report)."""

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    description: str

    def __post_init__(self) -> None:
        p, o = np.asarray(self.prompt_lens, dtype=np.int64), np.asarray(self.output_lens, dtype=np.int64)
        if p.ndim != 1 or p.shape != o.shape:
            raise ValueError(f"prompt_lens and output_lens must be 1-D of one length, got {p.shape} and {o.shape}")
        if len(p) == 0:
            raise ValueError("a workload needs at least one request")
        if p.min() < 1 or o.min() < 1:
            raise ValueError("every prompt and every output must have at least one token")
        object.__setattr__(self, "prompt_lens", p)
        object.__setattr__(self, "output_lens", o)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_lens.sum())

    @property
    def num_output_tokens(self) -> int:
        return int(self.output_lens.sum())

    @property
    def max_total_len(self) -> int:
        """The longest request, prompt plus output, in tokens."""
        return int((self.prompt_lens + self.output_lens).max())

    def prompts(self, vocab_size: int, seed: int = 0) -> list[list[int]]:
        """Random prompt token ids in [0, vocab_size), one list per request (deterministic by seed)."""
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab_size, size=self.num_prompt_tokens)
        return [chunk.tolist() for chunk in np.split(ids, np.cumsum(self.prompt_lens)[:-1])]

    def head(self, n: int) -> "Workload":
        """The first n requests (e.g. for a warm-up)."""
        return Workload(self.name, self.prompt_lens[:n], self.output_lens[:n], self.description)

    def summary(self) -> dict:
        """JSON-ready: the description, the request count and token totals, prompt / output length stats."""
        def stats(x: np.ndarray) -> dict:
            return {"mean": round(float(x.mean()), 1), "p50": float(np.median(x)), "max": int(x.max())}

        return {"name": self.name, "description": self.description, "num_requests": len(self),
                "prompt_tokens": self.num_prompt_tokens, "output_tokens": self.num_output_tokens,
                "prompt_len": stats(self.prompt_lens), "output_len": stats(self.output_lens)}


def synthetic(num_requests: int, max_len: int = 2048, seed: int = PAPER_SEED) -> Workload:
    """The Atom paper's synthetic lengths (see the module docstring); every request totals <= max_len."""
    _check_count(num_requests)
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (a prompt of 1 and an output of 2 tokens), got {max_len}")
    rng = np.random.Generator(np.random.PCG64(seed))
    s, loc, scale = 0.8, -1.0, 18.0
    raw = loc + scale * np.exp(s * rng.standard_normal(num_requests))
    prompt = np.clip(raw.astype(np.int64), 1, max_len - 2)
    total = np.maximum(prompt + 2, rng.integers(0, max_len, size=num_requests))
    desc = (f"Atom paper: prompt ~ lognormal(s=0.8, loc=-1, scale=18) clipped to [1, {max_len - 2}], total ~ "
            f"uniform[0, {max_len}) and >= prompt + 2, output = total - prompt; PCG64 seed {seed:#x}")
    return Workload("synthetic", prompt, total - prompt, desc)


def load_sharegpt_lengths(path: str | Path | None = None, data_dir: str | Path | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(prefill tokens, decode tokens) of every row of the ShareGPT length CSV. path: the CSV itself;
    else ``data_dir`` (default: the offline data directory, see atomq.data) / SHAREGPT_FILE."""
    if path is None:
        from ..data import default_data_dir

        path = Path(data_dir) if data_dir else default_data_dir()
        path = path / SHAREGPT_FILE
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT length file not found: {path}")
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        missing = {"num_prefill_tokens", "num_decode_tokens"} - set(rows.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}")
        pairs = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in rows]
    if not pairs:
        raise ValueError(f"{path} has no rows")
    arr = np.array(pairs, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def sharegpt(num_requests: int, path: str | Path | None = None, max_prompt_len: int | None = 1024,
             max_total_len: int | None = 2048, seed: int = 0, data_dir: str | Path | None = None) -> Workload:
    """num_requests rows of the ShareGPT length file, drawn without replacement (seeded) from the rows with
    prompt <= max_prompt_len and prompt + output <= max_total_len (None: no limit) and both >= 1 token."""
    _check_count(num_requests)
    prefill, decode = load_sharegpt_lengths(path, data_dir)
    keep = (prefill >= 1) & (decode >= 1)
    if max_prompt_len is not None:
        keep &= prefill <= max_prompt_len
    if max_total_len is not None:
        keep &= prefill + decode <= max_total_len
    rows = np.flatnonzero(keep)
    if num_requests > len(rows):
        raise ValueError(f"only {len(rows)} ShareGPT rows pass the filter (prompt <= {max_prompt_len}, total <= "
                         f"{max_total_len}); asked for {num_requests} requests")
    pick = np.random.default_rng(seed).permutation(rows)[:num_requests]
    limits = (f"prompt <= {max_prompt_len} and prompt + output <= {max_total_len} tokens (vLLM convention)"
              if (max_prompt_len, max_total_len) == (1024, 2048) else
              f"prompt <= {max_prompt_len} and prompt + output <= {max_total_len} tokens")
    desc = (f"ShareGPT lengths (Llama-2 tokenizer, {SHAREGPT_FILE}): {num_requests} of the {len(rows)} rows with "
            f"{limits}, drawn without replacement, seed {seed}")
    return Workload("sharegpt", prefill[pick], decode[pick], desc)


def fixed(num_requests: int, input_len: int, output_len: int) -> Workload:
    """num_requests identical requests of input_len prompt and output_len output tokens."""
    _check_count(num_requests)
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input and output lengths must be >= 1, got {input_len} and {output_len}")
    p = np.full(num_requests, input_len, dtype=np.int64)
    return Workload("fixed", p, np.full(num_requests, output_len, dtype=np.int64),
                    f"fixed: {input_len} prompt and {output_len} output tokens per request")


def make_workload(name: str, num_requests: int, *, max_len: int = 2048, seed: int | None = None,
                  input_len: int = 512, output_len: int = 128, sharegpt_path: str | None = None,
                  sharegpt_max_prompt: int | None = 1024, sharegpt_max_total: int | None = 2048) -> Workload:
    """One of WORKLOADS by name (the command line's entry point); seed None = each kind's default."""
    if name == "synthetic":
        return synthetic(num_requests, max_len, PAPER_SEED if seed is None else seed)
    if name == "sharegpt":
        return sharegpt(num_requests, sharegpt_path, sharegpt_max_prompt, sharegpt_max_total, seed or 0)
    if name == "fixed":
        return fixed(num_requests, input_len, output_len)
    raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")


def _check_count(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of requests must be a positive integer, got {n!r}")
