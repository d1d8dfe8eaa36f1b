"""Which linears a decoder layer has, which share an input, and the LinearSpec each gets from a QuantConfig."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QuantConfig
from ..quant import Split, plan_split
from .args import ModelArgs
from .layers import LinearSpec


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the same input, hence share one reorder permutation.

    ``applied_by``: where the permutation is applied at run time: a norm's name (the norm gathers its
    output), the linear's own name (it gathers its input), or "fold:<names>" (folded offline into the
    output rows of the named producer linears, so nothing runs at run time).
    """

    name: str
    linears: tuple[str, ...]
    applied_by: str
    in_features: int


def input_groups(args: ModelArgs, rotate: bool = False) -> list[InputGroup]:
    """The input groups of one decoder layer, in execution order. With ``rotate`` the down_proj input is
    rotated online after SiLU(gate) * up, so its reorder cannot fold into gate/up: down gathers itself."""
    h, i = args.hidden_size, args.intermediate_size
    groups = [
        InputGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", h),
        InputGroup("o", ("self_attn.o_proj",), "self_attn.o_proj", args.n_heads * args.head_dim),
    ]
    if args.is_moe:
        experts = [f"block_sparse_moe.experts.{e}" for e in range(args.n_experts)]
        ups = tuple(f"{p}.{n}" for p in experts for n in ("w1", "w3"))
        groups.append(InputGroup("moe_in", ("block_sparse_moe.gate",) + ups, "post_attention_layernorm", h))
        for p in experts:  # each expert's w2 input order folds into its own w1/w3 rows
            groups.append(InputGroup(f"{p}.down", (f"{p}.w2",), f"{p}.w2" if rotate else f"fold:{p}.w1,{p}.w3", i))
    else:
        groups.append(InputGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", h))
        groups.append(InputGroup("down", ("mlp.down_proj",), "mlp.down_proj" if rotate else
                                 "fold:mlp.gate_proj,mlp.up_proj", i))
    return groups


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int, bool]]:
    """name -> (in_features, out_features, has_bias) for every linear of one layer."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    b = args.attention_bias
    out = {
        "self_attn.q_proj": (h, args.n_heads * d, b),
        "self_attn.k_proj": (h, args.n_kv_heads * d, b),
        "self_attn.v_proj": (h, args.n_kv_heads * d, b),
        "self_attn.o_proj": (args.n_heads * d, h, False),
    }
    if args.is_moe:
        out["block_sparse_moe.gate"] = (h, args.n_experts, False)
        for e in range(args.n_experts):
            p = f"block_sparse_moe.experts.{e}"
            out.update({f"{p}.w1": (h, i, False), f"{p}.w3": (h, i, False), f"{p}.w2": (i, h, False)})
    else:
        out.update({"mlp.gate_proj": (h, i, False), "mlp.up_proj": (h, i, False), "mlp.down_proj": (i, h, False)})
    return out


def is_kept_float(name: str) -> bool:
    """The MoE router stays 16-bit (ATOM.md section 1)."""
    return name.endswith("block_sparse_moe.gate")


def plan_splits(args: ModelArgs, qcfg: QuantConfig) -> dict[str, Split]:
    """Split of each quantized linear's input (identical for every layer)."""
    splits = {}
    n_out = qcfg.n_outliers if qcfg.reorder else 0
    for name, (k, _, _) in linear_shapes(args).items():
        if qcfg.quantizes_linears and not is_kept_float(name):
            splits[name] = plan_split(k, n_out, qcfg.group_size)
    return splits


def layer_specs(args: ModelArgs, qcfg: QuantConfig) -> dict[str, LinearSpec]:
    splits = plan_splits(args, qcfg)
    specs = {}
    for name, (k, n, bias) in linear_shapes(args).items():
        split = splits.get(name)
        if split is None:
            specs[name] = LinearSpec(k, n, bias)
            continue
        specs[name] = LinearSpec(
            k, n, bias, split=split, w_bits=qcfg.w_bits, w_sym=qcfg.w_sym,
            a_bits=qcfg.a_bits, a_clip=qcfg.a_clip, a_levels=qcfg.a_scale_levels, w_levels=qcfg.w_scale_levels,
            own_index=qcfg.reorder and (name == "self_attn.o_proj"
                                        or (qcfg.rotates_down and name.endswith(("down_proj", ".w2")))),
        )
    return specs
