"""Offline rotation of a float model (QuaRot-style), done before calibration; the float function is kept.

Three orthogonal transforms, all randomized Hadamard-based (``ref.random_rotation_factors``: random
signs, a Walsh-Hadamard transform over the largest power-of-two factor of the size and a small random
orthogonal mix over the rest, so 576 and 1536 work as well as 4096):

- Q on the residual stream [hidden]: the embedding rows and every linear reading the stream (q/k/v,
  gate/up, the MoE router and experts' w1/w3, lm_head) absorb Q on their input side, every linear
  writing it (o_proj, down_proj / w2) absorbs Q^T on its output side. RMSNorm commutes with Q once its
  weight is folded into the linears that read it (the norm weights become 1; with tied embeddings the
  folded final norm unties lm_head).
- H per attention head on the value path: v_proj's output rows and o_proj's input columns, head by
  head (fused offline: attention mixes tokens, not channels). The INT4 cache then stores rotated values.
  ``QuantConfig.v_rotate`` applies this one alone (``rotate_value_path``) to an unrotated model.
- R on the down_proj input [intermediate]: folded into down_proj's columns here and applied online to
  SiLU(gate) * up at run time (``model.layers.OnlineRotation``), since the nonlinearity sits between.
  ``QuantConfig.down_rotate`` applies this one alone (``rotate_down_input``) to an unrotated model.

Quantizing the rotated tensors spreads outlier channels over all channels, which is what lets one scale
per row and per token (no groups) work at 4 bits.
"""

from __future__ import annotations

import torch

from ..kernels import ref
from ..model.args import ModelArgs

# seeds offsets: one independent rotation per role, all derived from QuantConfig.rotate_seed
_RESIDUAL, _DOWN = 0, 1


def check_rotatable(args: ModelArgs) -> None:
    """Raise ValueError before any work when the model's shapes cannot be rotated (per-head Hadamard)."""
    d = args.head_dim
    if d < 1 or d & (d - 1):
        raise ValueError(f"rotation needs a power-of-two head_dim for the per-head value rotation, got {d}")


def residual_rotation(args: ModelArgs, seed: int) -> torch.Tensor:
    """Q fp32 [hidden, hidden], orthogonal."""
    return ref.rotation_matrix(*ref.random_rotation_factors(args.hidden_size, 2 * seed + _RESIDUAL))


def down_rotation_factors(args: ModelArgs, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs fp32 [I], small fp32 [m, m]) of the online down_proj input rotation (same in every layer)."""
    return ref.random_rotation_factors(args.intermediate_size, 2 * seed + _DOWN)


def _head_blocks(w: torch.Tensor, d: int, h: torch.Tensor, side: str) -> torch.Tensor:
    """Apply the [d, d] rotation h to every head block of w: rows (side 'out': W -> H^T W per head)
    or columns (side 'in': W -> W H per head)."""
    if side == "out":
        n, k = w.shape
        return torch.einsum("ji,hjk->hik", h, w.reshape(n // d, d, k)).reshape(n, k)
    n, k = w.shape
    return torch.einsum("nhj,ji->nhi", w.reshape(n, k // d, d), h).reshape(n, k)


def rotate_value_path(t: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """One layer's tensors (names relative to the layer) with the value path rotated head by head by the
    Hadamard matrix H [head_dim, head_dim]: v_proj's output rows (and bias) become H^T v, o_proj's input
    columns absorb H. The float function is unchanged; the INT4 cache then stores rotated values and
    o_proj reads rotated attention outputs. v_proj / o_proj come back fp32, the rest as given."""
    t = dict(t)
    d = args.head_dim
    v, o = t["self_attn.v_proj.weight"].float(), t["self_attn.o_proj.weight"].float()
    hd = ref.hadamard_matrix(d).float().to(v.device)
    t["self_attn.v_proj.weight"] = _head_blocks(v, d, hd, "out")
    if "self_attn.v_proj.bias" in t:
        t["self_attn.v_proj.bias"] = (t["self_attn.v_proj.bias"].float().reshape(-1, d) @ hd).reshape(-1)
    t["self_attn.o_proj.weight"] = _head_blocks(o, d, hd, "in")
    return t


def rotate_layer(t: dict[str, torch.Tensor], args: ModelArgs, q: torch.Tensor,
                 down: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One decoder layer's float tensors (names relative to the layer) -> the rotated layer's tensors,
    fp32, plus the online rotation's factors ("<mlp>.down_rotation.signs" / ".small")."""
    t = {k: v.float() for k, v in t.items()}
    in_norm, post_norm = t["input_layernorm.weight"], t["post_attention_layernorm.weight"]
    reads = {"input": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "post": []}
    mlps = ([f"block_sparse_moe.experts.{e}" for e in range(args.n_experts)] if args.is_moe else ["mlp"])
    names = ("w1", "w3", "w2") if args.is_moe else ("gate_proj", "up_proj", "down_proj")
    for p in mlps:
        reads["post"] += [f"{p}.{names[0]}", f"{p}.{names[1]}"]
    if args.is_moe:
        reads["post"].append("block_sparse_moe.gate")
    for key, gamma in (("input", in_norm), ("post", post_norm)):
        for n in reads[key]:
            t[f"{n}.weight"] = (t[f"{n}.weight"] * gamma[None, :]) @ q
    t["input_layernorm.weight"] = torch.ones_like(in_norm)
    t["post_attention_layernorm.weight"] = torch.ones_like(post_norm)
    t = rotate_value_path(t, args)  # then o_proj writes the (rotated) residual stream
    t["self_attn.o_proj.weight"] = q.t() @ t["self_attn.o_proj.weight"]
    return rotate_down_input(t, args, down, q)


def rotate_down_input(t: dict[str, torch.Tensor], args: ModelArgs, down: tuple[torch.Tensor, torch.Tensor],
                      q: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One layer's tensors with R (``down``'s factors) folded into every down_proj / w2's input columns
    and the factors added for the online rotation ("<mlp>.down_rotation.signs" / ".small"); with ``q``
    (the residual rotation) down also writes the rotated stream: Q^T W R. Down weights come back fp32."""
    t = dict(t)
    mlps = ([f"block_sparse_moe.experts.{e}" for e in range(args.n_experts)] if args.is_moe else ["mlp"])
    name = "w2" if args.is_moe else "down_proj"
    signs, small = down
    r = ref.rotation_matrix(signs, small)
    for p in mlps:
        w = f"{p}.{name}.weight"
        t[w] = (t[w].float() if q is None else q.t() @ t[w]) @ r
        t[f"{p}.down_rotation.signs"] = signs.clone()
        t[f"{p}.down_rotation.small"] = small.clone()
    return t


def rotate_globals(embed: torch.Tensor, final_norm: torch.Tensor, lm_head: torch.Tensor,
                   q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embedding [vocab, hidden], final norm weight [hidden] and lm_head [vocab, hidden] (the embedding
    itself when tied) -> their rotated fp32 versions; lm_head absorbs the final norm weight."""
    return {
        "model.embed_tokens.weight": embed.float() @ q,
        "model.norm.weight": torch.ones_like(final_norm, dtype=torch.float32),
        "lm_head.weight": (lm_head.float() * final_norm.float()[None, :]) @ q,
    }
