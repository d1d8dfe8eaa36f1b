"""Online rotation (randomized Hadamard) and its ref.py twin (CPU: interpreter; full sizes with -m gpu)."""

import pytest
import torch

from atomq.kernels import get_op, ref

pytest.importorskip("triton")
from atomq.kernels import hadamard as Hd  # noqa: E402

SPLITS = {1: (1, 1), 12: (3, 4), 576: (9, 64), 1536: (3, 512), 4096: (1, 4096), 11008: (43, 256),
          14336: (7, 2048), 28672: (7, 4096)}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # fp32 rounding / a few output ulps
GPU_NS = [576, 1536, 4096, 11008, 13824, 14336, 28672]


def _factors(n, seed=0, device="cpu"):
    signs, small = ref.random_rotation_factors(n, seed)
    return signs.to(device), small.to(device)


def _input(m, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * m + n)
    return torch.randn(m, n, generator=g).to(dtype).to(device)


def _close(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def _close_fused(got, want, dtype):
    """SiLU * up is rounded to the dtype before the rotation, and the kernel's exp is not torch's (and the
    CPU interpreter's bf16 casts truncate): an input element one ulp apart moves every output of its block by
    up to that ulp, so compare relative L2 error."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() <= TOL[dtype]


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------


def test_hadamard_split():
    for n, mp in SPLITS.items():
        assert ref.hadamard_split(n) == mp
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            ref.hadamard_split(bad)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 96, 576, 1536])
def test_rotation_matrix_is_orthogonal(n):
    r = ref.rotation_matrix(*_factors(n, seed=n))
    assert r.dtype == torch.float32 and r.shape == (n, n)
    torch.testing.assert_close(r @ r.t(), torch.eye(n), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 12, 96, 576])
def test_rotate_online_is_x_times_r(n):
    signs, small = _factors(n, seed=1)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(ref.rotate_online(x, signs, small), x @ ref.rotation_matrix(signs, small),
                               rtol=1e-5, atol=1e-5)
    y = ref.rotate_online(x.to(torch.bfloat16), signs, small)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_rotate_online_definition():
    """Step by step: signs, H_p / sqrt(p) per block of p, then small^T across the m blocks."""
    n, (m, p) = 48, ref.hadamard_split(48)
    signs, small = _factors(n, seed=2)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(3))
    v = (x * signs).reshape(5, m, p) @ ref.hadamard_matrix(p)
    w = torch.stack([sum(small[lb, i] * v[:, lb] for lb in range(m)) for i in range(m)], 1).reshape(5, n)
    torch.testing.assert_close(ref.rotate_online(x, signs, small), w, rtol=1e-5, atol=1e-5)
    # power of two: R = diag(signs) @ H_n
    s64, one = _factors(64, seed=2)
    assert torch.equal(one, torch.ones(1, 1))
    torch.testing.assert_close(ref.rotation_matrix(s64, one), s64[:, None] * ref.hadamard_matrix(64))


def test_random_rotation_factors():
    signs, small = ref.random_rotation_factors(96, 5)
    assert signs.dtype == small.dtype == torch.float32 and signs.shape == (96,) and small.shape == (3, 3)
    assert set(signs.tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(small @ small.t(), torch.eye(3), rtol=0, atol=1e-6)
    again = ref.random_rotation_factors(96, 5)
    assert torch.equal(signs, again[0]) and torch.equal(small, again[1])
    other = ref.random_rotation_factors(96, 6)
    assert not torch.equal(signs, other[0]) and not torch.equal(small, other[1])
    assert torch.equal(ref.random_rotation_factors(4096, 1)[1], torch.ones(1, 1))


def test_ref_bad_factors():
    signs, small = _factors(96)
    with pytest.raises(ValueError, match="signs must be"):
        ref.rotate_online(torch.zeros(2, 96), signs[:48], small)
    with pytest.raises(ValueError, match="small must be"):
        ref.rotation_matrix(signs, torch.eye(2))


# --------------------------------------------------------------------------------------------------
# kernel vs ref
# --------------------------------------------------------------------------------------------------


def test_registered():
    assert get_op("rotate_online") is Hd.rotate_online and get_op("rotate_online", "ref") is ref.rotate_online


@pytest.mark.parametrize("n", [16, 48, 64, 96, 160, 576])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", [None, "loop"])
def test_kernel_matches_ref(device, n, m, dtype, kernel):
    signs, small = _factors(n, seed=n, device=device)
    x = _input(m, n, dtype, device)
    _close(Hd.rotate_online(x, signs, small, kernel=kernel), ref.rotate_online(x, signs, small), dtype)


def test_kernel_choice():
    sizes = (12, 48, 576, 1536, 4096, 11008, 13824, 14336, 18944, 28672)
    assert [Hd.uses_dot(*ref.hadamard_split(n)) for n in sizes] == \
        [False, False, True, False, False, True, True, False, True, False]
    with pytest.raises(ValueError, match="cannot rotate"):
        Hd.rotate_online(torch.zeros(1, 12), *_factors(12), kernel="dot")  # p = 4 < 16
    with pytest.raises(ValueError, match="kernel must be"):
        Hd.rotate_online(torch.zeros(1, 12), *_factors(12), kernel="fast")
    with pytest.raises(ValueError, match="power of two"):
        Hd.rotate_online(torch.zeros(1, 576), *_factors(576), block_i=24)
    with pytest.raises(ValueError, match="at least 16"):
        Hd.rotate_online(torch.zeros(1, 576), *_factors(576), kernel="dot", block_i=8)


@pytest.mark.parametrize("n", [48, 160, 576, 1536, 9216, 11008])
@pytest.mark.parametrize("block_i", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dot_kernel_blocks(device, n, block_i, dtype):
    """The dot kernel at any m > 1 (3, 5, 9, 43 blocks) and p from 16 to 1024: one K chunk or several,
    several programs per row (BLOCK_I below m), padded output blocks (above m)."""
    signs, small = _factors(n, seed=2, device=device)
    x = _input(5, n, dtype, device) * 3
    _close(Hd.rotate_online(x, signs, small, kernel="dot", block_i=block_i), ref.rotate_online(x, signs, small), dtype)


@pytest.mark.parametrize("n", [12, 96, 576, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", [None, "loop", "dot"])
def test_silu_mul_rotate_matches_ref(device, n, dtype, kernel):
    signs, small = _factors(n, seed=n + 1, device=device)
    if kernel == "dot" and not Hd.dot_fits(*ref.hadamard_split(n)):
        pytest.skip("p < 16: no dot kernel")
    gate_up = _input(4, 2 * n, dtype, device) * 3
    got = Hd.silu_mul_rotate(gate_up, signs, small, kernel=kernel, fuse=True)
    _close_fused(got, ref.silu_mul_rotate(gate_up, signs, small), dtype)


@pytest.mark.parametrize("n", [272, 1008])  # 17 and 63 blocks of 16: two and four K chunks
@pytest.mark.parametrize("block_i", [16, 64])
def test_silu_mul_rotate_dot_chunks_and_strides(device, n, block_i):
    """Fused SiLU * up on the dot kernel over several K chunks, with gate | up rows inside a wider tensor
    (row stride > 2n), a column-major small and strided signs."""
    signs, small = _factors(n, seed=n, device=device)
    signs_strided = torch.stack([signs, -signs], 1)[:, 0]  # stride 2
    small_cm = small.t().contiguous().t()
    wide = _input(6, 3 * n, torch.float16, device) * 3
    gate_up = wide[:, n:].view(2, 3, 2 * n)  # [2, 3, 2n], rows 3n apart
    got = Hd.silu_mul_rotate(gate_up, signs_strided, small_cm, kernel="dot", block_i=block_i, fuse=True)
    assert got.shape == (2, 3, n)
    _close_fused(got, ref.silu_mul_rotate(gate_up, signs, small), torch.float16)


def test_dot_kernel_rounding(device):
    """The 16-bit split of small (high part + rest): against float64 math rounded once to fp16, only rare ties
    differ (measured 0.03-0.1% of elements; without the rest's product 41%)."""
    n = 11008
    signs, small = _factors(n, seed=9, device=device)
    x = _input(8, n, torch.float16, device)
    got = Hd.rotate_online(x, signs, small, kernel="dot")
    exact = (x.double() @ ref.rotation_matrix(signs, small).double()).half()
    assert (got != exact).float().mean().item() < 0.01


@pytest.mark.parametrize("fuse", [None, False, True])
def test_silu_mul_rotate_fuse_rule(device, fuse, monkeypatch):
    """Up to FUSE_MAX_N (default) SiLU * up runs inside the rotation; above it, or with fuse=False, as its
    own kernel first; fuse=True forces the fused kernel."""
    from atomq.kernels import elementwise

    monkeypatch.setattr(Hd, "FUSE_MAX_N", 64)
    calls = []
    monkeypatch.setattr(elementwise, "silu_mul", lambda *a, _op=elementwise.silu_mul: calls.append(1) or _op(*a))
    n = 96
    signs, small = _factors(n, seed=5, device=device)
    gate_up = _input(3, 2 * n, torch.float16, device).view(3, 1, 2 * n) * 3
    got = Hd.silu_mul_rotate(gate_up, signs, small, fuse=fuse)
    assert got.shape == (3, 1, n)
    _close_fused(got, ref.silu_mul_rotate(gate_up, signs, small), torch.float16)
    assert len(calls) == (0 if fuse else 1)  # n = 96 > 64: the default does not fuse
    calls.clear()
    Hd.silu_mul_rotate(gate_up[..., :2 * 48].contiguous(), *_factors(48, device=device))  # 48 <= 64: fused
    assert calls == []


def test_silu_mul_rotate_shapes_and_bad_inputs(device):
    n = 96
    signs, small = _factors(n, device=device)
    gate_up = _input(6, 2 * n, torch.float16, device).view(2, 3, 2 * n)
    got = Hd.silu_mul_rotate(gate_up, signs, small)
    assert got.shape == (2, 3, n)
    _close_fused(got, ref.silu_mul_rotate(gate_up, signs, small), torch.float16)
    assert Hd.silu_mul_rotate(torch.zeros(0, 2 * n, device=device), signs, small).shape == (0, n)
    with pytest.raises(ValueError, match="gate \\| up"):
        Hd.silu_mul_rotate(torch.zeros(2, 2 * n + 1, device=device), signs, small)
    with pytest.raises(ValueError, match=r"signs must be \[48\]"):  # [2, 96] is gate | up of 48 channels
        Hd.silu_mul_rotate(torch.zeros(2, n, device=device), signs, small)
    assert get_op("silu_mul_rotate") is Hd.silu_mul_rotate


def test_kernel_shapes_and_strides(device):
    n = 96
    signs, small = _factors(n, device=device)
    x = _input(12, n, torch.float16, device).view(2, 6, n)  # [..., n]
    _close(Hd.rotate_online(x, signs, small), ref.rotate_online(x, signs, small), torch.float16)
    wide = _input(5, 2 * n, torch.float32, device)[:, n:]  # row stride 2n
    _close(Hd.rotate_online(wide, signs, small), ref.rotate_online(wide, signs, small), torch.float32)
    small_t = small.t().contiguous().t()  # column-major small
    _close(Hd.rotate_online(wide, signs, small_t), ref.rotate_online(wide, signs, small), torch.float32)
    assert Hd.rotate_online(torch.zeros(0, n, device=device), signs, small).shape == (0, n)
    one = _factors(1, device=device)
    _close(Hd.rotate_online(_input(3, 1, torch.float32, device), *one),
           ref.rotate_online(_input(3, 1, torch.float32, device), *one), torch.float32)


def test_kernel_bad_inputs(device):
    signs, small = _factors(96, device=device)
    x = torch.zeros(4, 96, device=device)
    with pytest.raises(TypeError, match="x must be float16"):
        Hd.rotate_online(x.to(torch.int32), signs, small)
    with pytest.raises(TypeError, match="must be float32"):
        Hd.rotate_online(x, signs.half(), small)
    with pytest.raises(TypeError, match="expects tensors"):
        Hd.rotate_online(x, signs.tolist(), small)
    with pytest.raises(ValueError, match=r"signs must be \[96\]"):
        Hd.rotate_online(x, signs[:48], small)
    with pytest.raises(ValueError, match=r"small must be \[3, 3\]"):
        Hd.rotate_online(x, signs, torch.eye(2, device=device))
    with pytest.raises(ValueError, match="contiguous rows"):
        Hd.rotate_online(torch.zeros(96, 4, device=device).t(), signs, small)
    with pytest.raises(ValueError, match="flatten without a copy"):
        Hd.rotate_online(torch.zeros(8, 2, 96, device=device).transpose(0, 1), signs, small)
    with pytest.raises(ValueError, match="one device"):
        Hd.rotate_online(torch.zeros(4, 96, device="meta"), signs, small)
    with pytest.raises(ValueError, match="not supported"):
        Hd.rotate_online(torch.zeros(1, 8192, device=device), *_factors(8192, device=device))
    with pytest.raises(ValueError, match="not supported"):
        Hd.rotate_online(torch.zeros(1, 65 * 2, device=device), *_factors(130, device=device))


# --------------------------------------------------------------------------------------------------
# full size on a GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_NS)
@pytest.mark.parametrize("m", [1, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_size_gpu(n, m, dtype):
    signs, small = _factors(n, seed=n, device="cuda")
    x = _input(m, n, dtype, "cuda")
    _close(Hd.rotate_online(x, signs, small), ref.rotate_online(x, signs, small), dtype)
    gate_up = _input(m, 2 * n, dtype, "cuda") * 2
    want = ref.silu_mul_rotate(gate_up, signs, small)
    for fuse in (None, True):
        _close_fused(Hd.silu_mul_rotate(gate_up, signs, small, fuse=fuse), want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1536, 11008, 28672])
def test_cuda_graph_gpu(n):
    signs, small = _factors(n, seed=3, device="cuda")
    x = _input(64, n, torch.bfloat16, "cuda")
    Hd.rotate_online(x, signs, small)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = Hd.rotate_online(x, signs, small)
    x.copy_(_input(64, n, torch.bfloat16, "cuda", seed=1))
    graph.replay()
    torch.cuda.synchronize()
    _close(y, ref.rotate_online(x, signs, small), torch.bfloat16)
    gate_up = _input(64, 2 * n, torch.bfloat16, "cuda")
    for fuse in (True, False):
        Hd.silu_mul_rotate(gate_up, signs, small, fuse=fuse)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = Hd.silu_mul_rotate(gate_up, signs, small, fuse=fuse)
        gate_up.copy_(_input(64, 2 * n, torch.bfloat16, "cuda", seed=2))
        graph.replay()
        torch.cuda.synchronize()
        _close_fused(y, ref.silu_mul_rotate(gate_up, signs, small), torch.bfloat16)
