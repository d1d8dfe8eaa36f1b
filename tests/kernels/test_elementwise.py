"""Fused add + RMSNorm, in-place RoPE and SiLU * up against their ref.py twins (CPU: interpreter)."""

import pytest
import torch

from atomq.kernels import ref
from atomq.model.args import rope_cos_sin

pytest.importorskip("triton")
from atomq.kernels import elementwise as E  # noqa: E402

CASES = [(1, 576), (7, 320), (33, 1000)]  # ragged K: masked tails
GPU_CASES = [(1, 4096), (64, 8192), (4096, 4096)]


def _close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    err = ((a.float() - b.float()).abs() / (b.float().abs() + 1e-2)).max().item()
    assert err < tol, err


def _rmsnorm_case(m, k, device, dtype):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype).to(device)
    res = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device)
    for r in (None, res):
        y, new_res = E.rmsnorm(x, w, 1e-5, r)
        y_ref, res_ref = ref.rmsnorm(x, w, 1e-5, r)
        assert torch.equal(new_res, res_ref)  # the add is one rounding in both
        _close(y, y_ref, 1e-2)


def _rope_case(t, hq, hkv, d, device, dtype):
    g = torch.Generator().manual_seed(t + hq)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    cos, sin = rope_cos_sin(10000.0 ** -(torch.arange(0, d, 2) / d), 1.0, torch.arange(3, 3 + t))
    qk = lambda buf: buf[:, : (hq + hkv) * d].view(t, hq + hkv, d)  # noqa: E731
    want = qkv.clone()
    ref.rope_(qk(want), cos.to(device), sin.to(device))
    got = qkv.clone()
    E.rope_(qk(got), cos.to(device), sin.to(device))
    _close(got, want, 1e-2)
    assert torch.equal(got[:, (hq + hkv) * d:], qkv[:, (hq + hkv) * d:])  # v untouched


def _silu_case(m, i, device, dtype):
    gu = (torch.randn(m, 2 * i, generator=torch.Generator().manual_seed(i)) * 3).to(dtype).to(device)
    _close(E.silu_mul(gu), ref.silu_mul(gu), 1e-2)


@pytest.mark.parametrize("m, k", CASES)
def test_rmsnorm(device, m, k):
    _rmsnorm_case(m, k, device, torch.float16)


@pytest.mark.parametrize("t, hq, hkv, d", [(1, 4, 2, 64), (5, 3, 3, 128), (9, 9, 3, 64)])
def test_rope_in_place_on_merged_qkv(device, t, hq, hkv, d):
    _rope_case(t, hq, hkv, d, device, torch.float16)


@pytest.mark.parametrize("m, i", [(1, 1536), (6, 100)])
def test_silu_mul(device, m, i):
    _silu_case(m, i, device, torch.float16)


def test_bad_inputs(device):
    x = torch.zeros(4, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="norm weight"):
        E.rmsnorm(x, torch.ones(32, dtype=torch.float16, device=device), 1e-5)
    with pytest.raises(ValueError, match="cos / sin"):
        E.rope_(x.view(4, 1, 64), torch.zeros(4, 32), torch.zeros(4, 32))
    with pytest.raises(ValueError, match="gate_up"):
        E.silu_mul(torch.zeros(4, 63, dtype=torch.float16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("m, k", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_size_gpu(m, k, dtype):
    _rmsnorm_case(m, k, "cuda", dtype)
    _silu_case(m, k, "cuda", dtype)
    _rope_case(m, 32, 8, 128, "cuda", dtype)
