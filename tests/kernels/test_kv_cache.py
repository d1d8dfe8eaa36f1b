"""Paged KV cache store kernel vs ref.kv_store_ref.

INT4 and FP16 pages must equal the reference byte for byte (data, scales, zeros). FP8 pages are
exact on the GPU; Triton's CPU interpreter converts to e4m3 with its own rounding (which loses the
carry when rounding up to a power of two), so on CPU they are checked within one e4m3 step of the
reference, or at half of it where that carry was lost.
"""

import pytest
import torch

from atomq.kernels import ref

kvc = pytest.importorskip("atomq.kernels.kv_cache")


def _filled_pair(num_blocks, hkv, d, mode, device, layout, gen):
    """Two caches with the same random bytes everywhere (so untouched slots must stay equal)."""
    a = kvc.allocate_kv_cache(num_blocks, hkv, d, mode, device, layout=layout,
                              fp8_k_scale=0.05, fp8_v_scale=torch.linspace(0.02, 0.1, hkv))
    b = kvc.allocate_kv_cache(num_blocks, hkv, d, mode, device, layout=layout,
                              fp8_k_scale=0.05, fp8_v_scale=torch.linspace(0.02, 0.1, hkv))
    for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
        ta, tb = getattr(a, name), getattr(b, name)
        if ta is None or ta.dtype == torch.float32:
            continue
        raw = torch.randint(0, 256, ta.shape, generator=gen, dtype=torch.uint8).to(device)
        if ta.dtype == torch.float16:
            raw = torch.rand(ta.shape, generator=gen).to(device, torch.float16)
        ta.view(raw.dtype).copy_(raw)
        tb.view(raw.dtype).copy_(raw)
    return a, b


def _slots(t, num_blocks, gen, skip_every=5):
    """t distinct random slots (crossing page boundaries), every skip_every-th token -1."""
    slots = torch.randperm(num_blocks * kvc.BLOCK_SIZE, generator=gen)[:t].to(torch.int32)
    slots[::skip_every] = -1
    return slots


def _check_store(mode, layout, t, hkv, d, device, num_blocks=16, seed=0, center=False):
    gen = torch.Generator().manual_seed(seed)
    got, want = _filled_pair(num_blocks, hkv, d, mode, device, layout, gen)
    k = (torch.randn(t, hkv, d, generator=gen) * 2 + 0.3).to(device, torch.float16)
    v = torch.randn(t, hkv, d, generator=gen).to(device, torch.float16)
    k[0, 0] = 0  # an all-zero head exercises the minimum range
    slots = _slots(t, num_blocks, gen).to(device)
    k_center = (torch.randn(hkv, d, generator=gen) + 0.3).to(device) if center else None
    kvc.kv_store(got, k, v, slots, k_center)
    ref.kv_store_ref(want, k, v, slots, k_center)
    return got, want


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("t,hkv,d", [(1, 2, 64), (37, 3, 64), (29, 2, 128)])
@pytest.mark.parametrize("center", [False, True])
def test_store_int4_exact(layout, t, hkv, d, center, device):
    got, want = _check_store("int4", layout, t, hkv, d, device, center=center)
    for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_store_int4_roundtrip_is_fake_quant(device):
    """Pages written by the kernel dequantize to ref.fake_quant_kv of the input."""
    gen = torch.Generator().manual_seed(1)
    cache = kvc.allocate_kv_cache(4, 2, 64, "int4", device)
    k = torch.randn(40, 2, 64, generator=gen).to(device, torch.float16)
    slots = torch.arange(40, dtype=torch.int32, device=device)
    kvc.kv_store(cache, k, k, slots)
    bt = torch.arange(4, dtype=torch.int32, device=device)
    kd, vd = ref.paged_kv_gather(cache, bt, 40)
    assert torch.equal(kd.half(), ref.fake_quant_kv(k))
    assert torch.equal(vd.half(), ref.fake_quant_kv(k))


