"""Function-preserving rewrites of one decoder layer's float tensors: smoothing and Atom's reorder.

Tensors are a dict with names relative to the layer ("self_attn.q_proj.weight", ...). Each rewrite
keeps the layer's float function unchanged (tested) and updates the statistics to match.
"""

from __future__ import annotations

import torch

from ..model.specs import InputGroup
from .stats import InputStats, hessian_key


def _stat_keys(group: InputGroup) -> set[str]:
    return {hessian_key(n) for n in group.linears}


def smooth_group(tensors: dict[str, torch.Tensor], group: InputGroup, stats: dict[str, InputStats],
                 alpha: float) -> None:
    """SmoothQuant: divide a norm-produced input by s per channel, multiply the weight columns by s.

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha), the W max over every linear of the group. Only
    groups whose input comes from an RMSNorm are smoothed (the norm weight absorbs 1 / s).
    """
    norm = group.applied_by
    if not norm.endswith("layernorm"):
        return
    x_max = stats[hessian_key(group.linears[0])].absmax
    if group.name == "moe_in":  # the router sees every token
        x_max = stats["block_sparse_moe.gate"].absmax
    w_max = torch.stack([tensors[f"{n}.weight"].abs().amax(dim=0).float() for n in group.linears]).amax(dim=0)
    s = (x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
    tensors[f"{norm}.weight"] = (tensors[f"{norm}.weight"].float() / s).to(tensors[f"{norm}.weight"].dtype)
    for n in group.linears:
        w = tensors[f"{n}.weight"]
        tensors[f"{n}.weight"] = (w.float() * s[None, :]).to(w.dtype)
    for key in _stat_keys(group):
        stats[key].scale_channels(s)


def reorder_group(tensors: dict[str, torch.Tensor], group: InputGroup, stats: dict[str, InputStats]) -> torch.Tensor:
    """Sort the group's input channels by energy, ascending (outliers last); returns the permutation.

    The permutation is recorded where it runs: ``<norm>.reorder_index`` or ``<linear>.reorder_index``
    (int32), or folded into the producers' output rows ("fold:a,b").
    """
    key = "block_sparse_moe.gate" if group.name == "moe_in" else hessian_key(group.linears[0])
    perm = torch.argsort(stats[key].energy, stable=True)
    for n in group.linears:
        tensors[f"{n}.weight"] = tensors[f"{n}.weight"][:, perm]
    for k in _stat_keys(group):
        stats[k].permute(perm)
    if group.applied_by.startswith("fold:"):
        for producer in group.applied_by[5:].split(","):
            tensors[f"{producer}.weight"] = tensors[f"{producer}.weight"][perm, :]
            if f"{producer}.bias" in tensors:
                tensors[f"{producer}.bias"] = tensors[f"{producer}.bias"][perm]
    else:
        tensors[f"{group.applied_by}.reorder_index"] = perm.to(torch.int32)
    return perm
