"""Paged decode and prefill attention vs the ref twins that dequantize the pages.

Pages are filled by ref.kv_store_ref, so these tests check attention alone. Tolerance (fp16 output
against the fp32 reference over the same dequantized pages): |out - ref| <= 4e-3 + 1e-2 * |ref|;
the kernels round q, p and (fp16/fp8 modes) K/V to fp16 for the tensor-core dots, and the output
to fp16 (half an fp16 step at |ref| ~ 3 is 1e-3).
"""

import pytest
import torch

from atomq.kernels import ref

kvc = pytest.importorskip("atomq.kernels.kv_cache")
dec = pytest.importorskip("atomq.kernels.decode_attention")
pre = pytest.importorskip("atomq.kernels.prefill_attention")

ATOL, RTOL = 4e-3, 1e-2


def make_batch(lens, hkv, d, mode, device, layout="HND", seed=0, spare_blocks=5):
    """A cache holding len tokens per sequence on randomly scattered pages.

    Returns (cache, block_table int32 [B, max_blocks], seq_lens int32 [B], generator).
    """
    gen = torch.Generator().manual_seed(seed)
    bs = kvc.BLOCK_SIZE
    max_blocks = max(1, max(-(-n // bs) for n in lens))
    num_blocks = len(lens) * max_blocks + spare_blocks
    cache = kvc.allocate_kv_cache(num_blocks, hkv, d, mode, device, layout=layout,
                                  fp8_k_scale=0.02, fp8_v_scale=torch.linspace(0.01, 0.02, hkv))
    bt = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    total = sum(lens)
    k = (torch.randn(total, hkv, d, generator=gen) * 1.5 + 0.2).to(device, torch.float16)
    v = torch.randn(total, hkv, d, generator=gen).to(device, torch.float16)
    slots = torch.cat([bt[b, torch.arange(n) // bs] * bs + torch.arange(n) % bs for b, n in enumerate(lens)])
    ref.kv_store_ref(cache, k, v, slots.to(device, torch.int32))
    return cache, bt.to(device, torch.int32), torch.tensor(lens, dtype=torch.int32, device=device), gen


def assert_close(out, want):
    torch.testing.assert_close(out.float(), want.float(), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------- decode

DECODE_CASES = [  # (mode, hq, hkv, d, dot, deq, splits)
    ("int4", 4, 4, 64, 0, 1, 1),
    ("int4", 4, 4, 128, 0, 0, 3),
    ("int4", 8, 2, 64, 1, 1, 2),
    ("int4", 8, 2, 128, 1, 0, 1),
    ("int4", 6, 2, 64, 2, 1, 4),
    ("int4", 4, 4, 128, 3, 1, 2),
    ("int4", 8, 2, 64, 3, 0, 1),
    ("int4", 4, 4, 64, 4, 1, 1),  # dot 4: CUDA-core words kernel, one q head per kv head
    ("int4", 4, 4, 128, 4, 1, 3),
    ("fp16", 4, 4, 128, 0, 1, 2),
    ("fp16", 8, 2, 64, 1, 1, 1),
    ("fp8", 8, 2, 128, 2, 1, 3),
    ("fp8", 4, 4, 64, 0, 1, 1),
]


@pytest.mark.parametrize("mode,hq,hkv,d,dot,deq,splits", DECODE_CASES)
def test_decode_matches_ref(mode, hq, hkv, d, dot, deq, splits, device):
    lens = [1, 17, 47, 16]  # one token, page crossings, an exact page
    cache, bt, sl, gen = make_batch(lens, hkv, d, mode, device)
    q = torch.randn(len(lens), hq, d, generator=gen).to(device, torch.float16)
    plan = dec.plan_decode(len(lens), hq, hkv, d, max(lens), device, num_splits=splits, block_n=16,
                           dot=dot, deq=deq)
    out = dec.paged_decode_attention(q, cache, bt, sl, d**-0.5, plan=plan)
    assert_close(out, ref.paged_decode_attention_ref(q, cache, bt, sl, d**-0.5))


@pytest.mark.parametrize("mode,hq,hkv,d,dot", [("int4", 6, 2, 64, 2), ("int4", 4, 4, 128, 4), ("fp16", 8, 2, 64, 1)])
def test_split_merge_in_kernel_equals_merge_kernel(mode, hq, hkv, d, dot, device):
    """Split over the sequence (empty splits included: a one-token sequence and 8 splits), merged by the
    last split program of each (sequence, kv head) or by the separate merge kernel: the same output, the
    reference's, and the arrival counters are zero again afterwards (a second call reuses them)."""
    from atomq.kernels.counters import arrival_counters

    lens = [1, 130, 47, 64]
    cache, bt, sl, gen = make_batch(lens, hkv, d, mode, device)
    q = torch.randn(len(lens), hq, d, generator=gen).to(device, torch.float16)
    want = ref.paged_decode_attention_ref(q, cache, bt, sl, d**-0.5)
    outs = {}
    for fused in (True, False):
        plan = dec.plan_decode(len(lens), hq, hkv, d, max(lens), device, num_splits=8, block_n=16, dot=dot,
                               fused_merge=fused)
        for _ in range(2):
            outs[fused] = dec.paged_decode_attention(q, cache, bt, sl, d**-0.5, plan=plan)
            assert_close(outs[fused], want)
    torch.testing.assert_close(outs[True].float(), outs[False].float(), atol=2e-3, rtol=2e-3)
    assert int(arrival_counters(torch.device(device), 1).abs().sum()) == 0


@pytest.mark.parametrize("mode,hq,hkv,d,dot", [("int4", 6, 2, 64, 2), ("int4", 4, 4, 128, 4), ("fp16", 8, 2, 64, 1)])
def test_adaptive_splits_spread_short_sequences_over_a_long_plan(mode, hq, hkv, d, dot, device):
    """A plan sized for 512 tokens (8 splits of 64): with adaptive splits a 130-token sequence uses five
    splits of 32 tokens instead of three of 64 (the partial log-sum-exps show which splits had tokens);
    both match the reference."""
    lens = [1, 130, 47, 64]
    cache, bt, sl, gen = make_batch(lens, hkv, d, mode, device)
    q = torch.randn(len(lens), hq, d, generator=gen).to(device, torch.float16)
    want = ref.paged_decode_attention_ref(q, cache, bt, sl, d**-0.5)
    for adaptive, used in ((True, 5), (False, 3)):
        plan = dec.plan_decode(len(lens), hq, hkv, d, 512, device, num_splits=8, block_n=16, dot=dot,
                               adaptive=adaptive)
        assert_close(dec.paged_decode_attention(q, cache, bt, sl, d**-0.5, plan=plan), want)
        assert int(torch.isfinite(plan.partial_lse[1, 0]).sum()) == used


@pytest.mark.parametrize("prefetch,block_n,acc_rows", [(True, 16, 16), (False, 64, 16), (True, 32, 8), (True, 128, 64)])
def test_decode_words_kernel_nhd_sharp_softmax_folded_rows(prefetch, block_n, acc_rows, device):
    """dot 4 on NHD pages with a sharp softmax (the running max moves), with and without prefetch, and
    with token rows folded into fewer accumulator rows."""
    lens = [70, 3, 0]
    cache, bt, sl, gen = make_batch(lens, 2, 128, "int4", device, layout="NHD")
    q = torch.randn(3, 2, 128, generator=gen).to(device, torch.float16) * 6
    plan = dec.plan_decode(3, 2, 2, 128, 70, device, num_splits=1, block_n=block_n, dot=4, prefetch=prefetch,
                           acc_rows=acc_rows)
    out = dec.paged_decode_attention(q, cache, bt, sl, 128**-0.5, plan=plan)
    assert torch.all(out[2] == 0)
    assert_close(out, ref.paged_decode_attention_ref(q, cache, bt, sl, 128**-0.5))


def test_decode_words_kernel_large_and_tiny_queries(device):
    """q near the fp16 limit (its planes are scaled by up to 2**111 inside) and tiny q (products near
    the denormal range) stay finite and match the reference."""
    lens = [37, 21]
    cache, bt, sl, gen = make_batch(lens, 2, 64, "int4", device)
    q = torch.randn(2, 2, 64, generator=gen)
    q[0] *= 60000.0 / q[0].abs().max()
    q[1] *= 1e-4
    q = q.to(device, torch.float16)
    plan = dec.plan_decode(2, 2, 2, 64, 37, device, num_splits=2, block_n=16, dot=4)
    out = dec.paged_decode_attention(q, cache, bt, sl, 64**-0.5, plan=plan)
    assert torch.isfinite(out).all()
    assert_close(out, ref.paged_decode_attention_ref(q, cache, bt, sl, 64**-0.5))


def test_decode_nhd_layout_empty_sequence_and_default_plan(device):
    lens = [0, 33, 5]
    cache, bt, sl, gen = make_batch(lens, 2, 64, "int4", device, layout="NHD")
    q = torch.randn(3, 4, 64, generator=gen).to(device, torch.float16)
    out = torch.full_like(q, float("nan"))
    dec.paged_decode_attention(q, cache, bt, sl, 0.125, out=out)
    assert torch.all(out[0] == 0)
    assert_close(out, ref.paged_decode_attention_ref(q, cache, bt, sl, 0.125))


def test_decode_rejects_bad_inputs(device):
    cache, bt, sl, _ = make_batch([3], 2, 64, "int4", device)
    q = torch.zeros(1, 3, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="multiple"):
        dec.paged_decode_attention(q, cache, bt, sl, 1.0)
    q = torch.zeros(1, 4, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="one query head per kv head"):
        dec.paged_decode_attention(q, cache, bt, sl, 1.0, plan=dec.plan_decode(1, 4, 2, 64, 3, device, dot=4))
    with pytest.raises(ValueError, match="seq_lens"):
        dec.paged_decode_attention(q, cache, bt, sl.long(), 1.0)


# ---------------------------------------------------------------------------------------------- prefill


def run_prefill(mode, hq, hkv, d, cached, new, device, block_m=16, block_n=16, layout="HND"):
    total = [c + n for c, n in zip(cached, new)]
    cache, bt, _, gen = make_batch(total, hkv, d, mode, device, layout=layout)
    q = torch.randn(sum(new), hq, d, generator=gen).to(device, torch.float16)
    cu = torch.tensor([0] + new, dtype=torch.int32).cumsum(0).to(device, torch.int32)
    cl = torch.tensor(cached, dtype=torch.int32, device=device)
    plan = pre.plan_prefill(max(new), d, block_m=block_m, block_n=block_n)
    out = pre.paged_prefill_attention(q, cache, cu, cl, bt, d**-0.5, plan=plan)
    return out, ref.paged_prefill_attention_ref(q, cache, cu, cl, bt, d**-0.5), (q, cache, cu, cl, bt)


@pytest.mark.parametrize("mode,hq,hkv,d", [("int4", 4, 4, 64), ("int4", 8, 2, 128), ("fp16", 4, 2, 64),
                                          ("fp8", 4, 4, 128)])
def test_prefill_matches_ref(mode, hq, hkv, d, device):
    # fresh prefill, a short extend after a cached prefix, a chunk crossing tiles and pages
    out, want, _ = run_prefill(mode, hq, hkv, d, cached=[0, 5, 20], new=[7, 1, 33], device=device)
    assert_close(out, want)


def test_prefill_last_token_equals_decode(device):
    """The last new token of a prefill sees what a decode step over the same pages sees."""
    out, _, (q, cache, cu, cl, bt) = run_prefill("int4", 4, 2, 64, [3, 16], [18, 5], device, layout="NHD")
    last = cu[1:].long() - 1
    seq_lens = (cl + cu[1:] - cu[:-1]).to(torch.int32)
    dout = dec.paged_decode_attention(q[last].contiguous(), cache, bt, seq_lens, 64**-0.5)
    assert_close(dout, out[last])


# ------------------------------------------------------------------------------------------- full size


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "fp16", "fp8"])
@pytest.mark.parametrize("hq,hkv,d", [(32, 32, 128), (64, 8, 128), (16, 4, 64)])
def test_decode_full_size_gpu(mode, hq, hkv, d):
    lens = [1, 513, 4096, 32768 - 5, 2000, 16]
    cache, bt, sl, gen = make_batch(lens, hkv, d, mode, "cuda")
    q = torch.randn(len(lens), hq, d, generator=gen).to("cuda", torch.float16)
    out = dec.paged_decode_attention(q, cache, bt, sl, d**-0.5)
    assert_close(out, ref.paged_decode_attention_ref(q, cache, bt, sl, d**-0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("num_warps", [4, 8, 16])
def test_decode_words_kernel_warps_gpu(num_warps):
    """The words kernel (7B heads, batch-1 sized grids) with more warps per program: accumulator rows
    8 * num_warps fold the tile's token rows differently; the result is the reference's."""
    lens = [150, 1, 4096]
    cache, bt, sl, gen = make_batch(lens, 32, 128, "int4", "cuda")
    q = torch.randn(len(lens), 32, 128, generator=gen).to("cuda", torch.float16)
    plan = dec.plan_decode(len(lens), 32, 32, 128, 4096, "cuda", num_splits=1, num_warps=num_warps)
    assert plan.dot == 4 and plan.acc_rows == min(plan.block_n, 8 * num_warps)
    assert_close(dec.paged_decode_attention(q, cache, bt, sl, 128**-0.5, plan=plan),
                 ref.paged_decode_attention_ref(q, cache, bt, sl, 128**-0.5))


def test_words_kernel_warps_rule(monkeypatch):
    """More warps only where the words kernel's programs do not fill the GPU (batch 1: one per head)."""
    monkeypatch.setattr(dec, "WORDS_FEW_PROGRAM_WARPS", 8)
    assert dec.plan_decode(1, 32, 32, 128, 160, "cpu", num_sms=132).num_warps == 8
    assert dec.plan_decode(64, 32, 32, 128, 160, "cpu", num_sms=132).num_warps == 4
    assert dec.plan_decode(1, 32, 8, 128, 160, "cpu", num_sms=132).num_warps == 4  # GQA: the tensor-core kernel


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "fp16", "fp8"])
def test_prefill_full_size_gpu(mode):
    out, want, _ = run_prefill(mode, 32, 8, 128, [0, 1000, 4093], [2048, 333, 7], "cuda", block_m=64, block_n=32)
    assert_close(out, want)
