"""Activation statistics of linear inputs, captured with forward pre-hooks during calibration.

For each observed linear input we keep H = sum over tokens of x x^T (fp32, [K, K], on the inputs'
device; its diagonal is the per-channel energy that drives the reorder, the whole matrix is GPTQ's
Hessian) and max |x| per channel (for smoothing).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def hessian_key(linear: str) -> str:
    """Linears that read the same tensor share one statistics entry, named after one of them."""
    if linear.startswith("self_attn.") and linear != "self_attn.o_proj":
        return "self_attn.q_proj"
    if linear in ("mlp.gate_proj", "mlp.up_proj"):
        return "mlp.gate_proj"
    if linear.endswith(".w3"):
        return linear[:-3] + ".w1"
    return linear


class InputStats:
    """Running statistics of one linear input of K channels.

    With ``full=False`` only the diagonal of H is kept (enough for the reorder; GPTQ needs it all):
    ``h`` is then a diagonal matrix built on first access.
    """

    def __init__(self, k: int, full: bool = True, device: torch.device | str = "cpu"):
        self.full = full
        self._h = torch.zeros(k, k, device=device) if full else torch.zeros(k, device=device)
        self.absmax = torch.zeros(k, dtype=torch.float32, device=device)
        self.tokens = 0

    @property
    def h(self) -> torch.Tensor:
        return self._h if self.full else torch.diag(self._h)

    @property
    def energy(self) -> torch.Tensor:
        """[K] sum over tokens of x^2 per channel (diag H)."""
        return self._h.diagonal() if self.full else self._h

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, K]
        if x.shape[0] == 0:
            return
        if self.full:
            self._h.addmm_(x.t(), x)
        else:
            self._h += x.pow(2).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.tokens += x.shape[0]

    def permute(self, perm: torch.Tensor) -> None:
        self._h = self._h[perm][:, perm] if self.full else self._h[perm]
        self.absmax = self.absmax[perm]

    def scale_channels(self, s: torch.Tensor) -> None:
        """The input becomes x / s (smoothing)."""
        self._h = self._h / s[:, None] / s[None, :] if self.full else self._h / s.pow(2)
        self.absmax = self.absmax / s


@contextmanager
def observe_inputs(layer: nn.Module, linears: list[str], full: bool = True):
    """Collect InputStats (full H or its diagonal) for each distinct hessian_key among ``linears``."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name in {hessian_key(n) for n in linears}:
        module = layer.get_submodule(name)

        def hook(mod, args, name=name):
            x = args[0]
            if name not in stats:
                stats[name] = InputStats(x.shape[-1], full, x.device)
            stats[name].add(x)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def observe_mean_key(attn: nn.Module):
    """Inside the block, add up the keys that ``attn`` (a llama.Attention) would write to its cache;
    yields a function returning their mean so far, fp32 [num_kv_heads, head_dim] on the CPU."""
    total, count = [0.0], [0]

    def observe(k: torch.Tensor) -> None:  # k [B, T, Hkv, D] after RoPE (and the key rotation)
        total[0] = total[0] + k.double().sum(dim=(0, 1))
        count[0] += k.shape[0] * k.shape[1]

    def mean() -> torch.Tensor:
        if not count[0]:
            raise RuntimeError("no keys were observed")
        return (total[0] / count[0]).float().cpu()

    attn.key_observer = observe
    try:
        yield mean
    finally:
        attn.key_observer = None
