"""RoPE + KV store + INT4 decode attention in one kernel (kernels/decode_fused.py).

The cache it leaves must be bit-identical to the separate Triton RoPE and store kernels'; its output must
match the reference twin (RoPE, store, attention over the dequantized pages) within the attention tests'
tolerance (test_attention.py).
"""

import pytest
import torch

from atomq.kernels import ref
from atomq.model.args import rope_cos_sin

from test_attention import assert_close, make_batch

fused = pytest.importorskip("atomq.kernels.decode_fused")
dec = pytest.importorskip("atomq.kernels.decode_attention")
kvc = pytest.importorskip("atomq.kernels.kv_cache")
ew = pytest.importorskip("atomq.kernels.elementwise")


def clone_cache(cache):
    return type(cache)(cache.mode, cache.k.clone(), cache.v.clone(), cache.k_scale.clone(), cache.v_scale.clone(),
                       cache.k_zero.clone(), cache.v_zero.clone(), block_size=cache.block_size, layout=cache.layout)


def step_inputs(lens, h, d, device, gen, dtype=torch.float16, pad=(), layout="HND"):
    """A cache holding lens[b] - 1 older tokens per sequence (the newest slot is written by the step),
    the pre-RoPE q / k / v of the new tokens as views of one merged q/k/v row, cos / sin and the slots."""
    cache, bt, sl, _ = make_batch(lens, h, d, "int4", device, layout=layout, seed=int(gen.initial_seed()))
    bsz = len(lens)
    qkv = (torch.randn(bsz, 3 * h * d, generator=gen) * 2).to(device, dtype)
    q, k, v = (t.view(bsz, h, d) for t in qkv.split(h * d, dim=1))
    pos = torch.tensor([max(n - 1, 0) for n in lens], device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    cos, sin = rope_cos_sin(inv_freq, 1.0, pos)
    bs = cache.block_size
    slots = torch.tensor([int(bt[b, (n - 1) // bs]) * bs + (n - 1) % bs if n > 0 and b not in pad else -1
                          for b, n in enumerate(lens)], dtype=torch.int32, device=device)
    return cache, bt, sl, q, k, v, cos, sin, slots



@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("h, d, splits, block_n, dtype", [
    (4, 128, 1, 16, torch.float16),
    (2, 64, 3, 16, torch.float16),
    (4, 128, 2, 32, torch.bfloat16),
])
def test_fused_step_equals_rope_store_attention(h, d, splits, block_n, dtype, layout, device):
    gen = torch.Generator().manual_seed(3)
    lens = [1, 17, 47, 16, 0, 33]  # only the new token, page crossings, an exact page, an empty row
    cache, bt, sl, q, k, v, cos, sin, slots = step_inputs(lens, h, d, device, gen, dtype, pad=(5,), layout=layout)
    qkv_before = (q.clone(), k.clone(), v.clone())
    plan = dec.plan_decode(len(lens), h, h, d, max(lens), device, num_splits=splits, block_n=block_n, dot=4)

    got_cache = clone_cache(cache)
    out = fused.rope_store_decode_attention(q, k, v, cos, sin, got_cache, slots, bt, sl, d**-0.5, plan=plan)
    for a, b in zip((q, k, v), qkv_before):  # the inputs are read, not rotated in place
        assert torch.equal(a, b)

    # the separate kernels: RoPE in place, then the store
    sep_cache = clone_cache(cache)
    qr, kr = ew.rope_(q.clone(), cos, sin), ew.rope_(k.clone(), cos, sin)
    kvc.kv_store(sep_cache, kr, v, slots)
    for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
        a, b = getattr(got_cache, name), getattr(sep_cache, name)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name  # bytes: unwritten slots may hold NaN

    want_cache = clone_cache(cache)
    want = ref.rope_store_decode_attention_ref(q, k, v, cos, sin, want_cache, slots, bt, sl, d**-0.5)
    assert torch.all(out[4] == 0)
    # row 5 is padding: its newest slot is not written, the output is unused
    if dtype == torch.bfloat16 and kvc.interpreting():  # the interpreter rounds fp32 -> bf16 toward zero, the
        torch.testing.assert_close(out[:5].float(), want[:5].float(), atol=0.1, rtol=0.05)  # ref to nearest
    else:
        assert_close(out[:5], want[:5])
    # and equal to the words kernel over the stored pages
    assert_close(out[:5], dec.paged_decode_attention(qr, sep_cache, bt, sl, d**-0.5, plan=plan)[:5])


def test_fused_step_sharp_softmax_newest_token_dominates(device):
    """The newest token carries the largest score (the running max starts there) or the smallest."""
    gen = torch.Generator().manual_seed(5)
    lens = [40, 40]
    cache, bt, sl, q, k, v, cos, sin, slots = step_inputs(lens, 2, 64, device, gen)
    k[0] = q[0] * 4  # aligned with q: its score dominates after the same rotation
    k[1] = -q[1] * 4
    plan = dec.plan_decode(2, 2, 2, 64, 40, device, num_splits=2, block_n=16, dot=4)
    got = fused.rope_store_decode_attention(q, k, v, cos, sin, clone_cache(cache), slots, bt, sl, 0.3, plan=plan)
    want = ref.rope_store_decode_attention_ref(q, k, v, cos, sin, clone_cache(cache), slots, bt, sl, 0.3)
    assert_close(got, want)


def test_fused_step_rejects_what_it_cannot_serve(device):
    gen = torch.Generator().manual_seed(0)
    cache, bt, sl, q, k, v, cos, sin, slots = step_inputs([5], 2, 64, device, gen)
    gqa = torch.randn(1, 4, 64, device=device, dtype=torch.float16)
    assert fused.unsupported_reason(cache, 4) is not None
    with pytest.raises(ValueError, match="GQA"):
        fused.rope_store_decode_attention(gqa, k, v, cos, sin, cache, slots, bt, sl, 0.125)
    fp16 = kvc.allocate_kv_cache(4, 2, 64, "fp16", device)
    assert "int4" in fused.unsupported_reason(fp16, 2)
    with pytest.raises(ValueError, match="cos"):
        fused.rope_store_decode_attention(q, k, v, cos[:, :32], sin, cache, slots, bt, sl, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        fused.rope_store_decode_attention(q, k.float(), v, cos, sin, cache, slots, bt, sl, 0.125)
