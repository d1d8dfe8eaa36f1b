import pytest
import torch

from atomq.quant import (Split, dequantize, dequantize_fp4, fake_quant, pack_int4, plan_split, quantize_asym,
                         quantize_fp4, quantize_mixed, quantize_sym, unpack_int4)
from atomq.quant.fp4 import E2M1_VALUES


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_sym_range_and_roundtrip_is_exact(bits, group):
    x = torch.randn(7, 256) * 3
    qt = quantize_sym(x, bits, group, clip=0.9)
    assert qt.q.dtype == torch.int8 and qt.scale.dtype == torch.float16
    assert qt.q.min() >= -(2 ** (bits - 1)) and qt.q.max() <= 2 ** (bits - 1) - 1
    # dequantized values lie on the grid: quantizing them again with the same scale gives the same ints
    again = quantize_sym(dequantize(qt), bits, group, scale=qt.scale)
    assert torch.equal(again.q, qt.q)
    assert qt.scale.shape == (7, 1 if group is None else 256 // group)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asym_range_roundtrip_and_zero(bits):
    x = torch.randn(5, 128) + 2.0  # mostly positive: the zero point matters
    qt = quantize_asym(x, bits, 64)
    assert qt.q.dtype == torch.uint8 and qt.zero.dtype == torch.uint8
    assert qt.q.max() <= 2**bits - 1
    again = quantize_asym(dequantize(qt), bits, 64, params=(qt.scale, qt.zero))
    assert torch.equal(again.q, qt.q)
    err = (dequantize(qt) - x).abs().max()
    assert err <= qt.scale.float().max() * 0.51 + 1e-6  # at most half a step (range includes all values)


def test_round_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 7.0, 0.0, 0.0]])
    qt = quantize_sym(x, 4, None, scale=torch.ones(1, 1, dtype=torch.float16))
    assert qt.q.tolist() == [[0, 2, 2, 0, -2, 7, 0, 0]]


def test_all_zero_rows_do_not_produce_nan():
    x = torch.zeros(3, 64)
    assert torch.equal(fake_quant(x, 4, 32), x)
    assert torch.equal(fake_quant(x, 4, 32, sym=False), x)


def test_int4_pack_every_value_roundtrips():
    signed = torch.arange(-8, 8, dtype=torch.int8).repeat(4, 2)  # [4, 32]
    assert torch.equal(unpack_int4(pack_int4(signed)), signed)
    unsigned = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(unsigned), signed=False), unsigned)


def test_int4_nibble_order_is_low_first():
    q = torch.tensor([[1, 2, -1, 7]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0x21, 0x7F]]


def test_pack_rejects_odd_and_wrong_dtype():
    with pytest.raises(ValueError, match="odd"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))


def test_fp4_represents_its_grid_exactly_and_ties_to_even():
    grid = torch.cat([E2M1_VALUES, -E2M1_VALUES[1:]])
    x = grid.repeat(2, 1)
    x[:, 0] = 6.0  # pin the group max so that the scale is 1
    codes, scale = quantize_fp4(x, None)
    assert torch.equal(dequantize_fp4(codes, scale), x)
    ties = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]])
    c, s = quantize_fp4(ties, None)
    assert dequantize_fp4(c, s).tolist() == [[0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]]


@pytest.mark.parametrize("k, n_out, group, expect", [
    (576, 128, 128, Split(576, 128, 64)),     # SmolLM2 hidden: groups of 64
    (1536, 128, 128, Split(1536, 128, 128)),  # SmolLM2 intermediate
    (4096, 128, 128, Split(4096, 128, 128)),
    (11008, 128, 128, Split(11008, 128, 128)),
    (64, 128, 128, Split(64, 32, 32)),        # tiny: outliers capped, grown to fit groups of 32
    (96, 0, None, Split(96, 0, None)),
    (97, 0, None, Split(97, 1, None)),        # per row: the INT4 part must be even
])
def test_plan_split_rule(k, n_out, group, expect):
    assert plan_split(k, n_out, group) == expect


def test_plan_split_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="cannot be split"):
        plan_split(20, 0, 128)
    with pytest.raises(ValueError, match="power of two"):
        plan_split(576, 128, 100)


