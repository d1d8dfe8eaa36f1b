"""Fused quantize kernels against their ref.py twins (CPU: Triton interpreter, small ragged shapes;
-m gpu: full Llama-2 sizes). Integer outputs and fp16 scales must be equal; the RMSNorm variant may
differ in rare ties from the fp32 sum-of-squares order (bounded below, see docs/KERNELS.md)."""

import pytest
import torch

from atomq.kernels import ref
from atomq.quant import plan_split, unpack_int4

pytest.importorskip("triton")
from atomq.kernels import quantize as Q  # noqa: E402

CPU_CASES = [  # (M, K, n_outliers, group_size)
    (1, 320, 64, 64),
    (7, 576, 128, 128),  # SmolLM2 hidden: K - 128 = 448 -> groups of 64
    (33, 448, 0, 64),
    (7, 352, 32, 32),
    (5, 256, 32, None),
]
GPU_CASES = [(1, 4096, 128, 128), (333, 4096, 128, 128), (4096, 8192, 128, 128), (64, 11008, 128, 128)]
# both kernels: whole rows per program with the gather in registers (default), and the chunked one
CONFIGS = [Q.QuantizeLaunch(kernel="rows"), Q.QuantizeLaunch()]


def _assert_actq_equal(a, r):
    for name, u, v in zip(("q4", "s4", "q8", "s8"), a, r):
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape, name
            assert torch.equal(u, v), f"{name}: {(u != v).sum().item()} of {u.numel()} differ"


def _inputs(m, k, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.float16).to(device)
    res = torch.randn(m, k, generator=g).to(torch.float16).to(device)
    w = (torch.rand(k, generator=g) + 0.5).to(torch.float16).to(device)
    idx = torch.randperm(k, generator=g).to(torch.int32).to(device)
    return x, res, w, idx


def _check_quantize_act(m, k, n_out, gs, device, cfg=None):
    split = plan_split(k, n_out, gs)
    x, _, _, idx = _inputs(m, k, device, seed=m + k)
    for index in (idx, None):
        r = ref.quantize_act(x, index, split)
        _assert_actq_equal(Q.quantize_act(x, index, split, config=cfg), r)
        op = Q.quantize_act(x, index, split, out="int8", config=cfg)
        assert torch.equal(op.qa, unpack_int4(r.q4))
        _assert_actq_equal(op.to_actq(), r)
    if device == "cuda":
        f8 = Q.quantize_act(x, idx, split, out="fp8", config=cfg)
        assert f8.qa.dtype == torch.float8_e4m3fn
        _assert_actq_equal(f8.to_actq(), ref.quantize_act(x, idx, split))


def _check_rmsnorm(m, k, n_out, gs, device, cfg=None):
    split = plan_split(k, n_out, gs)
    x, res, w, idx = _inputs(m, k, device, seed=2 * m + k)
    for residual, gathered in ((res, False), (None, False), (res, True)):
        wk = w[idx.long()] if gathered else w
        a, new_res = Q.rmsnorm_quantize(x, residual, wk, 1e-5, idx, split, config=cfg, weight_gathered=gathered)
        r, ref_res = ref.rmsnorm_quantize(x, residual, wk, 1e-5, idx, split, weight_gathered=gathered)
        assert torch.equal(ref_res, ref.rmsnorm_quantize(x, residual, w, 1e-5, idx, split)[1])
        assert torch.equal(new_res, ref_res)
        total = sum(u.numel() for u in a if u is not None)
        diff = sum((u != v).sum().item() for u, v in zip(a, r) if u is not None)
        assert diff <= max(2, 1e-4 * total), f"{diff} of {total} elements differ"
        qd = (unpack_int4(a.q4).int() - unpack_int4(r.q4).int()).abs().max().item()
        assert qd <= 1
        s_rel = ((a.s4.float() - r.s4.float()).abs() / r.s4.float()).max().item()
        assert s_rel <= 2e-3


def _check_silu(m, k, n_out, gs, device, cfg=None):
    split = plan_split(k, n_out, gs)
    g = torch.Generator(device="cpu").manual_seed(m * 7 + k)
    gate_up = (torch.randn(m, 2 * k, generator=g) * 2).to(torch.float16).to(device)
    _assert_actq_equal(Q.silu_mul_quantize(gate_up, split, config=cfg), ref.silu_mul_quantize(gate_up, split))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["rows", "chunk"])
