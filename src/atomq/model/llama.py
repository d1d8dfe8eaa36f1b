"""Llama / Mistral / Qwen2 / Mixtral decoder, readable top to bottom, with Hugging Face parameter names.

One forward serves every method: which tensors a ``Linear`` holds and how it quantizes its input is
decided by its ``LinearSpec`` (see ``model/specs.py`` for how a QuantConfig maps to specs). The KV cache
quantization of this full-sequence forward is fake-quant (quantize then dequantize K and V per token
and head), the numerics the paged INT4 cache has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ref
from .args import ModelArgs, apply_rope, rope_cos_sin, rope_inv_freq
from .layers import Linear, LinearSpec, OnlineRotation, RMSNorm, shared_forward

Specs = dict[str, LinearSpec]  # linear name inside a layer ("self_attn.q_proj", ...) -> spec


@dataclass(frozen=True)
class KVSpec:
    """KV-cache numerics: bits (None = 16-bit), quantize K before RoPE, rotate q/k after RoPE, take a
    calibrated mean key off the keys after RoPE."""

    bits: int | None = None
    pre_rope: bool = False
    rotate: bool = False
    center: bool = False


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, specs: Specs, kv: "KVSpec", dtype):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.kv_bits, self.kv_pre_rope = kv.bits, kv.pre_rope
        self.kv_group = None  # finer KV scales for accuracy studies (ref.fake_quant_kv); None = per head
        self.k_block_tokens = None  # per-channel key scales over N tokens, a study (ref.fake_quant_kv_per_channel)
        self.key_observer = None  # calibration: called with k [B, T, Hkv, D] after RoPE and rotation
        # Hadamard rotation of q and k after RoPE: q.k is unchanged, K's outlier dims are spread before
        # its INT4 quantization. The paged cache then stores rotated keys.
        self.register_buffer("kv_hadamard", ref.hadamard_matrix(args.head_dim) if kv.rotate else None,
                             persistent=False)
        # fp32 [Hkv, D], calibrated: the mean key, taken off every key before the cache. q.k_center is one
        # constant per query, so the scores keep their softmax; the INT4 range no longer spans the offset.
        self.register_buffer("k_center", torch.zeros(args.n_kv_heads, args.head_dim, device="meta")
                             if kv.center else None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, Linear(specs[f"self_attn.{name}"], dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] (already normed and reordered) -> [B, T, hidden]."""
        b, t, _ = x.shape
        q, k, v = shared_forward(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        if self.kv_bits is not None and self.kv_pre_rope:
            k = self._fake_quant_keys(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_hadamard is not None:
            q, k = ref.rotate_heads(q, self.kv_hadamard), ref.rotate_heads(k, self.kv_hadamard)
        if self.key_observer is not None:
            self.key_observer(k)
        if self.k_center is not None:
            k = (k.float() - self.k_center).to(k.dtype)
        if self.kv_bits is not None:
            if not self.kv_pre_rope:
                k = self._fake_quant_keys(k)
            v = self._fake_quant_values(v)
        # [B, H, T, D]; GQA: each KV head serves n_heads // n_kv_heads query heads
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _fake_quant_keys(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, T, H, D] through the KV cache's quantization (or a study's variant of it)."""
        if self.k_block_tokens:
            return ref.fake_quant_kv_per_channel(k, self.kv_bits, self.k_block_tokens)
        return ref.fake_quant_kv(k, self.kv_bits, self.kv_group)

    def _fake_quant_values(self, v: torch.Tensor) -> torch.Tensor:
        """v [B, T, H, D] through the KV cache's quantization."""
        return ref.fake_quant_kv(v, self.kv_bits, self.kv_group)


class MLP(nn.Module):
    def __init__(self, specs: Specs, prefix: str, dtype, rotate: bool = False):
        super().__init__()
        names = ("w1", "w3", "w2") if prefix.startswith("block_sparse_moe") else ("gate_proj", "up_proj", "down_proj")
        self.names = names
        for name in names:
            setattr(self, name, Linear(specs[f"{prefix}.{name}"], dtype))
        # rotated models: SiLU(gate) * up is rotated before down_proj, which holds the inverse
        self.down_rotation = OnlineRotation(specs[f"{prefix}.{names[2]}"].in_features) if rotate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden]; the down input order is folded into gate/up rows offline
        (rotated models: down gathers it itself after the rotation)."""
        gate, up, down = (getattr(self, n) for n in self.names)
        g, u = shared_forward(x, gate, up)
        h = (F.silu(g.float()) * u.float()).to(x.dtype)
        if self.down_rotation is not None:
            h = self.down_rotation(h)
        return down(h)


class MoE(nn.Module):
    """Mixtral sparse MoE: softmax router (kept 16-bit) -> top-k experts, weights renormalized."""

    def __init__(self, args: ModelArgs, specs: Specs, dtype, rotate: bool = False):
        super().__init__()
        self.top_k = args.top_k
        self.gate = Linear(specs["block_sparse_moe.gate"], dtype)
        self.experts = nn.ModuleList(
            MLP(specs, f"block_sparse_moe.experts.{e}", dtype, rotate) for e in range(args.n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [M, hidden]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [M, E]
        weight, expert = torch.topk(probs, self.top_k, dim=-1)  # [M, k]
        weight = weight / weight.sum(-1, keepdim=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, mlp in enumerate(self.experts):
            rows, slot = torch.where(expert == e)
            if rows.numel():
                out.index_add_(0, rows, mlp(x[rows]).float() * weight[rows, slot, None])
        return out.to(x.dtype).reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, specs: Specs, kv: KVSpec, reorder: bool, dtype, rotate: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_eps, reorder, dtype)
        self.self_attn = Attention(args, specs, kv, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_eps, reorder, dtype)
        if args.is_moe:
            self.block_sparse_moe = MoE(args, specs, dtype, rotate)
        else:
            self.mlp = MLP(specs, "mlp", dtype, rotate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] residual stream -> [B, T, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class TransformerModel(nn.Module):
    def __init__(self, args: ModelArgs, layer_specs: list[Specs], kv: KVSpec, reorder, dtype, rotate: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device="meta", dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(args, layer_specs[i], kv, reorder, dtype, rotate) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_eps, False, dtype)


class CausalLM(nn.Module):
    """The whole model. Build with ``model/loader.py``; parameters start on the meta device."""

    def __init__(self, args: ModelArgs, hf_config: Any, layer_specs: list[Specs], kv: KVSpec = KVSpec(),
                 reorder: bool = False, dtype: torch.dtype = torch.float32, rotate: bool = False):
        super().__init__()
        self.args, self.hf_config = args, hf_config
        self.model = TransformerModel(args, layer_specs, kv, reorder, dtype, rotate)
        self.lm_head = Linear(LinearSpec(args.hidden_size, args.vocab_size), dtype)
        inv_freq, self.rope_scaling = rope_inv_freq(hf_config, args.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T] -> final-normed hidden states [B, T, hidden]."""
        t = input_ids.shape[1]
        if self.args.sliding_window is not None and t > self.args.sliding_window:
            raise ValueError(f"sequence length {t} exceeds the sliding window {self.args.sliding_window}")
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scaling, torch.arange(t, device=input_ids.device))
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T] -> logits [B, T, vocab] in the model dtype."""
        return self.lm_head(self.hidden_states(input_ids))
