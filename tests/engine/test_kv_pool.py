"""KV pool sizing (scales and zeros counted), fp8 pages through the engine, and a light ``import atomq``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from atomq import LLM, SamplingParams
from atomq.engine.kv_pool import KVPool, bytes_per_token, num_blocks_for, paged_ops, resolve_kv_dtype


@pytest.mark.parametrize("mode, per_head", [("int4", 2 * (64 + 3)), ("fp16", 2 * 256), ("fp8", 2 * 128)])
def test_bytes_per_token_counts_what_is_allocated(mode, per_head):
    assert bytes_per_token(4, 128, mode, torch.float32) == 4 * per_head  # D=128: 67 bytes per head for int4
    pool = KVPool(n_layers=3, num_kv_heads=2, head_dim=32, num_blocks=5, mode=mode, device="cpu")
    per_block = pool.bytes_per_token * pool.block_size
    fp8_scales = 3 * 2 * 2 * 4 if mode == "fp8" else 0  # per-head fp32 scales: not per token
    assert pool.nbytes() - fp8_scales == 5 * per_block
    assert num_blocks_for(7 * per_block + 1, pool.bytes_per_token) == 7


def test_kv_dtype_resolution():
    assert resolve_kv_dtype("auto", 4) == "int4"
    assert resolve_kv_dtype("auto", None) == "model"
    assert resolve_kv_dtype("fp8", 4) == "fp8"
    with pytest.raises(ValueError, match="kv_bits=8 has no paged cache"):
        resolve_kv_dtype("auto", 8)
    with pytest.raises(ValueError, match="unknown kv cache dtype 'bf8'"):
        resolve_kv_dtype("bf8", None)


def test_attention_kernels_need_head_dim_32():
    pytest.importorskip("triton")
    """The kernels' tensor-core dots run over half a head: smaller heads get the reference ops under 'auto'
    and a clear error when the kernels are forced."""
    with pytest.raises(ValueError, match="power of two >= 32"):
        paged_ops(torch.device("cpu"), "triton", head_dim=16)
    assert paged_ops(torch.device("cuda"), "auto", head_dim=16).backend == "ref"
    assert paged_ops(torch.device("cuda"), "auto", head_dim=80).backend == "ref"  # not a power of two
    assert paged_ops(torch.device("cuda"), "auto", head_dim=32).backend == "triton"  # (only imports here)
    assert paged_ops(torch.device("cpu"), "auto", head_dim=128).backend == "ref"


def test_fp8_pages_track_the_full_forward(load, prompts, greedy_reference):
    """e4m3 keeps 3 mantissa bits (each K/V element moves by up to 6%): same first greedy token, logits
    within 15% norm-wise of the float forward on this random model (measured 6.5%)."""
    lm = load("qwen2")
    llm = LLM(lm, kv_cache_dtype="fp8", kv_cache_bytes=1 << 22, record_logits=True)
    out = llm.generate(prompts[1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    ref_tokens, ref_logits = greedy_reference(lm.model, out.prompt_token_ids, 1)
    got = out.logits[0]
    assert out.token_ids[0] == ref_tokens[0]
    rel = (got - ref_logits[0]).norm() / ref_logits[0].norm()
    assert 0 < rel < 0.15


def test_import_atomq_stays_light():
    code = ("import sys, atomq; assert 'torch' not in sys.modules, 'torch imported'; "
            "atomq.SamplingParams(max_tokens=3); assert 'torch' not in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": ":".join(p for p in sys.path if p)}, timeout=60)
    assert res.stdout.strip() == "ok", res.stderr