@pytest.mark.parametrize("m,k,n_out,gs", CPU_CASES)
def test_quantize_act(m, k, n_out, gs, cfg, device):
    _check_quantize_act(m, k, n_out, gs, device, cfg)


@pytest.mark.parametrize("cfg", CONFIGS + [Q.QuantizeLaunch(gather_residual=False)],
                         ids=["rows", "chunk", "chunk-gather-inputs"])
@pytest.mark.parametrize("m,k,n_out,gs", CPU_CASES)
def test_rmsnorm_quantize(m, k, n_out, gs, cfg, device):
    _check_rmsnorm(m, k, n_out, gs, device, cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["rows", "chunk"])
@pytest.mark.parametrize("m,k,n_out,gs", CPU_CASES)
def test_silu_mul_quantize(m, k, n_out, gs, cfg, device):
    _check_silu(m, k, n_out, gs, device, cfg)


def test_validation(device):
    split = plan_split(256, 32, 64)
    x = torch.randn(3, 128, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="channels"):
        Q.quantize_act(x, None, split)
    with pytest.raises(ValueError, match="index"):
        Q.quantize_act(torch.randn(3, 256, device=device, dtype=torch.float16),
                       torch.arange(256, device=device), split)
    with pytest.raises(ValueError, match="out must be"):
        Q.quantize_act(torch.randn(3, 256, device=device, dtype=torch.float16), None, split, out="int4")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [None, Q.QuantizeLaunch(gather_residual=False)], ids=["default", "gather-inputs"])
@pytest.mark.parametrize("m,k,n_out,gs", GPU_CASES)
def test_full_size_gpu(m, k, n_out, gs, cfg):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_quantize_act(m, k, n_out, gs, "cuda", cfg)
    _check_rmsnorm(m, k, n_out, gs, "cuda", cfg)
    _check_silu(m, k, n_out, gs, "cuda", cfg)


@pytest.mark.parametrize("mode", ["rmsnorm", "silu", "gather"])
def test_decode_launch_knobs_do_not_change_the_result(mode, device):
    """QuantizeLaunch.preload (constants before the wait) and norm_block (the norm's load width) change
    only the schedule: the quantized output is the default's, bit for bit."""
    from atomq.kernels.quantize import QuantizeLaunch

    torch.manual_seed(0)
    k, m = 320, 2
    split = plan_split(k, 64, 64)
    idx = torch.randperm(k).to(torch.int32).to(device)
    x = torch.randn(m, 2 * k if mode == "silu" else k, device=device).half()
    r = torch.randn(m, k, device=device).half()
    w = (torch.rand(k, device=device) + 0.5).half()

    def run(cfg):
        if mode == "rmsnorm":
            return Q.rmsnorm_quantize(x, r, w, 1e-6, idx, split, out="int8", config=cfg)[0]
        if mode == "silu":
            return Q.silu_mul_quantize(x, split, out="int8", config=cfg)
        return Q.quantize_act(x, idx, split, out="int8", config=cfg)

    want = run(None)
    for cfg in (QuantizeLaunch(preload=False), QuantizeLaunch(norm_block=64)):
        got = run(cfg)
        for a, b in zip(want, got):
            assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="power of two"):
        run(QuantizeLaunch(norm_block=96))


