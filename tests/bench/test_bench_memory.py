"""Memory budgets: the KV budget arithmetic, budget parsing, weight bytes measured and predicted."""

from __future__ import annotations

import pytest
import torch

from atomq.bench.memory import FULL, GiB, Budget, parse_budget, plan_memory, weight_bytes
from atomq.bench.throughput import CONFIGS, footprint


def test_plan_under_a_cap():
    budget = Budget("fake", cap_bytes=10_000, reserve_bytes=1_000)
    plan = plan_memory(budget, weight_bytes=4_000, kv_bytes_per_token=10, max_model_len=100,
                       available_kv_bytes=10**9)
    assert plan.fits and plan.kv_budget_bytes == 5_000
    assert plan.min_kv_bytes == 112 * 10  # 100 tokens -> 7 blocks of 16
    assert plan.kv_tokens == 496 and plan.reason == ""  # 5000 // 160 = 31 blocks
    tight = plan_memory(budget, 7_900, 10, 100, 10**9)  # leaves 1100 < 1120
    assert not tight.fits and tight.kv_tokens == 0
    assert "of weights + 1.00 kB reserve leave 1.10 kB of the 10.00 kB budget" in tight.reason
    assert "one 100-token request needs 1.12 kB" in tight.reason


def test_plan_limited_by_the_device():
    plan = plan_memory(Budget("fake", 10**9, 0), 1_000, 10, 100, available_kv_bytes=500)
    assert not plan.fits and plan.kv_budget_bytes == 500 and "of device memory" in plan.reason
    full = plan_memory(FULL, 1_000, 10, 100, available_kv_bytes=1_600)
    assert full.fits and full.kv_tokens == 160


def test_parse_budget():
    assert parse_budget("full") is FULL
    b = parse_budget("24GB", reserve_bytes=123)
    assert (b.name, b.cap_bytes, b.reserve_bytes) == ("24GB", 24 * GiB, 123)
    assert parse_budget("0.5gb").cap_bytes == GiB // 2
    for bad in ("24", "GB", "-3GB", "lots"):
        with pytest.raises(ValueError, match="'full' or '<N>GB'"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="reserve_bytes"):
        Budget("x", 10, -1)


def test_weight_bytes_counts_shared_storage_once():
    lin = torch.nn.Linear(8, 4, bias=False)
    tied = torch.nn.Sequential(lin, lin)
    assert weight_bytes(tied) == 8 * 4 * 4
    meta = torch.nn.Linear(8, 4, device="meta", dtype=torch.float16)
    assert weight_bytes(meta) == (8 * 4 + 4) * 2


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_prediction_on_meta_equals_the_built_model(config):
    """What run_config predicts before allocating equals what the built model holds (tiny-llama, CPU)."""
    from atomq.model.methods import prepare_linears
    from atomq.model.random_weights import random_model

    cfg = CONFIGS[config]
    fp = footprint("tiny-llama", cfg, torch.float32)
    lm = random_model("tiny-llama", cfg.weights, torch.float32, "cpu")
    stored = weight_bytes(lm.model)
    layer = sum(t.numel() * t.element_size() for t in lm.model.model.layers[0].state_dict().values())
    prepare_linears(lm.model, cfg.linear_method)
    assert fp.weight_bytes == weight_bytes(lm.model)
    if cfg.linear_method == "auto":
        assert fp.build_bytes == stored
    else:  # converted while built: the converted model and one layer of float weights at the peak
        assert fp.build_bytes == fp.weight_bytes + layer < stored
    if config == "fp8":
        assert fp.weight_bytes < stored / 2  # 1-byte linears from fp32 (embeddings and head stay fp32)


def test_build_random_converts_layer_by_layer_to_the_same_model():
    """fp8 built with each layer converted as it is made gives the logits of converting the whole float
    model afterwards (same random values, same kernels), and holds no float linear weight."""
    from atomq.model.random_weights import build_random
    from atomq.model.methods import prepare_linears
    from atomq.model.random_weights import random_model

    staged = build_random("tiny-llama", CONFIGS["fp8"], torch.float32, "cpu", seed=3).model
    whole = random_model("tiny-llama", "float", torch.float32, "cpu", seed=3).model
    prepare_linears(whole, "fp8")
    assert staged.linear_method == whole.linear_method
    assert all(lin.weight is None for layer in staged.model.layers for lin in (layer.self_attn.q_proj, layer.mlp.down_proj))
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    torch.testing.assert_close(staged(tokens), whole(tokens), rtol=0, atol=0)