def test_fake_quant_kv_groups_are_heads_of_that_width():
    """Groups of N channels quantize like heads of width N; a group of head_dim is the default; the
    finer scale has the smaller error; a group that does not divide head_dim is refused."""
    x = torch.randn(2, 9, 3, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ref.fake_quant_kv(x, 4, 64), ref.fake_quant_kv(x))
    by_group = ref.fake_quant_kv(x, 4, 16)
    assert torch.equal(by_group, ref.fake_quant_kv(x.reshape(2, 9, 12, 16)).reshape(x.shape))
    assert (by_group - x).norm() < (ref.fake_quant_kv(x) - x).norm()
    with pytest.raises(ValueError, match="does not divide"):
        ref.fake_quant_kv(x, 4, 24)
    with pytest.raises(ValueError, match="does not divide"):
        ref.fake_quant_kv(x, 4, -64)



def test_fake_quant_kv_per_channel_is_the_transposed_token_quantizer():
    """Per-channel key scales over blocks of N tokens equal the per-token quantizer applied to the
    transposed block; a last partial block gets its own scales; an odd block is refused."""
    x = torch.randn(2, 20, 3, 8, generator=torch.Generator().manual_seed(3))
    got = ref.fake_quant_kv_per_channel(x, 4, 4)
    for j in range(0, 20, 4):
        block = x[:, j:j + 4].permute(0, 2, 3, 1)  # [B, H, D, 4]: channels play tokens
        want = ref.fake_quant_kv(block).permute(0, 3, 1, 2)
        assert torch.equal(got[:, j:j + 4], want)
    tail = ref.fake_quant_kv_per_channel(x[:, :18], 4, 4)  # blocks 0-3 as before, then 2 tokens alone
    assert torch.equal(tail[:, :16], got[:, :16])
    assert torch.equal(tail[:, 16:], ref.fake_quant_kv_per_channel(x[:, 16:18], 4, 2))
    with pytest.raises(ValueError, match="even"):
        ref.fake_quant_kv_per_channel(x, 4, 3)

@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("center", [False, True])
def test_store_fp16_exact(layout, center, device):
    got, want = _check_store("fp16", layout, 23, 3, 64, device, center=center)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)


def test_store_fp8(device):
    got, want = _check_store("fp8", "HND", 23, 2, 64, device)
    for a, b in ((got.k, want.k), (got.v, want.v)):
        if device == "cuda":
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        else:
            fa, fb = a.float(), b.float()
            close = (fa - fb).abs() <= fb.abs() * 2**-3 + 2**-9
            # the interpreter drops the carry when rounding up to a power of two (e.g. 31.9 -> 16)
            carry = (2 * fa == fb) & (torch.frexp(fb).mantissa.abs() == 0.5)
            assert torch.all(close | carry | (fa.isnan() & fb.isnan()))  # random fill holds NaN codes


def test_store_rejects_bad_inputs(device):
    cache = kvc.allocate_kv_cache(2, 2, 64, "int4", device)
    k = torch.zeros(3, 2, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        kvc.kv_store(cache, k, k, torch.zeros(3, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"\[T, 2, 64\]"):
        kvc.kv_store(cache, k[:, :1], k[:, :1], torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="mode"):
        kvc.allocate_kv_cache(2, 2, 64, "int3", device)
    slots = torch.zeros(3, dtype=torch.int32, device=device)
    for bad in (torch.zeros(2, 64, device=device, dtype=torch.float16), torch.zeros(3, 64, device=device)):
        with pytest.raises(ValueError, match="k_center"):
            kvc.kv_store(cache, k, k, slots, bad)


def test_bytes_per_token():
    assert kvc.kv_bytes_per_token(32, 128, "fp16") == 16384
    assert kvc.kv_bytes_per_token(32, 128, "int4") == 2 * 32 * 67


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int4", "fp16", "fp8"])
def test_store_full_size_gpu(mode):
    got, want = _check_store(mode, "HND", 4096, 32, 128, "cuda", num_blocks=512)
    for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
        a, b = getattr(got, name), getattr(want, name)
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