@pytest.mark.parametrize("kind,clip", [("int8", 1.0), ("int8", 0.9), ("fp8", 1.0)])
@pytest.mark.parametrize("m,k", [(1, 96), (3, 4500)])  # one chunk; several chunks with a ragged tail
def test_quantize_rows_equals_the_torch_path(kind, clip, m, k, device):
    """The FP8 / INT8 baselines' per-token quantization in one kernel = model/methods.py's torch ops. INT8
    bit for bit everywhere; FP8 bit for bit on the GPU (the CPU interpreter rounds to e4m3 its own way,
    so there the dequantized values are compared within one e4m3 step)."""
    from atomq.model.methods import FP8_MAX
    from atomq.quant.intq import quantize_sym

    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(device, torch.float16)
    x[0, 5] = 40.0  # one outlier sets a row's scale
    q, s = Q.quantize_rows(x, kind, clip)
    if kind == "int8":
        qt = quantize_sym(x, 8, None, clip)
        assert s.dtype == torch.float16 and torch.equal(s, qt.scale) and torch.equal(q, qt.q)
        return
    s_ref = x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q_ref = (x.float() / s_ref).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert s.dtype == torch.float32 and torch.equal(s, s_ref)
    if device == "cuda":
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    else:
        a, b = q.float(), q_ref.float()
        step = (a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2.0**-9  # one e4m3 step
        carry = a == b / 2  # the interpreter drops the carry when rounding up to a power of two
        assert (step | carry).all()


def test_quantize_rows_rejects_bad_inputs(device):
    x = torch.zeros(2, 8, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="kind"):
        Q.quantize_rows(x, "int4")
    with pytest.raises(ValueError, match="clip"):
        Q.quantize_rows(x, "int8", 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        Q.quantize_rows(x.t(), "int8")


@pytest.mark.parametrize("cfg", CONFIGS, ids=["rows", "chunk"])
@pytest.mark.parametrize("m,k,n_out,gs", [(7, 576, 128, 128), (7, 352, 32, 32), (5, 256, 32, None)])
def test_eight_bit_activations_equal_the_reference(m, k, n_out, gs, cfg, device):
    """bits=8 (W4A8 on the int8-operand GEMMs): the same kernels with 127 in place of 7."""
    split = plan_split(k, n_out, gs)
    x, res, w, idx = _inputs(m, k, device, seed=3 * m + k)
    r = ref.quantize_act(x, idx, split, 8, 1.0)
    a = Q.quantize_act(x, idx, split, 8, 1.0, out="int8", config=cfg)
    assert r.q4.dtype == torch.int8 and r.q4.abs().max() > 7  # really 8-bit values
    _assert_actq_equal(a.to_actq(8), r)
    g = torch.Generator(device="cpu").manual_seed(m)
    gate_up = (torch.randn(m, 2 * k, generator=g) * 2).to(torch.float16).to(device)
    s = Q.silu_mul_quantize(gate_up, split, 8, 0.9, out="int8", config=cfg)
    _assert_actq_equal(s.to_actq(8), ref.silu_mul_quantize(gate_up, split, 8, 0.9))
    n, new_res = Q.rmsnorm_quantize(x, res, w, 1e-5, idx, split, 8, 1.0, out="int8", config=cfg)
    rn, ref_res = ref.rmsnorm_quantize(x, res, w, 1e-5, idx, split, 8, 1.0)
    assert torch.equal(new_res, ref_res)
    rn_op = n.to_actq(8)
    diff = sum((u != v).sum().item() for u, v in zip(rn_op, rn) if u is not None)
    assert diff <= max(2, 1e-4 * sum(u.numel() for u in rn)), diff  # rare sum-of-squares ties, as for 4 bits
    for out in ("packed", "fp8"):  # 8-bit values have no packed or e4m3 form
        with pytest.raises(ValueError, match="8-bit activations"):
            Q.quantize_act(x, idx, split, 8, out=out)


@pytest.mark.parametrize("m,k,n_out,gs", [(7, 576, 128, 64), (3, 352, 32, 32), (2, 4096, 128, 128)])
def test_integer_multiplier_scales_equal_the_reference(m, k, n_out, gs, device):
    """levels: every group scale an integer multiple (1..15) of one unit per token, the operand holding
    q * multiplier and s4 the unit; all three kernels against ref, decode sizes (one program per row)."""
    split = plan_split(k, n_out, gs)
    x, res, w, idx = _inputs(m, k, device, seed=5 * m + k)
    x = (x.float() * torch.rand(m, k, generator=torch.Generator().manual_seed(k)).to(device).pow(3)).half()
    a = Q.quantize_act(x, idx, split, out="int8", levels=15)
    r = ref.quantize_act(x, idx, split, levels=15)
    assert r.q4.abs().max() > 8 and bool((r.s4 == r.s4[:, :1]).all())  # multipliers in q, one unit per row
    _assert_actq_equal(tuple(a), r)
    g = torch.Generator(device="cpu").manual_seed(m)
    gate_up = (torch.randn(m, 2 * k, generator=g) * 2).to(torch.float16).to(device)
    _assert_actq_equal(tuple(Q.silu_mul_quantize(gate_up, split, out="int8", levels=15)),
                       ref.silu_mul_quantize(gate_up, split, levels=15))
    n, new_res = Q.rmsnorm_quantize(x, res, w, 1e-5, idx, split, out="int8", levels=15)
    rn, ref_res = ref.rmsnorm_quantize(x, res, w, 1e-5, idx, split, levels=15)
    assert torch.equal(new_res, ref_res)
    diff = sum((u != v).sum().item() for u, v in zip(n, rn) if u is not None)
    assert diff <= max(2, 1e-4 * sum(u.numel() for u in rn)), diff  # rare sum-of-squares ties
    with pytest.raises(ValueError, match="levels"):
        Q.quantize_act(x, idx, split, out="packed", levels=15)
    with pytest.raises(ValueError, match="levels"):
        Q.quantize_act(x, idx, plan_split(k, n_out, None), out="int8", levels=15)


@pytest.mark.parametrize("m,k,n_out,gs,acc_cols", [
    (1, 576, 64, 64, 1000), (3, 640, 128, 128, 64), (2, 512, 0, 32, 3),
    (16, 576, 64, 64, 100),  # one program per row: the norm's gathers read back the stored new residual
])
def test_accumulator_zeroed_and_fp32_inputs_rounded_as_the_reference(m, k, n_out, gs, acc_cols, device, monkeypatch):
    """acc_cols: the launch zeroes the next GEMM's fp32 accumulator (every column, whatever the programs per
    row); an fp32 input (a GEMM's accumulator) is rounded to the value dtype first, as the twins do."""
    monkeypatch.setattr(Q, "_new_acc", lambda m, n, dev: torch.full((m, n), float("nan"), device=dev))
    split = plan_split(k, n_out, gs)
    x, res, w, idx = _inputs(m, k, device, seed=3 * m + k)
    x32 = x.float() * (1 + 1e-3 * torch.rand(m, k, device=device))  # not on the fp16 grid
    a = Q.quantize_act(x, idx, split, out="int8", acc_cols=acc_cols)
    assert a.acc.shape == (m, acc_cols) and a.acc.dtype == torch.float32 and not a.acc.any()
    _assert_actq_equal(a.to_actq(), ref.quantize_act(x, idx, split))

    b, new_res = Q.rmsnorm_quantize(x32, res, w, 1e-5, idx, split, out="int8", acc_cols=acc_cols)
    r, ref_res = ref.rmsnorm_quantize(x32, res, w, 1e-5, idx, split)
    assert new_res.dtype == torch.float16 and torch.equal(new_res, ref_res)
    assert torch.equal(new_res, (x32.half().float() + res.float()).half())  # x rounded once, then the add
    assert not b.acc.any()
    diff = sum((u != v).sum().item() for u, v in zip(b.to_actq(), r) if u is not None)
    assert diff <= 2

    gate_up = torch.cat([x32, x32.flip(1)], 1)
    c = Q.silu_mul_quantize(gate_up, split, out="int8", acc_cols=acc_cols, dtype=torch.float16)
    _assert_actq_equal(c.to_actq(), ref.silu_mul_quantize(gate_up, split, dtype=torch.float16))
    assert not c.acc.any()
    assert Q.quantize_act(x, idx, split, out="int8").acc is None


def test_accumulator_validation(device):
    split = plan_split(256, 0, 128)
    x = _inputs(2, 256, device, seed=0)[0]
    with pytest.raises(ValueError, match="operand form"):
        Q.quantize_act(x, None, split, out="packed", acc_cols=8)
    with pytest.raises(ValueError, match="non-negative"):
        Q.quantize_act(x, None, split, out="int8", acc_cols=-1)
    with pytest.raises(TypeError, match="rounded to"):
        Q.silu_mul_quantize(torch.cat([x, x], 1), split, out="int8", dtype=torch.int8)