def test_mixed_quantization_layout():
    split = plan_split(576, 128, 128)
    x = torch.randn(3, 576)
    qn, qo = quantize_mixed(x, split, 4, 0.9)
    assert qn.q.shape == (3, 448) and qn.scale.shape == (3, 7)
    assert qo.q.shape == (3, 128) and qo.q.dtype == torch.int8 and qo.scale.shape == (3, 1)
    with pytest.raises(ValueError, match="expected last dimension"):
        quantize_mixed(torch.randn(3, 500), split, 4, 0.9)


def test_clip_search_never_does_worse_than_any_fixed_clip():
    from atomq.quant.intq import CLIP_GRID, sym_scale_search

    x = torch.randn(16, 256) * torch.rand(16, 1) * 4
    best = dequantize(quantize_sym(x, 4, 64, scale=sym_scale_search(x, 4, 64)))
    err = (best - x).pow(2).view(16, 4, 64).sum(-1)
    for c in CLIP_GRID:
        fixed = (fake_quant(x, 4, 64, clip=c) - x).pow(2).view(16, 4, 64).sum(-1)
        assert (err <= fixed + 1e-6).all()


@pytest.mark.parametrize("levels", [4, 15])
def test_level_scales_are_integer_multiples_of_one_unit_per_row(levels):
    """Integer-multiplier group scales: every group's scale is unit * m with m in 1..levels, the unit one
    fp16 per row; the values stay on the 4-bit grid and no worse than levels allow."""
    from atomq.quant.intq import level_base, sym_scale_levels

    x = torch.randn(6, 256) * torch.rand(6, 256).pow(4) * 10  # groups of very different ranges
    scale = sym_scale_levels(x, 4, 32, 0.9, levels)
    unit = level_base(x, 4, levels, 0.9)
    mult = scale.float() / unit.float()
    assert torch.equal(mult, mult.round()) and mult.min() >= 1 and mult.max() == levels  # exact multiples
    qt = quantize_sym(x, 4, 32, scale=scale)
    assert qt.q.min() >= -8 and qt.q.max() <= 7
    err = (dequantize(qt) - x).pow(2).sum()
    err_free = (fake_quant(x, 4, 32, 0.9) - x).pow(2).sum()
    assert err < (3.0 if levels == 4 else 1.5) * err_free  # a coarse scale grid costs, a fine one little


def test_mixed_quantization_with_levels_needs_symmetric_groups():
    from atomq.quant import fake_quant_mixed

    x = torch.randn(3, 192)
    split = plan_split(192, 32, 32)
    y = fake_quant_mixed(x, split, 4, 0.9, levels=15)
    assert y.shape == x.shape and torch.equal(y[:, 160:], fake_quant_mixed(x, split, 4, 0.9)[:, 160:])
    with pytest.raises(ValueError, match="symmetric groups"):
        fake_quant_mixed(x, plan_split(192, 32, None), 4, 0.9, levels=15)
    with pytest.raises(ValueError, match="symmetric groups"):
        fake_quant_mixed(x, split, 4, 0.9, sym=False, levels=15)


def test_scale_levels_config_is_validated():
    from atomq.config import QuantConfig, preset

    assert preset("atomq-plus", w_scale_levels=15, a_scale_levels=15).a_scale_levels == 15
    assert QuantConfig(a_bits=None, a_scale_levels=15).a_scale_levels == 15  # no effect while 16-bit
    for bad, match in ((dict(a_scale_levels=16), "2..15"), (dict(w_scale_levels=1), "2..15"),
                       (dict(group_size=None, w_scale_levels=15), "4-bit groups"),
                       (dict(a_bits=8, a_scale_levels=15), "4-bit groups"),
                       (dict(w_sym=False, gptq=False, w_scale_levels=15), "symmetric")):
        with pytest.raises(ValueError, match=match):
            QuantConfig(**bad)


def test_kv_center_needs_keys_after_rope():
    from atomq.config import QuantConfig

    assert QuantConfig(kv_center=True).kv_center
    with pytest.raises(ValueError, match="kv_center applies after RoPE"):
        QuantConfig(kv_center=True, kv_pre_rope=True)
