"""Model shape arguments read from a Hugging Face config, and the supported architectures."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# HF architecture name -> our family. Mistral is Llama with a sliding window.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}

_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


def architecture_of(config: Any) -> str | None:
    """The HF architecture name; configs made by the GGUF loader carry only ``model_type``."""
    archs = getattr(config, "architectures", None)
    if archs:
        return archs[0]
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


@dataclass(frozen=True)
class ModelArgs:
    family: str  # "llama" | "qwen2" | "mixtral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    attention_bias: bool
    tie_embeddings: bool
    max_position: int
    n_experts: int = 0
    top_k: int = 0
    sliding_window: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @classmethod
    def from_hf(cls, config: Any) -> "ModelArgs":
        arch = architecture_of(config)
        family = SUPPORTED_ARCHITECTURES.get(arch)
        if family is None:
            raise ValueError(
                f"unsupported architecture {arch!r} (model_type {getattr(config, 'model_type', None)!r}); "
                f"atomq supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            rms_eps=config.rms_norm_eps,
            attention_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position=getattr(config, "max_position_embeddings", 4096),
            n_experts=getattr(config, "num_local_experts", 0) if family == "mixtral" else 0,
            top_k=getattr(config, "num_experts_per_tok", 0) if family == "mixtral" else 0,
            sliding_window=getattr(config, "sliding_window", None) if arch == "MistralForCausalLM" else None,
        )


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [head_dim // 2], attention scaling) for the config's RoPE type, Llama-3 scaling included.

    Uses transformers' RoPE initialisers for scaled variants so they match Hugging Face exactly.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported RoPE type {rope_type!r}")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv.float(), float(scaling)


def rope_cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [T] -> (cos, sin) fp32 [T, head_dim] (halves repeated, HF's rotate_half convention)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [T, D] fp32 -> rotated x, same dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * c + rot * s).to(x.dtype)


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
