"""Request-length generators: the paper's synthetic lengths, ShareGPT rows, fixed lengths."""

from __future__ import annotations

import numpy as np
import pytest

from atomq.bench import workloads as W


def test_synthetic_is_deterministic_and_seeded():
    a, b = W.synthetic(500), W.synthetic(500)
    assert np.array_equal(a.prompt_lens, b.prompt_lens) and np.array_equal(a.output_lens, b.output_lens)
    c = W.synthetic(500, seed=1)
    assert not np.array_equal(a.prompt_lens, c.prompt_lens)
    assert "0xabcdabcd987" in a.description


def test_synthetic_statistics_and_bounds():
    w = W.synthetic(20000, max_len=2048)
    p, o = w.prompt_lens, w.output_lens
    # median of -1 + 18 exp(0.8 Z) is 17; truncation to an integer puts the sample median at 16 or 17
    assert 16 <= np.median(p) <= 17
    assert p.min() == 1 and p.max() <= 2046
    # a prompt of 1 token: raw values in [1, 2) truncated, and those below 1 clipped up: P(Z < -2.24) = 1.25%
    assert 0.009 < np.mean(p == 1) < 0.016
    assert o.min() >= 2 and (p + o).max() <= 2048
    # totals are uniform on [0, 2048) unless raised to prompt + 2: their mean is close to 1024
    assert abs((p + o).mean() - 1024) < 20


def test_synthetic_clips_at_the_top():
    w = W.synthetic(2000, max_len=32)
    assert w.prompt_lens.max() == 30 and np.sum(w.prompt_lens == 30) > 10
    assert (w.prompt_lens + w.output_lens).max() <= 32 and w.output_lens.min() >= 2


def test_synthetic_equals_the_papers_scipy_generator():
    """The draws of punica's bench_textgen.generate_request_set (scipy on a PCG64 Generator), except the
    lower clip at 1 where the original truncates to 0."""
    stats = pytest.importorskip("scipy.stats")
    n, maxlen = 3000, 2048
    rng = np.random.Generator(np.random.PCG64(seed=0xABCDABCD987))
    raw = stats.lognorm(0.8, -1.0, 18.0).rvs(size=n, random_state=rng)
    prompt = np.minimum(raw, maxlen - 2).astype(np.int32)
    total = np.maximum(prompt + 2, stats.randint(0, maxlen).rvs(size=n, random_state=rng)).astype(np.int32)
    ours = W.synthetic(n, maxlen)
    keep = prompt >= 1
    assert keep.sum() > 0.99 * n
    assert np.array_equal(ours.prompt_lens[keep], prompt[keep])
    assert np.array_equal(ours.output_lens[keep], (total - prompt)[keep])


def _csv(tmp_path, rows):
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                    + "".join(f"{p},{d},{p + d},{p / d}\n" for p, d in rows))
    return path


def test_sharegpt_filter_and_sampling(tmp_path):
    rows = [(100, 50), (1024, 1024), (1025, 10), (900, 1200), (10, 5), (2000, 500)]
    path = _csv(tmp_path, rows)
    w = W.sharegpt(3, path)
    kept = {(100, 50), (1024, 1024), (10, 5)}  # prompt <= 1024 and total <= 2048
    assert set(zip(w.prompt_lens.tolist(), w.output_lens.tolist())) == kept  # without replacement
    assert "vLLM convention" in w.description
    with pytest.raises(ValueError, match="only 3 ShareGPT rows"):
        W.sharegpt(4, path)
    everything = W.sharegpt(6, path, max_prompt_len=None, max_total_len=None)
    assert sorted(everything.prompt_lens.tolist()) == sorted(p for p, _ in rows)
    a, b, c = (W.sharegpt(6, path, None, None, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.prompt_lens, b.prompt_lens) and not np.array_equal(a.prompt_lens, c.prompt_lens)


def test_sharegpt_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        W.sharegpt(1, tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        W.sharegpt(1, bad)


def test_sharegpt_staged_file():
    """The real file (NOTES.md: 30,731 rows, 11,129 under vLLM's limits)."""
    try:
        prefill, decode = W.load_sharegpt_lengths()
    except FileNotFoundError:
        pytest.skip("offline ShareGPT data not present")
    assert len(prefill) == 30731
    w = W.sharegpt(2000)
    assert w.prompt_lens.max() <= 1024 and (w.prompt_lens + w.output_lens).max() <= 2048
    assert "of the 11129 rows" in w.description


def test_fixed_and_prompts():
    w = W.fixed(5, 7, 3)
    assert w.num_prompt_tokens == 35 and w.num_output_tokens == 15 and w.max_total_len == 10
    prompts = w.prompts(vocab_size=50, seed=3)
    assert [len(p) for p in prompts] == [7] * 5
    assert all(0 <= t < 50 for p in prompts for t in p)
    assert prompts == w.prompts(vocab_size=50, seed=3) and prompts != w.prompts(vocab_size=50, seed=4)
    assert w.head(2).prompt_lens.tolist() == [7, 7]


def test_bad_workloads():
    with pytest.raises(ValueError, match="at least one token"):
        W.Workload("x", np.array([1, 2]), np.array([0, 1]), "")
    with pytest.raises(ValueError, match="one length"):
        W.Workload("x", np.array([1, 2]), np.array([1]), "")
    with pytest.raises(ValueError, match="positive integer"):
        W.synthetic(0)
    with pytest.raises(ValueError, match="unknown workload"):
        W.make_workload("nope", 3)
    assert W.make_workload("fixed", 2, input_len=4, output_len=2).summary()["prompt_tokens"] == 8
