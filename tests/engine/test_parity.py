"""The engine's greedy tokens and logits equal the full-sequence forward (the model's own numerics)."""

from __future__ import annotations

import pytest
import torch

from atomq import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def check(prompts, greedy_reference):
    return lambda lm, llm, tol, atol=None: _check(lm, llm, tol, atol or tol, prompts, greedy_reference)


def _check(lm, llm, tol, atol, prompts, greedy_reference, n=6):
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    for out in outs:
        ref_tokens, ref_logits = greedy_reference(lm.model, out.prompt_token_ids, n)
        got = torch.stack(out.logits)
        assert out.token_ids == ref_tokens
        assert out.finish_reason == "length" and len(out.token_ids) == n
        torch.testing.assert_close(got, ref_logits, rtol=tol, atol=atol)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_float_kv_equals_full_forward(load, check, arch):
    """A cache in the model's dtype (fp32 here): the same math as the full forward up to float order."""
    lm = load(arch)
    llm = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, record_logits=True)
    check(lm, llm, 1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_fp16_kv_close_to_full_forward(load, check, arch):
    """fp16 pages round K/V to 11 significant bits: same greedy tokens, logits within 1e-2 + 3e-2 abs."""
    lm = load(arch)
    llm = LLM(lm, kv_cache_dtype="fp16", kv_cache_bytes=1 << 22, record_logits=True)
    check(lm, llm, 1e-2, 3e-2)


@pytest.mark.parametrize("arch, rotate", [("llama", False), ("qwen2", False), ("mixtral", False), ("llama", True)])
def test_int4_kv_equals_fake_quant_forward(load, check, prompts, greedy_reference, arch, rotate):
    """INT4 pages quantize exactly like ref.kv_quantize: equal to the full forward built with kv_bits=4."""
    lm = load(arch, kv_bits=4, kv_rotate=rotate)
    assert lm.qcfg.kv_bits == 4
    llm = LLM(lm, kv_cache_bytes=1 << 22, record_logits=True)  # "auto" follows the model: int4
    assert llm.engine.kv_pool.mode == "int4"
    check(lm, llm, 1e-4)
    # and it is really quantized: the float-KV model gives other logits
    float_lm = load(arch)
    out = llm.generate(prompts[1], GREEDY)[0]
    _, float_logits = greedy_reference(float_lm.model, out.prompt_token_ids, 6)
    assert (torch.stack(out.logits) - float_logits).abs().max() > 1e-3


@pytest.mark.parametrize("recipe, extra", [("atom", {}), ("rot-outliers", {}), ("atom", {"kv_center": True})])
def test_atom_checkpoint_with_int4_kv(tiny_model, calib_file, tmp_path, check, recipe, extra):
    """W4A4 fake-quant linears (an Atom checkpoint; a rotated one, with the online down_proj rotation;
    one with centered keys) + INT4 KV through the paged forward."""
    from atomq.calib.pipeline import quantize_model
    from atomq.config import CalibConfig, preset
    from atomq.model.loader import load_model

    out = tmp_path / "ckpt"
    quantize_model(str(tiny_model("llama")), str(out), preset(recipe, group_size=32, gptq=False, **extra),
                   CalibConfig(dataset=str(calib_file), n_samples=2, seq_len=32, dtype="float32"), progress=False)
    lm = load_model(str(out))
    assert lm.qcfg.a_bits == 4 and lm.qcfg.kv_bits == 4
    llm = LLM(lm, kv_cache_bytes=1 << 22, record_logits=True)
    check(lm, llm, 2e-3)


def test_chunked_prefill_and_prefix_cache_do_not_change_tokens(load, prompts):
    """A long shared prefix computed in chunks of 7 tokens, then reused from the prefix cache."""
    lm = load("llama")
    base = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, enable_prefix_caching=False)
    chunked = LLM(lm, kv_cache_dtype="model", kv_cache_bytes=1 << 22, max_num_batched_tokens=7)
    prompt = prompts[1] + " " + prompts[1]
    want = base.generate([prompt], GREEDY)[0].token_ids
    first = chunked.generate([prompt], GREEDY)[0]
    again = chunked.generate([prompt + " the"], GREEDY)[0]  # same prefix, one more word
    assert first.token_ids == want and first.num_cached_tokens == 0
    assert again.num_cached_tokens >= 16 * ((len(first.prompt_token_ids) - 1) // 16)
    assert again.token_ids == base.generate([prompt + " the"], GREEDY)[0].token_ids
    assert chunked.engine.stats["max_batch_tokens"] <= 7
