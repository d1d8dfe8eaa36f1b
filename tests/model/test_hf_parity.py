"""Our forwards against Hugging Face transformers: float models exactly, quantized ones against a
fake-quantized copy of the HF model built here from the checkpoint's tensors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atomq.calib.pipeline import quantize_model
from atomq.config import CalibConfig, preset
from atomq.kernels.ref import fake_quant_kv
from atomq.model.loader import load_model
from atomq.quant import fake_quant_mixed

CALIB = dict(n_samples=4, seq_len=32, dtype="float32")


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "mixtral"])
def test_float_forward_matches_transformers(tiny_model, arch):
    path = tiny_model(arch)
    ids = torch.randint(0, 320, (2, 40))
    ours = load_model(str(path), torch.float32).model
    with torch.no_grad():
        got = ours(ids)
    want = hf_logits(path, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class FakeQuantLinear(nn.Module):
    """HF-side twin of a quantized linear: gather, fake-quantize the input, multiply by the dequantized weight."""

    def __init__(self, weight, bias, perm, split, a_bits, a_clip, kv_bits=None, head_dim=None):
        super().__init__()
        self.weight, self.bias, self.perm = weight, bias, perm
        self.split, self.a_bits, self.a_clip = split, a_bits, a_clip
        self.kv_bits, self.head_dim = kv_bits, head_dim

    def forward(self, x):
        if self.perm is not None:
            x = x[..., self.perm]
        if self.a_bits is not None:
            x = fake_quant_mixed(x, self.split, self.a_bits, self.a_clip)
        y = F.linear(x, self.weight, self.bias)
        if self.kv_bits is not None:  # K (pre-RoPE) / V per (token, head)
            y = fake_quant_kv(y.unflatten(-1, (-1, self.head_dim)), self.kv_bits).flatten(-2)
        return y


def _twin(ours, perm, kv=None, head_dim=None):
    s = ours.spec
    return FakeQuantLinear(ours.dense_weight(torch.float32), getattr(ours, "bias", None),
                           None if perm is None else perm.long(), s.split, s.a_bits, s.a_clip, kv, head_dim)


class FakeQuantExperts(nn.Module):
    """Twin of transformers' fused MixtralExperts: per-expert fake-quantized w1 / w3 / w2."""

    def __init__(self, moe, perm):
        super().__init__()
        self.experts = [(_twin(e.w1, perm), _twin(e.w3, perm), _twin(e.w2, None)) for e in moe.experts]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, (w1, w3, w2) in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            y = w2(F.silu(w1(x)) * w3(x)) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y)
        return out


def fake_quant_hf(path, ckpt_model, qcfg):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # the checkpoint keeps these in 16 bit: give the twin the same values
    hf.model.embed_tokens.weight.data = ckpt_model.model.embed_tokens.weight.float()
    hf.model.norm.weight.data = ckpt_model.model.norm.weight.float()
    hf.lm_head.weight.data = ckpt_model.lm_head.weight.float()
    for i, (hl, ol) in enumerate(zip(hf.model.layers, ckpt_model.model.layers)):
        # the norms gather their outputs in our model; the HF twin gathers in each linear instead
        hl.input_layernorm.weight.data = ol.input_layernorm.weight.float()
        hl.post_attention_layernorm.weight.data = ol.post_attention_layernorm.weight.float()
        perm_in = getattr(ol.input_layernorm, "reorder_index", None)
        perm_post = getattr(ol.post_attention_layernorm, "reorder_index", None)
        linears = [
            ("self_attn.q_proj", ol.self_attn.q_proj, perm_in), ("self_attn.k_proj", ol.self_attn.k_proj, perm_in),
            ("self_attn.v_proj", ol.self_attn.v_proj, perm_in),
            ("self_attn.o_proj", ol.self_attn.o_proj, getattr(ol.self_attn.o_proj, "reorder_index", None)),
        ]
        if ckpt_model.args.is_moe:  # the router stays float; its columns follow our reordered input
            moe = ol.block_sparse_moe
            inv = torch.argsort(perm_post.long()) if perm_post is not None else slice(None)
            hl.mlp.gate.weight.data = moe.gate.dense_weight(torch.float32)[:, inv]
            hl.mlp.experts = FakeQuantExperts(moe, perm_post)
        else:
            linears += [("mlp.gate_proj", ol.mlp.gate_proj, perm_post), ("mlp.up_proj", ol.mlp.up_proj, perm_post),
                        ("mlp.down_proj", ol.mlp.down_proj, None)]
        for mod_name, ours, perm in linears:
            kv = qcfg.kv_bits if mod_name in ("self_attn.k_proj", "self_attn.v_proj") else None
            parent, leaf = mod_name.split(".")
            setattr(getattr(hl, parent), leaf, _twin(ours, perm, kv, ckpt_model.args.head_dim))
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("recipe", ["atom", "w8a8", "w4a16", "rtn-w4a4"])
def test_quantized_forward_matches_fake_quantized_transformers(tiny_model, calib_file, tmp_path, arch, recipe):
    path = tiny_model(arch)
    qcfg = preset(recipe, kv_pre_rope=True) if recipe == "atom" else preset(recipe)
    out = tmp_path / "ckpt"
    quantize_model(str(path), str(out), qcfg, CalibConfig(dataset=str(calib_file), **CALIB), progress=False)
    ours = load_model(str(out), torch.float32).model
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        got = ours(ids)
        want = fake_quant_hf(path, ours, qcfg)(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    float_logits = hf_logits(path, ids)
    assert not torch.allclose(got, float_logits, atol=1e-3)  # quantization really happened


@pytest.mark.parametrize("pre_rope, rotate", [(False, False), (True, False), (False, True)])
def test_attention_quantizes_kv_where_configured(tiny_model, pre_rope, rotate):
    """KV4 fake-quant sits after RoPE (default, what a paged cache stores) or before it (Atom's reference);
    with ``rotate`` q and k are turned by a per-head Hadamard matrix after RoPE, before K is quantized."""
    from atomq.kernels.ref import hadamard_matrix
    from atomq.model.args import apply_rope, rope_cos_sin

    model = load_model(str(tiny_model("llama", head_dim=16)), torch.float32).model
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 10, model.args.hidden_size)
    cos, sin = rope_cos_sin(model.inv_freq, model.rope_scaling, torch.arange(10))
    with torch.no_grad():
        plain = attn(x, cos, sin)
        if rotate:  # rotation alone leaves the attention output unchanged
            attn.kv_hadamard = hadamard_matrix(attn.head_dim)
            torch.testing.assert_close(attn(x, cos, sin), plain, rtol=1e-5, atol=1e-5)
        attn.kv_bits, attn.kv_pre_rope = 4, pre_rope
        got = attn(x, cos, sin)
        h, kvh, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q = apply_rope(attn.q_proj(x).view(1, 10, h, d), cos, sin)
        k = attn.k_proj(x).view(1, 10, kvh, d)
        if rotate:
            had = hadamard_matrix(d)
            q, k = q @ had, fake_quant_kv(apply_rope(k, cos, sin) @ had)
        else:
            k = apply_rope(fake_quant_kv(k), cos, sin) if pre_rope else fake_quant_kv(apply_rope(k, cos, sin))
        v = fake_quant_kv(attn.v_proj(x).view(1, 10, kvh, d))
        k, v = (z.transpose(1, 2).repeat_interleave(h // kvh, dim=1) for z in (k, v))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        want = attn.o_proj(o.transpose(1, 2).reshape(1, 10, h * d))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
